"""runtime.speculative.accept: greedy acceptance equals plain argmax decoding; speculative sampling emits tokens
distributed exactly as plain sampling (after temperature, top_k, top_p) would draw them, checked by chi-square on
a 6-token vocabulary at a fixed seed, with the power to reject deliberately wrong rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.sampling import Greedy, Sample
from runtime.speculative.accept import Accepted, accept, accept_greedy

V = 6
START = 0
RUNS = 6000  # chi-square power: every wrong rule below gives p < 1e-6 at this size


def _chi2_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """P-value of Pearson's chi-square for `counts` drawn from `expected` (probabilities); 0 when a token of
    probability 0 was drawn."""
    counts, expected = counts.ravel(), expected.ravel()
    possible = expected > 0
    if counts[~possible].any():
        return 0.0
    e = counts.sum() * expected[possible]
    stat = float(((counts[possible] - e) ** 2 / e).sum())
    dof = int(possible.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def _transformed(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None) -> np.ndarray:
    """The distribution plain sampling draws from, written independently of runtime.sampling: softmax of
    logits / temperature over the top_k largest (lowest ids among ties), then the smallest most-probable set
    whose mass reaches top_p, renormalised."""
    scores = logits.astype(np.float64) / temperature
    order = np.argsort(-scores, kind="stable")  # most probable first, ties by ascending id
    order = order[np.isfinite(scores[order])]
    if top_k is not None:
        order = order[:top_k]
    probs = np.exp(scores[order] - scores[order].max())
    probs /= probs.sum()
    if top_p is not None:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1  # first prefix whose mass reaches top_p
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    out = np.zeros(logits.size)
    out[order] = probs
    return out


# The target: a Markov chain over 6 tokens, with transitions of probability 0 (logits -inf).
TARGET = np.array(
    [
        [0.30, 0.25, 0.00, 0.20, 0.15, 0.10],
        [0.05, 0.10, 0.40, 0.00, 0.25, 0.20],
        [0.20, 0.00, 0.10, 0.35, 0.05, 0.30],
        [0.15, 0.15, 0.15, 0.15, 0.20, 0.20],
        [0.00, 0.45, 0.05, 0.10, 0.30, 0.10],
        [0.25, 0.05, 0.30, 0.05, 0.00, 0.35],
    ]
)
with np.errstate(divide="ignore"):
    TARGET_LOGITS = np.log(TARGET)


def _point_drafter(step: int):
    """A deterministic drafter: the token `step` ids above the previous one (often a token of probability 0)."""

    def draft(prev: int, k: int, rng) -> tuple[list[int], None]:
        out = []
        for _ in range(k):
            prev = (prev + step) % V
            out.append(prev)
        return out, None

    return draft


def _sampled_drafter(q: np.ndarray):
    """A model drafter: drafts drawn from the chain `q` (rows are q(. | previous token)), with their q."""

    def draft(prev: int, k: int, rng) -> tuple[list[int], np.ndarray]:
        out, rows = [], []
        for _ in range(k):
            rows.append(q[prev])
            prev = int(rng.choice(V, p=q[prev]))
            out.append(prev)
        return out, np.array(rows).reshape(k, V)

    return draft


_rng = np.random.default_rng(5)
Q_RANDOM = _rng.dirichlet(np.ones(V), V)
Q_ZEROS = np.where(TARGET > 0, 0.0, 1.0) + np.eye(V)[[1, 2, 4, 4, 0, 2]]  # zeros where p > 0, mass where p = 0
Q_ZEROS /= Q_ZEROS.sum(axis=1, keepdims=True)
DRAFTERS = {
    "point +1": _point_drafter(1),
    "point +2 (copy-like)": _point_drafter(2),
    "point argmax": lambda prev, k, rng: (_chain_argmax(prev, k), None),
    "q random": _sampled_drafter(Q_RANDOM),
    "q zero where p > 0": _sampled_drafter(Q_ZEROS),
    "q = p": _sampled_drafter(TARGET),
}


def _chain_argmax(prev: int, k: int) -> list[int]:
    out = []
    for _ in range(k):
        prev = int(TARGET[prev].argmax())
        out.append(prev)
    return out


def _generate(rule, drafter, sampler, k: int, rng, n_tokens: int = 2, logits_table=TARGET_LOGITS) -> list[int]:
    """Speculative decoding of the chain: draft k, verify with the target's logits at every drafted position."""
    out = [START]
    while len(out) <= n_tokens:
        drafts, q = drafter(out[-1], k, rng)
        logits = logits_table[[out[-1], *drafts]]  # (k + 1, V): row i predicts the token after drafts[:i]
        result = rule(drafts, logits, sampler, rng, q)
        assert 1 <= len(result.tokens) <= k + 1 and result.num_accepted == len(result.tokens) - 1
        assert list(result.tokens[: result.num_accepted]) == list(drafts[: result.num_accepted])
        out += result.tokens
    return out[1 : n_tokens + 1]


def _joint_counts(rule, drafter, sampler, k: int, seed: int, logits_table=TARGET_LOGITS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    counts = np.zeros((V, V), np.int64)
    for _ in range(RUNS):
        a, b = _generate(rule, drafter, sampler, k, rng, logits_table=logits_table)
        counts[a, b] += 1
    return counts


def _always_accept(drafts, logits, sampler, rng, q):
    """Wrong: every draft accepted."""
    return Accepted(tuple(drafts) + (int(sampler.choose(logits[-1:], rng)[0]),), len(drafts))


def _rejection_draws_from_p(drafts, logits, sampler, rng, q):
    """Wrong: the right acceptance test, but a rejected position draws from p instead of max(0, p - q)."""
    for i, x in enumerate(drafts):
        ids, probs = sampler.distribution(logits[i])
        q_x = 1.0 if q is None else q[i, x]
        if rng.random() >= probs[ids == x].sum() / q_x:
            return Accepted(tuple(drafts[:i]) + (int(sampler.choose(logits[i : i + 1], rng)[0]),), i)
    return Accepted(tuple(drafts) + (int(sampler.choose(logits[-1:], rng)[0]),), len(drafts))


@pytest.mark.parametrize("name, k", [(name, 3) for name in DRAFTERS] + [("point +1", 1), ("q random", 1)])
def test_sampling_keeps_the_target_distribution(name, k):
    counts = _joint_counts(accept, DRAFTERS[name], Sample(1.0), k, seed=k)
    expected = TARGET[START][:, None] * TARGET  # P(first = a, second = b)
    first = _chi2_pvalue(counts.sum(axis=1), TARGET[START])
    joint = _chi2_pvalue(counts, expected)
    assert first > 1e-3 and joint > 1e-3, (name, k, first, joint, counts)


@pytest.mark.parametrize(
    "wrong, name",
    [(_always_accept, "point +1"), (_rejection_draws_from_p, "q random"), (_rejection_draws_from_p, "point +1")],
)
def test_the_statistical_test_rejects_wrong_rules(wrong, name):
    counts = _joint_counts(wrong, DRAFTERS[name], Sample(1.0), 3, seed=3)
    joint = _chi2_pvalue(counts, TARGET[START][:, None] * TARGET)
    assert joint < 1e-6, (wrong.__name__, name, joint)


SAMPLERS = [Sample(0.7), Sample(1.3, top_k=3), Sample(1.0, top_p=0.7), Sample(0.8, top_k=4, top_p=0.85)]


def test_distribution_is_what_plain_sampling_draws_from():
    """Sample.distribution, which acceptance verifies against, equals the independent transform (normalised)."""
    rng = np.random.default_rng(8)
    for sampler in SAMPLERS + [Sample(1.0, top_k=1), Sample(0.5, top_p=0.3), Sample(2.0, top_k=50, top_p=0.99)]:
        for _ in range(50):
            logits = rng.standard_normal(40) * 2
            logits[rng.random(40) < 0.2] = -np.inf
            ids, probs = sampler.distribution(logits)
            dense = np.zeros(40)
            dense[ids] = probs
            ref = _transformed(logits, sampler.temperature, sampler.top_k, sampler.top_p)
            assert np.allclose(dense, ref, rtol=0, atol=1e-12), (sampler, np.abs(dense - ref).max())


@pytest.mark.parametrize(
    "sampler, name", [(s, "q random") for s in SAMPLERS] + [(SAMPLERS[3], "point argmax")]
)
def test_sampling_after_temperature_top_k_top_p(sampler, name):
    """The accepted tokens follow the request's transformed distribution, not the raw softmax."""
    logits_table = np.random.default_rng(9).standard_normal((V, V)) * 1.5
    table = np.array([_transformed(row, sampler.temperature, sampler.top_k, sampler.top_p) for row in logits_table])
    counts = _joint_counts(accept, DRAFTERS[name], sampler, 3, seed=4, logits_table=logits_table)
    joint = _chi2_pvalue(counts, table[START][:, None] * table)
    assert joint > 1e-3, (sampler, name, joint)
    # the same draws judged against the untransformed softmax fail: the test can tell the difference
    raw = np.exp(logits_table) / np.exp(logits_table).sum(axis=1, keepdims=True)
    assert _chi2_pvalue(counts, raw[START][:, None] * raw) < 1e-6


def _plain_greedy(drafts, logits) -> list[int]:
    """Independent reference: argmax at each position while the drafts agree, then the argmax after them."""
    out = []
    for i in range(len(drafts) + 1):
        best = int(np.argmax(logits[i]))
        out.append(best)
        if i == len(drafts) or drafts[i] != best:
            break
    return out


def test_greedy_accepts_the_longest_agreeing_prefix():
    logits = np.full((4, 8), -1.0, np.float32)
    logits[[0, 1, 2, 3], [5, 2, 7, 1]] = 3.0  # the target's argmax: 5, 2, 7, then 1
    rng = np.random.default_rng(0)
    assert accept([5, 2, 7], logits, Greedy(), rng) == Accepted((5, 2, 7, 1), 3)  # all accepted + bonus
    assert accept([5, 2, 6], logits, Greedy(), rng) == Accepted((5, 2, 7), 2)
    assert accept([4, 2, 7], logits, Greedy(), rng) == Accepted((5,), 0)  # first rejected: the plain step
    assert accept([], logits[:1], Greedy(), rng) == Accepted((5,), 0)  # no drafts: a plain step
    tied = logits.copy()
    tied[1, [0, 2]] = 3.0  # a tie at position 1: lowest id, like Greedy
    assert accept([5, 2, 7], tied, Greedy(), rng) == Accepted((5, 0), 1)


def test_greedy_equals_plain_argmax_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(500):
        k, vocab = int(rng.integers(0, 9)), int(rng.integers(2, 40))
        logits = rng.standard_normal((k + 1, vocab)).astype(np.float32)
        agree = int(rng.integers(0, k + 1))  # drafts agree with the argmax for a while, then are random
        drafts = [int(np.argmax(logits[i])) if i < agree else int(rng.integers(0, vocab)) for i in range(k)]
        got = accept(drafts, logits, Greedy(), rng)
        ref = _plain_greedy(drafts, logits)
        assert list(got.tokens) == ref and got.num_accepted == len(ref) - 1, (drafts, got, ref)


def test_top1_sampling_accepts_like_greedy():
    """Sample(top_k=1) is greedy; its speculative sampling must accept and emit exactly what greedy does."""
    rng = np.random.default_rng(2)
    for _ in range(300):
        k, vocab = int(rng.integers(0, 6)), 12
        logits = rng.standard_normal((k + 1, vocab))
        drafts = [int(np.argmax(logits[i])) if rng.random() < 0.7 else int(rng.integers(0, vocab)) for i in range(k)]
        q = rng.dirichlet(np.ones(vocab), k) if rng.random() < 0.5 else None
        for sampler in (Sample(1.0, top_k=1), Sample(2.0, top_p=1e-9)):
            assert accept(drafts, logits, sampler, rng, q) == accept(drafts, logits, Greedy(), rng)


def test_seeded_through_the_generator():
    logits = np.random.default_rng(3).standard_normal((5, 30))
    drafts = [1, 2, 3, 4]

    def run(seed: int) -> list:
        rng = np.random.default_rng(seed)
        return [accept(drafts, logits, Sample(1.5), rng).tokens for _ in range(50)]

    assert run(7) == run(7)
    assert run(7) != run(8)


@pytest.mark.parametrize(
    "args, message",
    [
        (([1], np.zeros((1, 5)), Sample(1.0)), r"expected \(2, vocab\)"),
        (([1, 2], np.zeros((3, 5, 1)), Greedy()), r"expected \(3, vocab\)"),
        (([5], np.zeros((2, 5)), Greedy()), r"\[0, 5\)"),
        (([-1], np.zeros((2, 5)), Greedy()), r"\[0, 5\)"),
        (([1.0], np.zeros((2, 5)), Greedy()), "1-D sequence of token ids"),
        (([1], np.zeros((2, 5)), "greedy"), "Greedy or Sample"),
        (([1], np.zeros((2, 5)), Sample(1.0), np.ones((2, 5)) / 5), r"expected \(1, 5\)"),
        (([1], np.zeros((2, 5)), Sample(1.0), np.eye(5)[[0]]), r"draft_probs\[0, 1\]"),
        (([1], np.full((2, 5), np.nan), Sample(1.0)), "NaN"),
        (([1], np.full((2, 5), np.nan), Greedy()), "NaN"),
    ],
)
def test_bad_arguments_raise(args, message):
    with pytest.raises(ValueError, match=message):
        accept(*args[:3], np.random.default_rng(0), *args[3:])


def test_accept_greedy_with_ties_and_nan():
    """The decode loop's unchecked greedy acceptance (one argmax) against the plain reference, on logits full of
    ties (small integers); NaN in a row whose choice counts raises, in a row after the first rejection it is not read."""
    rng = np.random.default_rng(4)
    for _ in range(500):
        k, vocab = int(rng.integers(0, 8)), int(rng.integers(2, 6))
        logits = rng.integers(0, 3, (k + 1, vocab)).astype(np.float32)
        drafts = [int(np.argmax(logits[i])) if rng.random() < 0.7 else int(rng.integers(0, vocab)) for i in range(k)]
        tokens, n = accept_greedy(drafts, logits)
        ref = _plain_greedy(drafts, logits)
        assert list(tokens) == ref and n == len(ref) - 1, (drafts, tokens, ref)
    logits = np.zeros((3, 4), np.float32)
    logits[:, 1] = 1.0
    bad = logits.copy()
    bad[2, 0] = np.nan
    assert accept_greedy([2, 1], bad) == ((1,), 0)  # rejected at 0: rows 1 and 2 never decide
    with pytest.raises(ValueError, match="NaN"):
        accept_greedy([1, 1], bad)
