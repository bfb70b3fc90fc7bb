"""Two ONNX Runtime engines of the same weights side by side (an old and a new lowering): decode steps and verify
passes of n tokens, interleaved turns in one process, new/old time ratios per call (medians over rounds), and the
logits of both checked equal (to float32 rounding) at every call.

Each engine's cache holds a prompt of ``--prompt`` random tokens; every call rewrites the same positions.

    python bench/verify_ab.py OLD NEW [--prompt 128] [--tokens 2,5,9] [--rounds 10] [--threads 2] [--out JSON]
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
sys.path.insert(0, str(ROOT))

from bench.paths import merge_runs


def run(old: str, new: str, prompt: int, tokens: list[int], rounds: int, threads: int) -> dict:
    import runtime
    from runtime.prompt import PrefillInputs

    models = {k: runtime.load(p, backend="onnxruntime", threads=threads) for k, p in (("old", old), ("new", new))}
    vocab = int(models["old"].config["text"]["vocab_size"])
    ids = np.random.default_rng(0).integers(3, vocab, prompt + max(tokens) + 1).tolist()
    caches = {}
    for k, m in models.items():
        caches[k] = m.backend.new_cache(1, m.max_len)
        m.backend.prefill(PrefillInputs(np.array([ids[:prompt]]), np.array([0]), np.array([prompt])), caches[k])

    def call(k: str, n: int):
        b = models[k].backend
        if n == 0:
            return b.decode([ids[prompt]], [prompt], caches[k], copy=False)[None]
        return b.verify(np.array([ids[prompt:prompt + n]]), [prompt], caches[k], copy=False)[0][0]

    shapes = [0, *tokens]
    err = {}
    for n in shapes:  # warm up (binds), and the two engines' logits compared
        a, b = np.array(call("old", n)), np.array(call("new", n))
        err[n] = float(np.abs(a - b).max() / max(1e-6, float(np.abs(a).max())))
    times = {k: {n: [] for n in shapes} for k in models}
    for r in range(rounds):
        for n in shapes:
            for k in (("old", "new") if r % 2 else ("new", "old")):
                t0 = time.perf_counter()
                call(k, n)
                times[k][n].append(time.perf_counter() - t0)
    out = {}
    for n in shapes:
        ratio = statistics.median(x / y for x, y in zip(times["new"][n], times["old"][n]))
        o, w = statistics.median(times["old"][n]), statistics.median(times["new"][n])
        name = "decode" if n == 0 else f"verify {n}"
        out[name] = {"old_ms": round(o * 1e3, 3), "new_ms": round(w * 1e3, 3), "new_over_old": round(ratio, 3),
                     "max_rel_logit_diff": err[n]}
    dec = {k: statistics.median(times[k][0]) for k in models}
    for n in tokens:
        row = out[f"verify {n}"]
        row["old_over_decode"] = round(statistics.median(times["old"][n]) / dec["old"], 3)
        row["new_over_decode"] = round(statistics.median(times["new"][n]) / dec["new"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", default="2,5,9")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--label")
    p.add_argument("--out")
    a = p.parse_args(argv)
    load = round(os.getloadavg()[0], 2)
    res = run(a.old, a.new, a.prompt, [int(x) for x in a.tokens.split(",")], a.rounds, a.threads)
    print(json.dumps(res, indent=1))
    if a.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
        label = a.label or f"{Path(a.new).name} p{a.prompt} t{a.threads}"
        merge_runs(a.out, __doc__.split("\n\n")[0].replace("\n", " "), {label: {
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_before": load,
            "load_average_after": round(os.getloadavg()[0], 2), "old": a.old, "new": a.new, "prompt": a.prompt,
            "threads": a.threads, "rounds": a.rounds, "calls": res}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
