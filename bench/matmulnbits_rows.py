"""What one more row costs ONNX Runtime's INT4 matmul on this CPU: the ceiling under batched decode and verify.

Batched decode (the server's 8 slots) and a speculative verify pass (K + 1 tokens) both multiply the rows of every
``com.microsoft.MatMulNBits`` (INT4, accuracy level 4: int8 activations, the build's INT4 form) while reading the
weights once.  Where the weights' read is the whole cost, rows are free; where the kernel's arithmetic per row is not
hidden behind the read, they are not, and no scheduler can do better than the kernel.  This measures, per matrix
shape and block size, one MatMulNBits call at M = 1..8 rows against M = 1, with the weights in DRAM as in a real
model (``--copies`` distinct weight matrices run one after another, more bytes than the last-level cache), at 1 and
2 intra-op threads; interleaved rounds (every M in each round), median per M.

Shapes: the 12B's MLP (K 3840, N 15360) and the bench model's LM head (K 640, N 262144, most of its weights).
Derived per shape: ``ceiling_8_rows`` = 8 / cost(8) (the most 8 decoding rows can gain over 1 if this matmul were the
whole step) and ``cost_5_rows`` (a verify pass over 5 tokens, if it were the whole pass).

Results: ``bench/results/matmulnbits_rows.json``.  Usage: ``python bench/matmulnbits_rows.py [--rounds 7]
[--copies 10] [--blocks 32,128] [--threads 1,2]``.  Timing is never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages, not bench/

from bench.paths import repo_path
from bench.runtime_timing import machine_info

RESULTS = ROOT / "bench" / "results" / "matmulnbits_rows.json"
SHAPES = {"12b_mlp": (3840, 15360), "bench_lm_head": (640, 262144)}
ROWS = (1, 2, 3, 4, 5, 6, 8)


def session(k: int, n: int, block: int, copies: int, threads: int, seed: int = 0):
    """One ONNX Runtime session: ``copies`` MatMulNBits of (K, N) on one input, summed (random INT4 weights)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for c in range(copies):
        inits += [numpy_helper.from_array(rng.integers(0, 256, (n, k // block, block // 2), dtype=np.uint8), f"B{c}"),
                  numpy_helper.from_array(rng.uniform(0.01, 0.02, n * (k // block)).astype(np.float32), f"S{c}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"B{c}", f"S{c}"], [f"y{c}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=block, accuracy_level=4))
    nodes.append(helper.make_node("Sum", [f"y{c}" for c in range(copies)], ["y"]))
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def measure(sess, k: int, copies: int, rounds: int, repeats: int = 3) -> dict:
    """Median ms per matmul at each M of `ROWS`, and its ratio to M = 1 (the ratio taken per round)."""
    rng = np.random.default_rng(1)
    xs = {m: rng.standard_normal((m, k)).astype(np.float32) for m in ROWS}
    ms = {m: [] for m in ROWS}
    for _ in range(rounds):
        for m in ROWS:
            sess.run(None, {"x": xs[m]})
            t0 = time.perf_counter()
            for _ in range(repeats):
                sess.run(None, {"x": xs[m]})
            ms[m].append(1000 * (time.perf_counter() - t0) / repeats / copies)
    ratio = {m: statistics.median(a / b for a, b in zip(ms[m], ms[1])) for m in ROWS}
    return {"ms": {m: round(statistics.median(v), 3) for m, v in ms.items()},
            "vs_1_row": {m: round(r, 3) for m, r in ratio.items()},
            "ceiling_8_rows": round(8 / ratio[8], 2), "cost_5_rows": round(ratio[5], 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--copies", type=int, default=10, help="distinct weight matrices per call (default 10)")
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    import onnxruntime

    run = {"what": __doc__.split("\n\n")[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                 check=False).stdout.strip(),
           "onnxruntime": onnxruntime.__version__, "machine": machine_info(), "copies": a.copies, "rounds": a.rounds,
           "results": {}}
    for name, (k, n) in SHAPES.items():
        copies = max(2, a.copies * 3840 * 15360 // (k * n))  # the same bytes per call for each shape
        for block in (int(b) for b in a.blocks.split(",")):
            for threads in (int(t) for t in a.threads.split(",")):
                key = f"{name}_b{block}_t{threads}"
                r = measure(session(k, n, block, copies, threads), k, copies, a.rounds)
                run["results"][key] = {"K": k, "N": n, "block": block, "threads": threads, "copies": copies, **r}
                print(f"{key}: x1 row {r['ms'][1]} ms; " + " ".join(f"M{m} {v}x" for m, v in r["vs_1_row"].items()),
                      flush=True)
    run["load_after"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    tmp.replace(a.out)
    print(f"wrote {repo_path(a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
