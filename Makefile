# Gemma 4 Unified deployment toolchain. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= tiny
OUT ?= artifacts/$(MODEL)
BACKEND ?= auto
MAX_LEN ?=
PROMPT ?=
IDS ?=
MAX_NEW_TOKENS ?= 32

.PHONY: help demo eval train-demo install export build-engine generate compare test bench clean

help:
	@echo "make demo                         install, export the trained demo checkpoint to artifacts/demo, build, answer held-out questions"
	@echo "make eval OUT=<artifact>          exact-answer accuracy of a demo artifact on the held-out split"
	@echo "make train-demo                   retrain demo/checkpoint from scratch (about 20 minutes on 2 CPU cores)"
	@echo "make install                      create $(VENV) with the CPU toolchain (torch 2.13.0 CPU, onnx, onnxruntime, transformers for tests)"
	@echo "make export MODEL=<dir|preset> OUT=<dir> [MAX_LEN=n]   export prefill.onnx + decode.onnx into an artifact"
	@echo "make build-engine OUT=<dir> [BACKEND=auto|onnxruntime|tensorrt]   build engines for the artifact"
	@echo "make generate OUT=<dir> PROMPT='...' [MAX_NEW_TOKENS=n]   generate with runtime.generate"
	@echo "make compare OUT=<dir>            Polygraphy: ONNX Runtime graphs vs our PyTorch model (random inputs, per-output tolerances)"
	@echo "make test                         install, then run the test suite"
	@echo "make bench                        export time and peak memory from a 2.4B-parameter checkpoint -> bench/results/"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,export,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m exporter.export --model demo/checkpoint --out artifacts/demo --max-len 256
	$(PY) -m graphs.build --artifact artifacts/demo --backend auto
	$(PY) -m demo.evaluate --artifact artifacts/demo --n 20 --show 2

eval: $(STAMP)
	$(PY) -m demo.evaluate --artifact $(OUT)

train-demo: $(STAMP)
	$(PY) -m demo.train --out demo/checkpoint

export: $(STAMP)
	$(PY) -m exporter.export --model $(MODEL) --out $(OUT) $(if $(MAX_LEN),--max-len $(MAX_LEN))

build-engine: $(STAMP)
	$(PY) -m graphs.build --artifact $(OUT) --backend $(BACKEND)

generate: $(STAMP)
	$(PY) -m runtime --artifact $(OUT) --max-new-tokens $(MAX_NEW_TOKENS) $(if $(PROMPT),--prompt "$(PROMPT)")$(if $(IDS),--ids $(IDS))

compare: $(STAMP)
	$(PY) -m exporter.compare --artifact $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/export_memory.py

clean:
	rm -rf artifacts .pytest_cache
