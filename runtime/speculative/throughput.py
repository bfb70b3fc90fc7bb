"""What speculation gains, in plain Python: expected tokens per target pass and the break-even acceptance rate.

The model: each draft is accepted with the same probability a, independently, until the first rejection; a verify
pass over k drafts emits the accepted ones plus one token of the target's, so it emits on average
E(a, k) = 1 + a + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens (Leviathan et al. 2023). Costs are in units of one
plain decode step: `verify_cost` is the time of one target pass over k + 1 tokens, `draft_cost` the time to draft
one token (about 0 for prompt lookup, one assistant step for the assistant). Speculation pays where
E(a, k) > verify_cost + k * draft_cost.

It deliberately models nothing else: real acceptance is not independent from token to token (runs of copied text
are accepted together), which the bench measures on real drafters instead.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["break_even_acceptance", "expected_tokens", "speedup"]


def expected_tokens(acceptance: float, k: int) -> float:
    """Expected tokens emitted by one verify pass over k drafts at per-draft acceptance `acceptance`."""
    a = _check_rate(acceptance)
    _check_k(k)
    return math.fsum(a**i for i in range(int(k) + 1))  # the sum, not the quotient: exact as a -> 1


def speedup(acceptance: float, k: int, verify_cost: float, draft_cost: float = 0.0) -> float:
    """Tokens per unit time with k drafts per pass, relative to plain decode (1 token per decode step)."""
    return expected_tokens(acceptance, k) / _round_cost(k, verify_cost, draft_cost)


def break_even_acceptance(k: int, verify_cost: float, draft_cost: float = 0.0) -> float | None:
    """The acceptance rate at which k drafts per pass match plain decode's speed: 0.0 when speculation pays at
    any rate (the round costs at most one step), None when no rate below 1 pays (it costs k + 1 steps or more)."""
    cost = _round_cost(k, verify_cost, draft_cost)
    if cost <= 1.0:
        return 0.0
    if cost >= k + 1:
        return None
    lo, hi = 0.0, 1.0  # E(a, k) rises from 1 at a = 0 to k + 1 at a = 1: bisect E(a, k) = cost
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if expected_tokens(mid, k) < cost:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15:
            break
    return hi


def _round_cost(k: int, verify_cost: float, draft_cost: float) -> float:
    _check_k(k)
    for name, value in (("verify_cost", verify_cost), ("draft_cost", draft_cost)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r}: expected a finite number >= 0 (a time in decode steps).")
    if not verify_cost > 0:
        raise ValueError(f"verify_cost={verify_cost!r}: a target pass takes time; expected a number > 0.")
    return verify_cost + k * draft_cost


def _check_rate(acceptance: float) -> float:
    a = acceptance
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 <= a <= 1:
        raise ValueError(f"acceptance={a!r}: expected a probability in [0, 1].")
    return float(a)


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k={k!r}: expected the number of drafts per pass, an integer >= 0.")
