"""Speculative rounds for a batch of rows: one target call per round for all of them, as a plain batched step.

A plain batched decode step reads the weights once for every row.  Running the rows' speculative rounds one row
after another (the single-row loop, `runtime.speculative.verify._Row`, on `Backend.rows` views) reads them once per
row per round, which at batch 4 made speculation slower than plain decoding (issue 23).  Here a round is:

1. every running row drafts: prompt lookup on each row's own tokens; the assistant for all rows in one
   `AssistantRunner.draft` call (the most drafts any row may take; each row keeps its own number);
2. where any row drafted (or the assistant needs its hidden states), ONE `Backend.verify` call over the rows:
   each row's newest token and its drafts, right-padded (``seq_lens``: rows without drafts are 1-token rows, a
   decode step that also returns the hidden state); where none drafted, one plain batched decode step, the plain
   loop's call;
3. each row accepts (greedy, or speculative sampling with the request's sampler and generator) and moves its length
   past what it kept (no rollback call: `runtime.backend`), and stops as the plain loop stops it.

Rows yield their tokens round by round, rows in order within a round, each row's tokens in order (the plain loop
yields step by step; per row the tokens and the stops are the same: greedy gives them exactly).

The calls run on the smallest `Backend.rows` view holding every running row (rows that finished inside it take
part as 1-token rows at their last position, whose results are dropped), so finished rows at the edges stop costing.

Where the backend verifies several tokens with past context one row per call (``batched_verify`` false: ONNX
Runtime's ring engine, GroupQueryAttention), rounds of several rows would still read the weights once per row:
while more than one row runs, the rounds are plain batched steps (greedy: the same tokens; sampling: the same
distribution), and `SpecStats.plain_reason` says why.  Once one row is left it speculates alone on its row view.

K: a fixed number, or ``"auto"``: one `AdaptiveK` for the batch, each row's drafts cut to its
``next_k(continuing)`` (its own run state), the round's time reported once per round (`observe`, with the widest
row's drafts: the width decides a batched pass's cost) against plain batched steps, the other rows' acceptance
through `AdaptiveK.learn`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from runtime.sampling import Greedy
from runtime.speculative.accept import accept, accept_greedy

__all__ = ["PER_ROW_REASON", "run_batch"]

PER_ROW_REASON = ("plain batched steps while more than one row runs: this engine verifies several tokens with past "
                  "context one row per call (ONNX Runtime's ring engine: GroupQueryAttention), so speculative rounds "
                  "would read the weights once per row where a plain batched step reads them once for all rows; "
                  "build the engine with --ort-sliding window (or TensorRT) to verify all rows in one call")


class _Row:
    """One row's state: its tokens (int64 array: cached ones, then the pending ones), what it emitted."""

    __slots__ = ("tokens", "n", "tail", "prompt", "made", "pending", "done", "continuing", "hidden", "written",
                 "evicted")

    def __init__(self, context, size: int, first: int):
        self.tokens = np.zeros(size, np.int64)
        self.n = self.prompt = self.written = len(context)
        self.tokens[: self.n] = context
        self.tail: list[int] = []  # emitted tokens not yet in ``tokens`` (written when the row drafts)
        self.made = 0
        self.pending = [first]
        self.done = False
        self.continuing = False  # the previous round verified drafts and accepted all of them
        self.hidden = None  # assistant: the target's final-norm hidden at the position before the newest token
        self.evicted = None  # assistant, windowed cache: (position, key, value) a compaction by the last call dropped


def run_batch(backend, cache, first: list[int], contexts: list[list[int]], *, k_max: int, adaptive, drafter,
              assistant, sampler, rng: np.random.Generator, max_new_tokens: int, max_len: int, stop_ids: set[int],
              stats, keep_costs: Callable[[], None]) -> Iterator[tuple[int, int, str | None]]:
    """Yields (row, token, "stop" or None).  ``drafter``: a context drafter (tokens, k) -> drafts, or None with
    ``assistant`` (an `AssistantRunner`); ``adaptive``: one `AdaptiveK` for the batch or None (K fixed at
    ``k_max``); ``keep_costs`` is called once the last row ends."""
    spare = backend.max_draft_tokens + 2
    rows = [_Row(c, max_len + spare, t) for c, t in zip(contexts, first)]
    batched = bool(getattr(backend, "batched_verify", False))
    fixed_room = None if getattr(backend, "sliding_slots", None) is not None else backend.verify_tokens([0]) - 1
    greedy = isinstance(sampler, Greedy)
    clock = time.perf_counter
    decode, verify = backend.decode, backend.verify
    lo, hi, view = 0, len(rows), cache
    last_k = None  # the round width `AdaptiveK` chose last (prompt lookup): 0 -> plain rounds without drafting
    idle_rounds = 0  # plain rounds in a row without drafting
    while True:
        for i in range(lo, hi):  # emit, as the plain loop stops a row: a stop id (kept), max_len, max_new_tokens
            r = rows[i]
            if r.done:
                continue
            for tok in r.pending:
                r.made += 1
                if tok in stop_ids:
                    r.done = True
                    yield i, tok, "stop"
                    break
                yield i, tok, None
                if r.prompt + r.made >= max_len or r.made >= max_new_tokens:
                    r.done = True
                    break
            if not r.done:
                r.tail += r.pending
        running = [i for i in range(lo, hi) if not rows[i].done]
        if not running:
            keep_costs()
            return
        if (running[0], running[-1] + 1) != (lo, hi):  # the smallest view holding every running row
            try:
                view = backend.rows(cache, running[0], running[-1] + 1)
                lo, hi = running[0], running[-1] + 1
            except (ValueError, AttributeError):  # an engine without row views: keep the whole batch
                pass
        speculate = batched or hi - lo == 1
        if not speculate and stats.plain_reason is None:
            stats.plain_reason = PER_ROW_REASON
        span = rows[lo:hi]
        newest = [0 if r.done else r.pending[-1] for r in span]
        cached = [r.prompt + r.made - 1 for r in span]  # each row's newest token is fed at this position
        start = clock()
        drafts = [[] for _ in span]
        ks: dict = {}
        offered = False  # a row's drafter matched something (before `AdaptiveK` cut it)
        # a context drafter whose last chosen width was 0 is not asked again until a probe is due: per-row lookups
        # cost little, but against a small model's batched step they are what would make the round slower
        idle = drafter is not None and adaptive is not None and last_k == 0 and not adaptive.probe_due
        if speculate and not idle:
            vt = None if fixed_room is not None else (backend.verify_tokens([c]) - 1 for c in cached)
            for j, (r, c) in enumerate(zip(span, cached)):
                room = fixed_room if vt is None else next(vt)
                if r.done:
                    continue
                room = min(k_max, room, max_new_tokens - r.made - 1, max_len - 1 - c)
                if drafter is not None:
                    if r.tail:
                        r.tokens[r.n: r.n + len(r.tail)] = r.tail
                        r.n += len(r.tail)
                        r.tail = []
                    d = drafter(r.tokens[: r.n], room) if room > 0 else []
                    d = d.tolist() if isinstance(d, np.ndarray) else [int(t) for t in d]
                    offered = offered or bool(d)
                    if d and adaptive is not None:  # next_k changes nothing: once per run state and round
                        if r.continuing not in ks:
                            ks[r.continuing] = adaptive.next_k(r.continuing)
                        d = d[: ks[r.continuing]]
                    drafts[j] = d
                elif r.hidden is not None:  # the assistant: how many this row takes
                    drafts[j] = min(room, adaptive.next_k()) if adaptive is not None else room
            if adaptive is not None:  # the round's width: what pays for the batch, not for one row
                wants = [len(d) if isinstance(d, list) else d for d in drafts]
                k = _round_k(adaptive, wants, [r.continuing if drafter is not None else None for r in span],
                             len(running))
                last_k = k if offered else None  # nothing matched: not a judgement on speculating
                drafts = [d[:k] if isinstance(d, list) else min(d, k) for d in drafts]
            if assistant is not None:
                drafts = _assistant_drafts(assistant, view, span, newest, cached, drafts)
        width = 1 + max(map(len, drafts))
        if width == 1 and (assistant is None or not speculate):  # a plain batched step, the plain loop's call
            logits = decode(newest, cached, view, copy=False)
            chosen = sampler.choose(logits, rng).tolist()
            for r, tok in zip(span, chosen):
                r.pending, r.continuing = [tok], False
            stats.decode_steps += 1
            stats.k_per_round.append(0)
            if speculate and adaptive is not None:  # the cost being beaten: timed every round while drafting is
                idle_rounds = idle_rounds + 1 if idle else 0  # considered, one in 8 while idle
                if idle_rounds % 8 == 1 or not idle:
                    adaptive.observe(0, 0, max(clock() - start, 1e-9))
                else:
                    adaptive.plain_round()
            continue
        ids = np.zeros((len(span), width), np.int64)
        lens = np.ones(len(span), np.int64)
        for j, (tok, d) in enumerate(zip(newest, drafts)):
            ids[j, 0] = tok
            ids[j, 1: 1 + len(d)] = d
            lens[j] += len(d)
        if assistant is not None and getattr(assistant, "sliding_slots", None) is not None:  # windowed caches
            ev = assistant.evicting(view, cached)
            for j, r in enumerate(span):
                r.evicted = None if ev is None or ev.position[j] < 0 else (ev.position[j], ev.key[j], ev.value[j])
        logits, hidden = verify(ids, cached, view, None if (lens == width).all() else lens, copy=False)
        if width > 1:
            stats.verify_calls += 1
        else:
            stats.decode_steps += 1
        stats.k_per_round.append(width - 1)
        timed = None  # the widest row's (drafts, accepted, continuing): the round's report to `adaptive`
        for j, (r, d, c) in enumerate(zip(span, drafts, cached)):
            if r.done:
                continue
            if greedy:
                r.pending, got = accept_greedy(d, logits[j, : len(d) + 1])
            else:
                out = accept(d, logits[j, : len(d) + 1], sampler, rng)
                r.pending, got = out.tokens, out.num_accepted
            r.written = max(r.written, c + 1 + len(d))
            if assistant is not None:
                r.hidden = np.array(hidden[j, got], np.float32)  # a copy: the buffers are reused
            if d:
                stats.drafted += len(d)
                stats.accepted += got
                stats.accepted_per_call.append(got)
                if adaptive is not None:
                    cont = r.continuing if drafter is not None else None
                    if timed is None or len(d) > timed[0]:
                        if timed is not None:
                            adaptive.learn(*timed)
                        timed = (len(d), got, cont)
                    else:
                        adaptive.learn(len(d), got, cont)
            r.continuing = bool(d) and got == len(d)
        if adaptive is not None:  # a round without drafts (the assistant's hidden states) is a plain round
            timed = timed or (0, 0, None)
            adaptive.observe(timed[0], timed[1], max(clock() - start, 1e-9), timed[2])


def _round_k(adaptive, wants: list[int], continuing: list, running: int) -> int:
    """The most drafts any row verifies this round (rows that want fewer keep theirs): the k maximising the round's
    expected tokens (each row's `AdaptiveK.expected_tokens` of min(its drafts, k); rows without drafts emit one) per
    unit of the round's cost (`AdaptiveK.cost`, measured per k on batched rounds; k = 0 a plain batched step of the
    ``running`` rows).  Rows padded to the widest one cost as much as valid ones, so a single row with drafts
    among several without must be worth a pass of its width."""
    most = max(wants)
    if most < 1:
        return 0
    best, best_rate = 0, running / adaptive.cost(0)
    for k in range(1, most + 1):
        tokens = sum(adaptive.expected_tokens(min(w, k), c) if w else 1.0 for w, c in zip(wants, continuing))
        rate = tokens / adaptive.cost(k)
        if rate > best_rate * (1 + 1e-12):  # ties go to the smaller k
            best, best_rate = k, rate
    return max(best, 1) if adaptive.probe_due else best


def _assistant_drafts(assistant, view, span: list[_Row], newest: list[int], cached: list[int],
                      ks: list) -> list[list[int]]:
    """The assistant's drafts for the rows of ``view`` in one call: as many as the row that takes the most, each row
    cut to its own number (``ks``: an int, or [] for a row that takes none: no hidden state yet, or finished)."""
    most = max((k for k in ks if isinstance(k, int)), default=0)
    if most < 1:
        return [[] for _ in span]
    width = next(r.hidden.shape[-1] for r, k in zip(span, ks) if isinstance(k, int))
    hidden = np.zeros((len(span), width), np.float32)
    for j, r in enumerate(span):
        if r.hidden is not None:
            hidden[j] = r.hidden
    kept = [r.evicted for r in span]
    evicted = None
    if any(e is not None for e in kept):  # the entries the rows' last calls dropped (windowed caches)
        from runtime.assistant import Evicted

        _, key, value = next(e for e in kept if e is not None)
        evicted = Evicted(np.array([-1 if e is None else e[0] for e in kept], np.int64),
                          np.stack([np.zeros_like(key) if e is None else e[1] for e in kept]),
                          np.stack([np.zeros_like(value) if e is None else e[2] for e in kept]))
    out = assistant.draft(view, newest, hidden, cached, most, written=[r.written for r in span],
                          **({"evicted": evicted} if evicted is not None else {}))
    return [out.tokens[j, :k].tolist() if isinstance(k, int) and k > 0 else [] for j, k in enumerate(ks)]
