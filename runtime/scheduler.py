"""The in-flight batching scheduler: owns the requests, the sequence slots and the waiting queue, and decides what
the next engine step runs.  Plain Python (no numpy, no backend): testable with a fake clock.

A step (`Scheduler.plan`) is at most one prefill call, then one decode step for every sequence that has its first
token.  The prefill call is the next chunk of the oldest admitted prompt; where that is a first chunk (nothing
cached yet), the first chunks of the same length of prompts admitted beside it in neighbouring slots join the call
while it stays within ``prefill_chunk`` tokens (a burst of short prompts is prefilled in one call, which on
quantized CPU engines costs about what one prompt does).  Only equal lengths: a right-padded row of an INT4 ONNX
Runtime engine gets other logits than the same prompt alone (measured: up to 0.09 of the logit range on the bench
model; fp32 1e-5), and each request must get what it gets alone.  Waiting requests are admitted into free slots first (lowest slot first, so running
sequences gather at the low rows and the decode call covers a short prefix of the cache), in arrival order.  A
prompt is prefilled in chunks of at most ``prefill_chunk`` tokens, one chunk per step, so a running stream never
waits longer than one chunk between two tokens; prefills are served oldest admission first.

It deliberately does not run the model, sample, detokenize or know about threads (`runtime.engine` does, and
holds the lock around every call here).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["Overloaded", "Scheduler", "Seq", "Step"]

WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


class Overloaded(RuntimeError):
    """The waiting queue is full: retry after ``retry_after`` seconds (the HTTP layer answers 429)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Seq:
    """One request as the scheduler sees it: its prompt's chunk boundaries and how far it got."""

    id: str
    chunks: list[tuple[int, int]]  # prefill calls: token ranges of the expanded prompt
    arrived: float = 0.0
    state: str = WAITING
    slot: int | None = None
    next_chunk: int = 0
    length: int = 0  # tokens in the cache
    payload: object = field(default=None, repr=False)  # the engine's own record of the request

    @property
    def prompt_len(self) -> int:
        return self.chunks[-1][1]


@dataclass
class Step:
    prefill: list[Seq]  # run each one's chunk ``next_chunk`` in one call (neighbouring slots, slot order)
    decode: list[Seq]  # then one decode step for these (each has a token to feed)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, *, prefill_chunk: int = 256,
                 clock: Callable[[], float] = time.monotonic):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch}, max_queue={max_queue}; expected max_batch >= 1, max_queue >= 0")
        self.max_batch, self.max_queue, self.clock, self.prefill_chunk = max_batch, max_queue, clock, prefill_chunk
        self.slots: list[Seq | None] = [None] * max_batch
        self.waiting: deque[Seq] = deque()
        self.step_seconds = 0.0  # a moving average of step time, for Retry-After

    # ------------------------------------------------------------------ requests in and out
    def add(self, seq: Seq) -> None:
        """Queue ``seq``; `Overloaded` when ``max_queue`` requests already wait beyond those the free slots take
        at the next step."""
        if len(self.waiting) >= self.max_queue + self.slots.count(None):
            raise Overloaded(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue}) and all "
                             f"{self.max_batch} slots are busy; retry later", retry_after=self.retry_after())
        seq.arrived, seq.state = self.clock(), WAITING
        self.waiting.append(seq)

    def retry_after(self) -> float:
        return max(1.0, round(self.step_seconds * 8, 1))

    def remove(self, seq: Seq) -> None:
        """Take ``seq`` out (finished, cancelled or failed): its slot is free for the next step's admission."""
        if seq.state == WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        elif seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
        seq.state = DONE

    # ------------------------------------------------------------------ progress the engine reports
    def prefilled(self, seq: Seq) -> None:
        """``seq``'s chunk ran: the next one is due, or (the last) it decodes from now on."""
        seq.length = seq.chunks[seq.next_chunk][1]
        seq.next_chunk += 1
        if seq.next_chunk == len(seq.chunks):
            seq.state = DECODE

    def decoded(self, seqs: list[Seq]) -> None:
        for seq in seqs:
            seq.length += 1

    def record_step(self, seconds: float) -> None:
        self.step_seconds = seconds if not self.step_seconds else 0.9 * self.step_seconds + 0.1 * seconds

    # ------------------------------------------------------------------ the plan
    def admit(self) -> list[Seq]:
        """Move waiting requests into free slots (lowest first), in arrival order; returns those admitted."""
        admitted = []
        for slot, held in enumerate(self.slots):
            if not self.waiting:
                break
            if held is None:
                seq = self.waiting.popleft()
                seq.slot, seq.state = slot, PREFILL
                self.slots[slot] = seq
                admitted.append(seq)
        return admitted

    def plan(self) -> Step:
        """The next step: admit, then the oldest admitted prefill's next chunk (with neighbouring first chunks),
        then every decoding sequence."""
        self.admit()
        running = [s for s in self.slots if s is not None]
        prefills = [s for s in running if s.state == PREFILL]
        group = []
        if prefills:
            group = [min(prefills, key=lambda s: s.arrived)]
            if group[0].next_chunk == 0:
                group = self._neighbours(group[0])
        return Step(group, [s for s in running if s.state == DECODE])

    def _neighbours(self, first: Seq) -> list[Seq]:
        """``first`` and the sequences in the slots next to it that are due a first chunk of the same length (no
        padding), while the call's size (rows x chunk) stays within ``prefill_chunk``."""
        def due(slot: int) -> Seq | None:
            seq = self.slots[slot] if 0 <= slot < self.max_batch else None
            return seq if seq is not None and seq.state == PREFILL and seq.next_chunk == 0 else None

        def width(seq: Seq) -> int:
            return seq.chunks[0][1] - seq.chunks[0][0]

        group, widest = [first], width(first)
        lo = hi = first.slot
        while True:
            grew = False
            for slot in (hi + 1, lo - 1):
                seq = due(slot)
                if seq is not None and width(seq) == widest and widest * (len(group) + 1) <= self.prefill_chunk:
                    group.append(seq)
                    widest = max(widest, width(seq))
                    lo, hi, grew = min(lo, slot), max(hi, slot), True
            if not grew:
                return sorted(group, key=lambda s: s.slot)

    # ------------------------------------------------------------------ facts
    @property
    def busy(self) -> int:
        return self.max_batch - self.slots.count(None)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.slots.count(None) == self.max_batch
