"""Speculative decoding: draft, verify in one target pass, accept by `runtime.speculative.accept`.

A round feeds the newest token and up to K drafted ones to `Backend.verify` (one pass over K + 1 tokens on the
cache), and `accept.accept` keeps a prefix of the drafts plus one token of the target's own, with the request's
sampler and generator: greedy gives plain greedy decoding's tokens exactly; sampling (standard speculative
sampling, drafts as point masses: both drafters here are deterministic) gives plain sampling's distribution.  The
row's length then moves past what was kept; the rejected tokens' keys and values are overwritten or masked by
position from then on (`runtime.backend`: no rollback call exists or is needed).  A round without drafts is a plain
decode step.  Rows run one at a time on views of their cache rows (`Backend.rows`): each gets its own drafts,
acceptance and K, and ONNX Runtime's ring engines run several tokens with past context one row per call anyway.

Drafters: ``"prompt_lookup"`` (`prompt_lookup.PromptLookup` on the row's tokens, kept in an int64 array) and
``"assistant"`` (the artifact's assistant graph, `runtime.assistant.AssistantRunner`, fed the target's final-norm
hidden state that `Backend.verify` returns).  K: a fixed number, or ``"auto"``: `adapt.AdaptiveK` per row up to the
artifact's K, told each round's proposed and accepted drafts and its wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InputError
from runtime.sampling import Greedy
from runtime.speculative.accept import accept
from runtime.speculative.adapt import AdaptiveK
from runtime.speculative.prompt_lookup import PromptLookup

__all__ = ["ASSISTANT", "DRAFTERS", "SpecStats", "check_draft", "speculative"]

_LOOKUP = PromptLookup(max_ngram=2)
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
    k_per_round: list[int] = field(default_factory=list)  # the K asked of the drafter each round (0: plain step)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def check_draft(backend, draft: str, num_draft_tokens, manifest: dict | None = None) -> None:
    """Refuse an unknown drafter, a bad K, an artifact that cannot verify K drafts, or one without the assistant
    that ``draft="assistant"`` needs, with the reason.  ``num_draft_tokens``: an integer >= 1, or ``"auto"``."""
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
    if draft == ASSISTANT and (getattr(backend, "name", None) != "onnxruntime"
                               or getattr(backend, "sliding_slots", None) is not None):
        raise InputError("draft='assistant' runs on the ONNX Runtime ring engine only (the assistant reads the "
                         "target's cache buffers in place in the ring layout); this backend is "
                         f"{getattr(backend, 'name', type(backend).__name__)!r}"
                         f"{' with --ort-sliding window' if getattr(backend, 'sliding_slots', None) else ''}: "
                         "rebuild with `make build-engine BACKEND=onnxruntime` or use draft='prompt_lookup'")


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
    sampler = sampler if sampler is not None else Greedy()
    rng = rng if rng is not None else np.random.default_rng()
    stats = stats if stats is not None else SpecStats()
    first = sampler.choose(np.asarray(first_logits), rng).tolist()
    rows = len(contexts)
    for i in range(rows):
        view = backend.rows(cache, i, i + 1) if rows > 1 else cache
        row = _Row(backend, view, contexts[i], max_len, num_draft_tokens, draft, assistant)
        yield from row.run(i, first[i], sampler, rng, max_new_tokens, stop_ids, stats)


class _Row:
    """One row's state: its tokens (int64 array, cached ones then the pending ones), the drafter and K."""

    def __init__(self, backend, cache, context, max_len: int, num_draft_tokens, draft: str, assistant):
        self.backend, self.cache, self.assistant = backend, cache, assistant
        self.tokens = np.zeros(max_len + backend.max_draft_tokens + 2, np.int64)
        self.n = len(context)  # tokens in self.tokens
        self.tokens[: self.n] = context
        self.drafter = None if draft == ASSISTANT else DRAFTERS[draft]
        self.adaptive = AdaptiveK(backend.max_draft_tokens) if num_draft_tokens == "auto" else None
        self.k_max = backend.max_draft_tokens if num_draft_tokens == "auto" else num_draft_tokens
        self.hidden = None  # assistant: the target's final-norm hidden at the position before the newest token
        self.written = len(context)  # positions the target has written (rejected drafts included)

    def _drafts(self, token: int, cached: int, k: int) -> list[int]:
        if k < 1:
            return []
        if self.assistant is None:
            return [int(t) for t in self.drafter(self.tokens[: self.n], k)]
        if self.hidden is None:
            return []
        out = self.assistant.draft(self.cache, [token], self.hidden[None], [cached], k, written=[self.written])
        return out.tokens[0].tolist()

    def run(self, row, token, sampler, rng, max_new_tokens, stop_ids, stats) -> Iterator[tuple[int, int, str | None]]:
        backend, cache = self.backend, self.cache
        prompt, made, max_len = self.n, 0, len(self.tokens) - backend.max_draft_tokens - 2
        pending = [token]
        while True:
            for tok in pending:  # emit as the plain loop does: the j-th new token is fed at position prompt + j
                made += 1
                if tok in stop_ids:
                    yield row, tok, "stop"
                    return
                yield row, tok, None
                if prompt + made >= max_len or made >= max_new_tokens:
                    return
            self.tokens[self.n: self.n + len(pending)] = pending
            self.n += len(pending)
            token = pending[-1]
            cached = prompt + made - 1  # the newest token is fed at this position
            room = min(self.k_max, backend.verify_tokens([cached]) - 1, max_new_tokens - made - 1,
                       max_len - 1 - cached)
            k = min(room, self.adaptive.next_k()) if self.adaptive is not None else room
            start = time.perf_counter()
            drafts = self._drafts(token, cached, k)
            stats.k_per_round.append(k)
            if not drafts and self.assistant is None:  # a plain decode step
                logits = backend.decode([token], [cached], cache, copy=False)
                pending = sampler.choose(logits, rng).tolist()
                stats.decode_steps += 1
                self._observe(0, 0, start)
                continue
            # a verify call (over the newest token alone where the assistant drafted nothing: its hidden is needed)
            logits, hidden = backend.verify(np.array([[token, *drafts]], np.int64), [cached], cache)
            self.written = max(self.written, cached + 1 + len(drafts))
            got = accept(drafts, logits[0], sampler, rng)
            pending = list(got.tokens)
            self.hidden = np.array(hidden[0, got.num_accepted], np.float32)  # a copy: buffers may be reused
            if drafts:
                stats.verify_calls += 1
                stats.drafted += len(drafts)
                stats.accepted += got.num_accepted
                stats.accepted_per_call.append(got.num_accepted)
            else:
                stats.decode_steps += 1
            self._observe(len(drafts), got.num_accepted, start)

    def _observe(self, proposed: int, accepted: int, start: float) -> None:
        if self.adaptive is not None:
            self.adaptive.observe(proposed, accepted, max(time.perf_counter() - start, 1e-9))
