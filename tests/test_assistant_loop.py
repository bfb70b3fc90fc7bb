"""The assistant's ONNX Runtime loop form (`graphs.ort.assistant`: K drafts in one call) as an artifact part: what
`make build-engine` and `make export-assistant` do with it, how it goes stale, and its INT4 form.

Its drafts are checked against transformers and our PyTorch assistant in tests/test_assistant_runtime.py (the
``drafting_artifact`` fixture runs those tests on both forms) and through `runtime.generate` in
tests/test_speculative_generate.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from exporter.export_assistant import export_assistant
from graphs.build import build_engine
from graphs.ort.assistant import DIR, FILE, add_ort_assistant
from runtime.assistant import AssistantRunner
from runtime.manifest import read_manifest
from tests.assistant_ref import reference_pair

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assistant_dir(workdir):
    return reference_pair("tiny-assistant", workdir)[3]


@pytest.fixture(scope="module")
def exported(artifact_store, assistant_dir, tmp_path_factory):
    """The tiny artifact (its ONNX Runtime engine built) with the tiny assistant exported after the engine."""
    out = tmp_path_factory.mktemp("loop") / "artifact"
    shutil.copytree(artifact_store("tiny"), out)
    export_assistant(assistant_dir, out, log=lambda *_: None)
    return out


@pytest.fixture
def artifact(artifact_store, tmp_path):
    out = tmp_path / "artifact"
    shutil.copytree(artifact_store("tiny"), out)
    return out


@pytest.fixture
def with_assistant(exported, tmp_path):
    out = tmp_path / "with-assistant"
    shutil.copytree(exported, out)
    return out


def _cache(runner: AssistantRunner, manifest: dict, batch: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for spec in manifest["graphs"]["decode"]["inputs"]:
        if spec["name"].startswith(("past_key_", "past_value_")):
            shape = [batch if d == "batch" else (40 if isinstance(d, str) else d) for d in spec["shape"]]
            out.append(rng.standard_normal(shape).astype(np.float32))
    return out


def _body(path) -> tuple[list[str], list[str]]:
    """(outer graph op types, loop body op types) of a saved loop form."""
    g = onnx.load(str(path), load_external_data=False).graph
    loop = [n for n in g.node if n.op_type == "Loop"]
    assert len(loop) == 1
    return [n.op_type for n in g.node], [n.op_type for n in loop[0].attribute[0].g.node]


def test_build_engine_writes_the_loop_form(with_assistant):
    """build-engine on an artifact with an assistant writes ``ort-assistant/`` and records it with the step graph's
    sha256; the work that does not change between a round's drafts (masks, rotary tables) is outside the body."""
    artifact = with_assistant
    assert "loop" not in read_manifest(artifact)["assistant"]  # the engine was built before the assistant
    manifest = build_engine(artifact, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)
    record = manifest["assistant"]["loop"]
    assert record["file"] == FILE and record["from"] == "assistant/assistant.onnx"
    assert record["from_sha256"] == manifest["files"]["assistant/assistant.onnx"]
    assert sorted(p.name for p in (artifact / DIR).iterdir()) == ["assistant.onnx", "assistant.onnx.data"]
    outer, body = _body(artifact / FILE)
    step = [n.op_type for n in onnx.load(str(artifact / "assistant/assistant.onnx"), load_external_data=False).graph.node]
    assert body.count("Softmax") == step.count("Softmax") > 0  # every assistant layer's attention, per draft
    assert "Sin" in outer and "Sin" not in body and "Range" not in body  # rotary table and masks: once per round
    assert "ReduceMean" not in body  # RMSNorms fused


def test_stale_loop_form_is_not_used(with_assistant, assistant_dir):
    """Re-exporting the assistant removes the loop form and its record (the runner then drafts step by step, and
    the artifact still verifies); a loop form whose source hash differs from the step graph's is not loaded."""
    artifact = with_assistant
    add_ort_assistant(artifact, log=lambda *_: None)
    manifest = read_manifest(artifact)
    assert AssistantRunner(artifact, manifest).loop is not None
    stale = dict(manifest, assistant=dict(manifest["assistant"],
                                          loop=dict(manifest["assistant"]["loop"], from_sha256="0" * 64)))
    assert AssistantRunner(artifact, stale).loop is None
    export_assistant(assistant_dir, artifact, log=lambda *_: None)
    manifest = read_manifest(artifact)  # verifies every listed file
    assert "loop" not in manifest["assistant"] and not (artifact / DIR).exists()
    assert AssistantRunner(artifact, manifest).loop is None


def test_cli_refusals_and_if_engine(artifact, with_assistant):
    """``python -m graphs.ort.assistant``: an artifact without an assistant is refused (exit 2, one error line, the
    artifact unchanged); ``--if-engine`` on an artifact without an ONNX Runtime engine says so and writes nothing."""
    before = (artifact / "manifest.json").read_bytes()
    run = subprocess.run([sys.executable, "-m", "graphs.ort.assistant", "--artifact", str(artifact)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 2 and "has no assistant" in run.stderr and "Traceback" not in run.stderr
    assert (artifact / "manifest.json").read_bytes() == before and not (artifact / DIR).exists()
    manifest = read_manifest(with_assistant)
    (with_assistant / "manifest.json").write_text(__import__("json").dumps(dict(manifest, engines={})))
    run = subprocess.run([sys.executable, "-m", "graphs.ort.assistant", "--artifact", str(with_assistant),
                          "--if-engine"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "no ONNX Runtime engine" in run.stdout
    assert not (with_assistant / DIR).exists()


def test_int4_loop_form_keeps_matmulnbits_in_the_body(artifact, assistant_dir):
    """An INT4 assistant's weight DequantizeLinear nodes stay beside their MatMuls in the body (not hoisted into
    the once-per-round part), so ONNX Runtime fuses each pair into MatMulNBits: no fp32 copy of a weight is made
    per round; its drafts equal the INT4 step graph's (tokens; logits within 1e-4 of their range)."""
    import functools

    from calib.assistant_int4 import quantize_int4

    export_assistant(assistant_dir, artifact, rewrite=functools.partial(quantize_int4, block_size=16),
                     precision="int4", log=lambda *_: None)
    manifest = add_ort_assistant(artifact, log=lambda *_: None)
    outer, body = _body(artifact / FILE)
    assert "DequantizeLinear" not in outer + body and "MatMul" not in outer
    assert body.count("MatMulNBits") >= 10
    loop = AssistantRunner(artifact, manifest)
    step = AssistantRunner(artifact, dict(manifest, assistant={k: v for k, v in manifest["assistant"].items()
                                                               if k != "loop"}))
    assert loop.loop is not None and step.loop is None
    cache = _cache(step, manifest, 2, 0)
    hidden = np.random.default_rng(1).standard_normal((2, manifest["model_config"]["text"]["hidden_size"]))
    a = loop.draft(cache, [5, 9], hidden.astype(np.float32), [30, 21], 4)
    b = step.draft(cache, [5, 9], hidden.astype(np.float32), [30, 21], 4)
    assert a.tokens.tolist() == b.tokens.tolist()
    span = float(b.logits.max() - b.logits.min())
    assert float(np.abs(a.logits - b.logits).max()) <= 1e-4 * span
