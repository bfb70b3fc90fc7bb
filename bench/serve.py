"""Serving benchmark (``make bench-serve``): the OpenAI server under concurrent streaming load, against baselines.

On the bench checkpoint (234 M parameters, the 12B's structure) this builds, as ``make bench-runtime`` does
(`bench.runtime_stacks.build_ours` / `build_genai`, reused while current): our fp32 artifact (max_len 512) and its
INT4 calibration with the default (ring) engine, their ``--ort-sliding window`` copies, and onnxruntime-genai's
fp32 / int4 models.  For each of ours it starts ``python -m runtime.serve ART --max-batch 8`` in its own process
(127.0.0.1, a free port; stopped at the end, on error too) and drives it with the official ``openai`` client
(`bench.serve_load`): streaming text completions with token-id prompts (16-256 tokens) and forced answer lengths
(max_tokens 16-128, greedy), at concurrency 1, 2, 4, 8, 16 from closed-loop clients with Poisson-staggered first
arrivals, 2x concurrency requests per level (at least 4) and a time limit.  Per level: aggregate generated
tokens/s, TTFT and inter-token latency p50/p99, errors, tokens (`bench.serve_report`).

Side by side, in this process and on the same requests as the server's concurrency-8 level (`bench.serve_baselines`):
`runtime.generate` one request at a time (the concurrency-1 level interleaves each HTTP request with the same
request through `runtime.generate`, for the per-stream decode ratio), static batches of 8, our `Engine` without
HTTP (its backend calls timed), onnxruntime-genai's continuous-batching
``og.Engine`` (on CPU 0.18 batches only equal prompt lengths, so it also runs, beside the server, on a set
of equal-length prompts with the same answer lengths); idle TTFT of each of those prompts (max_tokens 1, one at a
time); the time of one prefill chunk; one decode step of the backend at batch 1, 2, 4, 8.
Window engines get levels 1 and 8 only.  Also the logit movement of one row with the batch around it.

Results: ``bench/results/serve.json`` (paths relative to the repository) and Markdown tables on stdout.  The
machine has 2 shared cores: absolute numbers drift by tens of percent between runs; ratios are measured within
one run.  Timing is never asserted here; ``tests/test_bench_serve.py`` covers the arithmetic.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script (`make bench-serve`): the project's packages, not bench/

from bench.paths import repo_path, repo_paths_in
from bench.runtime_report import versions
from bench.runtime_stacks import CHECKPOINT, WINDOW, WORK, Ours, build_genai, build_ours
from bench.runtime_timing import machine_info, make_prompt
from bench.serve_baselines import (
    decode_step_ms,
    engine_closed_loop,
    genai_closed_loop,
    generate_sequential,
    logit_movement,
    static_batches,
)
from bench.serve_load import Request, idle_ttft, make_requests, run_level, server
from bench.serve_report import markdown, paired_median, percentile, ratios, summarize, verdicts

RESULTS = ROOT / "bench" / "results" / "serve.json"
LEVELS = (1, 2, 4, 8, 16)
SETTINGS = {  # prompt lengths, answer lengths (max_tokens), seconds after which a level sends no new request
    "full": {"prompt_lens": (16, 256), "answer_lens": (16, 128), "time_limit_s": 150.0, "same_len": 128},
    "quick": {"prompt_lens": (16, 128), "answer_lens": (8, 24), "time_limit_s": 30.0, "same_len": 64},
}


def _log(msg: str) -> None:
    print(f"[bench-serve] {msg}", flush=True)


def _level_requests(conc: int, s: dict, conc1_requests: int = 8):
    n = conc1_requests if conc == 1 else max(4, 2 * conc)
    return make_requests(n, conc, s["prompt_lens"], s["answer_lens"])


def _chunk_ms(model, length: int, repeats: int = 3) -> float:
    """One prefill chunk of ``length`` prompt tokens at batch 1 (the fastest of ``repeats``): what a running stream
    waits at most for a newcomer's chunk besides its own decode step."""
    import runtime

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        runtime.generate(model, make_prompt(length, 4242), max_new_tokens=1, detokenize=False)
        best = min(best, time.perf_counter() - t0)
    return round(1000 * best, 2)


def _rows(recs) -> list[dict]:
    return [{k: v for k, v in r.as_dict().items() if k != "itl"} for r in recs]


def _conc1(url: str, name: str, model, reqs, compare_url: str | None) -> dict:
    """Concurrency 1: each request through the server, the same through `runtime.generate` and (``compare_url``)
    the comparison server, one after the other, the order rotating per request.  Returns kind -> (records, wall)."""
    runs = {"server": ([], 0.0), "generate": ([], 0.0), **({"compare": ([], 0.0)} if compare_url else {})}
    order = list(runs)
    for i, req in enumerate(reqs):
        for kind in order[i % len(order):] + order[:i % len(order)]:
            if kind == "generate":
                recs, wall = generate_sequential(model, [req])
            else:
                recs, wall = run_level(url if kind == "server" else compare_url, name, [req], 1)
            runs[kind] = (runs[kind][0] + recs, runs[kind][1] + wall)
    return runs


def measure_engine(name: str, artifact: Path, genai: Path | None, s: dict, a, *, full: bool) -> dict:
    """One of our artifacts: the server at each level of ``a.concurrency`` (``full=False``, window engines: 1 and 8
    at most), the baselines on the concurrency-8 requests (``full``, unless ``a.no_baselines``), the ratios; with
    ``a.compare_src``, a second server from that source tree interleaved at concurrency 1."""
    levels = tuple(c for c in a.concurrency if full or c in (1, 8))
    reqs = {c: _level_requests(c, s, a.conc1_requests) for c in levels}
    set8 = reqs.get(8) or _level_requests(8, s)
    baselines, conc1_paired = not a.no_baselines, None
    out: dict = {"artifact": repo_path(artifact), "levels": {}, "baselines": {}, "records": {}}
    with contextlib.ExitStack() as stack:
        threads = a.threads if a.server_threads == "same" else None if a.server_threads == "default" else int(
            a.server_threads)
        out["server_threads"] = threads or "ONNX Runtime's default (one per physical core, workers pinned)"
        url = stack.enter_context(server(artifact, name, WORK / "logs" / f"serve-{name}.log", threads=threads))
        compare_url = None
        if a.compare_src is not None and 1 in levels:
            compare_url = stack.enter_context(server(artifact, name, WORK / "logs" / f"serve-{name}-compare.log",
                                                     cwd=a.compare_src, threads=threads))
            out["compare"] = {"src": a.compare_label or a.compare_src.name}
        _log(f"{name}: server up at {url}; loading it in this process too")
        model = Ours(artifact, a.threads).model
        warm = make_requests(2, 99, (16, 64), (4, 4))
        for u in filter(None, (url, compare_url)):
            run_level(u, name, warm, 1)
        generate_sequential(model, warm)
        idle = idle_ttft(url, name, set8) if 8 in levels else []
        if idle:
            out["idle_ttft_ms"] = {"per_request": [round(1000 * x, 2) for x in idle],
                                   "p50": round(1000 * percentile(idle, 50), 2),
                                   "p99": round(1000 * percentile(idle, 99), 2)}
        for conc in levels:
            _log(f"{name}: concurrency {conc}, {len(reqs[conc])} requests")
            if conc == 1:  # each request through the server, then the same through runtime.generate, alternating
                runs = _conc1(url, name, model, reqs[1], compare_url)
                (recs, wall), (gens, gwall) = runs["server"], runs["generate"]
                out["baselines"]["generate_conc1"] = summarize(gens, gwall)
                conc1_paired = paired_median(recs, gens)
                if compare_url:
                    crecs, cwall = runs["compare"]
                    level1, gen = summarize(crecs, cwall), out["baselines"]["generate_conc1"]
                    r1 = ratios({1: level1}, {"generate_seq": gen}, None, paired_median(crecs, gens))
                    out["compare"].update(level1=level1, records=_rows(crecs), **{
                        k: r1[k] for k in ("conc1_vs_generate_decode", "conc1_vs_generate_decode_of_p50s")})
            else:
                recs, wall = run_level(url, name, reqs[conc], conc, seed=conc, time_limit_s=s["time_limit_s"])
            out["levels"][conc] = summarize(recs, wall)
            out["levels"][conc]["loadavg_1min_after"] = round(os.getloadavg()[0], 2)  # outside load shows here
            out["records"][conc] = _rows(recs)
            _log(f"{name}: concurrency {conc}: {out['levels'][conc]['tok_s']} tok/s, "
                 f"TTFT p99 {out['levels'][conc]['ttft_p99_ms']} ms, errors {out['levels'][conc]['errors']}")
        c8 = out["records"].get(8, [])
        per = [r["ttft"] / i for r, i in zip(c8, idle) if r.get("ttft") is not None and i < float("inf")]
        out["ttft_conc8_over_idle_same_prompt"] = {"p50": round(percentile(per, 50), 3), "max": round(max(per), 3)} \
            if per else None
        full = full and baselines and 8 in levels
        if full:  # the peer's engine batches only equal prompt lengths on CPU: both on one such set
            same_len = [Request(make_prompt(s["same_len"], 500 + i), r.max_tokens) for i, r in enumerate(set8)]
            _log(f"{name}: concurrency 8, prompts all {s['same_len']} tokens (for the onnxruntime-genai comparison)")
            out["baselines"]["server8_same_len"] = summarize(*run_level(url, name, same_len, 8, seed=8,
                                                                        time_limit_s=s["time_limit_s"]))
        # the baselines, with the server idle
        if full:
            _log(f"{name}: runtime.generate one at a time, static batches of 8")
            out["baselines"]["generate_seq"] = summarize(*generate_sequential(model, set8))
            out["baselines"]["static8"] = summarize(*static_batches(model, set8))
        if baselines:
            _log(f"{name}: our Engine in this process (no HTTP)")
            recs, wall, prof = engine_closed_loop(model, set8, 8, seed=8)
            out["baselines"]["engine8"] = summarize(recs, wall)
            out["engine8_profile"] = prof
            out["decode_step_ms_by_batch"] = decode_step_ms(model)
            out["prefill_chunk_ms"] = _chunk_ms(model, max(len(r.prompt) for r in set8))
            out["prefill_chunk_tokens"] = max(len(r.prompt) for r in set8)
        if full:
            others = [r.prompt for r in make_requests(7, 77, s["prompt_lens"], (1, 1))]
            out["logit_movement"] = logit_movement(model, make_prompt(64, 7), others, steps=32)
        del model
        gc.collect()
    if full:
        if genai is None:
            out["baselines"]["genai8"] = {"skipped": "no onnxruntime-genai model of this precision"}
        else:
            for key, reqs8 in (("genai8", set8), ("genai8_same_len", same_len)):
                _log(f"{name}: onnxruntime-genai Engine ({genai.name}), {key}")
                try:
                    out["baselines"][key] = summarize(*genai_closed_loop(genai, reqs8, 8, threads=a.threads, seed=8))
                    out["baselines"][key]["model"] = repo_path(genai)
                except Exception as e:  # noqa: BLE001 - recorded; the rest of the run stands
                    out["baselines"][key] = {"skipped": repo_paths_in(f"{type(e).__name__}: {e}")}
    c8 = out["levels"].get(8)
    if c8 and "engine8_profile" in out:
        step_ms = out["engine8_profile"]["decode_ms_per_call"] or 0.0
        out["max_itl_vs_chunk"] = {
            "itl_max_ms": c8["itl_max_ms"], "prefill_chunk_ms": out["prefill_chunk_ms"], "decode_step_ms": step_ms,
            "ratio_to_chunk_plus_step": round(c8["itl_max_ms"] / (out["prefill_chunk_ms"] + step_ms), 3)
            if c8["itl_max_ms"] else None}
    out["ratios"] = ratios(out["levels"], {**out["baselines"],
                                           "generate_seq": out["baselines"].get("generate_conc1")},
                           out.get("idle_ttft_ms", {}).get("p99"), conc1_paired)
    out["verdicts"] = verdicts(out["ratios"])  # n/a where a window engine has no such baseline
    return out


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected concurrency levels >= 1 separated by commas, e.g. 1,8")
    return levels


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short prompts and answers, 30 s per level")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the in-process stacks")
    ap.add_argument("--server-threads", default="same", metavar="N|same|default",
                    help="the server's --threads: same as --threads (default: the server and runtime.generate run "
                         "ONNX Runtime alike), a number, or `default` (ONNX Runtime's own choice, workers pinned; "
                         "needed with a --compare-src tree whose server has no --threads)")
    ap.add_argument("--precisions", default="fp32,int4", help="our engines to serve (fp32, int4, int4-b<block size>, "
                    "...; default fp32,int4), e.g. `--precisions int4 --no-window --concurrency 1,8` for the INT4 "
                    "engine alone")
    ap.add_argument("--concurrency", type=_levels, default=LEVELS, metavar="LIST",
                    help="concurrency levels, e.g. 1,8 (default 1,2,4,8,16; window engines run 1 and 8 of them); the "
                         "baselines on the concurrency-8 requests need 8 among them")
    ap.add_argument("--conc1-requests", type=int, default=8, metavar="N",
                    help="requests at concurrency 1, each run in turn with the same through runtime.generate "
                         "(default 8); the ratio to runtime.generate is the median of the pairs' ratios")
    ap.add_argument("--no-baselines", action="store_true", help="only the levels and, at concurrency 1, "
                    "runtime.generate: no static batches, in-process engine, onnxruntime-genai, logit movement")
    ap.add_argument("--compare-src", type=Path, default=None, metavar="DIR",
                    help="also serve each engine from the source tree DIR (e.g. `git worktree add DIR BASE`) and "
                         "interleave its concurrency-1 requests with ours and runtime.generate: a serving change's "
                         "before/after in one run (results under `compare`)")
    ap.add_argument("--compare-label", default=None, help="what --compare-src holds (e.g. its commit)")
    ap.add_argument("--no-window", action="store_true", help="leave out the --ort-sliding window engines")
    ap.add_argument("--reuse", action="store_true", help="keep existing artifacts even if the code changed")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    if a.server_threads not in ("same", "default") and not a.server_threads.isdigit():
        ap.error(f"--server-threads {a.server_threads!r}: expected a number, `same` or `default`")
    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (a.checkpoint / "config.json").exists():
        _log(f"writing the bench checkpoint {a.checkpoint} ...")
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_bench_checkpoint.py"), str(a.checkpoint)],
                       cwd=ROOT, check=True)
    precisions = [p for p in a.precisions.split(",") if p]
    calibrated = [p for p in precisions if p != "fp32"]
    ours_names = {p: "ours-fp32-512" if p == "fp32" else f"ours-{p}" for p in precisions}
    windows = () if a.no_window or a.quick else tuple(ours_names.values())  # sources of the -win copies
    ours, skipped = build_ours(a.checkpoint, calibrated, a.reuse, 2, max_lens=(512,), windows=windows)
    genai_of = {p: p.partition("-b")[0] for p in precisions}  # int4-b128: onnxruntime-genai's int4 beside it
    genai, genai_skipped = (build_genai(a.checkpoint, sorted(set(genai_of.values()))) if not a.no_baselines
                            else ({}, {}))
    skipped.update(genai_skipped)
    s = SETTINGS["quick" if a.quick else "full"]
    run: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=False,
                              text=True).stdout.strip(),
        "versions": versions(), "quick": a.quick, "threads_in_process": a.threads,
        "settings": {**s, "levels": a.concurrency, "requests_per_level": "max(4, 2 x concurrency); "
                     f"{a.conc1_requests} at concurrency 1", "max_batch": 8, "baselines": not a.no_baselines,
                     "arrivals": "closed-loop clients, first arrivals Poisson with 0.2 s mean gap", "greedy": True},
        "skipped": {k: repo_paths_in(v) for k, v in skipped.items()}, "engines": {},
    }

    def save(complete: bool) -> None:
        run.update(complete=complete, wall_s=round(time.perf_counter() - t_start), load_after=os.getloadavg())
        run["table_md"] = markdown(run)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(run, indent=1) + "\n")

    plan = [(f"ours-{p}", ours_names[p], genai.get(f"genai-{genai_of[p]}"), True) for p in precisions]
    if not a.no_window and not a.quick:
        plan += [(f"ours-{p}{WINDOW}", f"{ours_names[p]}{WINDOW}", None, False) for p in precisions]
    for name, art, genai_path, full in plan:
        if art not in ours:
            run["engines"][name] = {"skipped": skipped.get(art, "not built")}
            continue
        try:
            run["engines"][name] = measure_engine(name, ours[art], genai_path, s, a, full=full)
        except Exception as e:  # noqa: BLE001 - one engine failing (e.g. the server refusing it) keeps the others
            run["engines"][name] = {"skipped": repo_paths_in(f"{type(e).__name__}: {e}")}
            _log(f"{name}: failed: {run['engines'][name]['skipped']}")
        save(False)
    save(True)
    print(run["table_md"])
    _log(f"wrote {repo_path(a.out)} in {run['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
