"""Where the CPU goes per streamed token at concurrency 1: ``python bench/serve_cpu.py [--artifact DIR]``.

On a machine whose few cores also run the load client, the server's decode rate at concurrency 1 loses to
`runtime.generate`'s by about the CPU time that runs beside ONNX Runtime's intra-op threads per token: the event loop
(events, sockets), the engine thread's Python between steps, and the client.  Wall-clock ratios need a quiet machine;
CPU time per token barely depends on other load, so this measures that, from ``/proc/PID/task/TID/schedstat``
(nanoseconds on a CPU, user and kernel), between the first and the last token of each request:

- ``generate``: `runtime.generate` in this process (``--threads``), its thread CPU per token;
- each server (``python -m runtime.serve`` from this tree, and from ``--compare-src DIR`` trees, e.g. a checkout of
  the commit before a change): its event-loop thread (the main thread), its other threads (the engine thread and
  ONNX Runtime's workers: the decode step itself), and this process as the client (the official ``openai`` client,
  streaming text completions with token-id prompts, greedy, as ``make bench-serve`` sends them);
- the decode tok/s of every request (noisy on a shared machine: compare within a run only).

Requests alternate between the stacks, the order rotating per round.  Results: ``bench/results/serve_cpu.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paths import repo_path
from bench.runtime_stacks import WORK
from bench.runtime_timing import make_prompt
from bench.serve_load import server


def thread_ns(pid: int) -> dict[int, int]:
    """thread id -> nanoseconds it has run on a CPU."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):
            out[int(tid)] = int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
    return out


async def _stream(url: str, prompt: list[int], n: int, pid: int) -> tuple[list[float], tuple, tuple]:
    """Token arrival times; (process CPU, server threads) at the first and at the last token."""
    from openai import AsyncOpenAI

    times, marks = [], []
    async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=n, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if any(c.text for c in chunk.choices):
                times.append(time.perf_counter())
                if len(times) == 1 or len(times) == n:
                    marks.append((time.process_time(), thread_ns(pid)))
    return times, marks[0], marks[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=WORK / "ours-int4", help="default: the bench INT4 artifact")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of runtime.generate (default 2)")
    ap.add_argument("--server-threads", type=int, default=None,
                    help="the servers' --threads (default: ONNX Runtime's own choice, as `python -m runtime.serve`)")
    ap.add_argument("--compare-src", type=Path, action="append", default=[], metavar="DIR",
                    help="also serve from this source tree (repeatable); named by its directory")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per answer (max_tokens, greedy)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_cpu.json")
    a = ap.parse_args(argv)
    import runtime

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = runtime.load(a.artifact, threads=a.threads)
    trees = {"this tree": ROOT, **{d.name: d for d in a.compare_src}}
    stacks, runs, cpu = ["generate", *trees], {}, {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, tree in trees.items():
            info: dict = {}
            url = stack.enter_context(server(a.artifact, "bench", WORK / "logs" / f"serve-cpu-{tree.name}.log",
                                             cwd=tree, threads=a.server_threads, info=info))
            servers[name] = (url, info["pid"])
        for r in range(a.rounds + 1):  # round 0 warms every stack up
            prompt = make_prompt(64, 1000 + r)
            for name in stacks[r % len(stacks):] + stacks[:r % len(stacks)]:
                if name == "generate":
                    times, marks = [], []
                    for piece in runtime.generate(model, prompt, max_new_tokens=a.tokens, stream=True):
                        if piece.token >= 0:
                            times.append(time.perf_counter())
                            if len(times) in (1, a.tokens):
                                marks.append((time.process_time(), thread_ns(os.getpid())))
                    first, last = marks[0], marks[-1]
                    main_tid = os.getpid()
                else:
                    url, pid = servers[name]
                    times, first, last = asyncio.run(_stream(url, prompt, a.tokens, pid))
                    main_tid = pid
                if not r or len(times) < 2:
                    continue
                per = 1000 / (len(times) - 1)  # ms per token from CPU seconds
                loop = (last[1].get(main_tid, 0) - first[1].get(main_tid, 0)) / 1e9
                rest = sum(v - first[1].get(t, 0) for t, v in last[1].items() if t != main_tid) / 1e9
                c = cpu.setdefault(name, {"event_loop": [], "engine_and_ort": [], "client": [], "generate": []})
                if name == "generate":
                    c["generate"].append(per * (loop + rest))
                else:
                    c["event_loop"].append(per * loop)
                    c["engine_and_ort"].append(per * rest)
                    c["client"].append(per * (last[0] - first[0]))
                runs.setdefault(name, []).append((len(times) - 1) / (times[-1] - times[0]))
    gen = runs["generate"]
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "artifact": repo_path(a.artifact),
           "git": os.popen(f"git -C {ROOT} rev-parse --short HEAD").read().strip(), "threads": a.threads,
           "server_threads": a.server_threads, "rounds": a.rounds, "tokens": a.tokens,
           "loadavg_after": os.getloadavg(), "stacks": {}}
    for name in stacks:
        med = {k: round(statistics.median(v), 3) for k, v in cpu[name].items() if v}
        out["stacks"][name] = {
            "source": "this process" if name == "generate" else repo_path(trees[name]),
            "cpu_ms_per_token_median": med, "decode_tok_s": [round(x, 1) for x in runs[name]],
            "decode_vs_generate_paired_median": round(statistics.median(x / y for x, y in zip(runs[name], gen)), 3)}
        print(f"{name:12s} CPU ms/token {med}  decode vs generate (paired) "
              f"{out['stacks'][name]['decode_vs_generate_paired_median']}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {repo_path(a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
