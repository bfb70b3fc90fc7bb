"""INT4 block size against batching: decode tokens/s at batch 1 and 8 of the bench INT4 engine per block size.

ONNX Runtime's ``com.microsoft.MatMulNBits`` (accuracy level 4: int8 activations, the build's INT4 form) grows
with the number of rows faster at block 32 than at block 64 or 128 on this CPU, and a served batch of 8 gains
less over one client.  This builds the bench INT4 artifact (``bench.runtime_stacks``: the fp32 max_len-512 export,
calibrated as `make calibrate PRECISION=int4 BLOCK_SIZE=N` does, AWQ) at each ``--blocks`` size (``ours-int4-b<N>``) with the default (ring) engine, loads them all in one process and
measures, in interleaved rounds (every artifact takes its turn in each round, the order rotating):

* ``step``: one backend decode step at batch 1 and 8 (128 prompt tokens cached per row, every row decoding):
  median ms and tokens/s;
* ``generate``: `runtime.generate` of 1 and of 8 prompts (a static batch; 64-token prompts, 48 new tokens):
  decode tokens/s (tokens after the first over the time from the first token to the last).

The number that matters is the 8-vs-1 aggregate ratio of each block size (``ratio_8_vs_1``), and the block size's
batch-1 speed against block 32's.  Results: ``bench/results/int4_block.json``.  The machine's 2 cores are shared:
absolute numbers drift between runs; ratios are taken within one round and their median reported.

Usage: ``python bench/int4_block.py [--blocks 32,64,128] [--rounds 8] [--threads 2] [--reuse]``
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
from bench.runtime_stacks import CHECKPOINT, build_ours
from bench.runtime_timing import machine_info, make_prompt

RESULTS = ROOT / "bench" / "results" / "int4_block.json"
BATCHES = (1, 8)


class StepTimer:
    """Backend decode steps of one artifact at each batch size, on caches prefilled once."""

    def __init__(self, model, prompt_len: int = 128):
        from runtime.prompt import PrefillInputs

        b = self.backend = model.backend
        self.state = {}
        for n in BATCHES:
            cache = b.new_cache(n, model.max_len)
            for i in range(n):
                ids = np.asarray(make_prompt(prompt_len, 300 + i), np.int64)[None]
                b.prefill(PrefillInputs(ids, np.zeros(1, np.int64), np.array([prompt_len], np.int64)),
                          b.rows(cache, i, i + 1))
            self.state[n] = [cache, prompt_len]
        self.max_len = model.max_len

    def turn(self, n: int, steps: int) -> float:
        """Median seconds of ``steps`` decode steps at batch ``n`` (one untimed first: it rebinds the cache)."""
        cache, pos = self.state[n]
        if pos + steps + 1 >= self.max_len:
            raise RuntimeError(f"the batch-{n} cache is full ({pos} of {self.max_len}): fewer rounds or steps")
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            self.backend.decode([5] * n, [pos] * n, cache, copy=False)
            if i:
                times.append(time.perf_counter() - t0)
            pos += 1
        self.state[n][1] = pos
        return statistics.median(times)


def generate_tok_s(model, n: int, new_tokens: int) -> float:
    """Decode tokens/s of `runtime.generate` over ``n`` 64-token prompts: tokens after each row's first over the time
    from the first token to the last."""
    import runtime

    prompts = [make_prompt(64, 500 + i) for i in range(n)]
    stamps = []
    stream = runtime.generate(model, prompts, max_new_tokens=new_tokens, stream=True)
    for _ in stream:
        stamps.append(time.perf_counter())
    tokens = sum(len(r.tokens) for r in stream.results) - n
    first = min(stamps[:n]) if len(stamps) >= n else stamps[0]
    return tokens / (stamps[-1] - first)


def measure(models: dict[str, object], rounds: int, steps: int, new_tokens: int) -> dict:
    timers = {k: StepTimer(m) for k, m in models.items()}
    names = list(models)
    raw: dict[str, dict[str, list[float]]] = {k: {"step_1": [], "step_8": [], "gen_1": [], "gen_8": []} for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            for n in BATCHES:
                raw[k][f"step_{n}"].append(n / timers[k].turn(n, steps))
            for n in BATCHES:
                raw[k][f"gen_{n}"].append(generate_tok_s(models[k], n, new_tokens))
        print(f"[int4-block] round {r + 1}/{rounds}: " + "  ".join(
            f"{k}: step x{raw[k]['step_8'][-1] / raw[k]['step_1'][-1]:.2f} "
            f"gen x{raw[k]['gen_8'][-1] / raw[k]['gen_1'][-1]:.2f}" for k in names), flush=True)
    out = {}
    base = names[0]
    for k in names:
        d = raw[k]
        out[k] = {
            "step_tok_s": {n: round(statistics.median(d[f"step_{n}"]), 1) for n in BATCHES},
            "generate_decode_tok_s": {n: round(statistics.median(d[f"gen_{n}"]), 1) for n in BATCHES},
            "ratio_8_vs_1": {
                "step": round(statistics.median(a / b for a, b in zip(d["step_8"], d["step_1"])), 2),
                "generate": round(statistics.median(a / b for a, b in zip(d["gen_8"], d["gen_1"])), 2)},
            f"batch1_vs_{base}": {
                "step": round(statistics.median(a / b for a, b in zip(d["step_1"], raw[base]["step_1"])), 2),
                "generate": round(statistics.median(a / b for a, b in zip(d["gen_1"], raw[base]["gen_1"])), 2)},
            f"batch8_vs_{base}": {
                "step": round(statistics.median(a / b for a, b in zip(d["step_8"], raw[base]["step_8"])), 2),
                "generate": round(statistics.median(a / b for a, b in zip(d["gen_8"], raw[base]["gen_8"])), 2)},
            "per_round_tok_s": {key: [round(v, 1) for v in vals] for key, vals in d.items()},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="32,64,128", help="INT4 block sizes, the first the reference (default 32,64,128)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per turn")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="keep existing artifacts even if the code changed")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    try:
        blocks = [int(b) for b in a.blocks.split(",") if b]
    except ValueError:
        ap.error(f"--blocks {a.blocks!r}: expected comma-separated integers, e.g. 32,128")
    import runtime

    made, skipped = build_ours(CHECKPOINT, [f"int4-b{b}" for b in blocks], a.reuse, 1, max_lens=(512,), windows=())
    if skipped:
        raise SystemExit(f"bench artifacts did not build: {skipped}")
    arts = {f"b{b}": made[f"ours-int4-b{b}"] for b in blocks}
    models = {k: runtime.load(p, "onnxruntime", threads=a.threads) for k, p in arts.items()}
    load_before = os.getloadavg()
    res = measure(models, a.rounds, a.steps, a.new_tokens)
    run = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True, check=False).stdout.strip(),
           "method": "awq", "threads": a.threads, "rounds": a.rounds, "steps_per_turn": a.steps,
           "new_tokens": a.new_tokens, "engine": "ring (default)", "load_before": load_before,
           "load_after": os.getloadavg(), "artifacts": {k: repo_path(p) for k, p in arts.items()}, "blocks": res}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(run, indent=1) + "\n")
    print("| block | step tok/s b1 | b8 | 8 vs 1 (step) | generate tok/s b1 | b8 | 8 vs 1 (generate) |")
    print("|---|---|---|---|---|---|---|")
    for k, r in res.items():
        print(f"| {k[1:]} | {r['step_tok_s'][1]} | {r['step_tok_s'][8]} | {r['ratio_8_vs_1']['step']}x | "
              f"{r['generate_decode_tok_s'][1]} | {r['generate_decode_tok_s'][8]} | {r['ratio_8_vs_1']['generate']}x |")
    print(f"[int4-block] wrote {repo_path(a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
