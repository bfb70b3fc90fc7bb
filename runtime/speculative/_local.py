"""Stand-ins for the prompt-lookup drafter and greedy acceptance, the least `runtime.speculative.verify` needs.

The project's drafters and acceptance rules (speculative sampling included) live in their own modules; this file
holds only what greedy verification needs until those are in place, behind the two functions the loop calls, so
either can be swapped without touching it.  Prompt lookup follows transformers' ``PromptLookupCandidateGenerator``
(`prompt_lookup_num_tokens`): the longest n-gram (``max_ngram`` down to 1) ending the context that occurred earlier
in it, first occurrence from the left whose continuation is non-empty, continued by up to ``k`` tokens.
"""

from __future__ import annotations

__all__ = ["accepted_greedy", "prompt_lookup"]


def prompt_lookup(context: list[int], k: int, max_ngram: int = 2) -> list[int]:
    """Up to ``k`` draft tokens continuing ``context`` from an earlier occurrence of its last n-gram ([] if none)."""
    n_ctx = len(context)
    if k < 1:
        return []
    for n in range(min(max_ngram, n_ctx - 1), 0, -1):
        tail = context[n_ctx - n:]
        for start in range(n_ctx - n):  # the tail itself (start = n_ctx - n) has no continuation
            if context[start:start + n] == tail:
                return context[start + n:min(start + n + k, n_ctx)]
    return []


def accepted_greedy(drafts: list[int], target: list[int]) -> int:
    """How many drafts greedy verification keeps: the longest prefix equal to the target's own choices
    (``target[i]`` is the target's argmax after the i-th token of the verify call, so ``target[i]`` checks
    ``drafts[i]``); the target's token after them, ``target[accepted]``, follows in every case."""
    a = 0
    while a < len(drafts) and drafts[a] == target[a]:
        a += 1
    return a
