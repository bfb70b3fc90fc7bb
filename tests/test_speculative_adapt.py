"""runtime.speculative.adapt: the number of drafts follows the acceptance and the measured costs, simulated with
a fake clock (each round's seconds from a cost table) and i.i.d. acceptance; the oracle is the best fixed k by the
closed form E(a, k) = (1 - a^(k+1)) / (1 - a), written here independently of the module."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.speculative.adapt import AdaptiveK

STEP = 0.01  # seconds of one plain decode step on the fake clock


def _round_seconds(verify, draft):
    return lambda k: STEP * (verify(k) + k * draft)


def _e(a: float, k: int) -> float:
    return k + 1 if a == 1 else (1 - a ** (k + 1)) / (1 - a)


def _oracle(a: float, max_k: int, seconds) -> tuple[int, float]:
    """The best fixed k and its tokens per second, by the closed form."""
    rates = [_e(a, k) / seconds(k) for k in range(max_k + 1)]
    return int(np.argmax(rates)), max(rates)


def _simulate(ctl: AdaptiveK, acceptance, seconds, rounds: int, seed: int = 0, timed: bool = True):
    """Run `rounds` rounds; acceptance(r) is round r's per-draft acceptance. -> (ks, tokens per round, seconds)."""
    rng = np.random.default_rng(seed)
    ks, tokens, times = [], [], []
    for r in range(rounds):
        k = ctl.next_k()
        assert isinstance(k, int) and 0 <= k <= ctl.max_k, k
        n = 0
        while n < k and rng.random() < acceptance(r):
            n += 1
        ctl.observe(k, n, seconds(k) if timed else None)
        ks.append(k)
        tokens.append(n + 1)
        times.append(seconds(k))
    return np.array(ks), np.array(tokens), np.array(times)


def test_zero_acceptance_converges_to_plain_decode():
    seconds = _round_seconds(lambda k: 1 + 0.1 * k, 0.02)
    ctl = AdaptiveK(8, verify_cost=[1 + 0.1 * k for k in range(9)], draft_cost=0.02)
    ks, tokens, times = _simulate(ctl, lambda r: 0.0, seconds, 2000)
    assert ks[0] > 0  # the prior (acceptance 0.5) speculates at first
    late = slice(100, None)
    assert set(ks[late].tolist()) <= {0, 1} and np.mean(ks[late] == 0) >= 1 - 1 / 16 - 0.005  # plain, 1 probe in 16
    rate = tokens[late].sum() / times[late].sum()
    # never worse than plain decode by more than the probes' drafting and verify overhead (1/16 of 0.12 steps)
    assert rate >= (1 / STEP) * (1 - 0.12 / 16) - 1e-9, rate * STEP


@pytest.mark.parametrize("a", [1.0, 0.95])
def test_high_acceptance_grows_to_max_k(a):
    seconds = _round_seconds(lambda k: 1 + 0.05 * k, 0.0)
    assert _oracle(a, 8, seconds)[0] == 8
    ctl = AdaptiveK(8, verify_cost=[1 + 0.05 * k for k in range(9)], prior_acceptance=0.2)
    ks, _, _ = _simulate(ctl, lambda r: a, seconds, 400, seed=1)
    assert ks.max() == 8
    assert np.mean(ks[50:] == 8) >= 0.9, np.bincount(ks[50:])


@pytest.mark.parametrize("max_k", [0, 1, 3, 8])
def test_never_exceeds_bounds(max_k):
    rng = np.random.default_rng(max_k)
    for trial in range(10):
        slope, draft = rng.uniform(0, 1), rng.uniform(0, 0.3)
        seconds = _round_seconds(lambda k: 1 + slope * k, draft)
        ctl = AdaptiveK(max_k, prior_acceptance=rng.uniform(), memory=rng.uniform(0.5, 1), probe_every=3)
        rates = rng.uniform(size=300)
        ks, _, _ = _simulate(ctl, lambda r: rates[r], seconds, 300, seed=trial)  # asserts 0 <= k <= max_k
        if max_k == 0:
            assert not ks.any()


@pytest.mark.parametrize("a", [0.3, 0.6, 0.8])
@pytest.mark.parametrize("slope, draft", [(0.05, 0.0), (0.3, 0.0), (0.1, 0.1)])
def test_throughput_near_the_best_fixed_k(a, slope, draft):
    seconds = _round_seconds(lambda k: 1 + slope * k, draft)
    best_k, best_rate = _oracle(a, 8, seconds)
    ctl = AdaptiveK(8, draft_cost=draft)  # prior: every verify costs one step; the clock says otherwise
    _, tokens, times = _simulate(ctl, lambda r: a, seconds, 3000, seed=2)
    rate = tokens[200:].sum() / times[200:].sum()
    assert rate >= 0.93 * best_rate, (a, slope, draft, best_k, rate * STEP, best_rate * STEP)


def test_first_round_of_each_k_is_warm_up():
    """A backend that takes 50 steps the first time it sees a width (shape planning) must not scare the rule off
    that width for good."""
    seconds = _round_seconds(lambda k: 1 + 0.05 * k, 0.0)
    seen = set()

    def cold_first(k: int) -> float:
        extra = 0.0 if k in seen else 50 * STEP
        seen.add(k)
        return seconds(k) + extra

    best_k, best_rate = _oracle(0.8, 8, seconds)
    ctl = AdaptiveK(8)
    ks, tokens, times = _simulate(ctl, lambda r: 0.8, cold_first, 2000, seed=5)
    assert np.bincount(ks[200:]).argmax() == best_k, np.bincount(ks[200:])
    assert tokens[200:].sum() / times[200:].sum() >= 0.93 * best_rate


def test_measured_costs_override_the_prior():
    """A prior of free verifies would speculate at acceptance 0.5; verifies measured at 1 + 0.6 k steps do not pay."""
    seconds = _round_seconds(lambda k: 1 + 0.6 * k, 0.0)
    assert _oracle(0.5, 4, seconds)[0] == 0
    plain = 1 / STEP
    ks, tokens, times = _simulate(AdaptiveK(4), lambda r: 0.5, seconds, 1000, seed=3)
    assert np.mean(ks[100:] == 0) >= 0.85, np.bincount(ks[100:])
    assert tokens[100:].sum() / times[100:].sum() >= 0.97 * plain
    # without measurements it trusts the prior, and decodes at little more than half plain decode's speed
    ks, tokens, times = _simulate(AdaptiveK(4), lambda r: 0.5, seconds, 1000, seed=3, timed=False)
    assert np.mean(ks[100:] > 0) >= 0.9
    assert tokens[100:].sum() / times[100:].sum() < 0.7 * plain


def test_plain_width_estimated_from_measured_widths():
    """Only k = 2 measured, at twice its prior: the widths beyond it follow the prior's shape from there."""
    ctl = AdaptiveK(4, verify_cost=[1.0, 1.1, 1.2, 1.3, 1.4], draft_cost=0.1)
    ctl.observe(2, 1, 99.0)  # warm-up: not counted
    assert ctl.cost(2) == pytest.approx(1.2 + 0.2)  # the prior, in decode steps
    ctl.observe(2, 1, 2 * STEP * 1.4)
    assert ctl.cost(2) == pytest.approx(2 * STEP * 1.4)
    assert ctl.cost(0) == pytest.approx(2 * STEP * 1.0)
    assert ctl.cost(3) == pytest.approx(2 * STEP * 1.6)
    ctl.observe(4, 0, 1.0)
    ctl.observe(4, 0, 3 * STEP)  # k = 4 measured too: k = 3 lies between 2 and 4
    assert ctl.cost(3) == pytest.approx(STEP * (2.8 + 3) / 2)
    assert ctl.cost(0) == pytest.approx(2 * STEP * 1.0)  # below the measured ones: the prior's shape from k = 2


def test_acceptance_estimate_counts_examined_drafts():
    ctl = AdaptiveK(4, prior_acceptance=0.5, prior_weight=2.0, memory=1.0)
    ctl.observe(4, 4)  # 4 examined, 4 accepted
    ctl.observe(4, 1)  # 2 examined (the second rejected), 1 accepted
    ctl.observe(0, 0)  # plain: nothing examined
    assert ctl.acceptance == pytest.approx((5 + 1) / (6 + 2))


def test_recovers_when_acceptance_rises():
    seconds = _round_seconds(lambda k: 1 + 0.1 * k, 0.0)
    ctl = AdaptiveK(8, verify_cost=[1 + 0.1 * k for k in range(9)])
    ks, _, _ = _simulate(ctl, lambda r: 0.0 if r < 400 else 0.9, seconds, 600, seed=4)
    assert np.mean(ks[300:400] == 0) >= 0.9  # plain decode while nothing is accepted
    best_k = _oracle(0.9, 8, seconds)[0]
    assert best_k >= 6
    assert np.mean(ks[500:] >= best_k - 2) >= 0.8, np.bincount(ks[500:])  # probes found the change


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AdaptiveK(-1), "max_k"),
        (lambda: AdaptiveK(2.0), "max_k"),
        (lambda: AdaptiveK(2, verify_cost=[1.0, 1.1]), "verify_cost"),
        (lambda: AdaptiveK(1, verify_cost=[1.0, 0.0]), "verify_cost"),
        (lambda: AdaptiveK(1, draft_cost=-0.1), "draft_cost"),
        (lambda: AdaptiveK(1, prior_acceptance=2), "prior_acceptance"),
        (lambda: AdaptiveK(1, memory=0), "memory"),
        (lambda: AdaptiveK(1, probe_every=0), "probe_every"),
        (lambda: AdaptiveK(2).observe(3, 0), "proposed"),
        (lambda: AdaptiveK(2).observe(2, 3), "accepted"),
        (lambda: AdaptiveK(2).observe(2, 1, 0.0), "seconds"),
        (lambda: AdaptiveK(2).cost(3), "cost"),
    ],
)
def test_bad_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _simulate_runs(ctl, start: float, run: float, seconds, rounds: int, seed: int, policy=None):
    """Acceptance in runs (a copying drafter): a round that starts a run has its first draft accepted with
    probability `start`, every other draft (and a continuing round's first) with `run`.  ``policy``: (k when
    starting, k when continuing) instead of the controller.  -> tokens per second."""
    rng = np.random.default_rng(seed)
    continuing, tokens, total = False, 0, 0.0
    for _ in range(rounds):
        k = ctl.next_k(continuing) if policy is None else policy[continuing]
        n = 0
        while n < k and rng.random() < (run if continuing or n else start):
            n += 1
        if policy is None:
            ctl.observe(k, n, seconds(k), continuing)
        tokens += n + 1
        total += seconds(k)
        continuing = k > 0 and n == k
    return tokens / total


@pytest.mark.parametrize("start, run", [(0.1, 0.95), (0.4, 0.9), (0.05, 0.6), (0.9, 0.9)])
def test_run_aware_rates_near_the_best_fixed_pair(start, run):
    """Against every fixed pair (k starting, k continuing), simulated on the same draws: the run-aware rule gets
    >= 90 % of the best pair's tokens per second."""
    seconds = _round_seconds(lambda k: 1 + 0.08 * k, 0.0)
    best = max(_simulate_runs(None, start, run, seconds, 3000, seed=7, policy=(a, b))
               for a in range(7) for b in range(7))
    got = _simulate_runs(AdaptiveK(6), start, run, seconds, 3000, seed=7)
    assert got >= 0.9 * best, (got * STEP, best * STEP)


def test_run_aware_rates_beat_one_rate_on_runs():
    """Rare starts, long runs: one per-draft rate averages them into a middling guess; the run-aware rule drafts
    little at a start and much within a run."""
    seconds = _round_seconds(lambda k: 1 + 0.3 * k, 0.0)
    aware = _simulate_runs(AdaptiveK(6), 0.1, 0.97, seconds, 3000, seed=8)
    rng = np.random.default_rng(8)
    one, continuing, tokens, total = AdaptiveK(6), False, 0, 0.0
    for _ in range(3000):  # the same process, the controller told nothing about runs
        k = one.next_k()
        n = 0
        while n < k and rng.random() < (0.97 if continuing or n else 0.1):
            n += 1
        one.observe(k, n, seconds(k))
        tokens, total, continuing = tokens + n + 1, total + seconds(k), k > 0 and n == k
    assert aware > 1.1 * tokens / total, (aware * STEP, tokens / total * STEP)


def test_starts_that_never_take_drop_to_plain_steps():
    seconds = _round_seconds(lambda k: 1.3 + 0.05 * k, 0.0)
    ctl = AdaptiveK(6)
    ks = []
    for _ in range(400):
        k = ctl.next_k(False)
        ctl.observe(k, 0, seconds(k), False)
        ks.append(k)
    assert np.mean(np.array(ks[50:]) == 0) >= 1 - 1 / 16 - 0.01, np.bincount(ks[50:])


def test_one_stalled_round_does_not_rule_a_width_out():
    """With the plain step measured, a width's one timed round that stalled (another process ran) is weighed
    against the prior's guess for it, and the lower median keeps the guess; rounds that agree override it."""
    ctl = AdaptiveK(4, verify_cost=[1.0, 1.1, 1.2, 1.3, 1.4])
    for _ in range(4):
        ctl.observe(0, 0, STEP)
    ctl.observe(3, 3, 5 * STEP)  # warm-up
    ctl.observe(3, 3, 50 * STEP)  # stalled
    assert ctl.cost(3) == pytest.approx(1.3 * STEP)
    assert ctl.next_k() > 0
    ctl.observe(3, 3, 2 * STEP)
    ctl.observe(3, 3, 2 * STEP)
    assert ctl.cost(3) == pytest.approx(2 * STEP)  # measured rounds outvote the guess


def test_measured_costs_need_rounds_of_their_own():
    ctl = AdaptiveK(2, verify_cost=[1.0, 1.5, 2.0])
    assert ctl.measured_costs() == [None, None, None]
    for _ in range(4):  # the first is the warm-up
        ctl.observe(0, 0, STEP)
        ctl.observe(2, 1, 1.5 * STEP)
    assert ctl.measured_costs() == [pytest.approx(1.0), None, pytest.approx(1.5)]
    assert AdaptiveK(2).measured_costs(min_rounds=1) == [None, None, None]
