"""Greedy speculative decoding: draft, verify in one target pass, keep the longest agreeing prefix.

Exact under greedy decoding: a round feeds the newest token and up to K drafted ones to `Backend.verify` (one pass
over K + 1 tokens on the cache), takes the target's own argmax after each of them, keeps the drafts that equal it
plus the target's next token, and moves the row's length past what was kept; the rejected tokens' keys and values
are overwritten or masked by position from then on (`runtime.backend`: no rollback call exists or is needed).  So
the tokens are the ones plain greedy decoding gives (tested token for token on every engine form).  A round without
drafts is a plain decode step.  Rows run one at a time on views of their cache rows (`Backend.rows`): each gets
its own number of drafts and acceptance, and ONNX Runtime's ring engines run several tokens with past context one
row per call anyway.

The drafter and the acceptance rule are two small functions (`runtime.speculative._local` until the project's
prompt-lookup drafter and acceptance modules replace them).  Not here: sampling (speculative sampling keeps the
target's distribution and needs the drafter's probabilities), the assistant drafter, adapting K.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InputError
from runtime.sampling import Greedy
from runtime.speculative._local import accepted_greedy, prompt_lookup

__all__ = ["DRAFTERS", "SpecStats", "check_draft", "greedy_speculative"]

DRAFTERS: dict[str, Callable[[list[int], int], list[int]]] = {"prompt_lookup": prompt_lookup}


@dataclass
class SpecStats:
    """What a speculative generation did: verify calls and plain decode steps, tokens drafted and accepted."""

    verify_calls: int = 0
    decode_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_call: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def check_draft(backend, draft: str, num_draft_tokens: int) -> None:
    """Refuse an unknown drafter, a bad K, or an artifact that cannot verify K drafts, with the reason."""
    if draft not in DRAFTERS:
        raise InputError(f"draft={draft!r}; expected one of {', '.join(DRAFTERS)} or None")
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise InputError(f"num_draft_tokens={num_draft_tokens!r}; expected an integer >= 1")
    limit = getattr(backend, "max_draft_tokens", 0)
    if not limit:
        raise InputError("speculative decoding needs an artifact exported with --speculative K (make export "
                         "SPECULATIVE=K): its graphs return logits at every drafted token and its sliding rings can "
                         "take rejected tokens back; this one was exported without it")
    if num_draft_tokens > limit:
        raise InputError(f"num_draft_tokens={num_draft_tokens}; this artifact verifies at most {limit} draft tokens "
                         f"per call (exported with --speculative {limit})")


def greedy_speculative(backend, cache, first_logits: np.ndarray, contexts: list[list[int]], *, num_draft_tokens: int,
                       max_new_tokens: int, max_len: int, stop_ids: set[int], draft: str = "prompt_lookup",
                       stats: SpecStats | None = None) -> Iterator[tuple[int, int, str | None]]:
    """Generate greedily after a prefill whose logits are ``first_logits`` (B, V), each row's prompt ``contexts[i]``
    (token ids as cached) on ``cache``; yields (row, token, "stop" or None) in each row's order, stopping a row as
    `runtime.generate`'s plain loop does (a stop id, included; ``max_len``; ``max_new_tokens``)."""
    check_draft(backend, draft, num_draft_tokens)
    drafter, greedy = DRAFTERS[draft], Greedy()
    stats = stats if stats is not None else SpecStats()
    first = greedy.choose(np.asarray(first_logits), None).tolist()
    rows = len(contexts)
    for i in range(rows):
        view = backend.rows(cache, i, i + 1) if rows > 1 else cache
        yield from _row(backend, view, i, list(contexts[i]), first[i], drafter, greedy, num_draft_tokens,
                        max_new_tokens, max_len, stop_ids, stats)


def _row(backend, cache, row: int, ctx: list[int], token: int, drafter, greedy, k_max: int, max_new_tokens: int,
         max_len: int, stop_ids: set[int], stats: SpecStats) -> Iterator[tuple[int, int, str | None]]:
    """One row: ``ctx`` the cached tokens, ``token`` the newest generated one (not cached yet)."""
    prompt, made = len(ctx), 0
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
        token = pending[-1]
        cached = prompt + made - 1  # the newest token is fed at this position
        room = min(k_max, backend.verify_tokens([cached]) - 1, max_new_tokens - made - 1, max_len - 1 - cached)
        drafts = drafter(ctx + pending, room) if room > 0 else []
        ctx += pending
        if not drafts:  # a plain decode step
            logits = backend.decode([token], [cached], cache, copy=False)
            pending = greedy.choose(logits, None).tolist()
            stats.decode_steps += 1
            continue
        logits, _hidden = backend.verify(np.array([[token, *drafts]], np.int64), [cached], cache)
        target = greedy.choose(logits.reshape(-1, logits.shape[-1]), None).tolist()  # (1 + len(drafts),)
        a = accepted_greedy(drafts, target)
        pending = [*drafts[:a], target[a]]
        stats.verify_calls += 1
        stats.drafted += len(drafts)
        stats.accepted += a
        stats.accepted_per_call.append(a)
