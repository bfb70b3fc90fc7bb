"""Which drafted tokens the target accepts, from its logits at every drafted position: greedy or by sampling.

`accept(drafts, logits, sampler, rng)` takes K drafts and the target's (K + 1, V) logits over them (row i predicts
the token after the drafts before i) and returns the tokens to emit: the accepted drafts, then one token of the
target's own (the correction at the first rejected position, or the bonus token after K accepted drafts), so a
verify pass always emits at least one token.
- Greedy: the longest prefix of drafts equal to the target's argmax (lowest id among ties, as `Greedy`), then the
  argmax after it. The output equals plain greedy decoding token for token.
- Sampling (Leviathan et al. 2023, Chen et al. 2023): draft x drawn from q is accepted with probability
  min(1, p(x) / q(x)); at the first rejection the token is drawn from normalize(max(0, p - q)) and the round ends.
  p is the request sampler's own distribution (`Sample.distribution`: temperature, top_k, top_p), so every emitted
  token is distributed exactly as plain sampling would draw it. A deterministic drafter (prompt lookup) is a point
  mass: x is accepted with probability p(x), else the token is drawn from p without x (the same as drawing from p
  and accepting while the draw equals the draft, which transformers does for drafters without logits).
  Randomness comes from the request's generator: one uniform per examined draft and one for the emitted token.

It deliberately does not stop at end-of-sequence or length limits (the caller cuts the emitted tokens at its stops,
as after any step) and handles one sequence per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.sampling import Greedy, Sample, Sampler

__all__ = ["Accepted", "accept", "accept_greedy"]


@dataclass(frozen=True)
class Accepted:
    """The outcome of one verify pass: `tokens` to emit (the first `num_accepted` are drafts, the last is the
    target's), so the caches keep the context plus `num_accepted` drafts."""

    tokens: tuple[int, ...]
    num_accepted: int


def accept(
    drafts,
    logits: np.ndarray,
    sampler: Sampler,
    rng: np.random.Generator,
    draft_probs: np.ndarray | None = None,
) -> Accepted:
    """(K,) drafts and (K + 1, V) target logits -> the `Accepted` tokens.

    `draft_probs` is (K, V): row i the distribution drafts[i] was drawn from; None for a deterministic drafter
    (each draft a point mass). Greedy ignores it.
    """
    drafts, logits, draft_probs = _check(drafts, logits, sampler, draft_probs)
    if isinstance(sampler, Greedy):
        return _accept_greedy(drafts, logits, rng)
    for i, x in enumerate(drafts):
        ids, probs = sampler.distribution(logits[i])
        p_x = float(probs[ids == x].sum())
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        if not q_x > 0:
            raise ValueError(
                f"draft_probs[{i}, {x}] = {q_x}: draft {i} (token {x}) has no probability under the distribution it "
                "was said to be drawn from; pass the drafter's own probabilities (rows summing to 1)."
            )
        if rng.random() < p_x / q_x:  # accepted with probability min(1, p(x) / q(x))
            continue
        residual = np.zeros(logits.shape[1])  # (V,) max(0, p - q)
        residual[ids] = probs
        if draft_probs is None:
            residual[x] = 0.0
        else:
            residual = np.maximum(residual - draft_probs[i], 0.0)
        if not residual.sum() > 0:  # p == q up to rounding: the rejection itself was rounding; p is the residual
            residual[ids] = probs
        return Accepted(tuple(drafts[:i]) + (_draw(residual, rng),), i)
    bonus = int(sampler.choose(logits[len(drafts) :], rng)[0])
    return Accepted(tuple(drafts) + (bonus,), len(drafts))


def _accept_greedy(drafts: list[int], logits: np.ndarray, rng: np.random.Generator) -> Accepted:
    return Accepted(*accept_greedy(drafts, logits))


def accept_greedy(drafts: list[int], logits: np.ndarray) -> tuple[tuple[int, ...], int]:
    """`accept` for greedy decoding, unchecked (for the decode loop: one argmax over the rows, Python ints after
    it): ``drafts`` a list of K ints, ``logits`` a (K + 1, V) float array -> (tokens to emit, drafts accepted).
    The argmax is `Greedy`'s (lowest id among ties; NaN in a row that decides raises)."""
    best = logits.argmax(axis=-1).tolist()
    i = 0
    k = len(drafts)
    while i < k and best[i] == drafts[i]:
        i += 1
    for row in range(i + 1):  # NaN wins argmax: a row whose choice counted must not hold one
        if math.isnan(logits.item(row, best[row])):
            raise ValueError("The logits contain NaN; the model produced invalid numbers (check the precision/engine).")
    return (*drafts[:i], best[i]), i


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """One token from unnormalised non-negative weights, by one uniform (inverse CDF, as `Sample`)."""
    cdf = np.cumsum(weights)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if index >= weights.size:  # u * total rounded up to total: the last token that has any weight
        index = int(np.flatnonzero(weights > 0)[-1])
    return index


def _check(drafts, logits, sampler, draft_probs) -> tuple[list[int], np.ndarray, np.ndarray | None]:
    if not isinstance(sampler, (Greedy, Sample)):
        raise ValueError(f"sampler={sampler!r}: expected a runtime.sampling Greedy or Sample.")
    d = np.asarray(drafts)
    if d.ndim != 1 or not (np.issubdtype(d.dtype, np.integer) or d.size == 0):
        raise ValueError(f"drafts of shape {d.shape} and dtype {d.dtype}: expected a 1-D sequence of token ids.")
    logits = np.asarray(logits)
    k = d.size
    if logits.ndim != 2 or logits.shape[0] != k + 1 or logits.shape[1] == 0:
        raise ValueError(
            f"logits of shape {logits.shape} for {k} drafts: expected ({k + 1}, vocab), the target's logits at the "
            "position before each draft and after the last one."
        )
    vocab = logits.shape[1]
    if k and (d.min() < 0 or d.max() >= vocab):
        raise ValueError(f"drafts {d.tolist()}: token ids must lie in [0, {vocab}) (the logits' vocabulary).")
    q = None
    if draft_probs is not None and not isinstance(sampler, Greedy):
        q = np.asarray(draft_probs, dtype=np.float64)
        if q.shape != (k, vocab):
            raise ValueError(f"draft_probs of shape {q.shape}: expected ({k}, {vocab}), one distribution per draft.")
    return d.astype(np.int64).tolist(), logits, q
