"""The shipped demo pair (``demo/checkpoint`` and the distilled ``demo/assistant``) through our runtime: exported with
``--speculative K`` (K = the assistant's ``num_assistant_tokens``) and ``exporter.export_assistant`` (with its loop
form, as ``make export-assistant`` writes it), ONNX Runtime engine.  On held-out ``continue`` questions, ``draft="assistant"`` gives plain greedy's tokens (the reference:
`runtime.generate` without drafts) and the target accepts at least half of the drafts (a real acceptance check on the
trained pair: transformers measured 0.87 on this task, bench/results/speculative_demo.json).  The same with the
assistant quantized to INT8 (`calib.assistant_int8`, calibrated on drafting rounds of the built-in ``assistant``
prompts): greedy tokens exact, acceptance within 3 points of the fp32 assistant's on the same questions.  And with
the assistant INT4, AWQ calibrated on the same drafting rounds (`calib.assistant_int4`, the default method): the
same graph form as round-to-nearest's (int4 DequantizeLinear -> MatMul, fused by ONNX Runtime into MatMulNBits,
plus the AWQ input Muls), greedy tokens exact, acceptance within 3 points of fp32's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import runtime
from demo.tasks import examples, prompt_text
from runtime.speculative.verify import SpecStats

ROOT = Path(__file__).resolve().parents[1]
K = json.loads((ROOT / "demo" / "assistant" / "generation_config.json").read_text())["num_assistant_tokens"]


@pytest.fixture(scope="session")
def demo_pair(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-pair") / "artifact"
    for args in (["-m", "exporter.export", "--model", "demo/checkpoint", "--out", str(out), "--max-len", "256",
                  "--speculative", str(K)],
                 ["-m", "graphs.build", "--artifact", str(out), "--backend", "onnxruntime"],
                 ["-m", "exporter.export_assistant", "--assistant", "demo/assistant", "--artifact", str(out)],
                 ["-m", "graphs.ort.assistant", "--artifact", str(out), "--if-engine"]):  # as make export-assistant
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT, capture_output=True)
    return out


def _acceptance(model, questions, *, min_tokens: int = 0) -> SpecStats:
    """Greedy with the assistant's drafts equals plain greedy on every question (each plain answer at least
    ``min_tokens`` long); the drafting statistics."""
    stats = SpecStats()
    for ex in questions:
        plain = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0)
        spec = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0, draft="assistant",
                                num_draft_tokens=K, spec_stats=stats)
        assert spec.tokens == plain.tokens, ex.question
        assert len(plain.tokens) >= min_tokens, ex.question
    return stats


def test_demo_assistant_keeps_greedy_and_is_accepted(demo_pair):
    model = runtime.load(demo_pair, backend="onnxruntime")
    assert model.assistant_runner().loop is not None  # K drafts per call (graphs.ort.assistant)
    questions = [ex for ex in examples("heldout", 60, seed=0) if ex.kind == "continue"][:4]
    assert len(questions) == 4
    stats = _acceptance(model, questions, min_tokens=21)  # long answers: several rounds of drafts
    assert stats.drafted >= 4 * 3 * K
    assert stats.acceptance >= 0.5, (stats.accepted, stats.drafted)


@pytest.fixture(scope="session")
def demo_pair_int8(demo_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo-pair-int8") / "artifact"
    shutil.copytree(demo_pair, out)
    subprocess.run([sys.executable, "-m", "calib.assistant_int8", "--assistant", "demo/assistant", "--artifact",
                    str(out)], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, "-m", "graphs.ort.assistant", "--artifact", str(out), "--if-engine"], check=True,
                   cwd=ROOT, capture_output=True)
    return out


def test_int8_demo_assistant_keeps_greedy_and_acceptance(demo_pair, demo_pair_int8):
    questions = [ex for ex in examples("heldout", 100, seed=0) if ex.kind == "continue"][8:14]
    manifest = json.loads((demo_pair_int8 / "manifest.json").read_text())
    rec = manifest["assistant"]
    assert rec["precision"].startswith("int8") and rec["quantization"]["draft_steps"] > 100
    assert rec["engines"]["onnxruntime"]["file"] in manifest["files"]
    from runtime.assistant import ort_graph

    assert rec["loop"]["from"] == ort_graph(rec)[0]  # the loop form of the step form this CPU runs
    int8_bytes = sum((demo_pair_int8 / f).stat().st_size for f in manifest["files"] if f.endswith(".int8.data"))
    fp32_bytes = sum((demo_pair / f).stat().st_size for f in json.loads((demo_pair / "manifest.json").read_text())[
        "files"] if f.startswith("assistant/") and f.endswith(".data"))
    assert int8_bytes < 0.3 * fp32_bytes, (int8_bytes, fp32_bytes)  # int8 weights: a quarter, plus scales
    int8 = _acceptance(runtime.load(demo_pair_int8, backend="onnxruntime"), questions)
    fp32 = _acceptance(runtime.load(demo_pair, backend="onnxruntime"), questions)
    assert int8.drafted >= 6 * 3 * K
    assert int8.acceptance >= fp32.acceptance - 0.03, (int8.accepted, int8.drafted, fp32.accepted, fp32.drafted)


def test_prompt_lookup_copies_the_repeated_terms(demo_pair):
    """``continue`` answers whose last terms repeat the prompt's (>= 10 given): prompt lookup, K fixed and "auto",
    gives plain greedy's tokens, drafts nothing while the answer's terms are new (its separator is ambiguous, the
    new terms are not in the prompt) and has most drafts accepted once they repeat; the plain answer says which
    tokens repeat, the reference for what can be drafted."""
    model = runtime.load(demo_pair, backend="onnxruntime")
    questions = [ex for ex in examples("heldout", 200, seed=0)
                 if ex.kind == "continue" and ex.question.count(",") + 1 >= 10][:4]
    assert len(questions) == 4
    for k in (K, "auto"):
        stats = SpecStats()
        passes = tokens = 0
        for ex in questions:
            plain = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0)
            before = stats.verify_calls + stats.decode_steps
            spec = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0,
                                    draft="prompt_lookup", num_draft_tokens=k, spec_stats=stats)
            assert spec.tokens == plain.tokens, (k, ex.question)
            passes += stats.verify_calls + stats.decode_steps - before
            tokens += len(plain.tokens) - 1
        assert stats.acceptance >= 0.9, (k, stats.accepted, stats.drafted)
        assert tokens / passes >= 2.0, (k, tokens, passes)  # >= 10 of 19 terms copied: long runs in few passes


def _assistant_int4(demo_pair, out: Path, method: str) -> Path:
    shutil.copytree(demo_pair, out)
    subprocess.run([sys.executable, "-m", "calib.assistant_int4", "--assistant", "demo/assistant", "--artifact",
                    str(out), "--int4-method", method], check=True, cwd=ROOT, capture_output=True)
    subprocess.run([sys.executable, "-m", "graphs.ort.assistant", "--artifact", str(out), "--if-engine"], check=True,
                   cwd=ROOT, capture_output=True)
    return out


def _fused_ops(graph: Path, tmp: Path) -> Counter:
    """Op types of ``graph`` after ONNX Runtime's optimiser (what its session runs)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp / f"{graph.parent.parent.name}-optimized.onnx")
    ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node)


def test_int4_awq_demo_assistant_form_keeps_greedy_and_acceptance(demo_pair, tmp_path_factory):
    import onnx

    tmp = tmp_path_factory.mktemp("demo-pair-int4")
    arts = {m: _assistant_int4(demo_pair, tmp / m, m) for m in ("awq", "rtn")}
    manifests = {m: json.loads((a / "manifest.json").read_text()) for m, a in arts.items()}
    rec = manifests["awq"]["assistant"]
    assert rec["precision"].startswith("int4") and "AWQ" in rec["precision"]
    assert rec["quantization"]["method"] == "awq" and rec["quantization"]["draft_steps"] > 100
    assert rec["quantization"]["scales"] in manifests["awq"]["files"] and "loop" in rec
    steps = {m: a / rec["file"] for m, a in arts.items()}
    written = {m: Counter(n.op_type for n in onnx.load(str(p), load_external_data=False).graph.node)
               for m, p in steps.items()}
    linears = rec["quantization"]["linears"]
    assert written["awq"]["DequantizeLinear"] == written["rtn"]["DequantizeLinear"] == linears == 13
    assert written["awq"] - written["rtn"] == Counter(Mul=3)  # pre_projection's and the two o_projs' AWQ Muls
    fused = {m: _fused_ops(p, tmp) for m, p in steps.items()}
    assert fused["awq"]["MatMulNBits"] == fused["rtn"]["MatMulNBits"] == linears
    assert "DequantizeLinear" not in fused["awq"] and fused["awq"] - fused["rtn"] == Counter(Mul=3)
    questions = [ex for ex in examples("heldout", 100, seed=0) if ex.kind == "continue"][8:14]
    model = runtime.load(arts["awq"], backend="onnxruntime")
    assert model.assistant_runner().loop is not None
    awq = _acceptance(model, questions)
    fp32 = _acceptance(runtime.load(demo_pair, backend="onnxruntime"), questions)
    assert awq.drafted >= 6 * 3 * K
    assert awq.acceptance >= fp32.acceptance - 0.03, (awq.accepted, awq.drafted, fp32.accepted, fp32.drafted)
