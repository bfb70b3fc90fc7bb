"""Speculative verification on every engine form of an artifact exported with ``--speculative K``: ONNX Runtime
ring engines (the one-token branch in place, and the copying form), the windowed engine (``--ort-sliding window``,
a small slack so GroupQueryAttention compacts its cache during the test) and `TrtBackend` over an engine emulated by
ONNX Runtime (the plugin graph, `tests.trt_emulated`); a real TensorRT engine where a GPU is present.

Expected values come from plain decoding on the same engine (itself tested against transformers elsewhere), never
from the verify path: a verify call of K + 1 tokens gives the logits of K + 1 decode steps; after it, continuing
at a shorter length (rejected tokens taken back) gives the logits of a cache that never saw them, with the verify
call's writes wrapping the rings, after images and audio; greedy generation with drafts equals plain greedy token
for token (prompt lookup, and a replay drafter that proposes the plain continuation with every third token wrong,
so that long runs are accepted and rejected).  Plain artifacts keep their graphs and refuse verification."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import pytest

import runtime
from exporter.config import PRESETS
from exporter.export import export_artifact, graph_io
from exporter.model import ring_slots
from exporter.stream import fake_model
from graphs.build import build_engine
from runtime.errors import InputError
from runtime.prompt import PrefillInputs, Prepared, expand_prompt
from runtime.speculative import verify as spec
from tests.cases import MAX_SOFT_TOKENS, cases
from tests.test_backend_contract import _gpu_trt_reason
from tests.test_model_reference import assert_close
from tests.trt_emulated import emulated_trt_backend

PRESET, K, MAX_LEN = "tiny", 3, 200
FORMS = ["ring", "ring-copy", "window", "tensorrt-emulated", "tensorrt"]


@pytest.fixture(scope="module")
def spec_artifact(reference_store, tmp_path_factory):
    _, ckpt = reference_store(PRESET)
    out = tmp_path_factory.mktemp("spec") / "artifact"
    export_artifact(fake_model(PRESETS[PRESET]), out, max_len=MAX_LEN, source={"checkpoint": str(ckpt)},
                    weights_from=ckpt, speculative=K, log=lambda *_: None)
    build_engine(out, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def window_artifact(spec_artifact, tmp_path_factory):
    """The windowed form with a slack of 4 (C = W + 4, compacting every 5 tokens: within every test's reach)."""
    art = tmp_path_factory.mktemp("window") / "artifact"
    shutil.copytree(spec_artifact, art)
    build_engine(art, "onnxruntime", ort_sliding="window", ort_sliding_slack=4, log=lambda *_: None)
    return art


@pytest.fixture(scope="module", params=FORMS)
def form(request, spec_artifact, tmp_path_factory):
    name, art = request.param, spec_artifact
    if name == "window":
        art = request.getfixturevalue("window_artifact")
    if name == "ring-copy":
        art = tmp_path_factory.mktemp(name) / "artifact"
        shutil.copytree(spec_artifact, art)
        build_engine(art, "onnxruntime", ort_ring_decode="copy", log=lambda *_: None)
    if name == "tensorrt-emulated":
        return name, dataclasses.replace(runtime.load(art, backend="onnxruntime"),
                                         backend=emulated_trt_backend(art, prefill_chunk=96))
    if name == "tensorrt":
        if reason := _gpu_trt_reason():
            pytest.skip(reason)
        art = tmp_path_factory.mktemp("trt") / "artifact"
        shutil.copytree(spec_artifact, art)
        build_engine(art, "tensorrt", dtype="fp32", log=lambda *_: None)
        return name, runtime.load(art, backend="tensorrt")
    return name, runtime.load(art, backend="onnxruntime")


def _prompts(form_name: str, rng, backend):
    """One prompt per case (the window form takes no images), each extended with text tokens until its length is
    two short of a multiple of the ring's slots (past the ring), so a verify call's writes wrap it, and (window
    form) a verify call of K + 1 tokens can be taken back there."""
    cfg = PRESETS[PRESET]
    r = ring_slots(cfg.text, K)
    out = {}
    for name, case in cases(cfg).items():
        if name == "batch" or (form_name == "window" and name == "two_images"):
            continue
        p = expand_prompt(case.ids[0], case.images[0], case.audio[0], cfg.to_json_dict(),
                          max_soft_tokens=MAX_SOFT_TOKENS)
        while len(p.ids) % r != r - 2 or len(p.ids) <= r or backend.verify_tokens([len(p.ids)]) < K + 1:
            p.ids.append(int(rng.integers(3, 290)))
        out[name] = p
    return out


def _prefill(backend, p):
    cache = backend.new_cache(1, MAX_LEN)
    cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
    backend.prefill(PrefillInputs(np.array([p.ids]), np.array([0]), np.array([len(p.ids)]), cat(p.image_patches),
                                  cat(p.image_positions), cat(p.audio_frames)), cache)
    return cache


def test_verify_equals_decode_steps_and_rollback(form):
    """K + 1 tokens verified in one call = K + 1 decode steps; keeping 1..K + 1 of them and decoding W + 3 more
    tokens = decoding after a prefill that never saw the rejected ones."""
    name, model = form
    b = model.backend
    w = PRESETS[PRESET].text.sliding_window
    rng = np.random.default_rng(0)
    for case, p in _prompts(name, rng, b).items():
        n = len(p.ids)
        drafts = [int(t) for t in rng.integers(3, 290, K + 1)]
        more = [int(t) for t in rng.integers(3, 290, w + 3)]
        cache = _prefill(b, p)
        logits, hidden = b.verify(np.array([drafts]), [n], cache)
        assert logits.shape == (1, K + 1, PRESETS[PRESET].text.vocab_size)
        assert hidden.shape == (1, K + 1, PRESETS[PRESET].text.hidden_size)
        steps = _prefill(b, p)
        for j, t in enumerate(drafts):
            assert_close(logits[0, j], b.decode([t], [n + j], steps)[0], f"{name}/{case}: verify token {j}")
        for keep in (1, 2, K + 1) if case == "text" else (1,):
            cache = _prefill(b, p)
            b.verify(np.array([drafts]), [n], cache)
            plain = _prefill(b, type(p)(p.ids + drafts[:keep], p.image_patches, p.image_positions, p.audio_frames))
            for j, t in enumerate(more):
                pos = n + keep + j
                assert_close(b.decode([t], [pos], cache)[0], b.decode([t], [pos], plain)[0],
                             f"{name}/{case}: decode {j} after keeping {keep} of {K + 1}")


def _replay(plain: list[int]):
    """A drafter proposing the plain greedy continuation with every third proposed token wrong."""
    def draft(context: np.ndarray, k: int) -> list[int]:
        start = len(context) - draft.prompt
        out = plain[start:start + k]
        return [(t + 1) % 290 + 3 if (start + i) % 3 == 2 else t for i, t in enumerate(out)]
    return draft


def test_greedy_speculative_equals_plain(form, monkeypatch):
    name, model = form
    cfg = PRESETS[PRESET]
    for case_name, case in cases(cfg).items():
        if name == "window" and case_name == "two_images":
            continue
        ids = case.ids if len(case.ids) > 1 else case.ids[0]
        im = case.images if len(case.ids) > 1 else case.images[0]
        au = case.audio if len(case.ids) > 1 else case.audio[0]
        kw = dict(images=im, audio=au, max_new_tokens=30, max_soft_tokens=MAX_SOFT_TOKENS)
        plain = runtime.generate(model, ids, **kw)
        for k in (1, K):
            stats = spec.SpecStats()
            got = runtime.generate(model, ids, draft="prompt_lookup", num_draft_tokens=k, spec_stats=stats, **kw)
            pairs = zip(plain, got) if isinstance(plain, list) else [(plain, got)]
            for a, g in pairs:
                assert g.tokens == a.tokens, f"{name}/{case_name} K={k}: {g.tokens} != plain {a.tokens}"
                assert g.finish_reason == a.finish_reason
        if isinstance(plain, list):
            continue
        p = expand_prompt(ids, im, au, cfg.to_json_dict(), max_soft_tokens=MAX_SOFT_TOKENS)
        drafter = _replay(plain.tokens)
        drafter.prompt = len(p.ids)
        monkeypatch.setitem(spec.DRAFTERS, "replay", drafter)
        stats = spec.SpecStats()
        got = runtime.generate(model, ids, draft="replay", num_draft_tokens=K, spec_stats=stats, **kw)
        assert got.tokens == plain.tokens, f"{name}/{case_name} replay: {got.tokens} != plain {plain.tokens}"
        assert len(plain.tokens) >= 12, f"{name}/{case_name}: plain greedy stopped after {len(plain.tokens)} tokens"
        assert stats.accepted >= len(plain.tokens) // 3, f"{name}/{case_name}: replay drafts barely accepted: {stats}"
        assert stats.accepted < stats.drafted, f"{name}/{case_name}: no replay draft was rejected: {stats}"


def test_assistant_drafts_on_both_onnx_runtime_forms(spec_artifact, window_artifact):
    """The assistant reads the target's ONNX Runtime cache buffers in place on the ring and the window form
    (tests/test_assistant_window.py); a backend that is neither ONNX Runtime nor TensorRT (tests/test_trt_assistant.py)
    is refused."""
    for art in (spec_artifact, window_artifact):
        spec.check_draft(runtime.load(art, backend="onnxruntime").backend, "assistant", 2)
    other = type("Other", (), {"name": "other", "max_draft_tokens": K})()
    with pytest.raises(InputError, match="ONNX Runtime engines \\(ring and window\\) and on TensorRT"):
        spec.check_draft(other, "assistant", 2)


def test_window_engine_limits_verify_at_compaction(window_artifact):
    """GroupQueryAttention's windowed cache (C = W + 4 slots, G = 5) compacts at T = C + 1, C + 6, ...: a verify
    call crossing a compaction cannot be taken back by the lengths alone, so `verify_tokens` stops it at the
    boundary, and one that crosses it anyway (called past the limit) breaks the rollback (the check is needed)."""
    b = runtime.load(window_artifact, backend="onnxruntime").backend
    w, c = PRESETS[PRESET].text.sliding_window, b.sliding_slots
    assert c == w + 4
    assert [b.verify_tokens([t]) for t in range(c - 2, c + 6)] == [2, 1, K + 1, K + 1, 3, 2, 1, K + 1]
    rng = np.random.default_rng(1)
    p = Prepared([2] + [int(t) for t in rng.integers(3, 290, c - 2)])
    n = len(p.ids)  # C - 1: a call of 4 tokens would cross the compaction at T = C + 1
    drafts = [int(t) for t in rng.integers(3, 290, K + 1)]
    more = [int(t) for t in rng.integers(3, 290, 4)]
    with pytest.raises(InputError, match="at most 1"):
        b.verify(np.array([drafts]), [n], _prefill(b, p))
    b_limit, b.verify_tokens = b.verify_tokens, lambda past: K + 1
    try:
        cache = _prefill(b, p)
        b.verify(np.array([drafts]), [n], cache)  # T from C - 1 to C + 3, compacting at C + 1
    finally:
        b.verify_tokens = b_limit
    plain = _prefill(b, type(p)(p.ids + drafts[:1]))
    errs = [float(np.abs(b.decode([t], [n + 1 + j], cache) - b.decode([t], [n + 1 + j], plain)).max())
            for j, t in enumerate(more)]
    assert max(errs) > 1e-2, f"a rollback across a compaction went unnoticed (errors {errs}): the limit is untested"


def test_plain_artifacts_unchanged_and_refuse_verify(artifact_store, spec_artifact):
    """Without --speculative the graphs keep their contract (no logits_index, no hidden output, (B, V) logits,
    rings of window slots); verification is refused with the reason.  (The plain graphs were also checked node for
    node against the exporter before this option existed: identical.)"""
    plain = artifact_store(PRESET)
    cfg = PRESETS[PRESET]
    man = runtime.load(plain, backend="onnxruntime").manifest
    for g in ("prefill", "decode"):
        assert man["graphs"][g]["inputs"] == graph_io(cfg, g)[0] and man["graphs"][g]["outputs"] == graph_io(cfg, g)[1]
    assert "speculative" not in man
    graph = onnx.load(str(plain / "prefill.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == [i["name"] for i in graph_io(cfg, "prefill")[0]]
    assert [o.name for o in graph.output] == [o["name"] for o in graph_io(cfg, "prefill")[1]]
    model = runtime.load(plain, backend="onnxruntime")
    with pytest.raises(InputError, match="--speculative"):
        model.backend.verify(np.array([[5, 6]]), [3], model.backend.new_cache(1, 20))
    with pytest.raises(InputError, match="--speculative"):
        runtime.generate(model, [2, 5, 6], max_new_tokens=3, draft="prompt_lookup")
    spec_model = runtime.load(spec_artifact, backend="onnxruntime")
    with pytest.raises(InputError, match="at most 3"):
        runtime.generate(spec_model, [2, 5, 6], max_new_tokens=3, draft="prompt_lookup", num_draft_tokens=4)
    with pytest.raises(InputError, match="make export-assistant"):
        runtime.generate(spec_model, [2, 5, 6], max_new_tokens=3, draft="assistant", num_draft_tokens=2)
    with pytest.raises(InputError, match="'auto'"):
        runtime.generate(spec_model, [2, 5, 6], max_new_tokens=3, draft="prompt_lookup", num_draft_tokens=0)


def test_verify_at_every_length_while_the_rings_fill(form):
    """Verify calls of every width (ONNX Runtime: one row on kept bindings, `runtime.ort_verify`) at every past
    length from an almost empty cache until the rings have wrapped (the geometry's shapes change on the way), on two
    caches in turn (the bindings follow the cache): each equals decode steps on a cache prefilled alike."""
    name, model = form
    b = model.backend
    rng = np.random.default_rng(3)
    r = ring_slots(PRESETS[PRESET].text, K)
    ids = [int(t) for t in rng.integers(3, 290, r + 2 * K + 8)]
    caches = [b.new_cache(1, MAX_LEN), b.new_cache(1, MAX_LEN)]
    for c in caches:
        b.prefill(PrefillInputs(np.array([ids[:2]]), np.array([0]), np.array([2])), c)
    past, done = 2, [2, 2]  # done: the positions each cache holds (every token written is ids' own)
    while past + K + 1 < len(ids):
        n = 1 + (past % (K + 1))
        if n > b.verify_tokens([past]):
            n = 1
        cache = caches[past % 2]
        for q in range(done[past % 2], past):  # catch up where the other cache moved on
            b.decode([ids[q]], [q], cache)
        done[past % 2] = max(done[past % 2], past + n)
        logits, hidden = b.verify(np.array([ids[past:past + n]]), [past], cache, copy=False)
        held = logits.copy()
        steps = b.new_cache(1, MAX_LEN)
        b.prefill(PrefillInputs(np.array([ids[:past]]), np.array([0]), np.array([past])), steps)
        for j in range(n):
            assert_close(held[0, j], b.decode([ids[past + j]], [past + j], steps)[0], f"{name}: past {past} n {n} j {j}")
        assert hidden.shape == (1, n, PRESETS[PRESET].text.hidden_size)
        past += 1
    # copy=True: arrays of the caller's; copy=False: the next call of as many tokens may overwrite them
    kept, _ = b.verify(np.array([ids[1:3]]), [1], caches[0])
    again = kept.copy()
    other, _ = b.verify(np.array([ids[5:7]]), [1], caches[0])
    np.testing.assert_array_equal(kept, again)
    assert not np.array_equal(other, kept)
