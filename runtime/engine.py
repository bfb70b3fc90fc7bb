"""`Engine`: in-flight batching over one loaded artifact.  Many callers `submit` requests from any thread; one
engine thread admits them into ``max_batch`` sequence slots of one cache, prefills them in chunks between decode
steps, and decodes every running sequence in one batched step, streaming each request's `Piece`s to its
`RequestHandle`.

    engine = Engine(runtime.load(dir), max_batch=8).start()
    handle = engine.submit("Hello", params=SamplingParams(max_tokens=32))
    for piece in handle: print(piece.text, end="")

Exactness: each request samples from its own logits row with its own random generator (seeded by its own
``seed``), so a greedy request gets the tokens `runtime.generate` gives it alone, whatever runs beside it, up to
the backend's rounding at another batch size (measured in ``tests/test_engine.py``; see the README).  Requests are
validated in `submit` (bad prompts, images, audio, too long a prompt: `InputError`; a full queue: `Overloaded`); a
failure while running (the backend raising, NaN logits) fails only the requests of that call, with the reason.

Layers (STYLE 13): `runtime.scheduler` decides, `runtime.runner` calls the backend, this module owns requests,
threads and streaming.  No HTTP here (`runtime.serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InputError
from runtime.generate import PREFILL_CHUNK, GenerationResult, LoadedModel, Piece, _prompt_ids, _stop_ids, _too_long
from runtime.generation_config import read_generation_config
from runtime.images import SUPPORTED_SOFT_TOKEN_BUDGETS
from runtime.prompt import RowMedia, chunk_end, expand_prompt
from runtime.runner import Runner
from runtime.sampling import _NAN, Greedy, make_sampler
from runtime.scheduler import Overloaded, Scheduler, Seq
from runtime.stops import StopStrings
from runtime.tokenizer import IncrementalDecoder

__all__ = ["Engine", "Overloaded", "RequestFailed", "RequestHandle", "SamplingParams"]

DEFAULT_PREFILL_CHUNK = 256  # prompt tokens per prefill call: the longest a running stream waits between tokens


class RequestFailed(RuntimeError):
    """The engine could not finish this request (``reason`` says why); other requests are not affected."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        m = self.max_tokens
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise InputError(f"max_tokens={m!r}; expected an integer >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature={t!r}; expected a finite number >= 0 (0: greedy)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InputError(f"seed={self.seed!r}; expected a non-negative integer or None")
        if isinstance(self.stop_strings, str) or not all(isinstance(s, str) for s in self.stop_strings):
            raise InputError(f"stop_strings={self.stop_strings!r}; expected a sequence of strings")
        object.__setattr__(self, "stop_ids", tuple(_stop_ids(self.stop_ids)))
        try:
            make_sampler(t or 1.0, self.top_k, self.top_p)  # top_k/top_p are checked even where greedy ignores them
        except ValueError as e:
            raise InputError(str(e)) from None


class RequestHandle:
    """A submitted request: iterate it (or `astream` it) for its `Piece`s, `result()` for the whole answer,
    `cancel()` from any thread.  Pieces are kept, so a late reader still sees every one."""

    def __init__(self, request_id: str, prompt_tokens: int, engine: Engine):
        self.id, self.prompt_tokens, self._engine = request_id, prompt_tokens, engine
        self._pieces: list[Piece] = []
        self._result: GenerationResult | None = None
        self._error: RequestFailed | None = None
        self._cond = threading.Condition()
        self._async: list[_Waiter] = []
        self._seq: Seq | None = None  # the scheduler's record, set by `Engine.submit`

    # ------------------------------------------------------------------ engine side
    def _push(self, piece: Piece | None = None, *, result: GenerationResult | None = None,
              error: RequestFailed | None = None) -> None:
        with self._cond:
            if piece is not None:
                self._pieces.append(piece)
            if result is not None:
                self._result = result
            if error is not None:
                self._error = error
            self._cond.notify_all()
            wake = [w for w in self._async if not w.pending]  # one wake per reader until it has looked again
            for w in wake:
                w.pending = True
        for w in wake:
            try:
                w.loop.call_soon_threadsafe(w.event.set)
            except RuntimeError:  # that loop is closed: its reader is gone
                pass

    # ------------------------------------------------------------------ caller side
    @property
    def done(self) -> bool:
        return self._result is not None or self._error is not None

    @property
    def finish_reason(self) -> str | None:
        return self._result.finish_reason if self._result else ("error" if self._error else None)

    def cancel(self) -> None:
        """Stop this request (thread-safe): it finishes with ``finish_reason`` "cancelled" and frees its slot at the
        engine's next step.  Cancelling a finished request does nothing."""
        if not self.done:
            self._engine._cancel(self)

    def __iter__(self) -> Iterator[Piece]:
        i = 0
        while True:
            with self._cond:
                while i >= len(self._pieces) and not self.done:
                    self._cond.wait()
                new, finished = self._pieces[i:], self.done
            yield from new
            i += len(new)
            if finished and i >= len(self._pieces):
                break
        if self._error is not None:
            raise self._error

    async def abatches(self) -> AsyncIterator[list[Piece]]:
        """The pieces in an asyncio task, as lists: each list is what arrived since the task last looked (no thread
        per request: the engine thread wakes the loop, once however many pieces it pushes meanwhile), so a reader
        that fell behind catches up in one go (the HTTP layer sends such a list in one write)."""
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._async.append(waiter)
        try:
            i = 0
            while True:
                waiter.event.clear()
                with self._cond:
                    waiter.pending = False  # a push from now on wakes the loop again
                    new, finished = self._pieces[i:], self.done
                if new:
                    i += len(new)
                    yield new
                if finished:  # nothing is pushed after the result or the error
                    break
                await waiter.event.wait()
        finally:
            with self._cond:
                self._async.remove(waiter)
        if self._error is not None:
            raise self._error

    async def astream(self) -> AsyncIterator[Piece]:
        """The pieces one by one in an asyncio task (`abatches`, flattened)."""
        async with contextlib.aclosing(self.abatches()) as batches:
            async for batch in batches:
                for piece in batch:
                    yield piece

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The finished request's `GenerationResult` (waits up to ``timeout`` seconds: `TimeoutError` after)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result


@dataclass(eq=False)
class _Waiter:
    """An asyncio reader of a handle: its loop, the event that wakes it, whether a wake is already on its way."""

    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    pending: bool = False


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    ids: np.ndarray
    media: RowMedia
    params: SamplingParams
    sampler: object
    rng: np.random.Generator
    stop_ids: frozenset[int]
    decoder: IncrementalDecoder | None
    stops: StopStrings
    tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    next_token: int | None = None


class Engine:
    """In-flight batching over ``model`` (see the module docstring).  ``max_batch`` slots, at most ``max_queue``
    requests waiting, prompts prefilled ``prefill_chunk`` tokens per call (default: the backend's limit, at most
    `DEFAULT_PREFILL_CHUNK`)."""

    def __init__(self, model: LoadedModel, *, max_batch: int = 8, max_queue: int = 64, prefill_chunk: int | None = None,
                 detokenize: bool = True, clock=time.monotonic):
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"{name}={value!r}; expected an integer >= {low}")
        backend_chunk = getattr(model.backend, "prefill_chunk", None)
        chunk = prefill_chunk or min(DEFAULT_PREFILL_CHUNK, backend_chunk or DEFAULT_PREFILL_CHUNK)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or (backend_chunk and chunk > backend_chunk):
            raise InputError(f"prefill_chunk={prefill_chunk!r}; expected an integer in [1, "
                             f"{backend_chunk or 'any'}] (the backend's limit)")
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, chunk
        self._max_call = backend_chunk or PREFILL_CHUNK  # an image longer than a chunk is prefilled whole, up to this
        self.detokenize = detokenize and model.tokenizer is not None
        self._base_stops = frozenset(read_generation_config(model)["eos_token_ids"])  # eos, <turn|>, the config's
        self._runner = Runner(model, max_batch)
        self._sched = Scheduler(max_batch, max_queue, prefill_chunk=chunk, clock=clock)
        self._lock = threading.Condition(threading.RLock())
        self._cancelled: set[Seq] = set()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain_deadline: float | None = None
        self.steps = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gemma4-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def shutdown(self, *, drain_timeout: float = 30.0) -> None:
        """Stop admitting; let running and waiting requests finish for up to ``drain_timeout`` seconds, cancel what
        is left, stop the engine thread."""
        with self._lock:
            self._stopping = True
            self._drain_deadline = time.monotonic() + max(0.0, drain_timeout)
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(drain_timeout=0.0)

    def stats(self) -> dict:
        with self._lock:
            return {"queue_depth": len(self._sched.waiting), "busy_slots": self._sched.busy,
                    "max_batch": self.max_batch, "running": self.ready, "steps": self.steps}

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: str | Sequence[int], *, images=None, audio=None, params: SamplingParams | None = None,
               max_soft_tokens: int = 280) -> RequestHandle:
        """Queue one request (validated here, in the caller's thread: images and audio are decoded now) and
        return its handle.  `InputError` for bad input, `Overloaded` when the queue is full, `RuntimeError` once
        shutting down."""
        params = params or SamplingParams()
        if max_soft_tokens not in SUPPORTED_SOFT_TOKEN_BUDGETS:
            raise InputError(f"max_soft_tokens={max_soft_tokens!r}; expected one of {SUPPORTED_SOFT_TOKEN_BUDGETS}")
        model = self.model
        prepared = expand_prompt(_prompt_ids(model, prompt, 0), images, audio, model.config,
                                 max_soft_tokens=max_soft_tokens)
        if len(prepared.ids) >= model.max_len:
            raise _too_long(0, prepared, model.max_len, max_soft_tokens)
        ids = np.asarray(prepared.ids, np.int64)
        chunks, done = [], 0
        while done < len(ids):
            end = chunk_end(ids, done, self.prefill_chunk, model.config["tokens"]["image"], chunk=self.prefill_chunk,
                            stretch=self._max_call)
            chunks.append((done, end))
            done = end
        handle = RequestHandle(f"req-{next(self._ids)}", len(ids), self)
        req = _Request(handle, ids, RowMedia(prepared, model.config["tokens"]), params,
                       make_sampler(params.temperature, params.top_k, params.top_p),
                       np.random.default_rng(params.seed), self._base_stops | frozenset(params.stop_ids),
                       IncrementalDecoder(model.tokenizer) if self.detokenize else None,
                       StopStrings(params.stop_strings if self.detokenize else ()))
        seq = handle._seq = Seq(handle.id, chunks, payload=req)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down and admits no new requests")
            self._sched.add(seq)  # Overloaded when full; requests submitted before start() wait for it
            self._lock.notify_all()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle._seq is not None:
                self._cancelled.add(handle._seq)
                self._lock.notify_all()

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._drop_cancelled()
                if self._stopping and (self._sched.idle or time.monotonic() >= self._drain_deadline):
                    for seq in [*self._sched.waiting, *(s for s in self._sched.slots if s is not None)]:
                        self._finish(seq, "cancelled")
                    return
                if self._sched.idle:
                    timeout = None if not self._stopping else max(0.0, self._drain_deadline - time.monotonic())
                    self._lock.wait(timeout)
                    continue
                step = self._sched.plan()
            t0 = time.monotonic()
            try:
                if step.prefill:
                    self._prefill(step.prefill)
                if step.decode:
                    self._decode(step.decode)
            except Exception as e:  # noqa: BLE001 - a bug of ours in a step: its requests fail, the engine serves on
                for seq in [*step.prefill, *step.decode]:
                    if seq.state != "done":
                        self._fail(seq, f"internal error: {type(e).__name__}: {e}")
            with self._lock:
                self._sched.record_step(time.monotonic() - t0)
                self.steps += 1

    def _drop_cancelled(self) -> None:
        for seq in self._cancelled:
            if seq.state != "done":
                self._finish(seq, "cancelled")
        self._cancelled.clear()

    def _prefill(self, group: list[Seq]) -> None:
        """One prefill call for ``group`` (neighbouring slots); where it fails for a group, each is retried alone
        (their first chunks rewrite the same positions) so that only the request at fault fails."""
        rows = []
        for seq in group:
            req: _Request = seq.payload
            rows.append((req.ids, req.media, *seq.chunks[seq.next_chunk]))
        try:
            logits = self._runner.prefill(group[0].slot, rows)
        except Exception as e:  # noqa: BLE001 - the backend's own errors: this request fails, the engine serves on
            if len(group) > 1:
                for seq in group:
                    self._prefill([seq])
                return
            start, end = rows[0][2:]
            self._fail(group[0], f"prefill of tokens {start}:{end} failed: {type(e).__name__}: {e}")
            return
        for i, seq in enumerate(group):
            with self._lock:
                self._sched.prefilled(seq)
            if seq.state == "decode":
                self._choose(seq, logits[i:i + 1])

    def _decode(self, seqs: list[Seq]) -> None:
        occupied = {s.slot: s.length for s in self._sched.slots if s is not None and s not in seqs}
        try:
            logits = self._runner.decode({s.slot: (s.payload.next_token, s.length) for s in seqs}, occupied)
        except Exception as e:  # noqa: BLE001 - fails the requests of this call only
            for seq in seqs:
                self._fail(seq, f"decode step failed: {type(e).__name__}: {e}")
            return
        with self._lock:
            self._sched.decoded(seqs)
        # greedy rows: one argmax for the whole step (numpy calls are slow right after a step: see runtime.generate)
        best = logits.argmax(axis=-1).tolist() if any(type(s.payload.sampler) is Greedy for s in seqs) else None
        for seq in seqs:
            row = seq.slot
            if best is not None and type(seq.payload.sampler) is Greedy:
                if math.isnan(logits.item(row, best[row])):  # argmax lands on a NaN where a row has one
                    self._fail(seq, _NAN)
                    continue
                self._choose(seq, None, best[row])
            else:
                self._choose(seq, logits[row:row + 1])

    def _choose(self, seq: Seq, logits: np.ndarray | None, token: int | None = None) -> None:
        """Sample ``seq``'s next token from its (1, vocab) logits (or take ``token``, chosen already), stream it,
        finish the request if it ends."""
        req: _Request = seq.payload
        if token is None:
            try:
                token = int(req.sampler.choose(logits, req.rng)[0])
            except ValueError as e:  # NaN/inf logits: this request only
                self._fail(seq, str(e))
                return
        req.tokens.append(token)
        if token in req.stop_ids:  # in tokens (as runtime.generate), not in the text
            req.handle._push(Piece(0, token, ""))
            self._finish(seq, "stop")
            return
        piece, hit = req.stops.feed(req.decoder.feed(token)) if req.decoder else ("", False)
        req.text.append(piece)
        req.handle._push(Piece(0, token, piece))
        if hit:
            self._finish(seq, "stop")
        elif len(req.tokens) >= req.params.max_tokens or seq.length + 1 >= self.model.max_len:
            self._finish(seq, "length")
        else:
            req.next_token = token

    def _finish(self, seq: Seq, reason: str) -> None:
        req: _Request = seq.payload
        with self._lock:
            self._sched.remove(seq)
        tail = ""
        if req.decoder is not None:
            more, _ = req.stops.feed(req.decoder.finish())
            tail = more + req.stops.flush()
            req.text.append(tail)
        text = "".join(req.text) if req.decoder is not None else None
        if tail:
            req.handle._push(Piece(0, -1, tail))
        req.handle._push(result=GenerationResult(list(req.tokens), text, reason, req.handle.prompt_tokens))

    def _fail(self, seq: Seq, reason: str) -> None:
        with self._lock:
            self._sched.remove(seq)
        seq.payload.handle._push(error=RequestFailed(reason))
