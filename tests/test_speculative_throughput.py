"""runtime.speculative.throughput: the closed forms against a simulation of i.i.d. acceptance, and known values."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.speculative.throughput import break_even_acceptance, expected_tokens, speedup


def _simulate_tokens(a: float, k: int, rounds: int, rng) -> np.ndarray:
    """Tokens emitted per verify pass: drafts accepted one by one with probability a until the first rejection,
    plus the target's own token."""
    accepted = rng.random((rounds, k)) < a  # (rounds, k)
    run = np.cumprod(accepted, axis=1).sum(axis=1) if k else np.zeros(rounds)
    return run + 1


@pytest.mark.parametrize("k", [0, 1, 4, 8])
@pytest.mark.parametrize("a", [0.0, 0.3, 0.7, 0.95, 1.0])
def test_expected_tokens_matches_simulation(a, k):
    tokens = _simulate_tokens(a, k, 40000, np.random.default_rng(k))
    e = expected_tokens(a, k)
    closed = k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)
    assert e == pytest.approx(closed, rel=1e-12)
    stderr = tokens.std() / np.sqrt(tokens.size)
    assert abs(tokens.mean() - e) <= 5 * stderr + 1e-12, (a, k, tokens.mean(), e, stderr)


def test_expected_tokens_near_one_is_stable():
    assert expected_tokens(1 - 1e-12, 8) == pytest.approx(9.0, abs=1e-9)
    assert expected_tokens(np.float32(0.5), np.int64(2)) == 1.75


def test_break_even_known_values():
    assert break_even_acceptance(1, 1.5) == pytest.approx(0.5, abs=1e-12)  # 1 + a = 1.5
    assert break_even_acceptance(2, 1.75) == pytest.approx(0.5, abs=1e-12)  # 1 + a + a^2 = 1.75
    assert break_even_acceptance(2, 1.5, draft_cost=0.125) == pytest.approx(0.5, abs=1e-12)
    assert break_even_acceptance(4, 1.0) == 0.0  # a verify as cheap as a step pays at any acceptance
    assert break_even_acceptance(4, 0.8) == 0.0
    assert break_even_acceptance(0, 1.0) == 0.0
    assert break_even_acceptance(3, 4.0) is None  # 4 steps for at most 4 tokens: never pays
    assert break_even_acceptance(3, 2.0, draft_cost=1.0) is None


@pytest.mark.parametrize("k, verify, draft", [(1, 1.2, 0.0), (4, 1.3, 0.0), (4, 1.3, 0.1), (8, 2.5, 0.05)])
def test_break_even_matches_simulation(k, verify, draft):
    """Simulated speed (tokens per unit time, plain decode = 1) crosses 1 at the break-even acceptance."""
    a0 = break_even_acceptance(k, verify, draft)
    assert 0 < a0 < 1
    assert expected_tokens(a0, k) == pytest.approx(verify + k * draft, rel=1e-12)
    rng = np.random.default_rng(int(k * 10 + verify * 100))
    for a, faster in ((a0 - 0.05, False), (a0 + 0.05, True)):
        a = min(max(a, 0.0), 1.0)
        tokens = _simulate_tokens(a, k, 40000, rng)
        simulated = tokens.mean() / (verify + k * draft)
        assert (simulated > 1) == faster, (k, verify, draft, a, simulated)
        assert simulated == pytest.approx(speedup(a, k, verify, draft), rel=0.02)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: expected_tokens(1.5, 2), "acceptance"),
        (lambda: expected_tokens(-0.1, 2), "acceptance"),
        (lambda: expected_tokens(0.5, -1), "k="),
        (lambda: expected_tokens(0.5, 2.0), "k="),
        (lambda: speedup(0.5, 2, 0.0), "verify_cost"),
        (lambda: speedup(0.5, 2, 1.0, -1.0), "draft_cost"),
        (lambda: break_even_acceptance(2, float("nan")), "verify_cost"),
        (lambda: break_even_acceptance(2, True), "verify_cost"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
