"""The streaming path's shortcuts give what the plain path gives: content events written without a pydantic model per
token are the bytes the model would write, and pieces the engine pushes while the event loop is busy reach the reader
as one batch (one wake of the loop), in order, ending where the request ends.

The reference for the events is the pydantic model dumped per chunk (`runtime.serve.routes._sse`), the reference for
the batches the pieces as pushed.  The streams through a real server are in tests/test_serve_http.py (a fake engine)
and tests/test_serve_engine.py (the real one).
"""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from runtime import GenerationResult, Piece
from runtime.engine import RequestFailed, RequestHandle
from runtime.serve import routes
from runtime.serve.metrics import Metrics

TEXTS = ["Hello", "", " ", 'say "hi"', "back\\slash", "line\nbreak\ttab\r", "\x00\x01\x1f\x7f", "é ngine 日本 🙂",
         "\u2028\u2029", "</script>", "\x00piece\x00", "{}[],:", "\ufffd"]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_text_events_are_the_models_bytes(kind):
    chunks = (routes._chat_chunks if kind == "chat" else routes._completion_chunks)("id-1", 1733000000, "gemma-x")
    event = routes._text_events(chunks)
    for text in TEXTS:
        want = routes._sse(chunks(text=text))
        assert event(text) == want, (text, event(text), want)
        body = json.loads(event(text)[len("data: "):])
        got = body["choices"][0]["delta"]["content"] if kind == "chat" else body["choices"][0]["text"]
        assert got == text


def _pieces(start: int, n: int) -> list[Piece]:
    return [Piece(0, start + i, f"t{start + i}") for i in range(n)]


def test_pieces_pushed_while_the_loop_is_busy_arrive_as_one_batch_with_one_wake():
    handle = RequestHandle("req-x", 3, engine=None)
    first, busy, late = _pieces(0, 3), _pieces(3, 4), _pieces(7, 2)
    for p in first:
        handle._push(p)  # before anyone reads: the first batch holds all three
    wakes, busy_wakes = [], []

    async def read():
        loop = asyncio.get_running_loop()
        plain = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakes.append(a), plain(*a))[1]
        batches = []
        async for batch in handle.abatches():
            batches.append(batch)
            if len(batches) == 1:  # the engine thread pushes four pieces while this loop does not run
                pusher = threading.Thread(target=lambda: [handle._push(p) for p in busy])
                pusher.start()
                pusher.join()
                busy_wakes.append(len(wakes))
            elif len(batches) == 2:
                threading.Thread(target=lambda: ([handle._push(p) for p in late],
                                                 handle._push(result=GenerationResult([], "", "stop", 3)))).start()
        return batches

    batches = asyncio.run(read())
    assert batches[:2] == [first, busy]
    assert [p for b in batches for p in b] == first + busy + late
    assert busy_wakes == [1], f"{busy_wakes[0]} wakes of the loop for four pushes while it was busy; expected 1"
    assert handle._async == [], "the reader's waiter outlived its stream"


def test_astream_flattens_the_batches_and_raises_the_failure():
    handle = RequestHandle("req-y", 3, engine=None)
    pieces, got = _pieces(0, 5), []

    async def read():
        threading.Thread(target=lambda: ([handle._push(p) for p in pieces],
                                         handle._push(error=RequestFailed("the backend failed")))).start()
        async for p in handle.astream():
            got.append(p)

    with pytest.raises(RequestFailed, match="the backend failed"):
        asyncio.run(read())
    assert got == pieces and handle._async == []


class _BatchHandle:
    """A handle whose pieces arrive in given batches (as `RequestHandle.abatches` gives them after busy loops)."""

    def __init__(self, batches):
        self.batches, self.finish_reason = batches, None

    async def abatches(self):
        for b in self.batches:
            yield b
        self.finish_reason = "length"

    def result(self, timeout=None):
        n = sum(p.token >= 0 for b in self.batches for p in b)
        return GenerationResult(list(range(n)), "", "length", 3)

    def cancel(self):
        raise AssertionError("a finished stream must not be cancelled")


def test_a_batch_of_pieces_is_one_write_of_one_event_per_piece():
    batches = [_pieces(0, 1), _pieces(1, 3), [Piece(0, 4, ""), Piece(0, 5, "x")], [Piece(0, -1, "tail")]]
    handle = _BatchHandle(batches)
    state = SimpleNamespace(metrics=Metrics(SimpleNamespace(stats=dict)))
    sub = SimpleNamespace(include_usage=False)
    chunks = routes._completion_chunks("id-2", 1, "m")

    async def collect():
        return [w async for w in routes._events(state, handle, sub, 0.0, chunks)]

    writes = asyncio.run(collect())
    text_writes = writes[:len(batches)]
    want = [[routes._sse(chunks(text=p.text)) for p in b if p.text] for b in batches]
    assert text_writes == ["".join(w) for w in want]
    assert [w.count("data: ") for w in text_writes] == [1, 3, 1, 1]
    assert writes[-1] == "data: [DONE]\n\n"
    assert json.loads(writes[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
