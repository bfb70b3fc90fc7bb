"""The in-flight batching scheduler alone (`runtime.scheduler`), with a fake clock and no model: admission order
and slots, one prefill chunk per step beside every decoding sequence, the queue bound, removal freeing the slot;
and the stop-string filter (`runtime.stops`)."""

from __future__ import annotations

import pytest

from runtime.scheduler import Overloaded, Scheduler, Seq
from runtime.stops import StopStrings


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 1.0
        return self.t


def _seq(name, *chunks):
    return Seq(name, list(chunks) or [(0, 5)])


def _run(s: Scheduler, steps: int) -> list[tuple[str | None, list[str]]]:
    """Plan and 'run' ``steps`` steps; returns (prefilled sequence, decoded sequences) per step."""
    trace = []
    for _ in range(steps):
        step = s.plan()
        for seq in step.prefill:
            s.prefilled(seq)
        s.decoded(step.decode)
        trace.append(("+".join(q.id for q in step.prefill) or None, [q.id for q in step.decode]))
    return trace


def test_admits_in_arrival_order_into_the_lowest_free_slots():
    s = Scheduler(max_batch=2, max_queue=8, clock=Clock())
    a, b, c = _seq("a"), _seq("b"), _seq("c")
    for q in (a, b, c):
        s.add(q)
    s.plan()
    assert (a.slot, b.slot, c.slot) == (0, 1, None) and list(s.waiting) == [c]
    s.remove(a)  # finished: its slot goes to the next waiting request at the next step
    assert s.slots[0] is None and s.busy == 1
    s.plan()
    assert c.slot == 0 and not s.waiting and a.state == "done"


def test_one_prefill_chunk_per_step_beside_every_decoding_sequence():
    """A long prompt's chunks alternate with the running sequence's decode steps: no stream waits longer than one
    chunk between two tokens; prefills go oldest first."""
    s = Scheduler(max_batch=3, max_queue=8, prefill_chunk=4, clock=Clock())
    short = _seq("short", (0, 4))
    s.add(short)
    assert _run(s, 2) == [("short", []), (None, ["short"])]
    long_, other = _seq("long", (0, 4), (4, 8), (8, 10)), _seq("other", (0, 3))
    s.add(long_)
    s.add(other)
    trace = _run(s, 5)
    assert trace == [("long", ["short"]), ("long", ["short"]), ("long", ["short"]), ("other", ["short", "long"]),
                     (None, ["short", "long", "other"])]
    assert (short.length, long_.length, other.length) == (4 + 6, 10 + 2, 3 + 1)


def test_queue_bound_raises_overloaded_with_a_retry_hint():
    s = Scheduler(max_batch=1, max_queue=2, clock=Clock())
    for name in "abc":  # one for the free slot, two waiting
        s.add(_seq(name))
    with pytest.raises(Overloaded, match="max_queue 2") as e:
        s.add(_seq("d"))
    assert e.value.retry_after >= 1.0
    s.plan()  # a takes the slot; b and c wait: full
    with pytest.raises(Overloaded):
        s.add(_seq("d"))
    s.remove(s.slots[0])  # a finished: its free slot makes room
    s.add(_seq("d"))
    assert [q.id for q in s.waiting] == ["b", "c", "d"]
    busy = Scheduler(max_batch=2, max_queue=0, clock=Clock())
    busy.add(_seq("a"))  # no queue at all: a request is taken only while a slot is free
    busy.add(_seq("b"))
    with pytest.raises(Overloaded):
        busy.add(_seq("c"))


def test_removing_a_waiting_or_running_sequence():
    s = Scheduler(max_batch=1, max_queue=4, clock=Clock())
    a, b = _seq("a"), _seq("b")
    s.add(a)
    s.add(b)
    s.plan()
    s.remove(b)  # cancelled while waiting
    assert not s.waiting and b.state == "done"
    s.remove(a)  # cancelled while running
    assert s.idle and s.plan().empty


@pytest.mark.parametrize("pieces,stops,want_text,want_stop", [
    (["Hel", "lo wor", "ld"], ["wor"], "Hello ", True),
    (["ab", "c"], ["bd"], "abc", False),  # "b" held back, then released
    (["x<", "/s", ">y"], ["</s>"], "x", True),
    (["aaa"], [], "aaa", False),
    (["one", " two"], ["two", "ne t"], "o", True),  # the earliest match wins
])
def test_stop_strings(pieces, stops, want_text, want_stop):
    f = StopStrings(stops)
    out, stopped = [], False
    for p in pieces:
        text, stopped = f.feed(p)
        out.append(text)
        if stopped:
            break
    out.append(f.flush())
    assert "".join(out) == want_text and stopped == want_stop


def test_stop_strings_hold_back_only_a_possible_start():
    f = StopStrings(["STOP"])
    assert f.feed("abcST") == ("abc", False)  # "ST" may start STOP
    assert f.feed("x") == ("STx", False)
    assert f.feed("S") == ("", False)
    assert f.flush() == "S"


def test_first_chunks_of_neighbouring_slots_share_a_call_within_the_chunk_budget():
    """Only first chunks of the same length join (no padded row: an INT4 engine's padded row gets other logits)."""
    s = Scheduler(max_batch=5, max_queue=8, prefill_chunk=8, clock=Clock())
    a, b, c, d, e = (_seq("a", (0, 2)), _seq("b", (0, 2)), _seq("c", (0, 2), (2, 6)), _seq("d", (0, 2)),
                     _seq("e", (0, 3)))
    for q in (a, b, c, d, e):
        s.add(q)
    step = s.plan()
    assert [q.id for q in step.prefill] == ["a", "b", "c", "d"]  # 4 x 2 tokens: the budget; e is longer
    for q in step.prefill:
        s.prefilled(q)
    step = s.plan()  # c's second chunk continues alone (a prompt with past context: one row per call) ...
    assert [q.id for q in step.prefill] == ["c"] and [q.id for q in step.decode] == ["a", "b", "d"]
    s.prefilled(c)
    s.decoded(step.decode)
    step = s.plan()  # ... then e, alone: no neighbour of its length
    assert [q.id for q in step.prefill] == ["e"]
    tight = Scheduler(max_batch=3, max_queue=8, prefill_chunk=4, clock=Clock())
    for q in (_seq("x", (0, 2)), _seq("y", (0, 2)), _seq("z", (0, 2))):
        tight.add(q)
    assert [q.id for q in tight.plan().prefill] == ["x", "y"]  # a third would make 6 > 4 tokens
