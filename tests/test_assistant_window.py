"""The assistant on ONNX Runtime's window engine (``--ort-sliding window``): GroupQueryAttention's compacting sliding
cache (C = W + 4 slots here, so it compacts every 5 tokens) instead of rings.

Expected values come from elsewhere than the window path: the ring engine's drafts on the same sequence (same calls,
same tokens, same positions), transformers' candidate generator on the accepted tokens (`tests.assistant_ref`), and
plain greedy decoding on the same engine.  Checked: drafts through many compactions, the entry a compaction drops
that the next round still reads (kept by `AssistantRunner.evicting`; without it the first draft's logits move),
`runtime.generate(draft="assistant")` equal to plain greedy with the step graph and the loop form, and an assistant
graph from before the ``sliding_offset`` input: still run on the ring form, refused on the window form."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

import runtime
from exporter.config import PRESETS
from exporter.export import export_artifact
from exporter.export_assistant import export_assistant
from exporter.stream import fake_model
from graphs.build import build_engine
from runtime.assistant import OFFSET, AssistantRunner
from runtime.errors import InputError
from runtime.manifest import ArtifactError, read_manifest, write_manifest
from runtime.ort_attention import window_offset
from runtime.prompt import PrefillInputs
from runtime.speculative import verify as spec
from tests.assistant_ref import prompt, record_rounds, reference_pair

PRESET, K, MAX_LEN, SLACK = "tiny", 3, 200, 4
W = PRESETS[PRESET].text.sliding_window


@pytest.fixture(scope="module")
def ring_artifact(reference_store, workdir, tmp_path_factory):
    """The tiny target exported with --speculative K, its ring engine, the tiny assistant (same target weights)."""
    _, ckpt = reference_store(PRESET)
    out = tmp_path_factory.mktemp("asstring") / "artifact"
    export_artifact(fake_model(PRESETS[PRESET]), out, max_len=MAX_LEN, source={"checkpoint": str(ckpt)},
                    weights_from=ckpt, speculative=K, log=lambda *_: None)
    *_, assistant_dir = reference_pair("tiny-assistant", workdir)
    export_assistant(assistant_dir, out, log=lambda *_: None)
    build_engine(out, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)  # + the assistant's loop
    return out


@pytest.fixture(scope="module")
def window_artifact(ring_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("asstwin") / "artifact"
    shutil.copytree(ring_artifact, out)
    build_engine(out, "onnxruntime", ort_sliding="window", ort_sliding_slack=SLACK, log=lambda *_: None)
    return out


def _runner(model, form: str) -> AssistantRunner:
    runner = model.assistant_runner()
    assert runner.loop is not None, "build-engine writes the assistant's loop form"
    if form == "step":  # the step graph called K times (an artifact without the loop form)
        runner.loop = None
    return runner


@pytest.mark.parametrize("form", ["loop", "step"])
def test_window_drafts_equal_ring_drafts_and_transformers(ring_artifact, window_artifact, workdir, form):
    """Both engines run the same calls (a prefill of 2 W + 3 tokens, then a verify per round of the newest token and
    the window runner's drafts, as many as the window engine takes there); every round the window runner's drafts
    equal the ring runner's on the ring engine's caches (first-step logits within 1e-4 of the range), through 8+
    compactions.  In the rounds right after a call that compacted (its query one past that call's first token:
    no draft accepted, so it reads the entry the compaction dropped) and in two other rounds, they equal
    transformers' candidate generator on the accepted tokens; there, without the kept entry, the range starts one
    later and the first draft's logits move beyond the tolerance."""
    target, ref, _, _ = reference_pair("tiny-assistant", workdir)
    win, ring = runtime.load(window_artifact, backend="onnxruntime"), runtime.load(ring_artifact, backend="onnxruntime")
    rw, rr = _runner(win, form), _runner(ring, form)
    c = win.backend.sliding_slots
    assert c == W + SLACK and rw.sliding_slots == c and rr.sliding_slots is None
    seq = prompt(2 * W + 3, 11)
    caches, first = {}, set()
    for name, m in (("win", win), ("ring", ring)):
        caches[name] = m.backend.new_cache(1, MAX_LEN)
        logits = m.backend.prefill(PrefillInputs(np.array([seq]), np.array([0]), np.array([len(seq)])), caches[name])
        first.add(int(logits[0].argmax()))
    assert len(first) == 1
    seq.append(first.pop())
    hidden, written, evicted, compacted_at, checks = None, len(seq) - 1, None, None, []
    while len(seq) < 2 * W + 3 + 8 * (SLACK + 1) + 4:
        p, k = len(seq) - 1, min(K, win.backend.verify_tokens([len(seq) - 1]) - 1)
        drafts = []
        if hidden is not None and k >= 1:
            got = rw.draft(caches["win"], [seq[-1]], hidden["win"][None], [p], k, written=[written], evicted=evicted)
            want = rr.draft(caches["ring"], [seq[-1]], hidden["ring"][None], [p], k, written=[written])
            assert got.tokens.tolist() == want.tokens.tolist(), f"position {p}"
            span = float(np.ptp(want.logits[0, 0]))
            err = float(np.abs(got.logits[0, 0] - want.logits[0, 0]).max())
            assert err <= 1e-4 * span, f"position {p}: first-step logits {err:.3g} off (range {span:.3g})"
            drafts = got.tokens[0].tolist()
            if compacted_at is not None and p == compacted_at + 1:
                bare = rw.draft(caches["win"], [seq[-1]], hidden["win"][None], [p], k, written=[written])
                checks.append((p, list(seq), drafts, float(np.abs(bare.logits[0, 0] - got.logits[0, 0]).max()) / span))
            elif p in (2 * W + 5, 2 * W + 13):
                checks.append((p, list(seq), drafts, None))
        evicted = rw.evicting(caches["win"], [p])
        compacted_at = p if window_offset(p + 1, W, c) > window_offset(p, W, c) else None
        assert (evicted is not None) == (compacted_at is not None)
        ids = np.array([[seq[-1], *drafts]], np.int64)
        out = {name: m.backend.verify(ids, [p], caches[name]) for name, m in (("win", win), ("ring", ring))}
        choice = out["win"][0][0].argmax(-1).tolist()
        assert choice == out["ring"][0][0].argmax(-1).tolist()
        n = next((i for i, d in enumerate(drafts) if d != choice[i]), len(drafts))
        seq += drafts[:n] + [choice[n]]
        hidden = {name: np.array(o[1][0, n]) for name, o in out.items()}
        written = max(written, p + 1 + len(drafts))
    assert window_offset(len(seq) - 1, W, c) >= 8 * (SLACK + 1)  # 8 compactions at least
    after = [x for x in checks if x[3] is not None]
    assert len(after) >= 3, f"only {len(after)} rounds right after a compaction"
    for p, upto, drafts, moved in checks:
        _, rounds = record_rounds(target, ref, upto[:-1], num_draft=len(drafts), max_new_tokens=len(drafts) + 2)
        r = rounds[0]
        assert r.input_ids == upto, f"position {p}: transformers' round starts elsewhere"
        assert drafts == r.drafts, f"position {p}: window engine {drafts}, transformers {r.drafts}"
        if moved is not None:  # beyond the tolerance of the equality above (seen: 1.2e-3 to 8.4e-2)
            assert moved > 1e-4, f"position {p}: without the kept entry the logits moved only {moved:.3g}"
    assert max(m for *_, m in after) > 1e-2


def _generate_equal(model, monkeypatch, k_values=(1, K), rows=2):
    """runtime.generate with the assistant equals plain greedy on the same engine (batch of ``rows`` <= 2, text
    several windows long); returns how many rounds read a kept entry."""
    used = []
    original = AssistantRunner.draft

    def spy(self, cache, *args, evicted=None, **kw):
        if evicted is not None:
            used.append(int(evicted.position[0]))
        return original(self, cache, *args, evicted=evicted, **kw)

    monkeypatch.setattr(AssistantRunner, "draft", spy)
    prompts = [prompt(3 * W + 5, 4), prompt(W + 2, 5)][:rows]
    plain = runtime.generate(model, prompts, max_new_tokens=5 * W)
    assert all(len(a.tokens) == 5 * W for a in plain)
    for k in k_values:
        stats = spec.SpecStats()
        got = runtime.generate(model, prompts, max_new_tokens=5 * W, draft="assistant", num_draft_tokens=k,
                               spec_stats=stats)
        for a, g in zip(plain, got):
            assert g.tokens == a.tokens, f"K={k}"
            assert g.finish_reason == a.finish_reason
        assert stats.drafted > 0 and stats.verify_calls > 0, stats
    return len(used)


@pytest.mark.parametrize("form", ["loop", "step"])
def test_generate_with_the_assistant_on_the_window_engine_equals_plain_greedy(window_artifact, monkeypatch, form):
    model = runtime.load(window_artifact, backend="onnxruntime")
    _runner(model, form)
    assert model.backend.sliding_slots == W + SLACK
    assert _generate_equal(model, monkeypatch) > 0  # some rounds came right after a compaction


def _strip_offset(artifact) -> None:
    """Make ``artifact``'s assistant graph one exported before the ``sliding_offset`` input: the input removed, its
    default a plain constant 0 (what the old graph computed), the manifest record and hashes to match."""
    path = artifact / "assistant" / "assistant.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    keep = [i for i in proto.graph.input if i.name != OFFSET]
    assert len(keep) == len(proto.graph.input) - 1 and any(t.name == OFFSET for t in proto.graph.initializer)
    del proto.graph.input[:]
    proto.graph.input.extend(keep)
    onnx.save(proto, str(path))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["assistant"]["inputs"] = [s for s in manifest["assistant"]["inputs"] if s["name"] != OFFSET]
    write_manifest(artifact, manifest)


def test_an_assistant_graph_without_the_offset(ring_artifact, window_artifact, tmp_path, monkeypatch):
    """Runs on the ring engine as before (generate equals plain greedy; its drafts are the current graph's), and
    is refused on the window engine with the command that re-exports it."""
    old_ring, old_window = tmp_path / "ring", tmp_path / "window"
    for src, dst in ((ring_artifact, old_ring), (window_artifact, old_window)):
        shutil.copytree(src, dst)
        _strip_offset(dst)
    model = runtime.load(old_ring, backend="onnxruntime")
    runner = model.assistant_runner()
    assert runner.loop is None  # the loop form was built from the graph before: stale, the step graph drafts
    # one row: the ring engine decodes plain batched steps while several rows run (runtime.speculative.batched)
    assert _generate_equal(model, monkeypatch, k_values=(K,), rows=1) == 0
    now = runtime.load(ring_artifact, backend="onnxruntime")
    cache = model.backend.new_cache(1, MAX_LEN)
    ids = prompt(2 * W + 5, 6)
    model.backend.prefill(PrefillInputs(np.array([ids]), np.array([0]), np.array([len(ids)])), cache)
    hidden = np.random.default_rng(0).standard_normal((1, PRESETS[PRESET].text.hidden_size)).astype(np.float32)
    old = runner.draft(cache, [ids[-1]], hidden, [len(ids)], K)
    new = now.assistant_runner().draft(cache, [ids[-1]], hidden, [len(ids)], K)
    assert old.tokens.tolist() == new.tokens.tolist() and np.allclose(old.logits, new.logits, atol=1e-5)
    model = runtime.load(old_window, backend="onnxruntime")
    with pytest.raises(InputError, match="make export-assistant ASSISTANT="):
        runtime.generate(model, ids, max_new_tokens=4, draft="assistant", num_draft_tokens=K)
    with pytest.raises(ArtifactError, match=f"make export-assistant ASSISTANT=<checkpoint dir> OUT={old_window}"):
        AssistantRunner(old_window, read_manifest(old_window))
