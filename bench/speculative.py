"""Speculation's cost model (``make bench-speculative``): one target pass over K + 1 tokens against one decode step.

Speculative decoding pays off when a verify call of the newest token and K drafts costs little more than one
decode step (it reads the weights once for all K + 1 tokens).  On the bench checkpoint (`bench/make_bench_checkpoint.py`,
234 M parameters, the 12B's structure) this exports an fp32 artifact with ``--speculative 8`` (max_len 512),
calibrates INT8 and INT4 from it (``calib.calibrate``, as ``make calibrate``) and builds the ONNX Runtime engines
(``graphs.build``, defaults); also a plain fp32 export, to show that an engine built for speculation decodes as
fast as a plain one.  Optionally (``--slice DIR``) a checkpoint of the 12B's dimensions (`bench/make_12b_checkpoint.py
--layers 6 --vocab 4096`) exported the same way and quantized to INT4 (the issue's target: a pass over 5 tokens
<= 1.3x one decode step).

Then, in ONE process, each engine's cache holds a prompt of ``--prompt`` tokens and each cycle times, in turn, one
decode step and one verify call of 2..9 tokens (K = 1..8) of every engine at that same length (each call rewrites
the same positions); ratios are per cycle (same machine load), medians over cycles.  From the ratios: the
break-even acceptance rate per K (i.i.d. per-draft acceptance a gives (1 - a^(K+1)) / (1 - a) tokens per verify
call; break-even where that equals the ratio; prompt lookup drafts for free).  Writes
``bench/results/speculative.json``.  Timing is never asserted anywhere.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages, not bench/

from bench.paths import repo_path  # noqa: E402

WORK = ROOT / "bench" / "work" / "speculative"
CHECKPOINT = ROOT / "bench" / "checkpoints" / "bench-234m"
RESULTS = ROOT / "bench" / "results" / "speculative.json"
K_MAX = 8


def _run(*args: str) -> None:
    print("[bench-speculative]", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def build(ckpt: Path, name: str, *, speculative: int, precisions=("fp32", "int8", "int4"), block_size: int = 32,
          plain: bool = True) -> dict[str, Path]:
    """Artifacts (built engines) for each precision, reused when present; ``plain``: also a plain fp32 one."""
    out = {}
    fp32 = WORK / f"{name}-fp32"
    if not (fp32 / "ort").is_dir():
        _run("-m", "exporter.export", "--model", str(ckpt), "--out", str(fp32), "--max-len", "512", "--force",
             "--speculative", str(speculative))
        _run("-m", "graphs.build", "--artifact", str(fp32), "--backend", "onnxruntime")
    if "fp32" in precisions:
        out["fp32"] = fp32
    for p in precisions:
        if p == "fp32":
            continue
        art = WORK / f"{name}-{p}"
        if not (art / "ort").is_dir():
            extra = ["--block-size", str(block_size), "--int4-method", "rtn"] if p == "int4" else []
            _run("-m", "calib.calibrate", "--src", str(fp32), "--out", str(art), "--precision", p, "--force", *extra)
            _run("-m", "graphs.build", "--artifact", str(art), "--backend", "onnxruntime")
        out[p] = art
    if plain:
        art = WORK / f"{name}-fp32-plain"
        if not (art / "ort").is_dir():
            _run("-m", "exporter.export", "--model", str(ckpt), "--out", str(art), "--max-len", "512", "--force")
            _run("-m", "graphs.build", "--artifact", str(art), "--backend", "onnxruntime")
        out["fp32-plain"] = art
    return out


class Engine:
    """One loaded engine with a prompt of ``prompt`` tokens in its cache; calls at that length."""

    def __init__(self, path: Path, prompt: int, threads: int):
        import numpy as np

        import runtime
        from runtime.prompt import PrefillInputs

        self.np = np
        self.model = runtime.load(path, backend="onnxruntime", threads=threads)
        self.b = self.model.backend
        vocab = self.model.config["text"]["vocab_size"]
        rng = np.random.default_rng(0)
        self.ids = rng.integers(3, vocab, prompt + K_MAX + 1).tolist()
        self.p = prompt
        self.cache = self.b.new_cache(1, self.model.max_len)
        self.b.prefill(PrefillInputs(np.array([self.ids[:prompt]]), np.array([0]), np.array([prompt])), self.cache)

    def decode(self) -> float:
        t0 = time.perf_counter()
        self.b.decode([self.ids[self.p]], [self.p], self.cache, copy=False)
        return time.perf_counter() - t0

    def verify(self, k: int) -> float:
        ids = self.np.array([self.ids[self.p:self.p + k + 1]])
        t0 = time.perf_counter()
        self.b.verify(ids, [self.p], self.cache)
        return time.perf_counter() - t0


def break_even(ratio: float, k: int) -> float | None:
    """The per-draft acceptance a at which K drafts and a verify call costing ``ratio`` decode steps break even:
    (1 - a^(K+1)) / (1 - a) = ratio (None when even a = 1 does not pay)."""
    if ratio <= 1.0:
        return 0.0
    if ratio >= k + 1:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        tokens = sum(a ** i for i in range(k + 1))
        lo, hi = (a, hi) if tokens < ratio else (lo, a)
    return round((lo + hi) / 2, 3)


def measure(engines: dict[str, Engine], cycles: int) -> dict:
    """Interleaved cycles: per engine a decode step, verify calls of K = 1..8 and a decode step, each engine in
    turn."""
    raw = {n: {"decode": [], **{k: [] for k in range(1, K_MAX + 1)}} for n in engines}
    for e in engines.values():  # warm up every shape once
        e.decode()
        for k in range(1, K_MAX + 1):
            e.verify(k)
    for c in range(cycles):
        for name, e in engines.items():
            raw[name]["decode"].append(e.decode())
            for k in range(1, K_MAX + 1):
                raw[name][k].append(e.verify(k))
            raw[name]["decode"].append(e.decode())
        print(f"[bench-speculative] cycle {c + 1}/{cycles}", flush=True)
    out = {}
    for name, r in raw.items():
        dec = [min(a, b) for a, b in zip(r["decode"][::2], r["decode"][1::2])]  # a step before and after: the quieter
        row = {"decode_ms": round(1e3 * statistics.median(dec), 3), "verify": {}}
        for k in range(1, K_MAX + 1):
            ratio = statistics.median(v / d for v, d in zip(r[k], dec))
            row["verify"][str(k)] = {"tokens": k + 1, "ms": round(1e3 * statistics.median(r[k]), 3),
                                     "ratio_to_decode": round(ratio, 3), "break_even_acceptance": break_even(ratio, k)}
        out[name] = row
    return out


def plain_vs_speculative(plain: Engine, spec: Engine, cycles: int) -> dict:
    """Decode steps of a plain engine and a speculative one of the same weights, interleaved."""
    ratios = []
    for _ in range(cycles * 4):
        a, b = plain.decode(), spec.decode()
        ratios.append(b / a)
    return {"decode_step_ratio_speculative_to_plain": round(statistics.median(ratios), 3), "pairs": len(ratios)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--slice", type=Path, default=None, help="a 12B-dimension checkpoint (make_12b_checkpoint.py)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--cycles", type=int, default=8)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--demo-rounds", type=int, default=5, help="rounds of the demo pair's interleaved turns")
    ap.add_argument("--demo-questions", type=int, default=8, help="held-out questions per task group")
    ap.add_argument("--only-demo", action="store_true",
                    help="only the runtime runs (demo pair, replay on the demo); keeps the file's cost-model runs")
    a = ap.parse_args(argv)
    if a.only_demo:
        result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        old, new = result.get("runtime", {}), runtime_runs(a, None)
        kept = [k for k in old if k not in new]  # runs this one does not repeat (the bench model's replay)
        result["runtime"] = {**{k: old[k] for k in kept}, **new, **({"kept_from_earlier_run": kept} if kept else {})}
        _write(result)
        return 0
    if not (a.checkpoint / "config.json").is_file():
        _run("bench/make_bench_checkpoint.py", str(a.checkpoint))
    precisions = tuple(a.precisions.split(","))
    arts = build(a.checkpoint, "bench", speculative=K_MAX, precisions=precisions)
    result = {"what": __doc__.split("\n\n")[0], "threads": a.threads, "prompt_tokens": a.prompt, "cycles": a.cycles,
              "cpu": os.cpu_count(), "artifacts": {k: repo_path(v) for k, v in arts.items()}}
    engines = {p: Engine(arts[p], a.prompt, a.threads) for p in precisions}
    result["bench"] = measure(engines, a.cycles)
    if "fp32-plain" in arts:
        result["plain_decode"] = plain_vs_speculative(Engine(arts["fp32-plain"], a.prompt, a.threads),
                                                      engines["fp32"], a.cycles)
    del engines
    if a.slice is not None:
        sl = build(a.slice, "slice12b", speculative=K_MAX, precisions=("int4",), block_size=128, plain=False)
        result["slice_12b_int4"] = measure({"int4": Engine(sl["int4"], a.prompt, a.threads)}, a.cycles)["int4"]
        result["artifacts"]["slice12b-int4"] = repo_path(sl["int4"])
    result["runtime"] = runtime_runs(a, arts.get("fp32"))
    _write(result)
    return 0


def _write(result: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps(result, indent=1))


def runtime_runs(a, bench_fp32: Path | None) -> dict:
    """`runtime.generate` with drafts, timed (bench/speculative_runtime.py): the demo pair, replay drafters."""
    from bench import speculative_runtime as sr

    k = sr.assistant_k()
    art = sr.build_demo_pair(WORK / f"demo-spec{k}", k)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False).stdout
    out = {"what": sr.__doc__.split("\n\n")[0], "date": time.strftime("%Y-%m-%d"), "commit": commit.strip(),
           "load_average_before": round(os.getloadavg()[0], 2), "threads": a.threads,
           "demo_artifact": repo_path(art), "max_draft_tokens": k}
    out["demo"] = sr.demo_pair(art, k, rounds=a.demo_rounds, n_continue=a.demo_questions, n_short=a.demo_questions,
                               threads=a.threads)
    cont = sr._questions(("continue",), 1)[0]
    import runtime

    ids = runtime.load(art, backend="onnxruntime").tokenizer.encode(cont[1])  # one held-out continue prompt
    out["replay_demo"] = sr.replay(art, prompt_ids=list(ids), new_tokens=37, rounds=a.demo_rounds, threads=a.threads)
    if bench_fp32 is not None:
        rng = __import__("numpy").random.default_rng(0)
        out["replay_bench_fp32"] = sr.replay(bench_fp32, prompt_ids=rng.integers(3, 1000, a.prompt).tolist(),
                                             new_tokens=48, errors=(0.0, 0.3, 0.6), rounds=3, threads=a.threads)
    out["load_average_after"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
