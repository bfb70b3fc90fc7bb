"""`runtime.generate` with drafts beyond greedy prompt lookup (`runtime.speculative.verify`): sampling with drafts
keeps plain sampling's distribution (chi-square against the exact distribution computed from the target's own
prefill logits, not from the speculative path), top_k=1 equals greedy; ``num_draft_tokens="auto"`` (AdaptiveK)
keeps greedy's tokens and varies K; ``draft="assistant"`` (the artifact's exported assistant, fed the target's
hidden states from verify; its step graph or its loop form) gives plain greedy's tokens on a text longer than
the sliding window, and its drafts are accepted more often than chance; after a verify call that accepted none of K
drafts its round drafts what transformers' drafter does on the accepted tokens."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import runtime
from exporter.config import PRESETS
from exporter.export import export_artifact
from exporter.export_assistant import export_assistant
from exporter.stream import fake_model
from graphs.build import build_engine
from graphs.ort.assistant import add_ort_assistant
from runtime.prompt import PrefillInputs
from runtime.sampling import Sample
from runtime.speculative import verify as spec
from tests.assistant_ref import prompt, reference_pair
from tests.speculative_doubles import RowByRow
from tests.test_speculative_accept import _chi2_pvalue

PRESET, K, MAX_LEN = "tiny", 3, 200
RUNS = 1500


@pytest.fixture(scope="module")
def spec_artifact(reference_store, workdir, tmp_path_factory):
    """The tiny target exported with --speculative K, with the tiny assistant (same target weights) exported in."""
    _, ckpt = reference_store(PRESET)
    out = tmp_path_factory.mktemp("specgen") / "artifact"
    export_artifact(fake_model(PRESETS[PRESET]), out, max_len=MAX_LEN, source={"checkpoint": str(ckpt)},
                    weights_from=ckpt, speculative=K, log=lambda *_: None)
    build_engine(out, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)
    *_, assistant_dir = reference_pair("tiny-assistant", workdir)
    export_assistant(assistant_dir, out, log=lambda *_: None)
    add_ort_assistant(out, log=lambda *_: None)  # what `make export-assistant` adds to an artifact with an engine
    return out


def _next_dist(model, ids: list[int], sampler: Sample) -> np.ndarray:
    """The exact distribution plain sampling draws the token after ``ids`` from: the target's prefill logits
    through the request's transforms (V,)."""
    cache = model.backend.new_cache(1, MAX_LEN)
    logits = model.backend.prefill(PrefillInputs(np.array([ids]), np.array([0]), np.array([len(ids)])), cache)
    tok, probs = sampler.distribution(logits[0])
    out = np.zeros(logits.shape[-1])
    out[tok] = probs
    return out


def _tree(model, ids: list[int], sampler: Sample) -> dict[tuple, np.ndarray]:
    """The next-token distribution after ``ids`` + each prefix of up to two sampled tokens."""
    dist = {(): _next_dist(model, ids, sampler)}
    for a in np.flatnonzero(dist[()]):
        dist[(int(a),)] = _next_dist(model, ids + [int(a)], sampler)
        for b in np.flatnonzero(dist[(int(a),)]):
            dist[(int(a), int(b))] = _next_dist(model, ids + [int(a), int(b)], sampler)
    return dist


def _joint(dist: dict[tuple, np.ndarray]) -> dict[tuple, float]:
    """Probability of each sequence of three tokens."""
    return {(*key, int(c)): dist[()][key[0]] * dist[key[:1]][key[1]] * dist[key][c]
            for key in dist if len(key) == 2 for c in np.flatnonzero(dist[key])}


def _binned_pvalue(counts: dict[tuple, int], joint: dict[tuple, float], runs: int) -> float:
    """Pearson's chi-square with the cells of expected count < 5 merged into one (the test's approximation needs
    it); 0 if a sequence of probability 0 occurred."""
    if any(key not in joint for key in counts):
        return 0.0
    big = [key for key, p in joint.items() if p * runs >= 5]
    got = [counts.get(key, 0) for key in big]
    want = [joint[key] for key in big]
    rest = 1.0 - sum(want)
    if rest > 1e-12:
        got.append(runs - sum(got))
        want.append(rest)
    return _chi2_pvalue(np.array(got, float), np.array(want))


def test_sampling_with_drafts_keeps_the_distribution(spec_artifact, monkeypatch):
    """Joint distribution of the first three emitted tokens (top_k=3: 27 sequences) under speculative sampling,
    drafted by a deterministic table drafter proposing the target's most likely continuation (so drafts are
    accepted and rejected), equals the exact plain-sampling distribution by Pearson's chi-square; the same counts
    reject the distribution at another temperature (the test has power)."""
    model = runtime.load(spec_artifact, backend="onnxruntime")
    ids = [2, 11, 57, 9, 140, 33]
    temperature = 2.0  # flat enough that every position is uncertain
    dist = _tree(model, ids, Sample(temperature=temperature, top_k=3, top_p=1.0))

    def table(tokens: np.ndarray, k: int) -> list[int]:  # deterministic in the context: point-mass drafts
        made = tuple(int(t) for t in tokens[len(ids):])
        out = []
        for _ in range(k):
            out.append(int(np.argmax(dist[made])) if made in dist else 5)
            made = (*made, out[-1])
        return out

    monkeypatch.setitem(spec.DRAFTERS, "table", table)
    counts: dict[tuple, int] = {}
    stats = spec.SpecStats()
    kw = dict(max_new_tokens=6, temperature=temperature, top_k=3, top_p=1.0, detokenize=False)
    for seed in range(RUNS):
        got = runtime.generate(model, ids, seed=seed, draft="table", num_draft_tokens=K, spec_stats=stats, **kw)
        assert len(got.tokens) >= 3, got
        key = tuple(got.tokens[:3])
        counts[key] = counts.get(key, 0) + 1
    assert stats.verify_calls >= RUNS and 0 < stats.accepted < stats.drafted, stats
    assert _binned_pvalue(counts, _joint(dist), RUNS) > 1e-3
    other = _joint(_tree(model, ids, Sample(temperature=temperature / 2, top_k=3, top_p=1.0)))
    assert _binned_pvalue(counts, other, RUNS) < 1e-3


def test_top_k_one_with_drafts_equals_greedy(spec_artifact):
    model = runtime.load(spec_artifact, backend="onnxruntime")
    ids = [2, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    greedy = runtime.generate(model, ids, max_new_tokens=30).tokens
    for draft in ("prompt_lookup", "assistant"):
        stats = spec.SpecStats()
        got = runtime.generate(model, ids, max_new_tokens=30, temperature=0.7, top_k=1, seed=1, draft=draft,
                               num_draft_tokens=K, spec_stats=stats).tokens
        assert got == greedy, draft
        assert stats.drafted > 0, draft


def test_adaptive_k_keeps_greedy_tokens(spec_artifact):
    model = runtime.load(spec_artifact, backend="onnxruntime")
    for ids in ([2, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6], prompt(30, 3)):
        plain = runtime.generate(model, ids, max_new_tokens=60).tokens
        for draft in ("prompt_lookup", "assistant"):
            stats = spec.SpecStats()
            got = runtime.generate(model, ids, max_new_tokens=60, draft=draft, num_draft_tokens="auto",
                                   spec_stats=stats).tokens
            assert got == plain, draft
            assert max(stats.k_per_round) <= K and min(stats.k_per_round) >= 0
            assert len(set(stats.k_per_round)) > 1, (draft, stats.k_per_round)


@pytest.mark.parametrize("form", ["loop", "step"])
def test_assistant_drafts_give_plain_greedy_tokens(spec_artifact, reference_store, monkeypatch, form):
    """Greedy with the assistant's drafts equals plain greedy token for token, prompt and output each several
    sliding windows long (rings wrap, rejected drafts written), batch of two rows in batched rounds (the ring engine
    verifies one row per call and would decode a batch plainly: `RowByRow` verifies the rows of a call one by one
    on row views and says it batches); K = 1 and K.  Every round feeds
    the assistant the row's newest token at its position and the target's final-norm hidden state at the position
    before it: transformers' ``hidden_states[-1]`` of the target on the sequence so far (random weights: the drafts
    are almost never accepted, so the wiring is checked at its inputs)."""
    import torch

    from runtime.assistant import AssistantRunner

    calls = []
    original = AssistantRunner.draft

    def spy(self, cache, tokens, hidden, position, num_tokens, **kw):
        calls.append((np.array(tokens).ravel().copy(), np.array(hidden).copy(), np.array(position).ravel().copy()))
        return original(self, cache, tokens, hidden, position, num_tokens, **kw)

    monkeypatch.setattr(AssistantRunner, "draft", spy)
    target, _ = reference_store(PRESET)
    model = runtime.load(spec_artifact, backend="onnxruntime")
    model = dataclasses.replace(model, backend=RowByRow(model.backend))
    assert model.assistant_runner().loop is not None
    if form == "step":  # the step graph called K times (an artifact without the loop form)
        model.assistant_runner().loop = None
    window = PRESETS[PRESET].text.sliding_window
    prompts = [prompt(3 * window + 5, 4), prompt(window + 2, 5)]
    plain = runtime.generate(model, prompts, max_new_tokens=4 * window)
    for k in (1, K):
        stats = spec.SpecStats()
        got = runtime.generate(model, prompts, max_new_tokens=4 * window, draft="assistant", num_draft_tokens=k,
                               spec_stats=stats)
        for a, g in zip(plain, got):
            assert g.tokens == a.tokens, f"K={k}"
            assert g.finish_reason == a.finish_reason
        assert stats.drafted > 0 and stats.accepted < stats.drafted, stats
        seqs = [[*p, *a.tokens] for p, a in zip(prompts, plain)]
        checked = 0
        assert max(len(c[0]) for c in calls) == len(prompts), "the rows should draft in one call"
        for tokens, hidden, position in calls[:: max(1, len(calls) // 6)]:
            for j in range(len(tokens)):  # every row of the call (the rows run alike: none finishes early)
                pos = int(position[j])
                rows = [seqs[j]] if len(tokens) == len(seqs) else seqs  # a call of every row: row j is j
                row = [s for s in rows if len(s) > pos and s[pos] == int(tokens[j])]
                assert row, "the assistant was fed a token that is not the sequence's at its position"
                with torch.no_grad():
                    want = target(input_ids=torch.tensor([row[0][:pos]]), output_hidden_states=True).hidden_states[-1]
                want = want[0, -1].numpy()
                assert np.abs(hidden[j] - want).max() <= 1e-4 * np.abs(want).max(), f"K={k} position {pos}"
                checked += 1
        assert checked >= 6
        calls.clear()


def test_assistant_round_after_a_verify_that_accepted_no_draft(spec_artifact, workdir):
    """On the ONNX Runtime ring engine's own caches (rings of W + K + 1 slots): after a prefill and a verify call of
    the newest token and K drafts that the target rejects (all of them: the most a ring must take back), the
    assistant's next round (the default reading, ``written`` = the verify call's end) drafts what transformers'
    candidate generator drafts after a prefill of the accepted tokens alone, token for token.  (An export with the
    earlier rings of W + K slots lost position L - W here and drafted [76, 184, 142] against [35, 161, 298].)"""
    from runtime.assistant import AssistantRunner
    from tests.assistant_ref import record_rounds

    target, ref, _, _ = reference_pair("tiny-assistant", workdir)
    model = runtime.load(spec_artifact, backend="onnxruntime")
    b, window = model.backend, PRESETS[PRESET].text.sliding_window
    runner = AssistantRunner(spec_artifact, model.manifest)
    assert model.manifest["speculative"] == {"max_draft_tokens": K, "ring_slots": window + K + 1}
    accepted = prompt(3 * window + 2, 9)  # the last one is the verify call's first token, at position L
    last = len(accepted) - 1
    _, rounds = record_rounds(target, ref, accepted, num_draft=K, max_new_tokens=K + 2)
    r = rounds[0]
    correction = r.input_ids[-1]  # the target's token at L + 1
    rejected = [t for t in prompt(3 * K, 10)[1:] if t != correction][:K]
    cache = b.new_cache(1, MAX_LEN)
    assert cache[runner.cache_index["ring_key"]].shape()[2] == window + K + 1
    b.prefill(PrefillInputs(np.array([accepted[:-1]]), np.array([0]), np.array([last])), cache)
    logits, hidden = b.verify(np.array([[accepted[-1], *rejected]]), [last], cache)
    assert int(logits[0, 0].argmax()) == correction  # so every draft is rejected
    got = runner.draft(cache, [correction], hidden[0, :1], [last + 1], K, written=[last + K + 1])
    assert got.tokens[0].tolist() == r.drafts, f"ours {got.tokens[0].tolist()}, transformers {r.drafts}"
