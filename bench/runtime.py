"""Speed benchmark (``make bench-runtime``): our artifacts against onnxruntime-genai and transformers, side by side.

On the bench checkpoint (`bench/make_bench_checkpoint.py`: 234 M parameters, the 12B's structure), this builds

- ours: ``exporter.export`` at max_len 512 and 4096, ``graphs.build --backend onnxruntime``, and
  ``calib.calibrate`` INT8 / FP8 / INT4 of the max_len-512 artifact (each then built the same way): the commands
  behind ``make export`` / ``make calibrate`` / ``make build-engine``, rebuilt whenever the code they depend on
  changed (a hash of the source directories, committed or not), so the numbers are for the code as it is
  (``--reuse`` keeps existing ones regardless).  A precision ``calib.calibrate`` refuses is skipped and its reason
  recorded.  ``*-win`` stacks: copies of the fp32-512, INT8 and INT4 artifacts whose engine is built with
  ``--ort-sliding window`` (text and audio only, as onnxruntime-genai's gemma4_text models);
- onnxruntime-genai's own builder output at fp32 / int8 / int4 (``bench/genai_build.py``, reused while the
  checkpoint and the genai version are unchanged);
- transformers (eager attention, torch with the same thread count) as the floor and the greedy reference;

then, in ONE process, runs each case's stacks in interleaved cycles (A, B, C, ..., repeated) with the same number
of intra-op threads, and reports medians of per-cycle ratios (a cycle's stacks share the machine's load at that
moment, so ratios stay meaningful on a busy machine where absolute numbers do not).  The machine's weight-read
bandwidth is measured inside every cycle too (two threads summing a buffer larger than the caches), giving the
decode bound of each stack: bytes of weights one decode step reads / bandwidth.  Stacks compared in a case are
loaded together; cases run one after another and free their stacks, so the process holds one case's stacks at a
time (a few GiB), not all of them.

Also measured: greedy agreement with transformers per stack (the first position where the tokens differ), peak
RSS of each stack (a fresh child process per stack: VmHWM from /proc/self/status after loading and one
generation, minus the child's VmHWM after its imports), and kernels per decode step (ONNX Runtime's profiler, one
step).  Results: ``bench/results/runtime.json`` (``latest``; ``--baseline`` also stores the run as ``baseline``)
and a Markdown table printed for the README.  Timing is never asserted here; tests cover the arithmetic.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script (`make bench-runtime`): the project's packages, not bench/

from bench.paths import repo_path  # noqa: E402
from bench.runtime_report import markdown, versions, write_results  # noqa: E402
from bench.runtime_stacks import CHECKPOINT, WORK, Stack, Timing, build_genai, build_ours  # noqa: E402
from bench.runtime_timing import (  # noqa: E402
    agreement,
    bandwidth_probe,
    cases,
    cycle_ratios,
    decode_bound,
    decode_graph,
    kernel_count,
    machine_info,
    median_or_none,
    peak_rss,
    rss_child,
    run_case,
    schedule,
    weight_bytes_read,
)

# the benchmark's pieces, as the tests and `bench/bench_12b.py` use them
__all__ = ["Timing", "agreement", "bandwidth_probe", "cycle_ratios", "decode_bound", "main", "markdown",
           "median_or_none", "schedule", "weight_bytes_read"]

RESULTS = ROOT / "bench" / "results" / "runtime.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 cycle, 16 tokens, a 512-token long prompt")
    ap.add_argument("--reuse", action="store_true",
                    help="keep our existing artifacts even if the code changed since they were built")
    ap.add_argument("--no-build", action="store_true", help="measure the artifacts already in bench/work")
    ap.add_argument("--build-only", action="store_true",
                    help="build the artifacts and stop (measure later with --no-build, on a quiet machine)")
    ap.add_argument("--jobs", type=int, default=2, help="artifact builds run at a time")
    ap.add_argument("--baseline", action="store_true", help="also store this run as `baseline` in the results")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", default="", help="comma-separated case numbers to run (1-4), default all")
    ap.add_argument("--skip", default="", help="comma-separated stacks to leave out (e.g. transformers)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--no-kernels", action="store_true", help="skip the profiler's kernel count")
    ap.add_argument("--cycles", type=int, default=None, help="cycles of every case (default: 5/3/3/3)")
    ap.add_argument("--new-tokens-per-run", type=int, default=None, help="greedy tokens per run (default 64)")
    ap.add_argument("--rss-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=8, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rss_child:
        rss_child(a.rss_child[0], a.rss_child[1], a.threads, a.prompt_len, a.new_tokens)
        return 0

    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (a.checkpoint / "config.json").exists():
        print(f"[bench] writing the bench checkpoint {a.checkpoint} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_bench_checkpoint.py"), str(a.checkpoint)],
                       cwd=ROOT, check=True)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    if a.no_build:  # measure what is there (e.g. while another run is still calibrating)
        ours = {p.name: p for p in sorted(WORK.glob("ours-*")) if (p / "manifest.json").exists()}
        skipped = {}
    else:
        ours, skipped = build_ours(a.checkpoint, ["int8", "fp8", "int4"], a.reuse, a.jobs)
    genai, genai_skipped = build_genai(a.checkpoint, ["fp32", "int8", "int4"])
    skipped.update(genai_skipped)
    if a.build_only:
        print(f"[bench] built: {', '.join([*ours, *genai])}; not built: {skipped or 'none'}", flush=True)
        return 0
    stacks = {n: Stack(n, "ours", p, n.split("-")[1]) for n, p in ours.items()}
    stacks.update({n: Stack(n, "genai", p, n.split("-")[1]) for n, p in genai.items()})
    stacks["transformers"] = Stack("transformers", "transformers", a.checkpoint, "fp32")
    for name in filter(None, a.skip.split(",")):
        stacks.pop(name, None)
        skipped[name] = "left out (--skip)"

    load_before = os.getloadavg()
    probe = bandwidth_probe(threads=a.threads)
    selected = [c for i, c in enumerate(cases(a.quick, a.cycles, a.new_tokens_per_run), 1)
                if not a.only or str(i) in a.only.split(",")]
    results: list[dict] = []
    per_stack: dict[str, dict] = {}
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "threads": a.threads,
        "quick": a.quick,
        "load_before": [round(x, 2) for x in load_before],
        "versions": versions(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
        "skipped": skipped,
        "cases": results,
        "stacks": per_stack,
    }

    def save(complete: bool):
        bw = [b for r in results for b in r["bandwidth_gb_s"]]
        run.update(complete=complete, load_after=[round(x, 2) for x in os.getloadavg()],
                   bandwidth_gb_s=round(statistics.median(bw), 2) if bw else None,
                   wall_s=round(time.perf_counter() - t_start))
        run["table_md"] = markdown(run)
        write_results(run, a.out, a.baseline)  # after every case: an interrupted run keeps what it measured

    reference = None
    for case in selected:
        r = run_case(case, stacks, a.threads, probe, reference)
        if reference is None and "transformers" in r["tokens"]:
            reference = r["tokens"]["transformers"]
        results.append({"name": case.name, **r})
        save(False)
    del probe
    gc.collect()

    measured = {s for r in results for s in r["stacks"]}
    for name, st in ((n, st) for n, st in stacks.items() if n in measured):
        rec: dict = {"path": repo_path(st.path)}
        if st.kind != "transformers":
            rec["weight_bytes_per_step"] = weight_bytes_read(decode_graph(st))
            if not a.no_kernels:
                print(f"[bench] kernels per decode step: {name}", flush=True)
                try:
                    rec["kernels"] = kernel_count(st, a.threads)
                except Exception as e:  # a profiler failure must not lose the timings; it is recorded instead
                    rec["kernels"] = {"error": f"{type(e).__name__}: {e}"}
        if not a.no_rss:
            print(f"[bench] peak RSS: {name}", flush=True)
            rec["rss"] = peak_rss(st, a.threads, 128, 8)
        per_stack[name] = rec
        save(False)
    save(True)
    print(run["table_md"])
    print(f"[bench] wrote {a.out} in {run['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
