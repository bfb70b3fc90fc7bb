"""A deterministic fake of `runtime.engine.Engine` for testing the HTTP layer alone, and a loopback uvicorn runner.

`FakeEngine` has the engine's interface (submit/start/shutdown/stats/ready/model; handles with astream, abatches,
iteration, result, cancel, finish_reason) and records what it was given.  It validates like the real engine where
the HTTP layer depends on it: media must decode (Pillow for images, the wave module for audio), placeholders must match
the media, token ids must be in the vocabulary, prompts must fit ``max_len``.  Its reply is a fixed list of pieces
followed by the eos token, cut to ``max_tokens`` (then ``finish_reason == "length"``).

The fake uses the real engine's types (`runtime.engine`: `Overloaded`, `RequestFailed`, `SamplingParams`).
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import threading
import time
import wave
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from runtime import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, GenerationResult, InputError, Piece


def engine_types():
    """`runtime.engine`: its exceptions and `SamplingParams` are what the HTTP layer handles."""
    import runtime.engine as module

    return module


E = engine_types()

REPLY = ["Hello", ",", " I", " am", " a", " fake", " é", "ngine", "."]
EOS, TURN_END = 1, 106
TOKENS = {"pad": 0, "eos": EOS, "bos": 2, "turn_start": 105, "turn_end": TURN_END, "boi": 255, "image": 258,
          "eoi": 259, "boa": 256, "audio": 260, "eoa": 261}


def _error(cls, message: str, **attrs):
    err = cls.__new__(cls)
    RuntimeError.__init__(err, message)
    for k, v in attrs.items():
        setattr(err, k, v)
    return err


@dataclass
class FakeModel:
    root: Path
    manifest: dict = field(default_factory=dict)
    tokenizer: object | None = "fake-tokenizer"
    max_len: int = 4096
    config: dict = field(default_factory=lambda: {"tokens": dict(TOKENS), "text": {"vocab_size": 1000}})


class FakeHandle:
    def __init__(self, engine: FakeEngine, prompt_tokens: int, params, fail: bool) -> None:
        self.id = f"req-{len(engine.handles)}"
        self.prompt_tokens = prompt_tokens
        self.finish_reason: str | None = None
        self.cancelled = False
        self._engine, self._params, self._fail = engine, params, fail
        reply = [(100 + i, text) for i, text in enumerate(REPLY)] + [(EOS, "")]
        self._steps = reply[: params.max_tokens]
        self._ended = "stop" if len(reply) <= params.max_tokens else "length"
        self._done: list[tuple[int, str]] = []

    def _step(self, i: int) -> Piece | None:
        if self.cancelled:
            self.finish_reason = "cancelled"
            return None
        if self._fail and i == 2:
            self.finish_reason = "failed"
            raise _error(E.RequestFailed, "fake failure", reason="the fake engine failed on purpose")
        if i >= len(self._steps):
            self.finish_reason = self._ended
            return None
        self._done.append(self._steps[i])
        return Piece(0, *self._steps[i])

    def __iter__(self):
        i = 0
        while (piece := self._step(i)) is not None:
            yield piece
            time.sleep(self._engine.delay)
            i += 1

    async def astream(self):
        i = 0
        while (piece := self._step(i)) is not None:
            yield piece
            await asyncio.sleep(self._engine.delay)
            i += 1

    async def abatches(self):
        async for piece in self.astream():
            yield [piece]

    def result(self, timeout=None) -> GenerationResult:
        if self.finish_reason is None:
            for _ in self:
                pass
        if self.finish_reason == "failed":
            raise _error(E.RequestFailed, "fake failure", reason="the fake engine failed on purpose")
        tokens = [t for t, _ in self._done]
        text = "".join(s for _, s in self._done)
        return GenerationResult(tokens, text, self.finish_reason, self.prompt_tokens)

    def cancel(self) -> None:
        self.cancelled = True
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self._engine.cancelled.append(self.id)


class FakeEngine:
    def __init__(self, model: FakeModel, *, max_batch: int = 8, max_queue: int = 64) -> None:
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.ready = False
        self.submissions: list[dict] = []
        self.handles: list[FakeHandle] = []
        self.cancelled: list[str] = []
        self.shutdowns: list[float] = []
        self.overloaded = False  # the next submits raise Overloaded
        self.fail_next = False  # the next request fails mid-generation
        self.crash_next = False  # the next submit raises an unexpected exception
        self.delay = 0.0  # seconds between pieces

    def start(self) -> FakeEngine:
        self.ready = True
        return self

    def shutdown(self, *, drain_timeout: float = 30.0) -> None:
        self.shutdowns.append(drain_timeout)
        self.ready = False

    def stats(self) -> dict:
        busy = sum(h.finish_reason is None for h in self.handles)
        return {"queue_depth": 0, "busy_slots": busy, "max_batch": self.max_batch, "running": self.ready}

    def submit(self, prompt, *, images=None, audio=None, params=None, max_soft_tokens=280) -> FakeHandle:
        if not self.ready:
            raise RuntimeError("the engine is not running")
        if self.crash_next:
            self.crash_next = False
            raise KeyError("an unexpected bug")
        if self.overloaded:
            raise _error(E.Overloaded, "64 requests queued", retry_after=2.5)
        images, audio = list(images or []), list(audio or [])
        params = params if params is not None else E.SamplingParams()
        n = self._prompt_tokens(prompt, images, audio, max_soft_tokens)
        self.submissions.append({"prompt": prompt, "images": images, "audio": audio, "params": params,
                                 "max_soft_tokens": max_soft_tokens})
        fail, self.fail_next = self.fail_next, False
        handle = FakeHandle(self, n, params, fail)
        self.handles.append(handle)
        return handle

    def _prompt_tokens(self, prompt, images, audio, max_soft_tokens) -> int:
        if isinstance(prompt, str):
            if prompt.count(IMAGE_PLACEHOLDER) != len(images) or prompt.count(AUDIO_PLACEHOLDER) != len(audio):
                raise InputError("placeholders and media do not match")
            n = 1 + len(prompt.split())
        else:
            if not prompt:
                raise InputError("prompt 0 is empty")
            if bad := [t for t in prompt if t >= self.model.config["text"]["vocab_size"]]:
                raise InputError(f"prompt 0 has token ids outside the vocabulary [0, 1000): {bad[:5]}")
            n = len(prompt)
        from PIL import Image

        for k, data in enumerate(images):
            try:
                Image.open(io.BytesIO(data)).load()
            except Exception as e:  # noqa: BLE001 - Pillow raises many kinds
                raise InputError(f"image {k + 1} of {len(images)} cannot be decoded ({e})") from None
            n += max_soft_tokens + 2
        for k, data in enumerate(audio):
            try:
                with wave.open(io.BytesIO(data)) as w:
                    n += -(-w.getnframes() // 640) + 2
            except (wave.Error, EOFError) as e:
                raise InputError(f"audio clip {k + 1} of {len(audio)} cannot be decoded ({e})") from None
        if n >= self.model.max_len:
            raise InputError(f"prompt 0 has {n} tokens but this artifact holds at most {self.model.max_len}")
        return n


@contextmanager
def running_server(app):
    """Serve ``app`` with uvicorn on 127.0.0.1 and a free port in a background thread; yields the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        yield port
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(args: list[str], *, port: int, ready_timeout: float = 120.0):
    """``python -m runtime.serve ARGS --port PORT`` in a child process, waited for until ``/health`` answers 200
    (failing the test if it exits first or takes longer); yields the process, killed on the way out if still
    running.  Its output is ``proc.output`` afterwards."""
    import os
    import subprocess

    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", *args, "--port", str(port)],
                            cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not become healthy (exit {proc.poll()})")
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.output = proc.communicate(timeout=10)[0]


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
