"""Benchmark: time and peak memory of `make export` from a checkpoint, written to bench/results/export_memory.json.

Writes a random bf16 checkpoint of a config (default: the 12B's exact layer shapes and vocabulary with 6 of its
48 layers, 2.4 B parameters, 4.5 GiB) in the Hugging Face layout, then runs the exporter CLI in a child process
and records its wall time and peak resident memory (that child's own ru_maxrss, from wait4) next to the size of
the weights it wrote.  Both steps run in child processes so the parent stays small: a forked child briefly
counts its parent's memory as its own.  The streaming exporter should peak far below the fp32 weight size; that is the property that lets the 12B
(48 GB of fp32 weights) export in a few GiB.

Usage: ``python bench/export_memory.py [--layers 6] [--keep]`` (``make bench``).
"""

from __future__ import annotations

import argparse
import json
import math
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


def write_checkpoint(cfg, path: Path, shard_bytes: int = 1 << 30) -> int:
    """Random bf16 weights in the HF layout, streamed tensor by tensor (`bench.make_12b_checkpoint`)."""
    from bench.make_12b_checkpoint import write_checkpoint as write

    return write(cfg, path, shard_bytes=shard_bytes, tokenizer=False, log=lambda *_: None)


def _config(layers: int):
    from bench.make_12b_checkpoint import config_12b

    return config_12b(layers)


def _child_write(layers: int, path: Path) -> int:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
        "from bench.export_memory import _config, write_checkpoint; "
        "print(write_checkpoint(_config(int(sys.argv[2])), Path(sys.argv[3])))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT), str(layers), str(path)], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    from exporter.weights import expected_tensors

    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "export_memory.json"))
    a = p.parse_args()
    cfg = _config(a.layers)
    work = Path(tempfile.mkdtemp(prefix="gemma4-bench-"))
    try:
        t0 = time.perf_counter()
        ckpt_bytes = _child_write(a.layers, work / "ckpt")
        t_ckpt = time.perf_counter() - t0
        print(f"[bench] checkpoint: {ckpt_bytes / 2**30:.2f} GiB bf16 in {t_ckpt:.0f} s", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter.export", "--model", str(work / "ckpt"), "--out", str(work / "art"),
             "--max-len", "4096"],
            cwd=ROOT,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        peak_kib = usage.ru_maxrss
        if os.waitstatus_to_exitcode(status) != 0:
            print("[bench] export failed", file=sys.stderr)
            return 1
        data = sum(f.stat().st_size for f in (work / "art").iterdir() if f.is_file())
        result = {
            "benchmark": "export from a bf16 checkpoint (streamed weights)",
            "config": f"gemma4-12b shapes with {a.layers} layers",
            "parameters": sum(math.prod(s) for s in expected_tensors(cfg).values()),
            "checkpoint_gib_bf16": round(ckpt_bytes / 2**30, 3),
            "artifact_gib_fp32": round(data / 2**30, 3),
            "export_wall_s": round(wall, 1),
            "export_peak_rss_gib": round(peak_kib / 2**20, 3),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
        }
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
