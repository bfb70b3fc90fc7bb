"""Speculative decoding at batch > 1 against plain batched decoding, on the demo pair (issue 23: speculation must
never make decoding slower) -> bench/results/speculative_batch.json.

The demo target exported with --speculative 6 and the demo assistant (`bench.speculative_runtime.build_demo_pair`),
its ring engine and a copy built with --ort-sliding window; `runtime.generate` of 4 held-out `continue` prompts
(>= 10 given terms), 40 new tokens, greedy: plain, prompt lookup ("auto" and K = 6) and the assistant ("auto").  In
one process, modes interleaved per
round, every answer checked equal to plain's; per mode the median wall time of `runtime.generate` (prefill
included, as the issue's numbers) and its ratio to plain's in the same round (median over rounds).

    python bench/speculative_batch.py [--rounds 7] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / "work" / "speculative"
OUT = ROOT / "bench" / "results" / "speculative_batch.json"


def window_copy(src: Path) -> Path:
    """The demo pair with its ONNX Runtime engine rebuilt --ort-sliding window (reused if built)."""
    from graphs.build import build_engine

    dst = src.with_name(src.name + "-window")
    if not (dst / "manifest.json").is_file() or '"window"' not in (dst / "manifest.json").read_text():
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        build_engine(dst, "onnxruntime", ort_sliding="window", log=lambda *_: None)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new", type=int, default=40)
    args = ap.parse_args()
    import runtime
    from bench.speculative_runtime import _questions, build_demo_pair
    from runtime.speculative.verify import SpecStats

    ring = build_demo_pair(WORK / "demo-spec6", 6)
    prompts = [p for _, p, _ in _questions(("continue",), args.batch, min_given=10)]
    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                         check=False).stdout.strip()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git, "batch": args.batch,
              "max_new_tokens": args.new, "rounds": args.rounds, "load_before": os.getloadavg(), "engines": {}}
    for form, art in (("ring", ring), ("window", window_copy(ring))):
        model = runtime.load(art, threads=2)
        modes = {"plain": {}, "lookup_auto": {"draft": "prompt_lookup", "num_draft_tokens": "auto"},
                 "lookup_k6": {"draft": "prompt_lookup", "num_draft_tokens": 6},
                 "assistant_auto": {"draft": "assistant", "num_draft_tokens": "auto"}}

        def run(kw, stats=None):
            t = time.perf_counter()
            res = runtime.generate(model, prompts, max_new_tokens=args.new, detokenize=False, temperature=0.0,
                                   spec_stats=stats, **kw)
            return time.perf_counter() - t, [list(r.tokens) for r in res]

        ref = run({})[1]
        stats = {}
        for name, kw in modes.items():  # warm-up, and what each mode does
            stats[name] = SpecStats() if kw else None
            assert run(kw, stats[name])[1] == ref, name
        times = {m: [] for m in modes}
        for r in range(args.rounds):
            order = list(modes)[r % len(modes):] + list(modes)[: r % len(modes)]
            for name in order:
                t, toks = run(modes[name])
                assert toks == ref, f"{form} {name}: tokens differ from plain"
                times[name].append(t)
        ratios = {m: statistics.median(p / t for p, t in zip(times["plain"], v)) for m, v in times.items()}
        result["engines"][form] = {
            m: {"ms": round(statistics.median(v) * 1e3, 2), "speed_vs_plain": round(ratios[m], 3),
                **({"verify_calls": stats[m].verify_calls, "decode_steps": stats[m].decode_steps,
                    "drafted": stats[m].drafted, "accepted": stats[m].accepted,
                    "plain_reason": stats[m].plain_reason} if stats[m] is not None else {})}
            for m, v in times.items()}
        print(form, {m: (e["ms"], e["speed_vs_plain"]) for m, e in result["engines"][form].items()}, flush=True)
    result["load_after"] = os.getloadavg()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
