"""Choose the next token from logits: greedy, or temperature sampling with optional top-k and top-p, numpy only.

A sampler is a small frozen dataclass with one method, `choose(logits, rng) -> ids`; all randomness comes from the
`numpy.random.Generator` passed in, so a seed reproduces a generation. Ties between equal logits go to the lowest
token id, as in `np.argmax`, so `Sample(top_k=1)` and `Sample(top_p=tiny)` choose exactly what `Greedy` chooses.

It deliberately does not implement repetition/frequency penalties, min-p, beam search or logit processors: those
change what the model is asked, and belong to the caller, on the logits, before `choose`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Greedy", "Sample", "Sampler", "make_sampler"]


_NAN = "The logits contain NaN; the model produced invalid numbers (check the precision/engine)."


def _check_shape(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] == 0 or not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(
            f"Got logits of shape {logits.shape} and dtype {logits.dtype}; expected a float array of shape "
            "(batch, vocab) with vocab >= 1 (take the last position's logits first)."
        )
    return logits


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = _check_shape(logits)
    if np.isnan(logits).any():
        raise ValueError(_NAN)
    return logits


@dataclass(frozen=True)
class Greedy:
    """Always the highest-scoring token (lowest id among ties)."""

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, V) logits -> (B,) int64 token ids; `rng` is not used."""
        logits = _check_shape(logits)
        ids = logits.argmax(axis=-1)
        # argmax returns the first NaN where a row has one: one look per row instead of a scan of the logits (as
        # Python floats: numpy calls are slow in a decode loop's cold caches, see `runtime.generate`)
        for row, tok in enumerate(ids.tolist()):
            if math.isnan(logits.item(row, tok)):
                raise ValueError(_NAN)
        return ids if ids.dtype == np.int64 else ids.astype(np.int64)


@dataclass(frozen=True)
class Sample:
    """Draw from softmax(logits / temperature), restricted to the top_k tokens, then to the top_p nucleus."""

    temperature: float
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(
                f"Sample(temperature={t!r}): temperature must be a finite number > 0; use Greedy() (or "
                "make_sampler(temperature=0)) for deterministic decoding."
            )
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"Sample(top_k={k!r}): top_k must be an integer >= 1, or None to keep every token.")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"Sample(top_p={p!r}): top_p must be a number in (0, 1], or None to keep every token.")

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(B, V) logits -> (B,) int64 token ids, one uniform draw from `rng` per row."""
        logits = _check_logits(logits)
        if np.isposinf(logits).any():
            raise ValueError("The logits contain +inf; a probability distribution cannot be formed from them.")
        return np.array([self._choose_row(row, rng) for row in logits], dtype=np.int64)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(V,) logits of one row -> (ids, probs): the candidates `choose` draws from and their probabilities
        (float64, summing to 1 up to rounding; every other token has probability 0). Speculative sampling
        (`runtime.speculative.accept`) verifies drafts against exactly this distribution."""
        logits = np.asarray(logits)
        _check_logits(logits[None])
        if np.isposinf(logits).any():
            raise ValueError("The logits contain +inf; a probability distribution cannot be formed from them.")
        ids, probs = self._distribution(logits)
        return ids, probs / probs.sum()

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates and their weights: probabilities before the nucleus cut, not renormalised after it
        (`_choose_row` scales its uniform draw by the total instead)."""
        scores = logits.astype(np.float64) / self.temperature  # (V,)
        ids = np.flatnonzero(scores > -np.inf)
        if ids.size == 0:
            raise ValueError("Every logit in a row is -inf; there is no token to sample.")
        if self.top_k is not None and self.top_k < ids.size:
            ids = _top_ids(scores, int(self.top_k))
        probs = np.exp(scores[ids] - scores[ids].max())  # stable softmax over the candidates
        probs /= probs.sum()
        if self.top_p is not None and self.top_p < 1:
            ids, probs = _nucleus(ids, probs, self.top_p)
        return ids, probs

    def _choose_row(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        ids, probs = self._distribution(logits)
        cdf = np.cumsum(probs)
        index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
        if index >= ids.size:  # u * total rounded up to total: take the last token that has any probability
            index = int(np.flatnonzero(probs > 0)[-1])
        return int(ids[index])


def _top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values (unordered, but ascending among equal values); ties at the threshold go to
    the lowest indices."""
    kth = np.partition(values, values.size - k)[values.size - k]  # the k-th largest value
    above = np.flatnonzero(values > kth)
    at = np.flatnonzero(values == kth)[: k - above.size]
    return np.concatenate([above, at])


def _nucleus(ids: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most probable candidates whose probability reaches top_p (at least one).

    Sorting a 262k vocabulary costs tens of milliseconds, so only the top m candidates are sorted, m growing until
    their mass reaches top_p (the nucleus is usually a few hundred tokens at most).
    """
    m = min(256, probs.size)
    while True:
        top = _top_ids(probs, m) if m < probs.size else np.arange(probs.size)
        top = top[np.argsort(-probs[top], kind="stable")]  # most probable first; ties keep ascending ids
        reached = np.cumsum(probs[top]) >= top_p
        if reached.any() or m == probs.size:
            keep = top[: int(np.argmax(reached)) + 1] if reached.any() else top
            return ids[keep], probs[keep]
        m = min(4 * m, probs.size)


Sampler = Greedy | Sample


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> Sampler:
    """Greedy() when temperature is 0, else Sample(temperature, top_k, top_p) (which checks its arguments)."""
    if temperature == 0:
        return Greedy()
    return Sample(temperature=temperature, top_k=top_k, top_p=top_p)
