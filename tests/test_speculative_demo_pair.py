"""The shipped demo pair (``demo/checkpoint`` and the distilled ``demo/assistant``) through our runtime: exported with
``--speculative K`` (K = the assistant's ``num_assistant_tokens``) and ``exporter.export_assistant``, ONNX Runtime
engine.  On held-out ``continue`` questions, ``draft="assistant"`` gives plain greedy's tokens (the reference:
`runtime.generate` without drafts) and the target accepts at least half of the drafts (a real acceptance check on the
trained pair: transformers measured 0.87 on this task, bench/results/speculative_demo.json)."""

from __future__ import annotations

import json
import subprocess
import sys
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
                 ["-m", "exporter.export_assistant", "--assistant", "demo/assistant", "--artifact", str(out)]):
        subprocess.run([sys.executable, *args], check=True, cwd=ROOT, capture_output=True)
    return out


def test_demo_assistant_keeps_greedy_and_is_accepted(demo_pair):
    model = runtime.load(demo_pair, backend="onnxruntime")
    questions = [ex for ex in examples("heldout", 60, seed=0) if ex.kind == "continue"][:4]
    assert len(questions) == 4
    stats = SpecStats()
    for ex in questions:
        plain = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0)
        spec = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0, draft="assistant",
                                num_draft_tokens=K, spec_stats=stats)
        assert spec.tokens == plain.tokens, ex.question
        assert len(plain.tokens) > 20  # a long answer: several rounds of drafts
    assert stats.drafted >= 4 * 3 * K
    assert stats.acceptance >= 0.5, (stats.accepted, stats.drafted)


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
