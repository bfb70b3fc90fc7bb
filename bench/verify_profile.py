"""Where an ONNX Runtime ring engine's verify pass goes, against its decode step, from ONNX Runtime's own profiler:
per-op exclusive kernel time (`bench.decode_profile.exclusive`: an ``If`` counts without the nodes inside it) of a
decode step and of verify passes of n tokens at the same position, plus the time outside kernels.

The cache holds a prompt of ``--prompt`` random tokens; each timed call rewrites the same positions (a decode step
the token at ``prompt``, a verify pass the n tokens from there), one untimed call of each shape first (it binds).
A profiled call is slower than an unprofiled one: compare the ops' shares and differences, not absolute times.

    python bench/verify_profile.py ARTIFACT [--prompt 128] [--tokens 2,5] [--steps 10] [--threads 2] [--out JSON]

``VERIFY_PROFILE_KEEP=1`` keeps ONNX Runtime's raw profile (bench/work/ort_profile_verify_*.json).  Results of the
issue-23 runs: bench/results/verify_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode_profile import exclusive
from bench.paths import merge_runs


def profile(art: str, prompt: int, tokens: list[int], steps: int, threads: int | None) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions

    def profiled():  # the backend makes its own SessionOptions: these record every kernel
        o = options()
        o.enable_profiling = True
        o.profile_file_prefix = str(ROOT / "bench" / "work" / "ort_profile_verify")
        return o

    ort.SessionOptions = profiled
    try:
        import runtime
        from runtime.prompt import PrefillInputs

        (ROOT / "bench" / "work").mkdir(parents=True, exist_ok=True)
        m = runtime.load(art, backend="onnxruntime", threads=threads)
    finally:
        ort.SessionOptions = options
    b = m.backend
    vocab = int(m.config["text"]["vocab_size"])
    ids = np.random.default_rng(0).integers(3, vocab, prompt + max(tokens) + 1).tolist()
    cache = b.new_cache(1, m.max_len)
    b.prefill(PrefillInputs(np.array([ids[:prompt]]), np.array([0]), np.array([prompt])), cache)
    calls = {"decode": lambda: b.decode([ids[prompt]], [prompt], cache, copy=False)}
    for n in tokens:
        calls[f"verify {n}"] = (lambda n=n: b.verify(np.array([ids[prompt:prompt + n]]), [prompt], cache, copy=False))
    order, walls = [], defaultdict(list)
    for name, call in calls.items():
        call()  # binds
        order.append((name, False))
    for _ in range(steps):  # interleaved turns
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            walls[name].append(time.perf_counter() - t0)
            order.append((name, True))
    path = b.sessions["prefill"].end_profiling()
    try:
        events = json.loads(Path(path).read_text())
    finally:
        if not os.environ.get("VERIFY_PROFILE_KEEP"):
            Path(path).unlink(missing_ok=True)
        else:
            print("[verify-profile] kept", path)
    runs = [e for e in events if e.get("name") == "model_run"][-len(order):]
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    starts = [e["ts"] for e in nodes]
    per = {name: {"ops": [], "run": []} for name in calls}
    for (name, timed), r in zip(order, runs):
        if not timed:
            continue
        lo, hi = np.searchsorted(starts, r["ts"]), np.searchsorted(starts, r["ts"] + r["dur"], side="right")
        ops = defaultdict(float)
        for e, own in exclusive(nodes[lo:hi]):
            ops[_key(e)] += own
        per[name]["ops"].append(ops)
        per[name]["run"].append(r["dur"])
    out = {}
    for name, p in per.items():  # medians over the steps: one preempted kernel does not move an op's total
        run_us = float(np.median(p["run"]))
        keys = {k for ops in p["ops"] for k in ops}
        outside = float(np.median([r - sum(ops.values()) for r, ops in zip(p["run"], p["ops"])]))  # per step
        p["ops"] = {k: float(np.median([ops.get(k, 0.0) for ops in p["ops"]])) for k in keys}
        kernels = sum(p["ops"].values())  # of the medians
        out[name] = {"profiled_run_ms": round(run_us / 1e3, 3), "wall_ms_median": round(1e3 * float(np.median(walls[name])), 3),
                     "kernels_ms": round(kernels / 1e3, 3), "outside_kernels_ms": round(outside / 1e3, 3),
                     "ops_ms": {k: round(v / 1e3, 3) for k, v in sorted(p["ops"].items(), key=lambda kv: -kv[1])}}
    return out


def _key(e: dict) -> str:
    """The op name; MatMulNBits with its weight's K x N (from the kernel's input and output shapes)."""
    op = e["args"].get("op_name", "?")
    if op == "MatMulNBits":
        try:
            k = next(iter(e["args"]["input_type_shape"][0].values()))[-1]
            n = next(iter(e["args"]["output_type_shape"][0].values()))[-1]
            return f"MatMulNBits {k}x{n}"
        except (KeyError, IndexError, TypeError):
            pass
    return op


def table(res: dict) -> str:
    names = list(res)
    ops = sorted({op for r in res.values() for op in r["ops_ms"]}, key=lambda op: -max(r["ops_ms"].get(op, 0) for r in res.values()))
    lines = ["op".ljust(34) + "".join(n.rjust(12) for n in names)]
    for op in ops:
        lines.append(op[:34].ljust(34) + "".join(f"{res[n]['ops_ms'].get(op, 0):12.3f}" for n in names))
    for key in ("kernels_ms", "outside_kernels_ms", "profiled_run_ms", "wall_ms_median"):
        lines.append(key.ljust(34) + "".join(f"{res[n][key]:12.3f}" for n in names))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", default="2,5")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label", help="the record's name under runs (default: the artifact's directory name)")
    p.add_argument("--out", help="JSON to add the results to (runs.<label>; other entries are kept)")
    a = p.parse_args(argv)
    res = profile(a.artifact, a.prompt, [int(x) for x in a.tokens.split(",")], a.steps, a.threads)
    print(table(res))
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
        label = a.label or Path(a.artifact).name
        merge_runs(a.out, __doc__.split("\n\n")[0].replace("\n", " "), {label: {
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": round(os.getloadavg()[0], 2),
            "prompt": a.prompt, "threads": a.threads, "steps": a.steps, "calls": res}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
