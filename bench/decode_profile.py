"""Where an ONNX Runtime engine's decode step goes, from ONNX Runtime's own profiler: weights (MatMulNBits and other
MatMuls), attention (the attention kernels, the ring writes and gathers, the branches around them), the rest of the
kernels, and the time outside kernels (the executor, binding, Python), per context length and batch size.

Each row of a batch is prefilled with its own text prompt of the given length, then decode steps run at a fixed
position (the same slot rewritten, the greedy tokens fed), one untimed step first (it binds the cache).  Kernel
times are exclusive: a branch (``If``) counts without the nodes inside it, which count under their own kind.  A
profiled step is slower than an unprofiled one (the profiler records every kernel): read the shares, not the times.

    python bench/decode_profile.py ARTIFACT [--contexts 11,275,1000] [--batches 1,8] [--steps 12] [--threads N]
                                   [--label NAME] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paths import merge_runs

WEIGHTS = {"MatMulNBits", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "Gemm", "FusedMatMul"}
ATTENTION = {"GroupQueryAttention", "Attention", "TensorScatter", "GatherElements", "Slice", "If", "Where", "Expand",
             "RotaryEmbedding"}


def exclusive(events: list[dict]) -> list[tuple[dict, float]]:
    """(event, its duration less the events nested directly inside it), for kernel events of one run; the
    sequential executor's events only overlap by nesting (a branch's nodes inside its ``If``)."""
    out, stack = [], []
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] < e["ts"] + e["dur"]:
            stack.pop()
        if stack:
            stack[-1][1][0] -= e["dur"]
        own = [float(e["dur"])]
        out.append((e, own))
        stack.append((e, own))
    return [(e, own[0]) for e, own in out]


def kind(op: str) -> str:
    return "weights" if op in WEIGHTS else "attention" if op in ATTENTION else "other kernels"


def profile(art: str, contexts: list[int], batches: list[int], steps: int, threads: int | None = None) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions

    def profiled():  # the backend makes its own SessionOptions: these record every kernel
        o = options()
        o.enable_profiling = True
        o.profile_file_prefix = str(ROOT / "bench" / "work" / "decode_profile")
        return o

    ort.SessionOptions = profiled
    try:
        import runtime
        from runtime.generate import _prefill
        from runtime.prompt import expand_prompt, pack_batch

        (ROOT / "bench" / "work").mkdir(parents=True, exist_ok=True)
        m = runtime.load(art, threads=threads)
    finally:
        ort.SessionOptions = options
    cfg, tk = m.config, m.config["tokens"]
    top = min(int(cfg["text"]["vocab_size"]), 4000)
    plan, walls = [], []
    for batch in batches:
        for n in contexts:
            ps = [expand_prompt([2, 105, *np.random.default_rng(n * 31 + b).integers(200, top, n - 4).tolist(), 106,
                                 105], None, None, cfg, max_soft_tokens=280) for b in range(batch)]
            cache = m.backend.new_cache(batch, m.max_len)
            logits = _prefill(m, ps, pack_batch(ps, tk["pad"]), cache)
            plan.append((batch, n, cache, np.argmax(logits.reshape(batch, -1), -1).tolist()))
    for batch, n, cache, toks in plan:
        m.backend.decode(toks, [n] * batch, cache, copy=False)  # binds this cache
        t0 = time.perf_counter()
        for _ in range(steps):
            m.backend.decode(toks, [n] * batch, cache, copy=False)
        walls.append((time.perf_counter() - t0) / steps)
    path = m.backend.sessions["prefill"].end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        Path(path).unlink(missing_ok=True)
    runs = [e for e in events if e.get("name") == "model_run"][-len(plan) * (1 + steps):]
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    starts = [e["ts"] for e in nodes]
    out = {}
    for i, ((batch, n, _, _), wall) in enumerate(zip(plan, walls)):
        timed = runs[i * (1 + steps) + 1:(i + 1) * (1 + steps)]
        parts, ops = defaultdict(float), defaultdict(float)
        for r in timed:
            lo, hi = np.searchsorted(starts, r["ts"]), np.searchsorted(starts, r["ts"] + r["dur"], side="right")
            for e, own in exclusive(nodes[lo:hi]):
                op = e["args"].get("op_name", "?")
                parts[kind(op)] += own / len(timed)
                ops[op] += own / len(timed)
        run_us = float(np.mean([r["dur"] for r in timed]))
        parts["outside kernels (executor)"] = run_us - sum(parts.values())
        out[f"batch {batch}, {n} tokens"] = {
            "batch": batch, "context": n, "profiled_step_ms": round(run_us / 1e3, 2),
            "wall_ms_with_profiler": round(wall * 1e3, 2),
            "share": {k: round(v / run_us, 3) for k, v in parts.items()},
            "ms": {k: round(v / 1e3, 2) for k, v in parts.items()},
            "ops_ms": {k: round(v / 1e3, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1]) if v >= 50}}
        print(f"[decode-profile] batch {batch}, {n} tokens: {run_us / 1e3:.1f} ms/step (profiled): "
              + ", ".join(f"{k} {v / run_us:.0%}" for k, v in parts.items()), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", nargs="+")
    p.add_argument("--contexts", default="11,275,1000", help="tokens already in the cache")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, help="ONNX Runtime's intra-op threads (default: one per core)")
    p.add_argument("--label", help="the record's name under runs (default: the artifact's directory name)")
    p.add_argument("--out", help="JSON to add the results to (runs.<label>; other entries are kept)")
    a = p.parse_args(argv)
    import onnxruntime as ort

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    runs = {}
    for art in a.artifact:
        man = json.loads((Path(art) / "manifest.json").read_text())
        runs[a.label or Path(art).name] = {
            "commit": commit, "date": time.strftime("%Y-%m-%d"), "onnxruntime": ort.__version__,
            "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores (shared)",
            "precision": man.get("precision"), "threads": a.threads or "onnxruntime's default",
            "ring_decode": man["engines"]["onnxruntime"]["lowering"]["prefill"]["attention"].get("ring_decode"),
            "steps": profile(art, [int(x) for x in a.contexts.split(",")], [int(x) for x in a.batches.split(",")],
                             a.steps, a.threads)}
    if a.out:
        merge_runs(a.out, __doc__.split("\n\n")[0].replace("\n", " "), runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
