"""Speculative decoding of several rows (`runtime.speculative.batched`).

The references are plain greedy `runtime.generate` of each prompt alone and the plain batched loop (the same call
without ``draft``), never the code under test:
- the window engine (``--ort-sliding window``, a slack of 4 so GroupQueryAttention compacts often: per-row verify
  limits) verifies every row in one call: greedy with prompt lookup (fixed K and "auto") and with a replay drafter
  (long runs accepted and rejected in every row) equals both references, rows of different prompt lengths stopping
  at different times; one backend call per round, every running row in it;
- the ring engine verifies one row per call: while several rows run it decodes plain batched steps and says why
  (`SpecStats.plain_reason`), and the last row left speculates alone; greedy equals the references with prompt
  lookup and with the assistant;
- the assistant's batched path (one `AssistantRunner.draft` call for all rows, one verify call) on the ring engine
  behind a backend that verifies the rows of a call one by one on row views and says ``batched_verify`` (the
  assistant reads ring-layout caches: the window engine refuses it);
- sampling at batch 2 keeps plain sampling's distribution (the joint of each row's first three tokens, chi-square
  against the exact distribution from the target's prefill logits, as tests/test_speculative_generate.py).
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

import runtime
from exporter.config import PRESETS
from exporter.export import export_artifact
from exporter.export_assistant import export_assistant
from exporter.stream import fake_model
from graphs.build import build_engine
from graphs.ort.assistant import add_ort_assistant
from runtime.sampling import Sample
from runtime.speculative import verify as spec
from runtime.speculative.batched import PER_ROW_REASON
from tests.assistant_ref import prompt, reference_pair
from tests.speculative_doubles import Counting, RowByRow
from tests.test_speculative_generate import _binned_pvalue, _joint, _tree

PRESET, K, MAX_LEN = "tiny", 3, 200
RUNS = 1000


@pytest.fixture(scope="module")
def ring_artifact(reference_store, workdir, tmp_path_factory):
    """The tiny target exported with --speculative K, ring engine, with the tiny assistant exported in."""
    _, ckpt = reference_store(PRESET)
    out = tmp_path_factory.mktemp("batchspec") / "artifact"
    export_artifact(fake_model(PRESETS[PRESET]), out, max_len=MAX_LEN, source={"checkpoint": str(ckpt)},
                    weights_from=ckpt, speculative=K, log=lambda *_: None)
    build_engine(out, "onnxruntime", ort_ring_decode="in_place", log=lambda *_: None)
    *_, assistant_dir = reference_pair("tiny-assistant", workdir)
    export_assistant(assistant_dir, out, log=lambda *_: None)
    add_ort_assistant(out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def window_model(ring_artifact, tmp_path_factory):
    art = tmp_path_factory.mktemp("batchspec-window") / "artifact"
    shutil.copytree(ring_artifact, art)
    build_engine(art, "onnxruntime", ort_sliding="window", ort_sliding_slack=4, log=lambda *_: None)
    model = runtime.load(art, backend="onnxruntime")
    assert model.backend.batched_verify and model.backend.sliding_slots == PRESETS[PRESET].text.sliding_window + 4
    return model


def _prompts():
    """Rows of different lengths, two with a repeated span (prompt lookup matches), one over three windows long."""
    w = PRESETS[PRESET].text.sliding_window
    rep = [2, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    return [rep, prompt(3 * w + 5, 4), prompt(w + 2, 5) + rep[1:], prompt(9, 6)]


def _references(model, prompts, **kw):
    alone = [runtime.generate(model, p, **kw) for p in prompts]
    batch = runtime.generate(model, prompts, **kw)
    for a, b in zip(alone, batch):
        assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)  # the references agree
    return alone


def _check(got, want, what):
    for i, (g, a) in enumerate(zip(got, want)):
        assert g.tokens == a.tokens, f"{what}: row {i}: {g.tokens} != plain {a.tokens}"
        assert g.finish_reason == a.finish_reason, f"{what}: row {i}"


def _stop_kw(model, prompts, new=40):
    """A stop id that ends some rows after 5 tokens or more and not all of them (the rows alone, plain greedy), so
    rows finish at different times."""
    outs = [runtime.generate(model, p, max_new_tokens=new).tokens for p in prompts]
    first: dict[int, dict[int, int]] = {}
    for r, out in enumerate(outs):
        for j, t in enumerate(out):
            first.setdefault(t, {}).setdefault(r, j)
    good = [t for t, f in first.items() if min(f.values()) >= 5 and len(f) < len(prompts)]
    assert good, f"no stop id fits these outputs: {outs}"
    return dict(max_new_tokens=new, stop=[max(good, key=lambda t: (len(first[t]), -min(first[t].values())))])


def test_window_engine_greedy_equals_plain(window_model):
    model = dataclasses.replace(window_model, backend=Counting(window_model.backend))
    prompts = _prompts()
    kw = _stop_kw(model, prompts)
    want = _references(model, prompts, **kw)
    assert len({len(a.tokens) for a in want}) > 1, "rows should stop at different times"
    for k in (1, K, "auto"):
        stats = spec.SpecStats()
        model.backend.calls.clear()
        got = runtime.generate(model, prompts, draft="prompt_lookup", num_draft_tokens=k, spec_stats=stats, **kw)
        _check(got, want, f"prompt lookup K={k}")
        assert stats.plain_reason is None
        assert stats.verify_calls > 0 and stats.accepted > 0, (k, stats)
        # one backend call per round (a verify, or a plain batched step where no row drafted)
        assert len(model.backend.calls) == len(stats.k_per_round), (k, model.backend.calls)


def _replay(prompts, plains):
    """Per row: the plain continuation with every third proposed token wrong (long runs accepted and rejected)."""
    def draft(context: np.ndarray, k: int) -> list[int]:
        row = next(i for i, p in enumerate(prompts) if list(context[: len(p)]) == p)
        start = len(context) - len(prompts[row])
        out = plains[row][start:start + k]
        return [(t + 1) % 290 + 3 if (start + j) % 3 == 2 else t for j, t in enumerate(out)]
    return draft


def test_window_engine_replay_rows_and_one_verify_call_per_round(window_model, monkeypatch):
    """Every running row drafts each round: each round is ONE verify call holding every running row (rows at the
    edges that finished drop out of the call's view), the rows' token counts differ (right padding), and the
    window's per-row limits cut some rows' drafts while others verify K + 1 tokens."""
    model = dataclasses.replace(window_model, backend=Counting(window_model.backend))
    prompts = _prompts()
    kw = _stop_kw(model, prompts)
    want = _references(model, prompts, **kw)
    monkeypatch.setitem(spec.DRAFTERS, "replay", _replay(prompts, [a.tokens for a in want]))
    stats = spec.SpecStats()
    model.backend.calls.clear()
    got = runtime.generate(model, prompts, draft="replay", num_draft_tokens=K, spec_stats=stats, **kw)
    _check(got, want, "replay")
    calls = model.backend.calls
    assert len(calls) == len(stats.k_per_round), calls
    assert all((c[0] == "decode") == (k == 0) for c, k in zip(calls, stats.k_per_round)), "a plain step iff no drafts"
    assert sum(c[0] == "verify" for c in calls) >= 0.8 * len(calls), calls
    running = [i for i, a in enumerate(want) if len(a.tokens) > 1]  # after the first token (the prefill's)
    assert calls[0][1] == running[-1] + 1 - running[0] >= 3, "the first round verifies all rows in one call"
    assert any(isinstance(c[2], list) and len(set(c[2])) > 1 for c in calls), "no round padded a row"
    assert stats.accepted >= sum(map(len, (a.tokens for a in want))) // 4 and stats.accepted < stats.drafted, stats
    assert calls[-1][1] < len(prompts), "finished rows at the edge should leave the call"


def test_rows_stop_drafting_while_adaptive_k_chooses_plain_rounds(window_model, monkeypatch):
    """A drafter whose every draft is wrong, K "auto": once `AdaptiveK` has chosen a plain round over the drafts the
    rows offered, the rows are not asked for drafts again until a probe is due (the lookups would cost each round
    something for nothing), and the output is plain greedy's."""
    model = dataclasses.replace(window_model, backend=Counting(window_model.backend))
    prompts = _prompts()
    want = _references(model, prompts, max_new_tokens=60)
    plains = [a.tokens for a in want]
    asked = []

    def wrong(context: np.ndarray, k: int) -> list[int]:  # the plain continuation, every token replaced
        asked.append(len(context))
        row = next(i for i, p in enumerate(prompts) if list(context[: len(p)]) == p)
        start = len(context) - len(prompts[row])
        return [(t + 1) % 290 + 3 for t in plains[row][start:start + k]]

    monkeypatch.setitem(spec.DRAFTERS, "wrong", wrong)
    stats = spec.SpecStats()
    got = runtime.generate(model, prompts, max_new_tokens=60, draft="wrong", num_draft_tokens="auto",
                           spec_stats=stats)
    _check(got, want, "always-wrong drafter")
    rounds = len(stats.k_per_round)
    assert stats.accepted == 0 and rounds >= 59, stats
    assert sum(k == 0 for k in stats.k_per_round) >= 0.8 * rounds, stats.k_per_round  # plain rounds won
    # asked in the first rounds and at probes only; every round would be >= `rounds` x 4 rows
    assert len(asked) < rounds, (len(asked), rounds)


def test_ring_engine_decodes_plain_batched_steps(ring_artifact):
    """The ring engine verifies one row per call: plain batched steps while several rows run (the reason in
    SpecStats), then the last row speculates alone (rows of 11, 29 and 20 tokens reach max_len apart); the tokens
    are plain greedy's."""
    base = runtime.load(ring_artifact, backend="onnxruntime")
    assert not base.backend.batched_verify
    model = dataclasses.replace(base, backend=Counting(base.backend))
    prompts = _prompts()[:3]
    kw = dict(max_new_tokens=MAX_LEN - min(map(len, prompts)))  # rows of different lengths end at max_len apart
    want = _references(model, prompts, **kw)
    ends = sorted(len(a.tokens) for a in want)
    assert ends[-1] > ends[-2] + 5, f"one row should run alone for a while: lengths {ends}"
    for draft in ("prompt_lookup", "assistant"):
        stats = spec.SpecStats()
        model.backend.calls.clear()
        got = runtime.generate(model, prompts, draft=draft, num_draft_tokens=K, spec_stats=stats, **kw)
        _check(got, want, draft)
        assert stats.plain_reason == PER_ROW_REASON and "one row per call" in stats.plain_reason
        calls = model.backend.calls
        assert any(c[1] > 1 for c in calls) and all(c[0] == "decode" for c in calls if c[1] > 1), \
            "several rows: plain batched steps only"
        assert all(c[1] == 1 for c in calls if c[0] == "verify"), "verify calls of one row only"
        assert stats.verify_calls > 0, f"{draft}: the last row did not speculate"


def test_assistant_batched_rounds_equal_plain(ring_artifact, monkeypatch):
    """The assistant drafts for all rows in one call and the rows are verified in one call per round (on a backend
    that verifies rows one by one but says it batches), greedy tokens equal plain greedy's, K fixed and "auto"."""
    from runtime.assistant import AssistantRunner

    drafted = []
    original = AssistantRunner.draft

    def spy(self, cache, tokens, hidden, position, num_tokens, **kw):
        drafted.append(len(np.asarray(tokens).reshape(-1)))
        return original(self, cache, tokens, hidden, position, num_tokens, **kw)

    monkeypatch.setattr(AssistantRunner, "draft", spy)
    base = runtime.load(ring_artifact, backend="onnxruntime")
    model = dataclasses.replace(base, backend=RowByRow(base.backend))
    prompts = _prompts()[:3]
    kw = _stop_kw(model, _prompts(), new=30)
    want = _references(base, prompts, **kw)
    for k in (K, "auto"):
        stats = spec.SpecStats()
        model.backend.calls.clear()
        drafted.clear()
        got = runtime.generate(model, prompts, draft="assistant", num_draft_tokens=k, spec_stats=stats, **kw)
        _check(got, want, f"assistant K={k}")
        assert stats.drafted > 0 and stats.plain_reason is None, stats
        # several rows drafted in one call (K fixed: all rows from the first drafting round; "auto" starts from a
        # prior that does not pay at these random weights' acceptance and drafts on its probes)
        assert drafted and (drafted[0] == len(prompts) if k == K else max(drafted) > 1), drafted
        assert model.backend.calls[0] == ("verify", 3, 1)  # the first round: each row's hidden state, one call
        assert len(model.backend.calls) == len(stats.k_per_round)


def test_batched_sampling_keeps_the_distribution(window_model, monkeypatch):
    """Two rows of the same prompt sampled with drafts (a table drafter proposing the target's likeliest
    continuation: accepted and rejected, rows of different widths): each row's first three tokens follow the exact
    plain-sampling distribution (pooled over both rows, chi-square), and fail against another temperature."""
    model = window_model
    ids = [2, 11, 57, 9, 140, 33]
    temperature = 2.0
    dist = _tree(model, ids, Sample(temperature=temperature, top_k=3, top_p=1.0))

    def table(tokens: np.ndarray, k: int) -> list[int]:
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
        for got in runtime.generate(model, [ids, ids], seed=seed, draft="table", num_draft_tokens=K,
                                    spec_stats=stats, **kw):
            key = tuple(got.tokens[:3])
            counts[key] = counts.get(key, 0) + 1
    assert stats.verify_calls >= RUNS and 0 < stats.accepted < stats.drafted, stats
    assert _binned_pvalue(counts, _joint(dist), 2 * RUNS) > 1e-3
    other = _joint(_tree(model, ids, Sample(temperature=temperature / 2, top_k=3, top_p=1.0)))
    assert _binned_pvalue(counts, other, 2 * RUNS) < 1e-3
