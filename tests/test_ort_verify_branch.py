"""The ring engine's write-first branch for a verify pass (several tokens of one text row before its ring wraps):
the geometry the runtime feeds it, checked against a ring simulated write by write, the calls that must not take
it, and on a built engine: the branch is taken and its logits equal both the decode steps and the copying ring
path's (``ort_ring_decode="copy"``: the opset-23 Attention over a copy of the ring, independent code)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import runtime
from exporter.config import PRESETS
from exporter.export import export_artifact
from exporter.model import ring_slots
from exporter.stream import fake_model
from graphs.build import build_engine
from runtime.ort_attention import INPUTS, NEG, attention_inputs
from runtime.prompt import PrefillInputs
from tests.test_model_reference import assert_close

PRESET, K, MAX_LEN = "tiny", 3, 200


def _held(end: int, slots: int) -> np.ndarray:
    """The position each ring slot holds after positions 0..end were written in turn (-1: never written)."""
    held = np.full(slots, -1)
    for p in range(end + 1):
        held[p % slots] = p
    return held


@pytest.mark.parametrize("slots", [8, 12])
def test_write_first_geometry_by_the_positions_each_slot_holds(slots):
    w = 8
    for past in range(slots):
        for s in range(2, slots - past + 1):
            got = attention_inputs([past], [s], s, window=w, slots=slots)
            assert got["write_first"] and got["ring_used"].tolist() == [1], (past, s)
            assert got["ring_seqlens_k"].tolist() == [past + s - 1] and int(got["ring_total"]) == past + s
            assert got["ring_last"].reshape(-1).tolist() == list(range(past, past + s))  # query i's own slot
            assert got["ring_first"].tolist() == [past]  # the write starts at the first new token's slot
            held = _held(past + s - 1, slots)[:past + s]
            bias = got["ring_bias_read"]
            assert bias.shape == (1, 1, s, past + s)
            for i in range(s):
                q = past + i
                visible = (held >= 0) & (held <= q) & (held > q - w)
                assert np.array_equal(bias[0, 0, i] == 0, visible), (past, s, i)
                assert (bias[0, 0, i][~visible] == NEG).all()


def test_calls_the_write_first_branch_does_not_take():
    w, r = 8, 12
    old = [k for k in INPUTS if k != "write_first"]  # an engine built before the branch took several tokens
    cases = {"wrapped": ([10], [3], 3, None, INPUTS), "two rows": ([2, 3], [3, 3], 3, None, INPUTS),
             "padded": ([2], [2], 3, None, INPUTS), "image": ([2], [3], 3, np.array([[-1, 0, 0]]), INPUTS),
             "old engine": ([2], [3], 3, None, old)}
    for name, (past, lens, s, blocks, want) in cases.items():
        got = attention_inputs(past, lens, s, window=w, slots=r, blocks=blocks, want=want)
        assert not got["one_token"] and not got.get("write_first", False), name
        assert (got["ring_seqlens_k"] == 0).all() and int(got["ring_total"]) == 1, name  # the dummy read of slot 0
        n = max(1, min(r, max(past)))
        assert got["ring_bias"].shape == (len(past), 1, s, n + s), name  # the ring path's geometry
    one = attention_inputs([3, 20], [1, 1], 1, window=w, slots=r)
    assert one["one_token"] and one["write_first"] and one["ring_last"].shape == (2, 1, 1, 1)


@pytest.fixture(scope="module")
def engines(reference_store, tmp_path_factory):
    _, ckpt = reference_store(PRESET)
    out = tmp_path_factory.mktemp("wf") / "artifact"
    export_artifact(fake_model(PRESETS[PRESET]), out, max_len=MAX_LEN, source={"checkpoint": str(ckpt)},
                    weights_from=ckpt, speculative=K, log=lambda *_: None)
    copy = tmp_path_factory.mktemp("wf-copy") / "artifact"
    shutil.copytree(out, copy)
    build_engine(out, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)
    build_engine(copy, "onnxruntime", ort_ring_decode="copy", log=lambda *_: None)
    return runtime.load(out, backend="onnxruntime"), runtime.load(copy, backend="onnxruntime")


def test_verify_takes_the_branch_and_equals_decode_steps_and_the_ring_path(engines):
    model, copying = engines
    b, c = model.backend, copying.backend
    r = ring_slots(PRESETS[PRESET].text, K)
    rng = np.random.default_rng(5)
    ids = [int(t) for t in rng.integers(3, 290, r + K + 4)]
    taken = set()
    for past in (1, 2, r // 2, r - K - 1, r - 2, r + 1):
        for n in (2, K + 1):
            caches = [x.new_cache(1, MAX_LEN) for x in (b, b, c)]
            for x, cache in zip((b, b, c), caches):
                x.prefill(PrefillInputs(np.array([ids[:past]]), np.array([0]), np.array([past])), cache)
            got = b.verify(np.array([ids[past:past + n]]), [past], caches[0])[0][0]
            taken.add((past + n <= r, bool(b._verify_bound.bound[(1, n)]["arrays"]["write_first"])))
            ring = c.verify(np.array([ids[past:past + n]]), [past], caches[2])[0][0]
            for j in range(n):
                step = b.decode([ids[past + j]], [past + j], caches[1])[0]
                assert_close(got[j], step, f"past {past} n {n}: verify token {j} vs decode")
                assert_close(got[j], ring[j], f"past {past} n {n}: verify token {j} vs the ring path")
            after = [np.array(x.numpy()) for x in caches[0]]  # the rings as the decode steps left them
            for i, (a, d) in enumerate(zip(after, (np.array(x.numpy()) for x in caches[1]))):
                assert_close(a, d, f"past {past} n {n}: cache {i}")
    assert taken == {(True, True), (False, False)}  # the branch where the ring has room, the ring path past it
