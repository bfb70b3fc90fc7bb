"""Speculative decoding: draft, verify in one target pass, accept by `runtime.speculative.accept`.

A round feeds the newest token and up to K drafted ones to `Backend.verify` (one pass over K + 1 tokens on the
cache), and `accept.accept` keeps a prefix of the drafts plus one token of the target's own, with the request's
sampler and generator: greedy gives plain greedy decoding's tokens exactly; sampling (standard speculative
sampling, drafts as point masses: both drafters here are deterministic) gives plain sampling's distribution.  The
row's length then moves past what was kept; the rejected tokens' keys and values are overwritten or masked by
position from then on (`runtime.backend`: no rollback call exists or is needed).  A round without drafts is a plain
decode step.  This module runs one row (`_Row`); several rows run in batched rounds (`batched`: one target call
per round for all rows, or plain batched steps where the engine verifies one row per call).

Drafters: ``"prompt_lookup"`` (`prompt_lookup.PromptLookup` on the row's tokens, kept in an int64 array) and
``"assistant"`` (the artifact's assistant graph, `runtime.assistant.AssistantRunner` on ONNX Runtime's engines,
its TensorRT engine `runtime.trt_assistant.TrtAssistantRunner` on TensorRT, fed the target's final-norm hidden
state that `Backend.verify` returns; on the ONNX Runtime window engine each verify call is preceded by
`AssistantRunner.evicting`, which keeps the entry a compaction drops for the next round).  K: a fixed number, or
``"auto"``: `adapt.AdaptiveK` (per batch) up to the artifact's K, told each round's proposed and accepted drafts and
its wall time.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InputError
from runtime.sampling import Greedy
from runtime.speculative.accept import accept, accept_greedy
from runtime.speculative.adapt import AdaptiveK
from runtime.speculative.batched import run_batch
from runtime.speculative.prompt_lookup import PromptLookup

__all__ = ["ASSISTANT", "DRAFTERS", "SpecStats", "check_draft", "speculative"]

_LOOKUP = PromptLookup(max_ngram=2, unambiguous_unigram=True)  # transformers' rules but ambiguous 1-grams
ASSISTANT = "assistant"  # drafts by the artifact's assistant graph (needs `make export-assistant`)
# Context-only drafters: (tokens: int64 array of the row so far, k) -> up to k draft token ids.
DRAFTERS: dict[str, Callable[[np.ndarray, int], object]] = {"prompt_lookup": _LOOKUP.propose}


@dataclass
class SpecStats:
    """What a speculative generation did: verify calls and plain decode steps, tokens drafted and accepted."""

    verify_calls: int = 0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_call: list[int] = field(default_factory=list)
    k_per_round: list[int] = field(default_factory=list)  # drafts verified each round (0: a plain step; a batch:
    # the most any row verified)
    plain_reason: str | None = None  # why a batch decoded plain steps instead of speculating (`batched`)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def check_draft(backend, draft: str, num_draft_tokens, manifest: dict | None = None) -> None:
    """Refuse an unknown drafter, a bad K, an artifact that cannot verify K drafts, or one without the assistant
    (on TensorRT: without the assistant's current TensorRT engine) that ``draft="assistant"`` needs, with the
    reason and the command that fixes it.  ``num_draft_tokens``: an integer >= 1, or ``"auto"``."""
    if draft not in DRAFTERS and draft != ASSISTANT:
        raise InputError(f"draft={draft!r}; expected one of {', '.join([*DRAFTERS, ASSISTANT])} or None")
    if num_draft_tokens != "auto" and (isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int)
                                       or num_draft_tokens < 1):
        raise InputError(f"num_draft_tokens={num_draft_tokens!r}; expected an integer >= 1 or 'auto'")
    limit = getattr(backend, "max_draft_tokens", 0)
    if not limit:
        raise InputError("speculative decoding needs an artifact exported with --speculative K (make export "
                         "SPECULATIVE=K): its graphs return logits at every drafted token and its sliding rings can "
                         "take rejected tokens back; this one was exported without it")
    if num_draft_tokens != "auto" and num_draft_tokens > limit:
        raise InputError(f"num_draft_tokens={num_draft_tokens}; this artifact verifies at most {limit} draft tokens "
                         f"per call (exported with --speculative {limit})")
    if draft == ASSISTANT and manifest is not None and manifest.get("assistant") is None:
        raise InputError("draft='assistant': the artifact has no assistant; add one with `make export-assistant "
                         "ASSISTANT=<checkpoint dir> OUT=<artifact>`")
    name = getattr(backend, "name", None)
    if draft == ASSISTANT and name == "tensorrt":  # its own engine: `runtime.trt_assistant`
        from runtime.trt_assistant import trt_engine_problem

        if manifest is not None and (problem := trt_engine_problem(getattr(backend, "root", "<artifact>"), manifest)):
            raise InputError(f"draft='assistant' on TensorRT: {problem}; or use draft='prompt_lookup'")
    elif draft == ASSISTANT and name != "onnxruntime":
        raise InputError("draft='assistant' runs on ONNX Runtime engines (ring and window) and on TensorRT (the "
                         "assistant reads the target's cache buffers in place); this backend is "
                         f"{getattr(backend, 'name', type(backend).__name__)!r}: build one with `make build-engine "
                         "BACKEND=onnxruntime` or use draft='prompt_lookup'")
    elif (draft == ASSISTANT and manifest is not None and getattr(backend, "sliding_slots", None) is not None
            and not _reads_windowed_caches(manifest["assistant"])):
        raise InputError("draft='assistant' on the ONNX Runtime window engine (--ort-sliding window): this "
                         "artifact's assistant graph reads the target's sliding cache in the ring layout only (it "
                         "was exported before the sliding_offset input); re-export it with `make export-assistant "
                         "ASSISTANT=<checkpoint dir> OUT=<artifact>`, or use the ring engine (`make build-engine`)")


def _reads_windowed_caches(record: dict) -> bool:
    """Whether an assistant record's graph takes the sliding cache's offset (`runtime.assistant.OFFSET`)."""
    from runtime.assistant import OFFSET

    return any(spec.get("name") == OFFSET for spec in record.get("inputs", ()))


def speculative(backend, cache, first_logits: np.ndarray, contexts: list[list[int]], *, num_draft_tokens,
                max_new_tokens: int, max_len: int, stop_ids: set[int], draft: str = "prompt_lookup", sampler=None,
                rng: np.random.Generator | None = None, assistant=None,
                stats: SpecStats | None = None) -> Iterator[tuple[int, int, str | None]]:
    """Generate after a prefill whose logits are ``first_logits`` (B, V), each row's prompt ``contexts[i]`` (token
    ids as cached) on ``cache``; yields (row, token, "stop" or None) in each row's order, stopping a row as
    `runtime.generate`'s plain loop does (a stop id, included; ``max_len``; ``max_new_tokens``).  ``sampler``
    (default greedy) and ``rng`` are the request's; ``assistant`` an `AssistantRunner` for ``draft="assistant"``."""
    check_draft(backend, draft, num_draft_tokens)
    if draft == ASSISTANT and assistant is None:
        raise InputError("draft='assistant' needs the artifact's AssistantRunner (runtime.assistant)")
    if draft == ASSISTANT and getattr(assistant, "sliding_slots", None) != getattr(backend, "sliding_slots", None):
        raise InputError(f"draft='assistant': the assistant reads sliding caches of "
                         f"{getattr(assistant, 'sliding_slots', None) or 'ring'} layout, the backend keeps "
                         f"{getattr(backend, 'sliding_slots', None) or 'ring'} (windowed caches: their slot count)")
    sampler = sampler if sampler is not None else Greedy()
    rng = rng if rng is not None else np.random.default_rng()
    stats = stats if stats is not None else SpecStats()
    first = sampler.choose(np.asarray(first_logits), rng).tolist()
    if len(contexts) == 1:
        row = _Row(backend, cache, contexts[0], max_len, num_draft_tokens, draft, assistant)
        yield from row.run(0, first[0], sampler, rng, max_new_tokens, stop_ids, stats)
        return
    # several rows: one target call per round for all of them (`batched`); K and its costs per batch size
    key = (draft, len(contexts))
    adaptive = None
    if num_draft_tokens == "auto":
        # before a batch of this size has measured anything: a batched pass costing 1 + k / 2 steps (padded rows
        # cost as much as valid ones), not 1: a start then needs the rows' drafts to pay; measured costs replace it
        prior = _seen_costs(backend, key) or [1 + k / 2 for k in range(backend.max_draft_tokens + 1)]
        adaptive = AdaptiveK(backend.max_draft_tokens, verify_cost=prior)
    yield from run_batch(backend, cache, first, contexts, adaptive=adaptive, drafter=DRAFTERS.get(draft),
                         k_max=backend.max_draft_tokens if adaptive is not None else num_draft_tokens,
                         assistant=assistant if draft == ASSISTANT else None, sampler=sampler, rng=rng,
                         max_new_tokens=max_new_tokens, max_len=max_len, stop_ids=stop_ids, stats=stats,
                         keep_costs=lambda: _keep_costs(backend, key, adaptive))


class _Row:
    """One row's state: its tokens (int64 array, cached ones then the pending ones), the drafter and K."""

    def __init__(self, backend, cache, context, max_len: int, num_draft_tokens, draft: str, assistant):
        self.backend, self.cache, self.assistant, self.draft = backend, cache, assistant, draft
        self.tokens = np.zeros(max_len + backend.max_draft_tokens + 2, np.int64)
        self.n = len(context)  # tokens in self.tokens
        self.tokens[: self.n] = context
        self.drafter = None if draft == ASSISTANT else DRAFTERS[draft]
        self.adaptive = None
        if num_draft_tokens == "auto":  # the costs seen by the previous sequence on this engine are the prior
            self.adaptive = AdaptiveK(backend.max_draft_tokens, verify_cost=_seen_costs(backend, draft))
        self.k_max = backend.max_draft_tokens if num_draft_tokens == "auto" else num_draft_tokens
        self.hidden = None  # assistant: the target's final-norm hidden at the position before the newest token
        self.written = len(context)  # positions the target has written (rejected drafts included)
        # assistant on a windowed cache: the entry its last compaction dropped that the next round may read
        self.windowed = getattr(assistant, "sliding_slots", None) is not None
        self.evicted = None

    def _assistant_drafts(self, token: int, cached: int, k: int) -> list[int]:
        if k < 1 or self.hidden is None:
            return []
        kw = {"evicted": self.evicted} if self.evicted is not None else {}
        out = self.assistant.draft(self.cache, [token], self.hidden[None], [cached], k, written=[self.written], **kw)
        return out.tokens[0].tolist()

    def run(self, row, token, sampler, rng, max_new_tokens, stop_ids, stats) -> Iterator[tuple[int, int, str | None]]:
        """The round loop.  A context drafter (prompt lookup) drafts first, as many as fit (it costs ~nothing), so
        a round without a match is a plain decode step that never consults `AdaptiveK`; with a match, "auto" cuts
        the drafts to `AdaptiveK.next_k`, told whether the round continues a run (the previous round's drafts were
        all accepted).  Per round: Python ints and lists, one backend call, one argmax (greedy)."""
        backend, cache, adaptive, drafter = self.backend, self.cache, self.adaptive, self.drafter
        decode, verify, tokens = backend.decode, backend.verify, self.tokens
        fixed_room = None if getattr(backend, "sliding_slots", None) is not None else backend.verify_tokens([0]) - 1
        greedy = isinstance(sampler, Greedy)
        clock = time.perf_counter
        prompt, made, max_len = self.n, 0, len(tokens) - backend.max_draft_tokens - 2
        pending = [token]
        continuing = False  # the previous round verified drafts and accepted all of them
        plain = 0  # plain rounds so far
        while True:
            for tok in pending:  # emit as the plain loop does: the j-th new token is fed at position prompt + j
                made += 1
                if tok in stop_ids:
                    yield row, tok, "stop"
                    self._keep_costs()
                    return
                yield row, tok, None
                if prompt + made >= max_len or made >= max_new_tokens:
                    self._keep_costs()
                    return
            tokens[self.n: self.n + len(pending)] = pending
            self.n += len(pending)
            token = pending[-1]
            cached = prompt + made - 1  # the newest token is fed at this position
            room = min(self.k_max, backend.verify_tokens([cached]) - 1 if fixed_room is None else fixed_room,
                       max_new_tokens - made - 1, max_len - 1 - cached)
            start = clock() if adaptive is not None else 0.0
            if drafter is not None:
                drafts = drafter(tokens[: self.n], room) if room > 0 else []
                drafts = drafts.tolist() if isinstance(drafts, np.ndarray) else [int(t) for t in drafts]
                if drafts and adaptive is not None:
                    k = adaptive.next_k(continuing)
                    if k < len(drafts):
                        drafts = drafts[:k]
            else:
                k = min(room, adaptive.next_k()) if adaptive is not None else room
                drafts = self._assistant_drafts(token, cached, k)
            stats.k_per_round.append(len(drafts))
            if not drafts and self.assistant is None:  # a plain decode step, as the plain loop's
                logits = decode([token], [cached], cache, copy=False)
                pending = sampler.choose(logits, rng).tolist()
                stats.decode_steps += 1
                if adaptive is not None:
                    plain += 1
                    if plain % 8 == 1:  # one plain round in 8 is timed: the cost being beaten stays measured
                        adaptive.observe(0, 0, max(clock() - start, 1e-9))
                    else:
                        adaptive.plain_round()
                continuing = False
                continue
            # a verify call (over the newest token alone where the assistant drafted nothing: its hidden is needed)
            if self.windowed:
                self.evicted = self.assistant.evicting(cache, [cached])
            logits, hidden = verify(np.array([[token, *drafts]], np.int64), [cached], cache, copy=False)
            self.written = max(self.written, cached + 1 + len(drafts))
            if greedy:
                pending, accepted = accept_greedy(drafts, logits[0])
            else:
                got = accept(drafts, logits[0], sampler, rng)
                pending, accepted = got.tokens, got.num_accepted
            if self.assistant is not None:
                self.hidden = np.array(hidden[0, accepted], np.float32)  # a copy: buffers may be reused
            if drafts:
                stats.verify_calls += 1
                stats.drafted += len(drafts)
                stats.accepted += accepted
                stats.accepted_per_call.append(accepted)
            else:
                stats.decode_steps += 1
            if adaptive is not None:
                adaptive.observe(len(drafts), accepted, max(clock() - start, 1e-9),
                                 continuing if drafter is not None and drafts else None)
            continuing = bool(drafts) and accepted == len(drafts)

    def _keep_costs(self) -> None:
        _keep_costs(self.backend, self.draft, self.adaptive)


def _keep_costs(backend, key, adaptive) -> None:
    """Leave an `AdaptiveK` for the next sequence to read (`_seen_costs`: not here, after the last token); ``key``:
    the drafter, with the batch size for a batch (a batched round's costs are not a single row's)."""
    if adaptive is not None:
        try:
            _COSTS.setdefault(backend, {}).setdefault(key, [None, []])[1].append(adaptive)
        except TypeError:  # a backend that cannot be a weak key: no memory across sequences
            pass


# per engine and drafter: [the costs per K in decode steps measured by earlier sequences (`AdaptiveK.measured_costs`,
# averaged over sequences: each is a ratio of two noisy medians), the rows ended since]: a new sequence's prior (a
# short answer ends before it has measured anything)
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _seen_costs(backend, draft) -> list[float] | None:
    """The prior `AdaptiveK.verify_cost` for a new sequence: the costs seen, a K never measured on the line between
    the measured ones around it, or beyond the last one on the line from the plain step (1) through it."""
    try:
        memory = _COSTS.get(backend, {}).get(draft)
    except TypeError:
        return None
    if memory is None:
        return None
    seen, finished = memory
    for adaptive in finished:  # the rows ended since the last read: their measured costs, averaged in
        if seen is None or len(seen) != adaptive.max_k + 1:
            seen = memory[0] = [None] * (adaptive.max_k + 1)
        for k, cost in enumerate(adaptive.measured_costs()):
            if cost is not None:
                seen[k] = cost if seen[k] is None else seen[k] + 0.25 * (cost - seen[k])
    finished.clear()
    if seen is None or len(seen) != backend.max_draft_tokens + 1:
        return None
    known = [(0, 1.0)] + [(k, c) for k, c in enumerate(seen) if k and c is not None]
    if len(known) == 1:
        return None
    out = []
    for k in range(len(seen)):
        lo = max((p for p in known if p[0] <= k), key=lambda p: p[0])
        hi = min((p for p in known if p[0] >= k), key=lambda p: p[0], default=None)
        if hi is None:  # beyond the last measured K: its slope from the plain step
            hi, lo = lo, known[0]
        out.append(lo[1] if hi[0] == lo[0] else lo[1] + (hi[1] - lo[1]) * (k - lo[0]) / (hi[0] - lo[0]))
    return out
