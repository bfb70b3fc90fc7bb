"""The ring engines' sliding-layer decode step (GroupQueryAttention over the ring where the write left it,
`graphs.ort.attention._ring_gqa`) against transformers, in float64.

One batched decode call per step carries rows at every phase of a ring: one about to fill its last slot, one that
wraps at the next step, a short one that crosses the window's edge halfway, one several windows long, and one after
an image prompt.  References whose window is one token wider or narrower show that the comparison sees a wrong
edge; the steps run with the caches bound in place (no copy), as `runtime.generate` and the serving engine run them.
The same runs on a speculative artifact's engine, whose rings hold K + 1 slots beyond the window (the decode masks
the slots older than the window by the position they hold), and there rounds of verify calls that reject drafts
(the multi-token ring path over stale slots) give transformers' logits too; the one-token geometry is also checked
against a ring written position by position, with and without slack.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

import runtime
from exporter.config import PRESETS
from exporter.model import ring_slots
from runtime.generate import _prefill
from runtime.ort_attention import NEG, _one_token, decode_inputs
from runtime.prompt import PrefillInputs, Prepared, expand_prompt, pack_batch
from tests.cases import MAX_SOFT_TOKENS, _ids, _image
from tests.reference import reference_inputs, reference_logits

PRESET = "tiny"  # window 8, 5 sliding + 1 full layers, vision
REL_TOL = 1e-4


SLACK = 3  # draft tokens of the speculative artifact


@pytest.fixture(scope="module")
def slack_artifact(reference_store, tmp_path_factory):
    """The tiny model exported with ``--speculative 3`` (rings of W + 4 slots), engine built with the defaults."""
    from exporter.export import export_artifact
    from exporter.stream import fake_model
    from graphs.build import build_engine

    _, ckpt = reference_store(PRESET)
    out = tmp_path_factory.mktemp("slack") / "artifact"
    export_artifact(fake_model(PRESETS[PRESET]), out, max_len=200, source={"checkpoint": str(ckpt)},
                    weights_from=ckpt, speculative=SLACK, log=lambda *_: None)
    build_engine(out, "onnxruntime", log=lambda *_: None)  # auto: the one-token branch
    return out


@pytest.fixture(scope="module", params=[0, SLACK], ids=["ring", "ring-with-slack"])
def engine_artifact(request, artifact_store):
    """The tiny artifact (rings of W slots), or the speculative one (rings of W + 4 slots)."""
    if not request.param:
        return artifact_store(PRESET), 0
    return request.getfixturevalue("slack_artifact"), request.param


def _reference(ref, window: int | None = None):
    """A float64 copy of the transformers model, optionally with another sliding window (the same weights)."""
    cfg = copy.deepcopy(ref.config)
    if window is not None:
        cfg.text_config.sliding_window = window
    model = type(ref)(cfg)
    model.load_state_dict(ref.state_dict())
    return model.eval().double()


def _rows(cfg) -> list[Prepared]:
    w, tk, js = cfg.text.sliding_window, cfg.tokens, cfg.to_json_dict()
    with_image = _ids(6, 4) + [tk.image] + _ids(7, 3)[1:]
    prompts = [(_ids(11, w - 1), []),  # first step writes the last slot (no wrap yet), the next wraps
               (_ids(12, 2), []),  # short: crosses the window's edge halfway
               (_ids(13, w), []),  # its first step wraps the ring
               (_ids(14, 2 * w + 3), []),  # wrapped twice before it starts
               (with_image, [_image(288, 528, 1)])]  # an image prompt (66 soft tokens), several windows long
    return [expand_prompt(ids, im, None, js, max_soft_tokens=MAX_SOFT_TOKENS) for ids, im in prompts]


def test_decode_rows_around_the_window_edge_match_transformers(engine_artifact, reference_store, capfd):
    cfg = PRESETS[PRESET]
    w = cfg.text.sliding_window
    art, slack = engine_artifact
    os.environ["GEMMA4_ORT_LOG"] = "2"  # ONNX Runtime's warnings: a ring write that copies would say so
    try:
        model = runtime.load(art)
    finally:
        del os.environ["GEMMA4_ORT_LOG"]
    engine = model.manifest["engines"]["onnxruntime"]
    assert engine["lowering"]["prefill"]["attention"]["ring_decode"] == "in_place"
    slots = (engine.get("attention_inputs") or {}).get("ring_slots", w)
    assert slots == ring_slots(cfg.text, slack) == (w + slack + 1 if slack else w)
    rows = _rows(cfg)
    steps = slots + 3  # every row's ring wraps during the run
    cache = model.backend.new_cache(len(rows), model.max_len)
    buffers = [c.data_ptr() for c in cache]
    _prefill(model, rows, pack_batch(rows, cfg.tokens.pad), cache)
    capfd.readouterr()
    fed = np.random.default_rng(5).integers(3, 290, (steps, len(rows)))
    lens = [len(p.ids) for p in rows]
    got = []
    for k in range(steps):  # one call for all rows, each at its own position
        got.append(model.backend.decode(fed[k].tolist(), [n + k for n in lens], cache))
    log = capfd.readouterr().err
    assert "in-place optimization not activated" not in log, log[-2000:]
    assert [c.data_ptr() for c in cache] == buffers
    got = np.stack(got, 1)  # (rows, steps, vocab)

    ref, _ = reference_store(PRESET)
    tokens = cfg.to_json_dict()["tokens"]

    def logits(m, b):  # row b's logits at its decode positions, from one forward over prompt + fed tokens
        p = rows[b]
        full = Prepared(p.ids + fed[:, b].tolist(), p.image_patches, p.image_positions, p.audio_frames)
        inputs = {k: v.double() if torch.is_floating_point(v) else v for k, v in reference_inputs(full, tokens).items()}
        return reference_logits(m, inputs)[lens[b]:]

    exact = _reference(ref)
    wide, narrow = _reference(ref, w + 1), _reference(ref, w - 1)
    for b in range(len(rows)):
        want = logits(exact, b)
        scale = float(np.ptp(want))
        err = np.abs(got[b] - want).max(axis=-1) / scale  # per step
        assert err.max() <= REL_TOL, (f"row {b} (prompt {lens[b]} tokens): max err {err.max():.3g} of the logit range "
                                      f"at step {int(err.argmax())} (position {lens[b] + int(err.argmax())})")
        # the control: a window one wider or narrower moves these logits by far more than the tolerance once the
        # context is longer than the window, so an engine with an edge off by one fails above
        beyond = np.arange(steps) + lens[b] >= w
        for other, name in ((wide, "w + 1"), (narrow, "w - 1")):
            moved = np.abs(logits(other, b) - want).max(axis=-1) / scale
            assert moved[beyond].min() > 10 * REL_TOL, f"row {b}: window {name} moves the logits only {moved}"


def test_verify_rounds_after_rejections_match_transformers(slack_artifact, reference_store):
    """The speculative artifact's ring engine: rounds of verify calls of K + 1 tokens (the multi-token ring path),
    most keeping only their first token (every draft rejected: the most stale slots a ring holds), the others 2..K +
    1, the context wrapping the rings several times, then W + 2 decode steps (the one-token branch in place): every
    logit equals transformers' on the kept tokens followed by the call's own (float64 reference, 1e-4 of the range);
    references whose window is one token wider or narrower are off by far more, so each query sees exactly its
    window."""
    cfg = PRESETS[PRESET]
    w, k = cfg.text.sliding_window, SLACK
    b = runtime.load(slack_artifact).backend
    assert b.ring_slots == ring_slots(cfg.text, k)
    ref, _ = reference_store(PRESET)
    refs = {"exact": _reference(ref), "w + 1": _reference(ref, w + 1), "w - 1": _reference(ref, w - 1)}
    tokens = cfg.to_json_dict()["tokens"]
    rng = np.random.default_rng(3)
    kept = _ids(15, 2 * w + 2)  # kept[-1]: the newest token, not cached yet
    cache = b.new_cache(1, 200)
    b.prefill(PrefillInputs(np.array([kept[:-1]]), np.array([0]), np.array([len(kept) - 1])), cache)
    calls = []  # (our logits (n, V), the sequence the reference runs, the position of the call's first token)
    for keep in (1, 1, 3, 1, 1, k + 1, 1, 2, 1, 1):
        cached, toks = len(kept) - 1, [kept[-1], *(int(t) for t in rng.integers(3, 290, k))]
        logits, _ = b.verify(np.array([toks]), [cached], cache)
        calls.append((logits[0], kept[:-1] + toks, cached))
        kept = kept[:-1] + toks[:keep] + [int(rng.integers(3, 290))]
    start = len(kept) - 1
    kept += [int(t) for t in rng.integers(3, 290, w + 1)]
    steps = [b.decode([kept[pos]], [pos], cache)[0] for pos in range(start, len(kept))]
    calls.append((np.stack(steps), kept, start))
    for i, (got, ids, first) in enumerate(calls):
        want = {name: reference_logits(m, reference_inputs(Prepared(ids), tokens))[first:first + len(got)]
                for name, m in refs.items()}
        scale = float(np.ptp(want["exact"]))
        err = float(np.abs(got - want["exact"]).max()) / scale
        assert err <= REL_TOL, f"call {i} at position {first}: max err {err:.3g} of the logit range"
        for name in ("w + 1", "w - 1"):
            moved = float(np.abs(want[name] - want["exact"]).max(axis=-1).min()) / scale
            assert moved > 10 * REL_TOL, f"call {i}: window {name} moves the logits only {moved:.3g}"


def _ring_by_writes(past: int, window: int, slots: int) -> tuple[int, np.ndarray]:
    """A ring of ``slots`` slots written position by position up to ``past`` (slot p mod R): the last slot read and,
    per slot read, whether the position it holds is inside the window of the query at ``past``."""
    held = np.full(slots, -1)
    for p in range(past + 1):
        held[p % slots] = p
    last = min(past, slots - 1)
    return last, (held[:last + 1] >= 0) & (held[:last + 1] > past - window)


@pytest.mark.parametrize("slots", [8, 9, 12])  # the window, and rings with slack
def test_one_token_geometry_by_the_positions_each_slot_holds(slots):
    w = 8
    past = np.array([0, 3, 6, 7, 8, 9, 11, 12, 30, 200])
    got = _one_token(past, w, True, slots)
    t = int(got["ring_total"])
    assert t == min(int(past.max()), slots - 1) + 1
    for b, p in enumerate(past):
        last, valid = _ring_by_writes(int(p), w, slots)
        assert got["ring_seqlens_k"][b] == last and got["ring_last"][b, 0, 0, 0] == last
        bias = got["ring_bias_read"][b, 0, 0]
        assert np.array_equal(bias[:last + 1] == 0, valid), (p, bias)
        assert (bias[last + 1:] == NEG).all()  # not read (beyond this row's slots)
        if slots == w:
            assert valid.all()  # a ring of exactly the window: every slot read is visible, no mask needed
    with pytest.raises(ValueError, match="cannot hold a window"):
        _one_token(past, w, True, w - 1)


def test_one_token_inputs_of_a_call_of_several_tokens():
    """A prefill call: the branch is not taken; GroupQueryAttention still runs (a graph node runs every call), on
    slot 0 only (read and written back), unmasked."""
    got = _one_token(np.array([0, 5, 40]), 8, False)
    assert not got["one_token"] and (got["ring_seqlens_k"] == 0).all() and int(got["ring_total"]) == 1
    assert (got["ring_bias_read"] == 0).all() and got["ring_bias_read"].shape == (3, 1, 1, 1)
    dec = decode_inputs([0, 5, 40], window=8)
    assert dec["one_token"] and dec["ring_seqlens_k"].tolist() == [0, 5, 7] and int(dec["ring_total"]) == 8
