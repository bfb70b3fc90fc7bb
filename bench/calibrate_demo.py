"""Benchmark: `make calibrate` on the trained demo checkpoint -> bench/results/calibrate_demo.json.

Exports the committed demo checkpoint (fp32), then for INT8 (SmoothQuant 0.5) and FP8 runs the calibration CLI in a
child process, recording its wall time and peak resident memory (the child's own ru_maxrss, from wait4), runs the
accuracy report (mean next-token KL, top-1 agreement, perplexity ratio against fp32) and ``make eval``'s held-out
accuracy next to the fp32 artifact's.

Usage: ``python bench/calibrate_demo.py`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _timed_child(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of ``python args`` run in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)} failed")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "calibrate_demo.json"))
    a = p.parse_args()
    from calib.report import accuracy_report
    from demo.evaluate import evaluate

    work = Path(tempfile.mkdtemp(prefix="gemma4-calib-bench-"))
    try:
        fp32 = work / "demo"
        _timed_child(["-m", "exporter.export", "--model", "demo/checkpoint", "--out", str(fp32), "--max-len", "256"])
        right, n = evaluate(str(fp32), log=lambda *_: None)
        result = {
            "benchmark": "make calibrate on the trained demo checkpoint (1.47 M parameters, 32 calibration prompts)",
            "fp32_eval_accuracy": round(right / n, 4),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
        }
        for precision in ("int8", "fp8"):
            out = work / f"demo-{precision}"
            wall, peak = _timed_child(["-m", "calib.calibrate", "--src", str(fp32), "--out", str(out),
                                       "--precision", precision])
            rep = accuracy_report(out, log=lambda *_: None)
            right, n = evaluate(str(out), log=lambda *_: None)
            result[precision] = {
                "calibrate_wall_s": round(wall, 2),
                "calibrate_peak_rss_mib": round(peak, 1),
                "mean_kl": rep["mean_kl"],
                "top1_agreement": rep["top1"],
                "perplexity_ratio": rep["perplexity_ratio"],
                "worst_linear": rep["worst_linears"][0],
                "eval_accuracy": round(right / n, 4),
                "weights_mib": round((out / "weights.data").stat().st_size / 2**20, 2),
            }
            print(f"[bench] {precision}: {json.dumps(result[precision])}", flush=True)
        result["fp32_weights_mib"] = round((fp32 / "weights.data").stat().st_size / 2**20, 2)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"[bench] written {a.out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
