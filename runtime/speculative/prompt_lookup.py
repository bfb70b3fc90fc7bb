"""Prompt lookup: draft the tokens that followed an earlier occurrence of the sequence's last n-gram.

No model and nearly no cost: the drafts are copied from the prompt and the output so far, which pays off where
answers quote their prompt (code edits, extraction, repetition). The rules are those of transformers'
`PromptLookupCandidateGenerator` (what `generate(prompt_lookup_num_tokens=...)` uses), so both propose the same
drafts for the same tokens:
- n-gram sizes from `max_ngram` (transformers' `max_matching_ngram_size`, default 2) down to 1, never the whole
  sequence; the largest size that occurs earlier wins, and among its occurrences the earliest (leftmost) one;
- the drafts are the up to `num_tokens` tokens that followed it, as many as the sequence holds (fewer near its end);
- drafts stop before the first end-of-sequence token; if that leaves none there are no drafts (no other match is
  tried, as in transformers).

One rule of our own, off by default (`unambiguous_unigram=True` turns it on; the runtime's drafter does): where no
n-gram larger than one matches and the last token's earlier occurrences are followed by different tokens (a common
token such as a separator), nothing is drafted: the earliest occurrence's continuation is a guess that a verify pass
would mostly reject. A 1-gram whose occurrences all agree on the next token (a token seen once, typically) still
drafts from the earliest one.

Deliberately different: transformers clips the copied span by `max_length` as an index into the sequence and
crops the accepted tokens to the length budget afterwards; here the caller passes the budget as `num_tokens`
(the tokens it may still accept), so the drafts are the part of transformers' drafts its budget lets through.
Not implemented: transformers' check of drafts against logits processors (the runtime has none) and batches (one
sequence per call; transformers' prompt lookup is batch 1 too).

Cost: one vectorised pass over the sequence for the last token's occurrences, then work on those occurrences only
per larger n-gram size, no state; pass an int64 array (not a list) to skip the conversion and the checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PromptLookup"]

_NONE = np.zeros(0, np.int64)
_INT64 = np.dtype(np.int64)


def _checked(tokens, num_tokens) -> np.ndarray:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)) or num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens!r}: expected an integer >= 0 (the most drafts to propose).")
    t = np.asarray(tokens)
    if t.ndim != 1 or not (np.issubdtype(t.dtype, np.integer) or t.size == 0):
        raise ValueError(f"tokens of shape {t.shape} and dtype {t.dtype}: expected a 1-D sequence of integer token ids.")
    return t


@dataclass(frozen=True)
class PromptLookup:
    """The prompt-lookup drafter: `propose(tokens, num_tokens)` -> the drafted token ids."""

    max_ngram: int = 2
    eos_ids: tuple[int, ...] = ()
    unambiguous_unigram: bool = False  # True: no drafts from a 1-gram whose occurrences disagree on the next token

    def __post_init__(self) -> None:
        n = self.max_ngram
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"PromptLookup(max_ngram={n!r}): the largest n-gram to match must be an integer >= 1.")
        eos = self.eos_ids
        if not isinstance(eos, tuple) or not all(isinstance(e, (int, np.integer)) for e in eos):
            raise ValueError(f"PromptLookup(eos_ids={eos!r}): expected a tuple of token ids (ints).")
        if not isinstance(self.unambiguous_unigram, bool):
            raise ValueError(f"PromptLookup(unambiguous_unigram={self.unambiguous_unigram!r}): expected a bool.")

    def propose(self, tokens, num_tokens: int) -> np.ndarray:
        """(L,) token ids so far (prompt then output) -> (<= num_tokens,) int64 drafts for the next positions
        (empty: no match, draft nothing this step)."""
        t = tokens
        if not (type(num_tokens) is int and num_tokens >= 0 and type(t) is np.ndarray and t.dtype == _INT64
                and t.ndim == 1):  # the decode loop's call (an int64 array, an int) skips the slower checks
            t = _checked(tokens, num_tokens)
        length = t.size
        if num_tokens == 0 or length < 2:
            return _NONE
        # ends: the positions e <= length - 2 (followed by a token) where an n-gram equal to the last one ends, in
        # increasing order (the earliest occurrence first).  Grown one size at a time: the (n+1)-gram ending at e
        # matches iff the n-gram does and t[e - n] = t[length - 1 - n], so once a size has no match no larger one has.
        ends = np.flatnonzero(t[: length - 1] == t[length - 1])
        if not ends.size:
            return _NONE
        best_n, best = 1, ends
        for n in range(2, min(self.max_ngram, length - 1) + 1):
            ends = ends[ends >= n - 1]
            ends = ends[t[ends - (n - 1)] == t[length - n]]
            if not ends.size:
                break
            best_n, best = n, ends
        if best_n == 1 and self.unambiguous_unigram and best.size > 1:
            following = t[best + 1]  # the token after each occurrence of the last token
            if (following != following[0]).any():
                return _NONE
        start = int(best[0]) + 1  # after the earliest occurrence of the largest matching n-gram
        drafts = t[start : start + num_tokens].astype(np.int64)
        if self.eos_ids:
            for j, tok in enumerate(drafts.tolist()):
                if tok in self.eos_ids:
                    return drafts[:j]
        return drafts
