"""How many tokens to draft next: the k that maximises expected tokens per unit time, from what was seen so far.

`AdaptiveK.next_k()` picks k in [0, max_k] maximising E(a, k) / cost(k) (E as `throughput.expected_tokens`), where
- a is the per-draft acceptance rate: accepted drafts over examined drafts (a round with n of k accepted examined
  n + 1 drafts, or k if all were accepted), starting from a prior (`prior_acceptance` worth `prior_weight` drafts)
  and forgetting the prior and old rounds alike, geometrically (`memory` per round);
- cost(k) is the time of a round with k drafts (drafting plus the verify pass), measured: the caller reports each
  round's seconds (per k the lower median of its last `WINDOW` rounds: a round stalled by another process on a
  busy machine, noise that only ever adds time, moves it little; once the plain step is measured, the prior's
  cost for k from it counts as one more round, so one stalled round alone cannot rule a k out; the first timed
  round of each k is taken as its warm-up, such as a backend planning a new shape, and not counted). A k never
  measured lies on the line between the measured k on either side of it, or, beyond the measured ones, follows the
  prior costs (`verify_cost`, `draft_cost`, in decode steps) from the nearest measured k; with nothing measured
  the prior is the cost.
k = 0 is plain decode (E = 1 at the cost of one step): it wins whenever speculation would not pay. Two kinds of
probe keep the estimates current: after `probe_every` plain rounds in a row one round drafts a single token (plain
rounds teach nothing about acceptance; a probe costs at most a verify over 2 tokens and one drafted token, spread
over `probe_every` steps), and while speculating with timed rounds, one round in `4 * probe_every` (in
`probe_every` until it is measured) is a plain step so the cost being beaten stays measured (prompt lookup's rounds
without a match measure it for free).

Runs (`next_k(continuing=...)`, `observe(..., continuing=...)`, optional): a drafter that copies (prompt lookup)
is right in runs, so one per-draft rate misjudges both ends of a run. Told whether a round continues a run (the
previous round verified drafts and accepted them all) or starts one, the rule keeps two more rates, each from the
same prior, each forgetting as it learns: `start` (f) for the first draft of a round that starts a run and `run`
(r) for every other examined draft.  The k for a start and the k within a run are chosen together, maximising the
long-run tokens per second of that two-state process (`_best_pair`): a start is worth its own tokens plus the run
it may open, so rare starts of long runs are still tried, with few drafts.  Starts that never take drop to plain
steps (and probes), runs that keep being accepted grow to max_k; rounds without `continuing` use the single rate.

`next_k` costs a few microseconds (it runs between two decode steps): the cost table is rebuilt only when a
measurement changed it.

transformers' `num_assistant_tokens_schedule="heuristic"` (k + 2 after a fully accepted round, else k - 1, at least
1) needs no costs but never stops speculating; this rule stops when the measured costs say so. It deliberately
keeps one state per sequence and knows nothing of drafters or backends: the caller drafts at most `next_k()`
tokens, verifies, and reports the round with `observe`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["AdaptiveK"]

WINDOW = 9  # rounds per k whose median is its measured cost


class AdaptiveK:
    """Per-sequence choice of the number of drafts; `next_k()` then `observe(...)` once per round."""

    def __init__(
        self,
        max_k: int,
        verify_cost: Sequence[float] | None = None,
        draft_cost: float = 0.0,
        prior_acceptance: float = 0.5,
        prior_weight: float = 4.0,
        memory: float = 0.95,
        probe_every: int = 16,
    ) -> None:
        """`verify_cost[k]`: a target pass over k + 1 tokens in decode steps, k = 0..max_k (default 1 everywhere:
        the weight-read bound); `draft_cost`: drafting one token, in decode steps."""
        if isinstance(max_k, bool) or not isinstance(max_k, numbers.Integral) or max_k < 0:
            raise ValueError(f"AdaptiveK(max_k={max_k!r}): expected an integer >= 0 (0: never speculate).")
        self.max_k = int(max_k)
        costs = [1.0] * (self.max_k + 1) if verify_cost is None else list(verify_cost)
        if len(costs) != self.max_k + 1 or not all(_positive(c) for c in costs):
            raise ValueError(
                f"AdaptiveK(verify_cost={verify_cost!r}): expected {self.max_k + 1} numbers > 0, the time of a target "
                f"pass over k + 1 tokens for k = 0..{self.max_k} in decode steps."
            )
        if not (_positive(draft_cost) or draft_cost == 0) or isinstance(draft_cost, bool):
            raise ValueError(f"AdaptiveK(draft_cost={draft_cost!r}): expected a number >= 0 (decode steps per draft).")
        if not (isinstance(prior_acceptance, numbers.Real) and 0 <= prior_acceptance <= 1):
            raise ValueError(f"AdaptiveK(prior_acceptance={prior_acceptance!r}): expected a probability in [0, 1].")
        if not _positive(prior_weight):
            raise ValueError(f"AdaptiveK(prior_weight={prior_weight!r}): expected a number > 0 (drafts' worth).")
        if not (isinstance(memory, numbers.Real) and 0 < memory <= 1):
            raise ValueError(f"AdaptiveK(memory={memory!r}): expected a number in (0, 1] (1: never forget).")
        if isinstance(probe_every, bool) or not isinstance(probe_every, numbers.Integral) or probe_every < 1:
            raise ValueError(f"AdaptiveK(probe_every={probe_every!r}): expected an integer >= 1.")
        self._prior_cost = [c + k * float(draft_cost) for k, c in enumerate(costs)]  # a round of k drafts
        self._memory = float(memory)
        self._probe_every = int(probe_every)
        self._accepted = float(prior_acceptance) * prior_weight  # decayed counts of drafts, the prior's included
        self._examined = float(prior_weight)
        self._seconds: list[float | None] = [None] * (self.max_k + 1)  # measured round time per width (median)
        self._samples: list[list[float]] = [[] for _ in range(self.max_k + 1)]  # the last WINDOW rounds' times
        self._warm = [False] * (self.max_k + 1)  # a width's first timed round (its warm-up) was seen
        self._plain_rounds = 0  # plain rounds in a row since the last speculative one
        self._since_plain = 0  # rounds since the last plain one
        # run-aware rates (`continuing`): [accepted, examined] for a run's first draft and for the drafts after it
        self._start = [float(prior_acceptance) * prior_weight, float(prior_weight)]
        self._run = [float(prior_acceptance) * prior_weight, float(prior_weight)]
        self._costs: list[float] | None = None  # cost(k) for every k, rebuilt after a measurement changed

    @property
    def acceptance(self) -> float:
        """The current estimate of the per-draft acceptance rate."""
        return self._accepted / self._examined

    def cost(self, k: int) -> float:
        """The estimated time of a round with k drafts: measured, else interpolated, else the prior's shape."""
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= self.max_k:
            raise ValueError(f"cost(k={k!r}): expected an integer in [0, {self.max_k}] (max_k).")
        return self._cost_table()[k]

    def measured_costs(self, min_rounds: int = 3) -> list[float | None]:
        """For k = 0..max_k the measured cost(k) / cost(0) where both k and 0 have at least ``min_rounds`` timed
        rounds after the warm-up, else None: what a new sequence on the same engine may take as its
        ``verify_cost`` prior (the draft cost included; never an estimate, so one noisy round is not passed on)."""
        if len(self._samples[0]) < min_rounds:
            return [None] * (self.max_k + 1)
        return [self._seconds[k] / self._seconds[0] if len(self._samples[k]) >= min_rounds else None
                for k in range(self.max_k + 1)]

    def _cost_table(self) -> list[float]:
        if self._costs is None:
            sec, prior = self._seconds, self._prior_cost
            measured = [k for k, v in enumerate(sec) if v is not None]
            table, j = [], 0  # measured[j]: the first measured k >= the current one
            for k in range(self.max_k + 1):
                while j < len(measured) and measured[j] < k:
                    j += 1
                lo = measured[j - 1] if j else None
                hi = measured[j] if j < len(measured) else None
                if hi == k:
                    table.append(sec[k])
                elif lo is not None and hi is not None:
                    table.append(sec[lo] + (sec[hi] - sec[lo]) * (k - lo) / (hi - lo))
                elif lo is not None or hi is not None:
                    near = lo if lo is not None else hi
                    table.append(sec[near] * prior[k] / prior[near])
                else:
                    table.append(prior[k])
            self._costs = table
        return self._costs

    def next_k(self, continuing: bool | None = None) -> int:
        """How many tokens to draft this round (0: a plain decode step).  ``continuing``: None for the single
        per-draft rate; True where this round continues a run (the previous round accepted all its drafts), False
        where it starts one (the run-aware rates)."""
        costs = self._cost_table()
        if continuing is None:
            a = self._accepted / self._examined
            best, best_rate = 0, 1.0 / costs[0]
            tokens, p = 1.0, 1.0  # E(a, k) = 1 + a + ... + a^k, summed term by term
            for k in range(1, self.max_k + 1):
                p *= a
                tokens += p
                rate = tokens / costs[k]
                if rate > best_rate * (1 + 1e-12):  # ties go to the smaller k
                    best, best_rate = k, rate
        else:
            best = self._best_pair(costs)[continuing]
        if best == 0 and self.max_k > 0 and self._plain_rounds + 1 >= self._probe_every:
            return 1  # a probe: acceptance may have changed while nothing was drafted
        timed = any(s is not None for s in self._seconds)
        every = self._probe_every * (1 if self._seconds[0] is None else 4)
        if best > 0 and timed and self._since_plain + 1 >= every:
            return 0  # a probe: the plain step's cost may have changed, or was never measured
        return best

    @property
    def probe_due(self) -> bool:
        """`next_k` would draft one token as a probe now (plain rounds in a row have reached ``probe_every``)."""
        return self.max_k > 0 and self._plain_rounds + 1 >= self._probe_every

    def expected_tokens(self, k: int, continuing: bool | None = None) -> float:
        """The tokens a round of k drafts is expected to emit (the target's own included), by the single per-draft
        rate (``continuing`` None) or the run-aware ones: a start 1 + f (1 + r + ... + r^(k-1)), within a run
        1 + r + ... + r^k.  A batched round weighs its rows' drafts with it (`runtime.speculative.batched`)."""
        if continuing is None:
            first = rest = self._accepted / self._examined
        else:
            rest = self._run[0] / self._run[1]
            first = rest if continuing else self._start[0] / self._start[1]
        tokens, p = 1.0, first
        for _ in range(k):
            tokens += p
            p *= rest
        return tokens

    def _best_pair(self, costs: list[float]) -> tuple[int, int]:
        """(k at a start, k within a run) maximising the long-run tokens per second of the two-state process: a
        start of kf drafts emits 1 + f (1 + r + ... + r^(kf-1)) tokens and enters a run with probability
        f r^(kf-1); a run of kc drafts per round emits 1 + r + ... + r^kc per round and lasts 1 / (1 - r^kc) rounds;
        so a cycle (a start and the run it may open) yields (E_f + P T) / (c(kf) + P C), T and C a run's tokens
        and time.  (0, 0): plain steps (a cycle of one step, one token)."""
        f = self._start[0] / self._start[1]
        r = min(self._run[0] / self._run[1], 1 - 1e-9)  # a run that never ends: its own rate, in the limit
        runs = []  # per kc: (tokens, seconds) of a whole run
        tokens, p = 1.0, 1.0
        for k in range(1, self.max_k + 1):
            p *= r
            tokens += p
            runs.append((k, tokens / (1 - p), costs[k] / (1 - p)))
        best, best_rate = (0, 0), 1.0 / costs[0]
        start, p = 1.0, f  # E_f(kf) and P(kf) = f r^(kf-1)
        for kf in range(1, self.max_k + 1):
            start += p
            for kc, run_tokens, run_seconds in runs:
                rate = (start + p * run_tokens) / (costs[kf] + p * run_seconds)
                if rate > best_rate * (1 + 1e-12):  # ties go to the smaller k
                    best, best_rate = (kf, kc), rate
            p *= r
        return best

    def plain_round(self) -> None:
        """A plain round not timed, the cheapest report (the caller's rounds without a match: it times one in a
        few, `observe(0, 0, seconds)`); the same as `observe(0, 0)`."""
        self._plain_rounds += 1
        self._since_plain = 0

    def _check_round(self, proposed, accepted, seconds, continuing) -> None:
        if isinstance(proposed, bool) or not isinstance(proposed, numbers.Integral) or not 0 <= proposed <= self.max_k:
            raise ValueError(f"observe(proposed={proposed!r}): expected an integer in [0, {self.max_k}] (max_k).")
        if isinstance(accepted, bool) or not isinstance(accepted, numbers.Integral) or not 0 <= accepted <= proposed:
            raise ValueError(f"observe(accepted={accepted!r}): expected an integer in [0, {proposed}] (proposed).")
        if seconds is not None and not _positive(seconds):
            raise ValueError(f"observe(seconds={seconds!r}): expected the round's duration, a number > 0, or None.")
        if continuing is not None and not isinstance(continuing, bool):
            raise ValueError(f"observe(continuing={continuing!r}): expected True, False or None.")

    def observe(self, proposed: int, accepted: int, seconds: float | None = None,
                continuing: bool | None = None) -> None:
        """One round: `proposed` drafts verified (fewer than `next_k()` where the drafter had fewer), `accepted`
        of them accepted, `seconds` it took from drafting to the verdict (None: not timed); `continuing` as told
        to `next_k` (None: the run-aware rates learn nothing from this round)."""
        if not (type(proposed) is int and type(accepted) is int and 0 <= accepted <= proposed <= self.max_k
                and type(seconds) is float and 0 < seconds < math.inf and type(continuing) in (bool, type(None))):
            self._check_round(proposed, accepted, seconds, continuing)  # the loop's own calls skip the slow checks
        if seconds is not None and not self._warm[proposed]:
            self._warm[proposed] = True
        elif seconds is not None:
            samples = self._samples[proposed]
            samples.append(float(seconds))
            if len(samples) > WINDOW:
                del samples[0]
            plain = self._seconds[0]
            if proposed and plain is not None:  # the prior's guess from the plain step counts as one more round
                samples = [*samples, plain * self._prior_cost[proposed] / self._prior_cost[0]]
            self._seconds[proposed] = sorted(samples)[(len(samples) - 1) // 2]  # the lower median
            self._costs = None
        if proposed == 0:
            self._plain_rounds += 1
            self._since_plain = 0
            return
        self._plain_rounds = 0
        self._since_plain += 1
        self.learn(proposed, accepted, continuing)

    def learn(self, proposed: int, accepted: int, continuing: bool | None = None) -> None:
        """The acceptance of one more row's drafts in a round already reported by `observe` (a batched round: one
        `observe` with the round's time, `learn` for every other row that drafted): the rates learn, the costs and
        the probes' counters do not."""
        if not (type(proposed) is int and type(accepted) is int and 0 <= accepted <= proposed <= self.max_k):
            self._check_round(proposed, accepted, None, continuing)
        if not proposed:
            return
        m = self._memory
        self._accepted = m * self._accepted + accepted
        self._examined = m * self._examined + accepted + (accepted < proposed)
        if continuing is None:
            return
        first = self._run if continuing else self._start
        rest = self._run
        first[0] *= m  # each rate forgets only as it learns: a start followed by a long run must not fade faster
        first[1] *= m  # than one followed by plain steps
        if accepted and rest is not first:
            rest[0] *= m
            rest[1] *= m
        first[0] += accepted > 0
        first[1] += 1
        if accepted:  # the drafts after the first: accepted - 1 accepted, one more examined if one was rejected
            rest[0] += accepted - 1
            rest[1] += accepted - 1 + (accepted < proposed)


def _positive(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0
