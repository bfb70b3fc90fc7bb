"""Benchmark: the 12B (or a slice with its exact dimensions) through the whole pipeline on this machine.

``python bench/bench_12b.py [--layers 48] [--steps checkpoint,export,int4,build,generate] [--work DIR] [--keep]``
(``make bench-12b``) -> ``bench/results/12b.json``.  A run of some steps keeps the other steps' earlier records of
the same layer count in the file (each step carries its own date).

Each step runs in a child process; its peak resident memory is that child's own ``ru_maxrss`` (``os.wait4``), its
wall time is measured around it, and the disk in use under the work directory is sampled every second while it
runs (the peak is what the step needs on disk at once).  Steps:

1. ``checkpoint``: `bench/make_12b_checkpoint.py` (seeded bf16 weights, HF layout, streamed);
2. ``export``: ``make export`` of that checkpoint (``--weight-dtype``, bf16 by default: the GPU path; fp32 needs
   twice the disk), then deleted; ``export-preset``: ``make export MODEL=gemma4-12b`` (seeded weights, no
   checkpoint; 48 layers only), then deleted;
3. ``int4``: `calib.sequential` from the checkpoint (layer-by-layer statistics on the built-in calibration set,
   AWQ or RTN, block-wise INT4 streamed export);
4. ``build``: ``make build-engine BACKEND=onnxruntime`` of the INT4 artifact (one graph for prefill and decode:
   one session holds the weights once; without it the runtime opens the exported prefill and decode graphs, two
   sessions with every weight each: 22 GiB peak for the 48-layer INT4 artifact);
5. ``generate``: `runtime.generate` on the INT4 artifact, 16 new tokens for a text and for an image prompt: load
   time, time to first token, decode tokens/s, and the weight-read bound (bytes of the weights one decode step
   reads, tables only gathered from excepted, over the read bandwidth `bench.runtime_timing.bandwidth_probe`
   measures in the same process: two threads, as the runtime);
6. ``serve``: `bench/serve_12b.py` on the INT4 artifact: `runtime.Engine` with 4 slots, one client alone, then 4
   text clients and one with an image at once: peak RSS, aggregate tokens/s against one client, TTFT;
7. ``int8`` / ``fp8``: `calib.sequential` W8A8 from the checkpoint (SmoothQuant 0.5 for INT8, the LM head INT8;
   FP8 decoder only, as ``make calibrate``), then deleted.

With ``--layers`` < 48 the numbers are for that slice; ``extrapolated_48_layers`` scales the per-layer part
linearly (stated as such in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paths import repo_paths_in  # noqa: E402


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def run_step(name: str, argv: list[str], work: Path, log) -> dict:
    """Run ``argv`` as a child; wall time, the child's peak RSS (wait4) and the peak disk use under ``work``."""
    log(f"[bench-12b] {name}: {' '.join(argv)}")
    peak_disk = [_du(work)]
    stop = threading.Event()

    def sample():
        while not stop.wait(1.0):
            peak_disk[0] = max(peak_disk[0], _du(work))

    th = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    th.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak_disk[0] = max(peak_disk[0], _du(work))
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"step {name} failed (exit {code}); its output:\n{out[-4000:]}")
    rec = {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
           "peak_disk_gib": round(peak_disk[0] / 2**30, 3)}
    last = [line for line in out.splitlines() if line.startswith("{")]
    if last:
        rec |= json.loads(last[-1])
    log(f"[bench-12b] {name}: {json.dumps(rec)}")
    return rec


def _child_generate(art: str) -> int:
    """Load the artifact and generate 16 tokens for a text and an image prompt; prints one JSON line."""
    import numpy as np

    import runtime
    from bench.runtime_timing import bandwidth_probe

    probe = bandwidth_probe(1024, threads=2, repeats=5)  # the runtime reads weights on 2 threads
    bw = probe()
    del probe
    t0 = time.perf_counter()
    model = runtime.load(art)
    load_s = time.perf_counter() - t0
    man = json.loads((Path(art) / "manifest.json").read_text())
    tk = man["model_config"]["tokens"]
    out = {"load_s": round(load_s, 2), "read_bandwidth_gbs": round(bw / 1e9, 2)}
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(480, 672, 3), dtype=np.uint8)
    prompts = {"text": [2, 105, 17, 42, 99, 7, 250, 3, 11, 106, 105],
               "image": [2, 105, 17, tk["image"], 42, 99, 106, 105]}
    for kind, ids in prompts.items():
        times = []
        t0 = time.perf_counter()
        stream = runtime.generate(model, ids, images=[image] if kind == "image" else None, max_new_tokens=16,
                                  stream=True, stop=[])
        n = 0
        for _ in stream:
            times.append(time.perf_counter() - t0)
            n += 1
        decode = (times[-1] - times[0]) / max(1, n - 1) if n > 1 else float("nan")
        out[kind] = {"new_tokens": n, "ttft_s": round(times[0], 2), "decode_tok_s": round(1 / decode, 3)}
    from bench.runtime_timing import weight_bytes_read

    engine = man.get("engines", {}).get("onnxruntime", {})
    graph = Path(art) / engine.get("decode", man["graphs"]["decode"]["file"])
    read = weight_bytes_read(graph)  # initializers one decode step reads (not the tables only gathered from)
    out["engine"] = "one-graph ORT engine (build-engine)" if engine.get("one_graph") else f"{graph.name} (exported)"
    out["weights_gib"] = round(sum(f.stat().st_size for f in Path(art).rglob("*.data")) / 2**30, 3)
    out["decode_read_gib"] = round(read / 2**30, 3)
    out["decode_bound_tok_s"] = round(bw / read, 3)  # every weight a step reads, read once per token
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--steps", default="checkpoint,export,int4,build,generate,serve")
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "12b"))
    p.add_argument("--weight-dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--method", default="awq", choices=("awq", "rtn"))
    p.add_argument("--awq-objective", default="diag", choices=("diag", "sample"))
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--max-prompts", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the INT4 artifact")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "12b.json"))
    p.add_argument("--child-generate", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child_generate:
        return _child_generate(a.child_generate)
    steps = [s.strip() for s in a.steps.split(",") if s.strip()]
    if bad := [s for s in steps if s not in _STEP_ORDER]:
        print(f"error: --steps {','.join(bad)}: unknown; steps are {','.join(_STEP_ORDER)}", file=sys.stderr)
        return 2
    work = Path(a.work)
    marker = work / ".bench-12b"  # what this bench made: it deletes and rewrites only inside such a directory
    if work.exists() and any(work.iterdir()) and not marker.exists():
        print(f"error: --work {work} exists, is not empty and was not made by bench_12b (no {marker.name}); "
              "name a new or empty directory", file=sys.stderr)
        return 2
    work.mkdir(parents=True, exist_ok=True)
    marker.touch()
    ckpt, art, exp = work / "ckpt", work / "int4", work / "export"
    py = [sys.executable]
    results: dict = {"layers": a.layers, "steps": {}}
    log = lambda m: print(m, flush=True)  # noqa: E731
    failed = None
    try:
        if "checkpoint" in steps:
            shutil.rmtree(ckpt, ignore_errors=True)
            results["steps"]["checkpoint"] = run_step(
                "checkpoint", py + ["bench/make_12b_checkpoint.py", str(ckpt), "--layers", str(a.layers)], work, log)
        if "export" in steps:
            results["steps"]["export"] = run_step(
                "export", py + ["-m", "exporter.export", "--model", str(ckpt), "--out", str(exp), "--max-len", "4096",
                                "--weight-dtype", a.weight_dtype], work, log)
            results["steps"]["export"]["weight_dtype"] = a.weight_dtype
            results["steps"]["export"]["artifact_gib"] = round(_du(exp) / 2**30, 3)
            shutil.rmtree(exp, ignore_errors=True)
        if "export-preset" in steps:
            if a.layers != 48:
                raise ValueError("export-preset exports the gemma4-12b preset (48 layers); run it with --layers 48")
            results["steps"]["export-preset"] = run_step(
                "export-preset", py + ["-m", "exporter.export", "--model", "gemma4-12b", "--out", str(exp),
                                       "--max-len", "4096", "--weight-dtype", a.weight_dtype], work, log)
            results["steps"]["export-preset"] |= {"weight_dtype": a.weight_dtype,
                                                  "artifact_gib": round(_du(exp) / 2**30, 3)}
            shutil.rmtree(exp, ignore_errors=True)
        for prec in ("int8", "fp8"):
            if prec not in steps:
                continue
            qart = work / prec
            results["steps"][prec] = run_step(
                prec, py + ["-m", "calib.sequential", "--model", str(ckpt), "--out", str(qart), "--max-len", "4096",
                            "--precision", prec, "--max-prompts", str(a.max_prompts), "--force"], work, log)
            q = json.loads((qart / "manifest.json").read_text())["quantization"]
            results["steps"][prec] |= {
                "artifact_gib": round(_du(qart) / 2**30, 3), "quantized": q["quantized"],
                "smoothquant_alpha": q["smoothquant_alpha"], "embedding": q["embedding"],
                "calibration": f"{q['calibration_prompts']} prompts, {q['calibration_tokens']} tokens from "
                               f"{repo_paths_in(q['calibration_data'])} (images at {q['max_soft_tokens']} soft tokens)",
                "statistics_s": q["sequential"]["statistics_seconds"],
            }
            shutil.rmtree(qart, ignore_errors=True)  # measured; --keep keeps the checkpoint and the INT4 artifact
        if "int4" in steps:
            results["steps"]["int4"] = run_step(
                "int4", py + ["-m", "calib.sequential", "--model", str(ckpt), "--out", str(art), "--max-len", "4096",
                              "--method", a.method, "--awq-objective", a.awq_objective,
                              "--block-size", str(a.block_size),
                              "--max-prompts", str(a.max_prompts), "--force"], work, log)
            man = json.loads((art / "manifest.json").read_text())
            q = man["quantization"]
            results["steps"]["int4"] |= {
                "artifact_gib": round(_du(art) / 2**30, 3), "method": a.method, "block_size": a.block_size,
                "awq_objective": a.awq_objective if a.method == "awq" else None,
                "calibration": f"{q['calibration_prompts']} prompts, {q['calibration_tokens']} tokens from "
                               f"{repo_paths_in(q['calibration_data'])} (images at {q['max_soft_tokens']} soft tokens)",
                "per_layer": q["sequential"]["layers"],
            }
        if "build" in steps:  # the ONNX Runtime engine a user builds next: one session, the weights held once
            results["steps"]["build"] = run_step(
                "build", py + ["-m", "graphs.build", "--artifact", str(art), "--backend", "onnxruntime"], work, log)
        if "generate" in steps:
            results["steps"]["generate"] = run_step(
                "generate", py + ["bench/bench_12b.py", "--child-generate", str(art)], work, log)
        if "serve" in steps:  # in-flight batching: 4 slots, 4 text clients and one with an image
            results["steps"]["serve"] = run_step("serve", py + ["bench/serve_12b.py", str(art)], work, log)
        ck = results["steps"].get("checkpoint")
        if ck is not None:
            ck["checkpoint_gib"] = round(_du(ckpt) / 2**30, 3)
    except BaseException as e:  # the steps done so far are still written, with what stopped the run
        failed = e
        results["failed"] = repo_paths_in(f"{type(e).__name__}: {e}")
    finally:
        if not a.keep:  # only what this bench made: --work may name a directory holding other files
            for d in (ckpt, art, exp, work / "int8", work / "fp8"):
                shutil.rmtree(d, ignore_errors=True)
            try:
                marker.unlink(missing_ok=True)
                work.rmdir()
            except OSError:
                pass
    if a.layers < 48:
        results["extrapolated_48_layers"] = _extrapolate(results, a.layers)
    results |= {"machine": f"{platform.machine()} {os.cpu_count()} cores, "
                           f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    now = results["date"]
    for rec in results["steps"].values():
        rec.setdefault("date", now)
    out = Path(a.out)
    try:  # the steps not run now keep their earlier records (same layer count only)
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("layers") == a.layers:
        for step, rec in old.get("steps", {}).items():
            if step not in results["steps"]:
                rec.setdefault("date", old.get("date"))
                results["steps"][step] = rec
        order = lambda k: _STEP_ORDER.index(k) if k in _STEP_ORDER else len(_STEP_ORDER)  # noqa: E731
        results["steps"] = {k: results["steps"][k] for k in sorted(results["steps"], key=order)}
        for key, value in old.items():  # e.g. the config of the earlier run's slice; not its failure
            if key not in ("failed", "extrapolated_48_layers"):
                results.setdefault(key, value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    if failed is not None:
        raise failed
    return 0


_STEP_ORDER = ["checkpoint", "export", "export-preset", "int4", "build", "generate", "serve", "int8", "fp8"]


def _extrapolate(results: dict, layers: int) -> dict:
    """Rough 48-layer figures from a slice: wall time and disk scaled by the parameter ratio (low: the embedding,
    vision and tracing do not grow) and by the decoder-Linear ratio (high: as if everything grew with the layers);
    peak RSS kept (one layer / one tensor block in memory).  Extrapolated, never measured."""
    import math

    from bench.make_12b_checkpoint import config_12b
    from exporter.weights import expected_tensors

    def count(n):
        shapes = expected_tensors(config_12b(n))
        lin = sum(math.prod(s) for k, s in shapes.items() if ".layers." in k and k.endswith("proj.weight"))
        return sum(math.prod(s) for s in shapes.values()), lin

    (p48, l48), (pn, ln) = count(48), count(layers)
    low, high = p48 / pn, l48 / ln
    out = {"method": f"wall time x{low:.2f} (all parameters, 48 layers / {layers}) to x{high:.2f} (decoder "
                     f"Linear parameters), disk x{low:.2f}; peak RSS as measured (it holds one layer or one tensor block, not the "
                     "model). Extrapolated, not measured."}
    for step, rec in results["steps"].items():
        if step == "generate" or "wall_s" not in rec:
            continue
        out[step] = {"wall_s": [round(rec["wall_s"] * low), round(rec["wall_s"] * high)],
                     "peak_disk_gib": round(rec["peak_disk_gib"] * low, 1),  # bytes follow the parameters
                     "peak_rss_gib": rec["peak_rss_gib"]}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
