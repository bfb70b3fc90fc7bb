"""Decode speed after an image prompt against text prompts: the short one and one of the image prompt's length.

Prompts as `bench/bench_12b.py` ``_child_generate`` makes them: 11 text ids; 8 ids with one 480x672 image at 280
soft tokens (random noise, and a smooth gradient), expanded to L tokens; and L text ids.  Each prompt is prefilled
into its own cache, then decode steps run at a fixed position (the same slot rewritten, the greedy token fed), the
variants interleaved block by block in one process (this machine's bandwidth drifts by tens of percent), first
step of each block untimed (it rebinds the cache).  A second session of the same artifact that never saw an image
decodes the L-token text too (ONNX Runtime's arena grown by the image prefill, and the order, would show there).
Also counts subnormal floats in every cache after its prefill.

``--ab BASE NEW --base-code DIR`` compares two builds of an engine made by two versions of the code (the runtime of
each must feed its own engine, so they cannot share a process): one worker process per version (``DIR``, a checkout
of the older code; this checkout for ``NEW``) prefills the prompts (text 11, text L, the two images, text ~1000)
and waits; the parent then gives them turns, strictly one at a time and in alternating order, block by block (the
same interleaving as in one process).  Each turn: one untimed step, then three timed.

    python bench/image_decode.py ARTIFACT [--rounds 40] [--out bench/results/image_decode.json]
    python bench/image_decode.py --ab BASE NEW --base-code DIR [--rounds 20] [--label NAME] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def images() -> dict[str, np.ndarray]:
    noise = np.random.default_rng(0).integers(0, 256, size=(480, 672, 3), dtype=np.uint8)  # bench_12b's image
    yy, xx = np.mgrid[0:480, 0:672]
    smooth = np.stack([xx * 255 // 671, yy * 255 // 479, (xx + yy) * 255 // 1150], -1).astype(np.uint8)
    return {"noise": noise, "smooth": smooth}


def prepare(art: str, *, long: int = 0, fresh: bool = True, threads: int | None = None) -> tuple[dict, dict]:
    """The prompts prefilled into caches of their own: name -> (model, cache, greedy token, position); and the
    subnormal floats in each cache.  ``long``: also a text of that many tokens; ``fresh``: also the L-token text in
    a second session that never saw an image.  Uses the ``runtime`` first on ``sys.path`` (`main`, ``--code``)."""
    import runtime
    from runtime.generate import _prefill
    from runtime.prompt import expand_prompt, pack_batch

    model = runtime.load(art, threads=threads)
    cfg, tk = model.config, model.config["tokens"]
    ims = images()
    img_ids = [2, 105, 17, tk["image"], 42, 99, 106, 105]
    n = len(expand_prompt(img_ids, [ims["noise"]], None, cfg, max_soft_tokens=280).ids)
    top = min(int(cfg["text"]["vocab_size"]), 4000)
    long_text = [2, 105, *np.random.default_rng(1).integers(200, top, n - 4).tolist(), 106, 105]
    prompts = {"text_11": ([2, 105, 17, 42, 99, 7, 250, 3, 11, 106, 105], None, model),
               f"text_{n}": (long_text, None, model),
               "image_noise": (img_ids, [ims["noise"]], model),
               "image_smooth": (img_ids, [ims["smooth"]], model)}
    if long:
        prompts[f"text_{long}"] = ([2, 105, *np.random.default_rng(2).integers(200, top, long - 4).tolist(), 106, 105],
                                   None, model)
    if fresh:
        prompts[f"text_{n}_session_without_images"] = (long_text, None, runtime.load(art, threads=threads))
    tiny = np.finfo(np.float32).tiny
    state, subnormals = {}, {}
    for name, (ids, images_, m) in prompts.items():
        p = expand_prompt(ids, images_, None, cfg, max_soft_tokens=280)
        cache = m.backend.new_cache(1, m.max_len)
        logits = _prefill(m, [p], pack_batch([p], tk["pad"]), cache)
        subnormals[name] = int(sum(((np.abs(a) < tiny) & (a != 0)).sum() for a in (c.numpy() for c in cache)))
        state[name] = (m, cache, int(np.argmax(logits[0])), len(p.ids))
    return state, subnormals


def turn(entry) -> list[float]:
    """One block of a prompt's decode: an untimed step (it rebinds this cache), then three timed ones at the same
    position (the same slot rewritten, the greedy token fed)."""
    m, cache, tok, pos = entry
    m.backend.decode([tok], [pos], cache, copy=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        m.backend.decode([tok], [pos], cache, copy=False)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: dict[str, list[float]], tokens: dict[str, int], base: str) -> dict:
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"prompt_tokens": tokens,
            "median_step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
            # the fastest tenth: what a step costs when no other process got in its way (this machine is shared)
            "p10_step_ms": {k: round(float(np.percentile(v, 10)) * 1e3, 2) for k, v in times.items()},
            "tok_s": {k: round(1 / v, 2) for k, v in med.items()},
            f"tok_s_ratio_to_{base}": {k: round(med[base] / v, 3) for k, v in med.items()},
            "steps_per_variant": len(times[base])}


def measure(art: str, rounds: int, threads: int | None = None) -> dict:
    state, subnormals = prepare(art, threads=threads)
    times: dict[str, list[float]] = {k: [] for k in state}
    for r in range(rounds):
        for name in (list(state) if r % 2 == 0 else list(reversed(state))):
            times[name] += turn(state[name])
    base = next(k for k in state if k.startswith("text_") and k != "text_11")
    return {**summary(times, {k: v[3] for k, v in state.items()}, base), "cache_subnormals_after_prefill": subnormals}


def worker(art: str, code: str, long: int, threads: int | None) -> int:
    """``--worker``: prefill the prompts with the runtime of the checkout ``code``, then run one turn per prompt name
    read from stdin, one JSON line of step times each (an empty line ends)."""
    state, _ = prepare(art, long=long, fresh=False, threads=threads)
    print(json.dumps({k: v[3] for k, v in state.items()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        print(json.dumps(turn(state[line.strip()])), flush=True)
    return 0


def _reply(proc, label: str):
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the {label} worker ended (exit status {proc.wait()}); its error is above")
    return json.loads(line)


def ab(base_art: str, new_art: str, base_code: str, rounds: int, long: int, threads: int | None) -> dict:
    """Two builds of an engine, each decoded by its own version of the code in a worker process; turns strictly
    one at a time, the order alternating between rounds (`worker`)."""
    procs = {}
    for label, art, code in (("base", base_art, base_code), ("new", new_art, str(ROOT))):
        procs[label] = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(Path(art).resolve()), "--code", code,
             "--long", str(long), *(["--threads", str(threads)] if threads else [])],
            cwd=code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        tokens = {label: _reply(p, label) for label, p in procs.items()}
        names = list(tokens["new"])
        times = {label: {k: [] for k in names} for label in procs}
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                for label in (("base", "new") if r % 2 == 0 else ("new", "base")):
                    procs[label].stdin.write(name + "\n")
                    procs[label].stdin.flush()
                    times[label][name] += _reply(procs[label], label)
    finally:
        for p in procs.values():
            if p.stdin and not p.stdin.closed:
                p.stdin.write("\n")
                p.stdin.close()
            p.wait(timeout=120)
    n = next(k for k in names if k.startswith("text_") and k not in ("text_11", f"text_{long}"))
    res = {label: summary(times[label], tokens[label], n) for label in procs}
    for label in procs:
        med = res[label]["median_step_ms"]
        res[label]["image_over_text_11_tok_s"] = {k: round(med["text_11"] / med[k], 3) for k in med}
    for stat in ("median", "p10"):
        res[f"new_over_base_tok_s_{stat}"] = {
            k: round(res["base"][f"{stat}_step_ms"][k] / res["new"][f"{stat}_step_ms"][k], 3) for k in names}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", nargs="*", help="artifact directories with an ONNX Runtime engine")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--ab", nargs=2, metavar=("BASE", "NEW"), help="two builds of an engine: BASE by --base-code's "
                   "code, NEW by this checkout's")
    p.add_argument("--base-code", help="a checkout of the code that built --ab's BASE")
    p.add_argument("--long", type=int, default=1000, help="--ab: also a text prompt of this many tokens (0: none)")
    p.add_argument("--threads", type=int, help="ONNX Runtime's intra-op threads (default: its own choice, one per "
                   "core); 1 keeps a parallel kernel from waiting on a thread another process has preempted")
    p.add_argument("--label", help="the record's name under runs (default: the artifact's directory name)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--code", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="JSON to add the results to (runs.<label>; other entries are kept)")
    a = p.parse_args(argv)
    if a.worker:
        sys.path.insert(0, a.code)
        return worker(a.worker, a.code, a.long, a.threads)
    if bool(a.ab) == bool(a.artifact) or bool(a.ab) != bool(a.base_code):
        p.error("give ARTIFACT..., or --ab BASE NEW with --base-code DIR")
    sys.path.insert(0, str(ROOT))
    import onnxruntime as ort

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout.strip()
    meta = {"machine": f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores (shared)",
            "onnxruntime": ort.__version__, "date": time.strftime("%Y-%m-%d"),
            "commit": commit + ("+uncommitted" if dirty else ""), "rounds": a.rounds,
            "threads": a.threads or "onnxruntime's default"}
    runs = {}
    if a.ab:
        base_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=a.base_code, capture_output=True,
                                     text=True, check=False).stdout.strip()
        res = {**meta, "base_commit": base_commit or f"(not a git checkout: {a.base_code})",
               "base": _engine(a.ab[0]), "new": _engine(a.ab[1]), **ab(*a.ab, a.base_code, a.rounds, a.long, a.threads)}
        runs[a.label or Path(a.ab[1]).name] = res
        print(json.dumps(res), flush=True)
    for art in a.artifact:
        res = {**meta, **_engine(art), **measure(art, a.rounds, a.threads)}
        print(Path(art).name, json.dumps(res), flush=True)
        runs[a.label or Path(art).name] = res
    if a.out:
        from bench.paths import merge_runs

        merge_runs(a.out, __doc__.split("\n\n")[0].replace("\n", " "), runs)
    return 0


def _engine(art: str) -> dict:
    man = json.loads((Path(art) / "manifest.json").read_text())
    text = man["model_config"]["text"]
    return {"sliding_layers": text["layer_types"].count("sliding_attention"),
            "full_layers": text["layer_types"].count("full_attention"), "precision": man.get("precision"),
            "ring_decode": man["engines"]["onnxruntime"]["lowering"]["prefill"]["attention"].get("ring_decode")}


if __name__ == "__main__":
    sys.exit(main())
