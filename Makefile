# Gemma 4 Unified deployment toolchain. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MODEL ?= tiny
OUT ?= artifacts/$(MODEL)
BACKEND ?= auto
DTYPE ?= bf16
WEIGHT_DTYPE ?=
# make export SPECULATIVE=K: graphs for speculative decoding (docs/speculative.md)
SPECULATIVE ?=
LAYERS ?= 48
MAX_LEN ?=
PROMPT ?=
IDS ?=
MAX_NEW_TOKENS ?= 32
# make generate: CHAT=1|0 (default: chat turn when the tokenizer has one), IMAGE/AUDIO (space-separated files),
# MAX_SOFT_TOKENS=70|140|280|560|1120, sampling TEMPERATURE TOP_K TOP_P SEED
CHAT ?=
IMAGE ?=
AUDIO ?=
MAX_SOFT_TOKENS ?=
TEMPERATURE ?=
TOP_K ?=
TOP_P ?=
SEED ?=
# one shell word, single-quoted
shq = '$(subst ','\'',$(1))'
SRC ?=
PRECISION ?= int8
# INT4 weight-only: input channels per scale (32/64/128; empty: the tool's default, 128 for calibrate, 32 for the
# assistant) and scale choice (awq|rtn)
BLOCK_SIZE ?=
INT4_METHOD ?= awq
CALIB_DATA ?=
HELDOUT_DATA ?=
# make calibrate writes OUT when given on the command line, else <SRC>-<PRECISION>
QOUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),$(SRC)-$(PRECISION))
# make eval reads OUT when given, else the demo artifact (the only kind it can score)
EVAL_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),artifacts/demo)
# make serve serves OUT when given, else the demo artifact (exported and built first when missing)
SERVE_OUT = $(if $(filter command line environment,$(origin OUT)),$(OUT),artifacts/demo)
HOST ?= 127.0.0.1
PORT ?= 8000
MAX_BATCH ?= 8
SERVE_ARGS ?=
# FORCE=1: export/calibrate may replace an OUT that is a non-empty directory but not an artifact (never the source)
FORCE ?=
FORCE_FLAG = $(if $(filter 1 yes true,$(FORCE)),--force)

.PHONY: help demo demo-artifact eval train-demo install export export-assistant build-engine generate serve compare calibrate check-quant gpu-check test bench bench-runtime bench-serve bench-ring bench-12b bench-speculative clean

help:
	@echo "make demo                         install, export the trained demo checkpoint to artifacts/demo, build, answer held-out questions"
	@echo "make eval [OUT=<artifact>]        exact-answer accuracy of a demo artifact (default artifacts/demo) on the held-out split"
	@echo "make train-demo                   train demo/checkpoint further on every task kind (how the shipped one was made; see demo/train.py); python -m demo.train --assistant: the demo assistant"
	@echo "make install                      create $(VENV) with the CPU toolchain (torch 2.13.0 CPU, onnx, onnxruntime, transformers for tests)"
	@echo "make export MODEL=<dir|preset> OUT=<dir> [MAX_LEN=n] [FORCE=1] [SPECULATIVE=K]   export prefill.onnx + decode.onnx into an artifact (SPECULATIVE: verify K drafts per pass)"
	@echo "make export-assistant ASSISTANT=<dir> OUT=<artifact>   add a Gemma 4 assistant (transformers format) to an artifact exported with SPECULATIVE=K, for generate(draft=\"assistant\")"
	@echo "make build-engine OUT=<dir> [BACKEND=auto|onnxruntime|tensorrt] [DTYPE=bf16|fp16|fp32] [ORT_SLIDING=ring|window] [ORT_RING_DECODE=auto|in_place|copy]   build engines (DTYPE: TensorRT Linears; ORT_SLIDING=window: faster ONNX Runtime decode, text and audio only)"
	@echo "make generate OUT=<dir> PROMPT='...' [IMAGE=a.png AUDIO=b.wav CHAT=1|0 MAX_SOFT_TOKENS=70 MAX_NEW_TOKENS=n TEMPERATURE= TOP_K= TOP_P= SEED=]   generate (python -m runtime)"
	@echo "make serve [OUT=<dir>] [HOST=127.0.0.1] [PORT=8000] [MAX_BATCH=8] [SERVE_ARGS=...]   OpenAI-compatible server (python -m runtime.serve; without OUT: the demo artifact, built first if missing)"
	@echo "make compare OUT=<dir>            Polygraphy: ONNX Runtime graphs vs our PyTorch model (random inputs, per-output tolerances)"
	@echo "make calibrate SRC=<fp32 artifact> OUT=<dir> PRECISION=int8|fp8|int4 [BLOCK_SIZE=128] [CALIB_DATA=<dir>]   Q/DQ artifact + accuracy report"
	@echo "make calibrate SRC=<checkpoint dir> OUT=<dir> PRECISION=int8|fp8|int4   the same from a checkpoint, layer by layer (the 12B in < 8 GiB)"
	@echo "make check-quant OUT=<quantized artifact>   Polygraphy: quantized vs fp32 graphs, distribution metrics and targets"
	@echo "make gpu-check [QUICK=1]          on a CUDA machine (no install needed): Triton kernels vs references, timings, TensorRT vs ONNX Runtime -> bench/results/"
	@echo "make test                         install, then run the test suite"
	@echo "make bench                        export time/memory (2.4B-parameter checkpoint), calibration of the demo -> bench/results/"
	@echo "make bench-12b [LAYERS=48] [BENCH_ARGS=--steps ...]   the 12B (or a slice): checkpoint, exports, INT4/INT8/FP8 from the checkpoint, engine, generate -> bench/results/12b.json"
	@echo "make bench-runtime [BENCH_ARGS=--quick]   speed vs onnxruntime-genai and transformers, 234M bench model -> bench/results/runtime.json"
	@echo "make bench-serve [BENCH_ARGS=--quick]     the OpenAI server under concurrent streaming load vs runtime.generate, static batches, onnxruntime-genai's Engine -> bench/results/serve.json"
	@echo "make bench-speculative             speculative decoding: verify pass vs decode step (bench model), the demo pair through runtime.generate, replay drafter -> bench/results/speculative.json"
	@echo "make bench-ring                   one sliding layer's decode step (12B and bench shapes), ring path vs one-token branch -> bench/results/ring_step.json"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,export,serve,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m exporter.export --model demo/checkpoint --out artifacts/demo --max-len 256
	$(PY) -m graphs.build --artifact artifacts/demo --backend auto
	$(PY) -m demo.evaluate --artifact artifacts/demo --n 20 --show 2

# the demo artifact, exported and built only when it is not there yet (make serve's default)
demo-artifact: $(STAMP)
	@test -f artifacts/demo/manifest.json || { $(PY) -m exporter.export --model demo/checkpoint --out artifacts/demo --max-len 256 && \
		$(PY) -m graphs.build --artifact artifacts/demo --backend auto; }

eval: $(STAMP)
	$(PY) -m demo.evaluate --artifact $(EVAL_OUT)

train-demo: $(STAMP)
	$(PY) -m demo.train --out demo/checkpoint --init demo/checkpoint --focus continue --steps 700 --lr 1e-3

export: $(STAMP)
	$(PY) -m exporter.export --model $(MODEL) --out $(OUT) $(if $(MAX_LEN),--max-len $(MAX_LEN)) $(FORCE_FLAG)$(if $(WEIGHT_DTYPE), --weight-dtype $(WEIGHT_DTYPE))$(if $(SPECULATIVE), --speculative $(SPECULATIVE))

# Not in `make help` yet: tests/test_readme.py wants every help target named in README.md (see docs/speculative.md)
# PRECISION=fp32 (default here, whatever PRECISION defaults to for calibrate) | int8 (calib.assistant_int8, CALIB_DATA)
# | int4 (calib.assistant_int4, BLOCK_SIZE, INT4_METHOD=awq|rtn: AWQ on drafting rounds by default, CALIB_DATA)
ASSISTANT_PRECISION = $(if $(filter command line environment,$(origin PRECISION)),$(PRECISION),fp32)
ASSISTANT_MODULE = $(if $(filter int8,$(ASSISTANT_PRECISION)),calib.assistant_int8,$(if $(filter int4,$(ASSISTANT_PRECISION)),calib.assistant_int4,exporter.export_assistant))
export-assistant: $(STAMP)
	@case "$(ASSISTANT_PRECISION)" in fp32|int8|int4) ;; *) echo "make export-assistant: PRECISION=$(ASSISTANT_PRECISION); expected fp32, int8 or int4" >&2; exit 2;; esac
	@case "$(ASSISTANT_PRECISION):$(INT4_METHOD)" in int4:awq|int4:rtn|fp32:*|int8:*) ;; *) echo "make export-assistant: INT4_METHOD=$(INT4_METHOD); expected awq or rtn" >&2; exit 2;; esac
	$(PY) -m $(ASSISTANT_MODULE) --assistant $(ASSISTANT) --artifact $(OUT)$(if $(and $(filter int4,$(ASSISTANT_PRECISION)),$(BLOCK_SIZE)), --block-size $(BLOCK_SIZE))$(if $(filter int4,$(ASSISTANT_PRECISION)), --int4-method $(INT4_METHOD))$(if $(and $(filter int8 int4:awq,$(ASSISTANT_PRECISION) $(ASSISTANT_PRECISION):$(INT4_METHOD)),$(CALIB_DATA)), --data $(CALIB_DATA))
	$(PY) -m graphs.ort.assistant --artifact $(OUT) --if-engine
	$(PY) -m graphs.trt_assistant --artifact $(OUT) --if-engine

build-engine: $(STAMP)
	$(PY) -m graphs.build --artifact $(OUT) --backend $(BACKEND) --dtype $(DTYPE) \
		$(if $(INT8_KERNEL),--int8-kernel $(INT8_KERNEL)) $(if $(FP8_ACTIVATIONS),--fp8-activations $(FP8_ACTIVATIONS)) \
		$(if $(ORT_SLIDING),--ort-sliding $(ORT_SLIDING)) $(if $(ORT_RING_DECODE),--ort-ring-decode $(ORT_RING_DECODE))

# PROMPT reaches the CLI verbatim through the environment: neither make nor the shell expands it.
generate: override export PROMPT := $(value PROMPT)
generate: $(STAMP)
	$(PY) -m runtime --artifact $(call shq,$(OUT)) --max-new-tokens $(call shq,$(MAX_NEW_TOKENS)) \
	  $(if $(value PROMPT),--prompt-env PROMPT)$(if $(IDS),--ids=$(call shq,$(IDS))) \
	  $(if $(filter 1 yes true,$(CHAT)),--chat)$(if $(filter 0 no false,$(CHAT)),--no-chat) \
	  $(foreach f,$(IMAGE),--image $(call shq,$(f))) $(foreach f,$(AUDIO),--audio $(call shq,$(f))) \
	  $(if $(MAX_SOFT_TOKENS),--max-soft-tokens $(call shq,$(MAX_SOFT_TOKENS))) \
	  $(if $(TEMPERATURE),--temperature $(call shq,$(TEMPERATURE))) $(if $(TOP_K),--top-k $(call shq,$(TOP_K))) \
	  $(if $(TOP_P),--top-p $(call shq,$(TOP_P))) $(if $(SEED),--seed $(call shq,$(SEED)))

serve: $(STAMP) $(if $(filter command line environment,$(origin OUT)),,demo-artifact)
	$(PY) -m runtime.serve $(call shq,$(SERVE_OUT)) --host $(call shq,$(HOST)) --port $(call shq,$(PORT)) \
		--max-batch $(call shq,$(MAX_BATCH)) $(SERVE_ARGS)

compare: $(STAMP)
	$(PY) -m exporter.compare --artifact $(OUT)

calibrate: $(STAMP)
	@test -n "$(SRC)" || { echo "make calibrate: set SRC=<fp32 artifact or checkpoint dir> (and OUT=<new artifact> PRECISION=int8|fp8|int4)" >&2; exit 2; }
	$(PY) -m calib.calibrate --src $(SRC) --out $(QOUT) --precision $(PRECISION) $(if $(CALIB_DATA),--data $(CALIB_DATA)) $(FORCE_FLAG) \
		$(if $(filter int4,$(PRECISION)),$(if $(BLOCK_SIZE),--block-size $(BLOCK_SIZE)) --int4-method $(INT4_METHOD))
	$(if $(wildcard $(SRC)/manifest.json),$(PY) -m calib.report --artifact $(QOUT) $(if $(HELDOUT_DATA),--data $(HELDOUT_DATA)),@echo "make calibrate: $(SRC) is a checkpoint, so there is no fp32 artifact to report against: python -m calib.report --artifact $(QOUT) --reference <fp32 artifact of it>")

check-quant: $(STAMP)
	$(PY) -m calib.check --artifact $(OUT) $(if $(HELDOUT_DATA),--data $(HELDOUT_DATA))

# No install step: a GPU machine's own python with torch (CUDA) and triton is enough (QUICK=1: about 2 minutes).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bench/gpu_check.py $(if $(QUICK),--quick)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/export_memory.py
	$(PY) bench/calibrate_demo.py

bench-12b: $(STAMP)
	nice -n 10 $(PY) bench/bench_12b.py --layers $(LAYERS) $(BENCH_ARGS)

# Installs the optional `bench` extra (onnxruntime-genai) on first use; BENCH_ARGS e.g. --quick, --reuse, --only 1,3
bench-ring: $(STAMP)
	$(PY) bench/ring_step.py

# not in `make help` yet: tests/test_readme.py wants every help target named in README.md (docs/speculative.md has it)
bench-speculative: $(STAMP)
	$(PY) bench/speculative.py $(BENCH_ARGS)

bench-runtime: $(STAMP)
	@$(PY) -c "import onnxruntime_genai" 2>/dev/null || $(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/runtime.py $(BENCH_ARGS)

# Installs the optional `bench` extra (onnxruntime-genai) on first use; BENCH_ARGS e.g. --quick, --no-window, --reuse
bench-serve: $(STAMP)
	@$(PY) -c "import onnxruntime_genai" 2>/dev/null || $(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/serve.py $(BENCH_ARGS)

clean:
	rm -rf artifacts .pytest_cache
