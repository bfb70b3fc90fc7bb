"""The serving benchmark's requests, server process and load generator (``make bench-serve``).

`make_requests` draws a seeded set of token-id prompts and answer lengths; `server` runs ``python -m runtime.serve``
in its own process on 127.0.0.1 and a free port (stopped when the block ends, on error too); `run_level` sends a
set of requests with the official ``openai`` client (`AsyncOpenAI`, streaming text completions with token-id
prompts, greedy) from ``concurrency`` closed-loop clients whose first requests arrive Poisson-staggered, and
returns one `Record` per request: time to the first content chunk, the gaps between chunks, the tokens the server
counted (``stream_options.include_usage``), errors.  Summaries and ratios: `bench.serve_report`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.paths import ROOT
from bench.runtime_timing import make_prompt
from bench.serve_report import Record

__all__ = ["Request", "idle_ttft", "make_requests", "run_level", "server"]


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def make_requests(n: int, seed: int, prompt_lens: tuple[int, int], answer_lens: tuple[int, int]) -> list[Request]:
    """``n`` requests: prompt lengths and max_tokens uniform in the inclusive ranges, ids as `make_prompt` draws."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(prompt_lens[0], prompt_lens[1] + 1))
        out.append(Request(make_prompt(length, seed * 1000 + i), int(rng.integers(answer_lens[0], answer_lens[1] + 1))))
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(artifact: Path, name: str, log: Path, *, max_batch: int = 8, start_timeout: float = 600.0,
           cwd: Path = ROOT, threads: int | None = None, info: dict | None = None):
    """``python -m runtime.serve ARTIFACT`` on 127.0.0.1 in a child process; yields its base URL once ``/health``
    answers 200.  The process (its whole group) is terminated when the block ends, and killed if it lingers.
    ``cwd``: the source tree whose ``runtime`` package serves (another checkout, for a before/after); ``threads``:
    its ONNX Runtime intra-op threads (``--threads``; None: ONNX Runtime's default, workers pinned to cores);
    ``info`` (a dict) gets the server's ``pid``."""
    import httpx

    port = _free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "runtime.serve", str(artifact), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(max_batch), "--served-model-name", name, "--drain-timeout", "2",
           *(["--threads", str(threads)] if threads else [])]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise RuntimeError(f"the server exited with {proc.returncode} before answering: {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {start_timeout:.0f} s (log: {log})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        if info is not None:
            info["pid"] = proc.pid
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _one(client, model: str, req: Request, t_base: float, timeout: float) -> Record:
    rec = Record(len(req.prompt), req.max_tokens)
    t0 = time.perf_counter()
    rec.start = t0 - t_base
    last = None
    try:
        stream = await client.completions.create(
            model=model, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, timeout=timeout)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                rec.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text:
                    rec.chunks += 1
                    if last is None:
                        rec.ttft = now - t0
                    else:
                        rec.itl.append(now - last)
                    last = now
                if choice.finish_reason:
                    rec.finish = choice.finish_reason
        if rec.finish is None:
            rec.error = "the stream ended without a finish_reason"
    except Exception as e:  # noqa: BLE001 - counted per request, the level goes on
        rec.error = f"{type(e).__name__}: {str(e)[:200]}"
    rec.end = time.perf_counter() - t_base
    return rec


async def _level(url: str, model: str, reqs: list[Request], concurrency: int, *, mean_gap_s: float, seed: int,
                 time_limit_s: float, timeout: float) -> tuple[list[Record], float]:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.AsyncClient(limits=limits, timeout=timeout))
    todo = iter(reqs)
    records: list[Record] = []
    starts = np.cumsum(np.random.default_rng(seed).exponential(mean_gap_s, concurrency))  # Poisson arrivals
    starts -= starts[0]
    t_base = time.perf_counter()
    deadline = t_base + time_limit_s

    async def client_loop(delay: float) -> None:
        await asyncio.sleep(delay)
        while time.perf_counter() < deadline:
            req = next(todo, None)
            if req is None:
                return
            records.append(await _one(client, model, req, t_base, timeout))

    async with client:
        await asyncio.gather(*(client_loop(float(d)) for d in starts))
    wall = max((r.end for r in records), default=0.0) - min((r.start for r in records), default=0.0)
    return records, wall


def run_level(url: str, model: str, reqs: list[Request], concurrency: int, *, mean_gap_s: float = 0.2, seed: int = 0,
              time_limit_s: float = 300.0, timeout: float = 300.0) -> tuple[list[Record], float]:
    """``reqs`` through the server from ``concurrency`` closed-loop clients (each sends its next request when its
    previous one ends; the clients' first requests arrive as a Poisson process with ``mean_gap_s`` between them);
    no request is sent after ``time_limit_s``.  Returns the records and the wall time from first send to last end."""
    return asyncio.run(_level(url, model, reqs, concurrency, mean_gap_s=mean_gap_s, seed=seed,
                              time_limit_s=time_limit_s, timeout=timeout))


def idle_ttft(url: str, model: str, reqs: list[Request], repeats: int = 1) -> list[float]:
    """Time to the first content chunk of each prompt on an otherwise idle server (max_tokens 1, one at a time);
    the smallest of ``repeats`` tries per prompt."""
    one = [Request(r.prompt, 1) for r in reqs]
    best = [float("inf")] * len(reqs)
    for _ in range(repeats):
        records, _ = run_level(url, model, one, 1)
        for i, rec in enumerate(records):
            if rec.ttft is not None:
                best[i] = min(best[i], rec.ttft)
    return best
