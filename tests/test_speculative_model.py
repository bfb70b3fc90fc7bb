"""Speculative verification in our PyTorch model (`exporter.model`) against transformers: a verify call of K + 1
tokens on rings of window + K + 1 slots gives transformers' logits and last hidden states (``hidden_states[-1]``, after
the final norm) at every new token, and after taking rejected tokens back, decoding on gives the logits of plain
decoding (rings of window slots) of the sequence that never had them: past the window (the rejected writes wrapped
the ring), after images and audio; rounds of verify calls that keep few of their tokens give transformers' logits
on what they kept (float64).  The engine forms are tested in tests/test_speculative_engines.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from exporter.config import PRESETS, TEST_PRESETS
from exporter.model import ring_slots
from exporter.weights import load_model
from runtime.prompt import expand_prompt
from tests.cases import MAX_SOFT_TOKENS, cases
from tests.reference import reference_hidden, reference_inputs, reference_logits
from tests.test_model_reference import assert_close

K = 3
CASES = [(p, name) for p in TEST_PRESETS for name in cases(PRESETS[p]) if name != "batch"]


def _prompt(preset: str, name: str, rng):
    """The case's prompt, extended with text tokens until its length P is just short of a multiple of the ring
    (R = W + K + 1) and past it, so the verify call's writes wrap the ring; then K + 1 more tokens to verify and
    W + 3 to decode after the rollback."""
    cfg = PRESETS[preset]
    case = cases(cfg)[name]
    p = expand_prompt(case.ids[0], case.images[0], case.audio[0], cfg.to_json_dict(), max_soft_tokens=MAX_SOFT_TOKENS)
    r = ring_slots(cfg.text, K)
    while len(p.ids) % r != r - 2 or len(p.ids) <= r:
        p.ids.append(int(rng.integers(3, 290)))
    return cfg, p


def _media(p):
    cat = lambda xs: torch.from_numpy(np.concatenate(xs)) if xs else None  # noqa: E731
    return cat(p.image_patches), cat(p.image_positions), cat(p.audio_frames)


@pytest.mark.parametrize("preset,name", CASES)
def test_verify_and_rollback_match_transformers(preset, name, reference_store):
    ref, ckpt = reference_store(preset)
    rng = np.random.default_rng(0)
    cfg, p = _prompt(preset, name, rng)
    tokens = cfg.to_json_dict()["tokens"]
    model = load_model(ckpt)
    n_p, w = len(p.ids), cfg.text.sliding_window
    drafts = [int(t) for t in rng.integers(3, 290, K + 1)]
    more = [int(t) for t in rng.integers(3, 290, w + 3)]
    full = type(p)(p.ids + drafts, p.image_patches, p.image_positions, p.audio_frames)
    want = reference_logits(ref, reference_inputs(full, tokens))
    want_hidden = reference_hidden(ref, reference_inputs(full, tokens))
    one = lambda n: torch.tensor([n])  # noqa: E731
    with torch.no_grad():
        caches = model.empty_caches(1, n_p + 2 * w + 8, ring_slots=ring_slots(cfg.text, K))
        _, caches = model.prefill(torch.tensor([p.ids]), one(0), one(n_p), caches, *_media(p))
        logits, hidden, caches = model.prefill(torch.tensor([drafts]), one(n_p), one(K + 1), caches,
                                               logits_index=torch.arange(K + 1)[None])
        assert_close(logits[0].numpy(), want[n_p:], f"{preset}/{name}: verify logits")
        assert_close(hidden[0].numpy(), want_hidden[n_p:], f"{preset}/{name}: verify hidden states")
    # Taking tokens back, in float64 (rounding then cannot hide a wrong key, nor amplify into a false alarm: these
    # random models move fp32 logits by ~1e-4 of the range between two equal computations of different layout):
    # expected is plain decoding (rings of window slots) of the sequence that never had the rejected tokens.
    model = model.double()
    media = [None if x is None else x.double() if x.is_floating_point() else x for x in _media(p)]
    with torch.no_grad():
        caches = model.empty_caches(1, n_p + 2 * w + 8, torch.float64, ring_slots=ring_slots(cfg.text, K))
        _, caches = model.prefill(torch.tensor([p.ids]), one(0), one(n_p), caches, *media)
        _, _, caches = model.prefill(torch.tensor([drafts]), one(n_p), one(K + 1), caches,
                                     logits_index=torch.arange(K + 1)[None])
        for keep in (1, 2):  # the verify call's first `keep` tokens stay; continue as if the others never came
            c = [x.clone() for x in caches]
            ids = p.ids + drafts[:keep]
            _, plain = model.prefill(torch.tensor([ids]), one(0), one(len(ids)),
                                     model.empty_caches(1, n_p + 2 * w + 8, torch.float64), *media)
            for j, t in enumerate(more):
                pos = n_p + keep + j
                out, c = model.decode(torch.tensor([[t]]), one(pos), c)
                expect, plain = model.decode(torch.tensor([[t]]), one(pos), plain)
                assert_close(out[0].numpy(), expect[0].numpy(), f"{preset}/{name}: decode {j} after keeping {keep}",
                             rel=1e-9)


def test_decode_geometry_with_slack_equals_the_general_one():
    """Rings of R > W slots: the decode loop's few-call geometry (`decode_inputs`) equals the general
    `attention_inputs` for one new token per row (mixed, filling, wrapped rings; the in-place branch's inputs too)."""
    from runtime.ort_attention import attention_inputs, decode_inputs

    rng = np.random.default_rng(0)
    for w, r in ((1, 3), (4, 7), (8, 11), (16, 24)):
        for trial in range(150):
            b = int(rng.integers(1, 5))
            past = rng.integers(0, 3 * r + 3, size=b)
            if trial % 4 == 0:
                past[:] = past[0]
            want = attention_inputs(past, np.ones(b, np.int64), 1, window=w, slots=r)
            got = decode_inputs(past, window=w, slots=r)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} window {w} slots {r} past {past}")
    with pytest.raises(ValueError, match="cannot hold"):
        decode_inputs([3], window=8, slots=7)


def test_window_verify_tokens_follows_onnxruntimes_layout():
    """`window_verify_tokens` against ONNX Runtime's documented windowed-cache layout (GroupQueryAttention,
    ``sliding_window_cache``): E(T) = 0 for T <= C, else G * ceil((T - C) / G), G = C - W + 1; dropping tokens from
    a call is exact iff E is the same at every length the call can end at: the longest such call."""
    from runtime.ort_attention import window_verify_tokens

    def evicted(t, c, g):
        return 0 if t <= c else g * -(-(t - c) // g)

    for w, c in ((1, 1), (4, 4), (4, 6), (8, 12), (16, 272)):
        g = c - w + 1
        for past in range(0, 3 * c + 5):
            n = window_verify_tokens(past, w, c)
            ends = [evicted(past + i, c, g) for i in range(1, n + 2)]
            assert n >= 1 and len(set(ends[:n])) == 1, (w, c, past, n)
            assert ends[n] != ends[0], f"window {w} capacity {c} past {past}: {n} is not the longest call"


def _rounds(model, ref, ring: int, w: int, rng, keeps) -> float:
    """Verify rounds of K + 1 tokens on rings of ``ring`` slots, each keeping its first ``keep`` tokens plus a new
    one, then W + 2 decode steps: the largest error against transformers (``ref``) on the kept tokens followed by the
    round's own, relative to each call's logit range."""
    one = lambda n: torch.tensor([n])  # noqa: E731
    kept = [2] + [int(t) for t in rng.integers(3, 290, 2 * w + 1)]  # kept[-1]: the newest token, not yet cached
    worst = 0.0
    with torch.no_grad():
        caches = model.empty_caches(1, len(kept) + len(keeps) * (K + 1) + w + 4, torch.float64, ring_slots=ring)
        _, caches = model.prefill(torch.tensor([kept[:-1]]), one(0), one(len(kept) - 1), caches)
        for keep in keeps:
            cached, toks = len(kept) - 1, [kept[-1], *(int(t) for t in rng.integers(3, 290, K))]
            logits, _, caches = model.prefill(torch.tensor([toks]), one(cached), one(K + 1), caches,
                                              logits_index=torch.arange(K + 1)[None])
            want = ref(input_ids=torch.tensor([kept[:-1] + toks])).logits[0, cached:].numpy()
            worst = max(worst, float(np.abs(logits[0].numpy() - want).max() / np.ptp(want)))
            kept = kept[:-1] + toks[:keep] + [int(rng.integers(3, 290))]
        start, got = len(kept) - 1, []
        kept += [int(t) for t in rng.integers(3, 290, w + 1)]
        for pos in range(start, len(kept)):
            out, caches = model.decode(torch.tensor([[kept[pos]]]), one(pos), caches)
            got.append(out[0].numpy())
        want = ref(input_ids=torch.tensor([kept])).logits[0, start:].numpy()
    return max(worst, float((np.abs(np.stack(got) - want).max(-1) / np.ptp(want, axis=-1)).max()))


def test_verify_rounds_after_rejections_match_transformers(reference_store):
    """Rounds of verify calls on rings of `ring_slots` slots, most of them keeping only their first token (every
    draft rejected: the most stale slots a ring ever holds), the others 2..K + 1, the context wrapping the ring
    several times: each round's K + 1 logits equal transformers' on the kept tokens followed by the round's own, and
    so do W + 2 decode steps after the last round (float64 on both sides, 1e-4 of the range; seen 1.5e-6).  Control:
    the same rounds on rings of W + K - 2 slots fail (a rejected write replaced a key a later query sees: 0.49 of
    the range), so the comparison sees a ring too small (W + K - 1, the target's own minimum, passes too)."""
    preset = "tiny"
    ref, ckpt = reference_store(preset)
    ref = copy.deepcopy(ref).double()
    cfg, model = PRESETS[preset], load_model(ckpt).double()
    w = cfg.text.sliding_window
    keeps = [1, 1, 3, 1, 1, K + 1, 1, 2, 1, 1]
    err = _rounds(model, ref, ring_slots(cfg.text, K), w, np.random.default_rng(1), keeps)
    assert err <= 1e-4, f"{preset}: rings of {ring_slots(cfg.text, K)} slots: max err {err:.3g} of the logit range"
    short = _rounds(model, ref, w + K - 2, w, np.random.default_rng(1), keeps)
    assert short > 1e-2, f"{preset}: rings of W + K - 2 slots moved the logits only {short:.3g}: the test is blind"
