"""What the serving benchmark compares the server with, on the same requests, in the benchmark's own process.

- `generate_sequential`: `runtime.generate` one request at a time (a service without batching);
- `static_batches`: the requests in static batches of 8 through `runtime.generate` (each batch runs to its longest
  answer; only the tokens each request asked for are counted);
- `engine_closed_loop`: our `runtime.engine.Engine` with no HTTP in between, closed-loop clients as the server's
  load generator runs them; the runner's backend calls are timed by wrapping them, so the engine thread's own cost
  per step (scheduling, sampling, detokenizing, streaming) is the wall time the backend did not take;
- `genai_closed_loop`: onnxruntime-genai 0.18's continuous-batching ``og.Engine`` on the same requests;
- `decode_step_ms`: one decode step of the backend at batch 1, 2, 4, 8 (interleaved rounds): how much a row more
  costs, the bound on what batching can give;
- `logit_movement`: one prompt decoded alone vs as row 0 beside 7 others on the backend directly, prefilled per
  row as the engine does (`runtime.runner`), greedy.

Each returns `bench.serve_report.Record`s (times relative to the first request) and the wall time.  Greedy
everywhere.  No HTTP here (`bench.serve_load`), no summaries (`bench.serve_report`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import numpy as np

from bench.serve_load import Request
from bench.serve_report import Record

__all__ = ["engine_closed_loop", "genai_closed_loop", "generate_sequential", "logit_movement", "static_batches"]


def _poisson_starts(concurrency: int, mean_gap_s: float, seed: int) -> np.ndarray:
    starts = np.cumsum(np.random.default_rng(seed).exponential(mean_gap_s, concurrency))
    return starts - starts[0]  # the same arrivals `bench.serve_load.run_level` draws for this seed


def _from_times(req: Request, t0: float, times: list[float], tokens: int, finish: str, t_base: float) -> Record:
    rec = Record(len(req.prompt), req.max_tokens, start=t0 - t_base, end=(times[-1] if times else t0) - t_base,
                 tokens=tokens, chunks=len(times), finish=finish)
    if times:
        rec.ttft = times[0] - t0
        rec.itl = [b - a for a, b in itertools.pairwise(times)]
    return rec


def generate_sequential(model, reqs: list[Request]) -> tuple[list[Record], float]:
    import runtime

    records, t_base = [], time.perf_counter()
    for req in reqs:
        t0, times = time.perf_counter(), []
        stream = runtime.generate(model, req.prompt, max_new_tokens=req.max_tokens, stream=True)
        for _ in stream:
            times.append(time.perf_counter())
        res = stream.results
        records.append(_from_times(req, t0, times, len(res.tokens), res.finish_reason, t_base))
    return records, time.perf_counter() - t_base


def static_batches(model, reqs: list[Request], batch: int = 8) -> tuple[list[Record], float]:
    import runtime

    records, t_base = [], time.perf_counter()
    for b in range(0, len(reqs), batch):
        group = reqs[b:b + batch]
        t0, times = time.perf_counter(), [[] for _ in group]
        stream = runtime.generate(model, [r.prompt for r in group], max_new_tokens=max(r.max_tokens for r in group),
                                  stream=True)
        for piece in stream:
            if len(times[piece.index]) < group[piece.index].max_tokens:  # past its own max_tokens: padding work
                times[piece.index].append(time.perf_counter())
        for req, ts, res in zip(group, times, stream.results):
            n = min(len(res.tokens), req.max_tokens)
            records.append(_from_times(req, t0, ts, n, res.finish_reason if n == len(res.tokens) else "length",
                                       t_base))
    return records, time.perf_counter() - t_base


class _Timed:
    """Wraps a runner method: calls, seconds spent in it, rows decoded."""

    def __init__(self, fn, rows: bool = False):
        self.fn, self.rows, self.calls, self.seconds, self.row_sum = fn, rows, 0, 0.0, 0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        if self.rows:
            self.row_sum += len(args[0])
        return out


def engine_closed_loop(model, reqs: list[Request], concurrency: int = 8, *, detokenize: bool = True,
                       mean_gap_s: float = 0.2, seed: int = 0) -> tuple[list[Record], float, dict]:
    """``reqs`` through our Engine (max_batch 8) from ``concurrency`` closed-loop asyncio clients; also returns
    where the engine thread's time went."""
    from runtime.engine import Engine, SamplingParams

    engine = Engine(model, max_batch=8, detokenize=detokenize)
    runner = engine._runner  # instrumented from outside: the engine's code is unchanged
    runner.prefill, runner.decode = _Timed(runner.prefill), _Timed(runner.decode, rows=True)
    todo, records = iter(reqs), []
    starts = _poisson_starts(concurrency, mean_gap_s, seed)

    async def run() -> None:
        t_base = time.perf_counter()

        async def client(delay: float) -> None:
            await asyncio.sleep(delay)
            while (req := next(todo, None)) is not None:
                t0, times = time.perf_counter(), []
                handle = engine.submit(req.prompt, params=SamplingParams(max_tokens=req.max_tokens))
                async for piece in handle.astream():
                    if piece.token >= 0:
                        times.append(time.perf_counter())
                res = handle.result()
                records.append(_from_times(req, t0, times, len(res.tokens), res.finish_reason, t_base))

        await asyncio.gather(*(client(float(d)) for d in starts))

    engine.start()
    try:
        t0 = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - t0
    finally:
        engine.shutdown(drain_timeout=0)
    pre, dec = runner.prefill, runner.decode
    steps = engine.steps
    profile = {
        "steps": steps, "wall_s": round(wall, 3),
        "prefill_calls": pre.calls, "prefill_s": round(pre.seconds, 3),
        "decode_calls": dec.calls, "decode_s": round(dec.seconds, 3),
        "decode_rows_mean": round(dec.row_sum / dec.calls, 2) if dec.calls else None,
        "decode_ms_per_call": round(1000 * dec.seconds / dec.calls, 2) if dec.calls else None,
        "prefill_ms_per_call": round(1000 * pre.seconds / pre.calls, 2) if pre.calls else None,
        "outside_backend_s": round(wall - pre.seconds - dec.seconds, 3),
        "outside_backend_ms_per_step": round(1000 * (wall - pre.seconds - dec.seconds) / steps, 3) if steps else None,
    }
    return records, wall, profile


def genai_closed_loop(path: Path, reqs: list[Request], concurrency: int = 8, *, threads: int = 2,
                      mean_gap_s: float = 0.2, seed: int = 0) -> tuple[list[Record], float]:
    """onnxruntime-genai 0.18's ``og.Engine``: requests begun (``Request.begin_turn`` with greedy `TurnOptions`
    and ``set_max_generated_tokens``) as closed-loop clients free up, events drained with ``Engine.run``.

    On CPU (a builder model without a paged KV cache) 0.18 schedules with its ``StaticBatchScheduler``: batches
    of at most 4 requests, a new batch only once every request of the running one has finished, and a batch of
    different prompt lengths fails in ONNX Runtime's GroupQueryAttention ("seqlens_k[0] = 19 is too small for
    sequence_length 50"): such requests come back FAILED and are counted as errors here."""
    import onnxruntime_genai as og

    from bench.runtime_stacks import Genai

    token, done, failed = (int(og.EngineEventFlags.TOKEN), int(og.EngineEventFlags.TURN_FINISHED),
                           int(og.EngineEventFlags.FAILED))
    model = Genai(path, threads).model
    engine = og.Engine(model)
    buffer = engine.create_event_buffer(64)
    todo, records = iter(reqs), []
    live: dict[int, tuple] = {}  # id(og request) -> (og request, its options, Request, t0, token times)
    starts = list(_poisson_starts(concurrency, mean_gap_s, seed))
    t_base = time.perf_counter()

    def begin() -> None:
        if (req := next(todo, None)) is None:
            return
        r = engine.create_request()
        opts = og.TurnOptions(r)
        opts.set_do_sample(False)
        opts.set_max_generated_tokens(req.max_tokens)
        live[id(r)] = (r, opts, req, time.perf_counter(), [])
        r.begin_turn(np.asarray(req.prompt, np.int32), opts)

    while starts or live:
        while starts and starts[0] <= time.perf_counter() - t_base:
            starts.pop(0)
            begin()
        if not engine.has_pending_requests():
            if not starts:
                break
            time.sleep(max(0.0, starts[0] - (time.perf_counter() - t_base)))
            continue
        for ev in engine.run(buffer):
            now, flags = time.perf_counter(), int(ev.flags)
            if (entry := live.get(id(ev.request))) is None:
                continue
            r, _, req, t0, times = entry
            if flags & token:
                times.append(now)
            if flags & (done | failed):
                eos = ev.finish_reason == og.FinishReason.EOS
                rec = _from_times(req, t0, times, len(times), "stop" if eos else "length", t_base)
                if flags & failed:
                    rec.error = f"genai FAILED: {ev.error_code}"
                records.append(rec)
                del live[id(r)]
                r.close()
                begin()
    return records, time.perf_counter() - t_base


def logit_movement(model, prompt: list[int], others: list[list[int]], steps: int = 32) -> dict:
    """``prompt`` decoded greedily alone, then as row 0 beside ``others`` (each prefilled at batch 1 on its own
    cache rows, as the engine's runner does, then decoded together): the largest |logit difference| of row 0 over
    the steps where both runs fed the same tokens, relative to the logit range; and how many greedy tokens agree."""
    from runtime.prompt import PrefillInputs

    b = model.backend
    rows = [prompt, *others]

    def run(rows: list[list[int]]) -> tuple[np.ndarray, list[int]]:
        cache = b.new_cache(len(rows), model.max_len)
        first = []
        for i, r in enumerate(rows):
            ids = np.asarray(r, np.int64)[None]
            out = b.prefill(PrefillInputs(ids, np.zeros(1, np.int64), np.array([len(r)], np.int64)), b.rows(cache, i, i + 1))
            first.append(np.array(out[0]))
        logits, toks = [first[0]], [int(np.argmax(first[0]))]
        nxt = [int(np.argmax(x)) for x in first]
        lens = [len(r) for r in rows]
        for s in range(steps - 1):
            out = np.array(b.decode(nxt, [n + s for n in lens], cache))
            logits.append(out[0])
            nxt = [int(np.argmax(x)) for x in out]
            toks.append(nxt[0])
        return np.stack(logits), toks

    alone, t_alone = run([prompt])
    batched, t_batched = run(rows)
    agree = next((i for i, (a, c) in enumerate(zip(t_alone, t_batched)) if a != c), len(t_alone))
    span = slice(0, min(agree + 1, steps))  # logits up to and including the first step that may differ
    diff = np.abs(alone[span] - batched[span])
    rng = float(alone[span].max() - alone[span].min())
    return {"rows": len(rows), "steps": steps, "prompt_len": len(prompt),
            "max_abs_diff": float(diff.max()), "logit_range": rng, "max_abs_diff_rel": float(diff.max() / rng),
            "mean_abs_diff_rel": float(diff.mean() / rng), "greedy_agree": agree, "greedy_equal": agree == steps,
            "max_abs_diff_rel_per_step": [float(f"{x:.3g}") for x in diff.max(-1) / rng]}


def decode_step_ms(model, batches: tuple[int, ...] = (1, 2, 4, 8), prompt_len: int = 128, steps: int = 8,
                   rounds: int = 3) -> dict:
    """Median ms of one backend decode step at each batch size (every row decoding, ``prompt_len`` tokens cached),
    measured in ``rounds`` interleaved rounds of ``steps`` steps; and the tokens/s each batch size gives."""
    from bench.runtime_timing import make_prompt
    from runtime.prompt import PrefillInputs

    b = model.backend
    state = {}
    for n in batches:
        cache = b.new_cache(n, model.max_len)
        for i in range(n):
            ids = np.asarray(make_prompt(prompt_len, 300 + i), np.int64)[None]
            b.prefill(PrefillInputs(ids, np.zeros(1, np.int64), np.array([prompt_len], np.int64)), b.rows(cache, i, i + 1))
        state[n] = [cache, prompt_len]
    times: dict[int, list[float]] = {n: [] for n in batches}
    for _ in range(rounds):
        for n in batches:
            cache, pos = state[n]
            for _ in range(steps):
                t0 = time.perf_counter()
                b.decode([5] * n, [pos] * n, cache, copy=False)
                times[n].append(time.perf_counter() - t0)
                pos += 1
            state[n][1] = pos
    ms = {n: round(1000 * float(np.median(t)), 2) for n, t in times.items()}
    return {"ms": ms, "tok_s": {n: round(1000 * n / v, 1) for n, v in ms.items()},
            "speedup_vs_1": {n: round(ms[batches[0]] * n / v, 2) for n, v in ms.items()}}
