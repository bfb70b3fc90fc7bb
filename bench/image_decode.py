"""Decode speed after an image prompt against text prompts: the short one and one of the image prompt's length.

Prompts as `bench/bench_12b.py` ``_child_generate`` makes them: 11 text ids; 8 ids with one 480x672 image at 280
soft tokens (random noise, and a smooth gradient), expanded to L tokens; and L text ids.  Each prompt is prefilled
into its own cache, then decode steps run at a fixed position (the same slot rewritten, the greedy token fed), the
variants interleaved block by block in one process (this machine's bandwidth drifts by tens of percent), first
step of each block untimed (it rebinds the cache).  A second session of the same artifact that never saw an image
decodes the L-token text too (ONNX Runtime's arena grown by the image prefill, and the order, would show there).
Also counts subnormal floats in every cache after its prefill.

    python bench/image_decode.py ARTIFACT [--rounds 40] [--out bench/results/image_decode.json]
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
sys.path.insert(0, str(ROOT))

import runtime
from runtime.generate import _prefill
from runtime.prompt import expand_prompt, pack_batch


def images() -> dict[str, np.ndarray]:
    noise = np.random.default_rng(0).integers(0, 256, size=(480, 672, 3), dtype=np.uint8)  # bench_12b's image
    yy, xx = np.mgrid[0:480, 0:672]
    smooth = np.stack([xx * 255 // 671, yy * 255 // 479, (xx + yy) * 255 // 1150], -1).astype(np.uint8)
    return {"noise": noise, "smooth": smooth}


def measure(art: str, rounds: int) -> dict:
    model, fresh = runtime.load(art), runtime.load(art)  # fresh: never prefills an image
    cfg, tk = model.config, model.config["tokens"]
    ims = images()
    img_ids = [2, 105, 17, tk["image"], 42, 99, 106, 105]
    n = len(expand_prompt(img_ids, [ims["noise"]], None, cfg, max_soft_tokens=280).ids)
    top = min(int(cfg["text"]["vocab_size"]), 4000)
    long_text = [2, 105, *np.random.default_rng(1).integers(200, top, n - 4).tolist(), 106, 105]
    prompts = {"text_11": ([2, 105, 17, 42, 99, 7, 250, 3, 11, 106, 105], None, model),
               f"text_{n}": (long_text, None, model),
               "image_noise": (img_ids, [ims["noise"]], model),
               "image_smooth": (img_ids, [ims["smooth"]], model),
               f"text_{n}_session_without_images": (long_text, None, fresh)}
    tiny = np.finfo(np.float32).tiny
    state, subnormals = {}, {}
    for name, (ids, images_, m) in prompts.items():
        p = expand_prompt(ids, images_, None, cfg, max_soft_tokens=280)
        cache = m.backend.new_cache(1, m.max_len)
        logits = _prefill(m, [p], pack_batch([p], tk["pad"]), cache)
        subnormals[name] = int(sum(((np.abs(a) < tiny) & (a != 0)).sum() for a in (c.numpy() for c in cache)))
        state[name] = (m, cache, int(np.argmax(logits[0])), len(p.ids))
    times: dict[str, list[float]] = {k: [] for k in state}
    for r in range(rounds):
        for name in (list(state) if r % 2 == 0 else list(reversed(state))):
            m, cache, tok, pos = state[name]
            m.backend.decode([tok], [pos], cache, copy=False)  # rebinds this cache: not timed
            for _ in range(3):
                t0 = time.perf_counter()
                m.backend.decode([tok], [pos], cache, copy=False)
                times[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    base = med[f"text_{n}"]
    return {"prompt_tokens": {k: v[3] for k, v in state.items()},
            "median_step_ms": {k: round(v * 1e3, 2) for k, v in med.items()},
            "tok_s": {k: round(1 / v, 2) for k, v in med.items()},
            f"tok_s_ratio_to_text_{n}": {k: round(base / v, 3) for k, v in med.items()},
            "cache_subnormals_after_prefill": subnormals,
            "steps_per_variant": len(times[f"text_{n}"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", nargs="+", help="artifact directories with an ONNX Runtime engine")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default=None, help="JSON to write (the artifacts' results under their names)")
    a = p.parse_args(argv)
    import onnxruntime as ort

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout
    out = {"what": __doc__.split("\n\n")[0].replace("\n", " "), "machine": f"{platform.machine()}, "
           f"{len(__import__('os').sched_getaffinity(0))} cores (shared)", "onnxruntime": ort.__version__,
           "date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "rounds": a.rounds, "artifacts": {}}
    for art in a.artifact:
        man = json.loads((Path(art) / "manifest.json").read_text())
        text = man["model_config"]["text"]
        res = {"sliding_layers": text["layer_types"].count("sliding_attention"), "full_layers":
               text["layer_types"].count("full_attention"), "precision": man.get("precision"),
               "ring_decode": man["engines"]["onnxruntime"]["lowering"]["prefill"]["attention"].get("ring_decode"),
               **measure(art, a.rounds)}
        print(Path(art).name, json.dumps(res), flush=True)
        out["artifacts"][Path(art).name] = res
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
