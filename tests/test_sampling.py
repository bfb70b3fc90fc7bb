"""runtime.sampling, tested by invariants: what must hold for any logits, not recorded outputs."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.sampling import Greedy, Sample, make_sampler


def _logits(batch: int = 4, vocab: int = 50, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_greedy_is_argmax():
    logits = _logits()
    ids = Greedy().choose(logits, np.random.default_rng(0))
    assert ids.dtype == np.int64 and ids.shape == (4,)
    assert np.array_equal(logits[np.arange(4), ids], logits.max(axis=-1))


@pytest.mark.parametrize("sampler", [Sample(1.0, top_k=1), Sample(5.0, top_p=1e-9), Sample(0.7, top_k=3, top_p=1e-6)])
def test_top1_sampling_equals_greedy(sampler):
    rng = np.random.default_rng(1)
    for seed in range(20):
        logits = _logits(seed=seed)
        logits[0, :3] = logits[0].max()  # a tie: both must pick the lowest id
        assert np.array_equal(sampler.choose(logits, rng), Greedy().choose(logits, rng))


def test_same_seed_same_draws_different_seeds_differ():
    sampler = Sample(temperature=1.0)
    logits = np.zeros((8, 100), np.float32)  # uniform: every draw is pure chance

    def draws(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.concatenate([sampler.choose(logits, rng) for _ in range(20)])

    assert np.array_equal(draws(7), draws(7))
    assert not np.array_equal(draws(7), draws(8))


def test_frequencies_match_softmax():
    logits = np.array([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], np.float32)
    draws = 20000
    counts = np.bincount(Sample(1.0).choose(np.repeat(logits, draws, axis=0), np.random.default_rng(3)), minlength=6)
    expected = _softmax(logits)[0]
    # 5 standard deviations of a binomial proportion: fails only if the distribution is wrong.
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws)
    assert np.all(np.abs(counts / draws - expected) <= tolerance), (counts / draws, expected)


def test_temperature_sharpens_and_flattens():
    logits = np.array([[1.0, 0.0]], np.float32)
    rng = np.random.default_rng(4)
    hot = np.mean([Sample(4.0).choose(logits, rng)[0] == 0 for _ in range(4000)])
    cold = np.mean([Sample(0.25).choose(logits, rng)[0] == 0 for _ in range(4000)])
    expected_hot, expected_cold = _softmax(logits / 4.0)[0, 0], _softmax(logits / 0.25)[0, 0]
    assert abs(hot - expected_hot) < 0.03 and abs(cold - expected_cold) < 0.03


def test_tokens_outside_top_k_never_drawn():
    logits = _logits(batch=3, vocab=40, seed=5, scale=0.5)  # flat-ish, so outsiders would be drawn if allowed
    allowed = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    rng = np.random.default_rng(6)
    drawn = np.stack([Sample(2.0, top_k=5).choose(logits, rng) for _ in range(2000)])  # (draws, B)
    for row in range(3):
        assert set(drawn[:, row].tolist()) == set(allowed[row].tolist())


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None].astype(np.float64)
    rng = np.random.default_rng(7)
    drawn = {int(Sample(1.0, top_p=0.75).choose(logits, rng)[0]) for _ in range(2000)}
    assert drawn == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    drawn = {int(Sample(1.0, top_p=0.81).choose(logits, rng)[0]) for _ in range(2000)}
    assert drawn == {0, 1, 2}


def test_masked_logits_never_drawn():
    logits = np.full((2, 10), -np.inf, np.float32)
    logits[0, [3, 7]] = 0.0
    logits[1, 9] = -50.0
    rng = np.random.default_rng(8)
    drawn = np.stack([Sample(1.0).choose(logits, rng) for _ in range(500)])
    assert set(drawn[:, 0].tolist()) == {3, 7} and set(drawn[:, 1].tolist()) == {9}


def test_extreme_logits_are_stable():
    logits = np.array([[1e4, 1e4 - 1.0, -1e4]], np.float32)
    rng = np.random.default_rng(9)
    drawn = [int(Sample(1.0).choose(logits, rng)[0]) for _ in range(2000)]
    assert set(drawn) == {0, 1} and drawn.count(0) > drawn.count(1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": 1.0, "top_k": 0}, "top_k"),
        ({"temperature": 1.0, "top_k": 2.5}, "top_k"),
        ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
        ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sample(**kwargs)


def test_bad_logits_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\(batch, vocab\)"):
        Greedy().choose(np.zeros(5, np.float32), rng)
    with pytest.raises(ValueError, match="NaN"):
        Sample(1.0).choose(np.array([[0.0, np.nan]]), rng)
    # greedy looks only at each row's argmax: a NaN anywhere in a row must still be what it finds
    for row in ([[0.0, 9.0, np.nan, 1.0]], [[np.nan, 9.0, 0.0, 1.0]], [[1.0, 2.0, 3.0, 4.0], [0.0, 9.0, 1.0, np.nan]]):
        with pytest.raises(ValueError, match="NaN"):
            Greedy().choose(np.array(row, np.float32), rng)
    with pytest.raises(ValueError, match="-inf"):
        Sample(1.0).choose(np.full((1, 3), -np.inf), rng)


def test_make_sampler():
    assert make_sampler() == Greedy()
    assert make_sampler(temperature=0.8, top_k=40, top_p=0.95) == Sample(0.8, top_k=40, top_p=0.95)
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(temperature=-0.5)
