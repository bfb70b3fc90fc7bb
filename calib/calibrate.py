"""``make calibrate SRC=<fp32 artifact> OUT=<new artifact> PRECISION=int8|fp8|int4 [CALIB_DATA=<dir>]``.

Reads an fp32 artifact, collects activation statistics on calibration prompts (or reuses a saved ``stats.npz``),
applies SmoothQuant (INT8 by default, alpha 0.5; optional for FP8), inserts explicit Q/DQ into both the prefill and
the decode graph with the same scales, and writes a new artifact: the two graphs sharing one ``weights.data``
(quantized weights stored as int8 / float8e4m3fn), the tokenizer, ``calibration/scales.json`` (every scale and
smoothing factor), ``calibration/stats.npz`` (reusable with ``--stats``) and a manifest with ``precision`` and a
``quantization`` section.  The artifact is staged and moved into place only when complete.  Engines are not built
here: run ``make build-engine OUT=<new artifact>``.

``int4``: weight-only block-wise INT4 (`calib.int4`: AWQ or round-to-nearest, ``--block-size``), no activation
Q/DQ.

What is quantized (``--quantize``, `DEFAULT_QUANTIZE`): INT8 and INT4 quantize the decoder's Linears **and the tied LM
head** (on the 234 M bench model the LM head is 168 M of 234 M parameters: left fp32, a decode step read more LM head
than decoder); the embedding gather then reads an fp16 copy of the table (`calib.embedding`), the only reader left of
the fp32 table.  FP8 quantizes the decoder only: on ONNX Runtime's CPU an FP8 weight is dequantized to fp32 at build
time (`graphs.ort.qdq`), so an FP8 LM head would be a second fp32 copy of the table beside the embedding's, with
no speed gain; TensorRT users can ask for it (``--quantize decoder,lm_head``).  ``--quantize decoder`` gives the old
INT8/INT4 form (fp32 LM head and embedding).  Vision and audio projections, norms and attention stay fp32 unless
``vision``/``audio`` are named.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from calib.int4 import DEFAULT_BLOCK_SIZE
from calib.parts import DEFAULT_QUANTIZE, GROUPS
from calib.qdq import PRECISIONS, activation_scales, quantize_graph, weight_scales
from calib.smoothquant import apply_smoothing, plan_smoothing
from calib.stats import Stats, collect_stats
from exporter.linears import find_linears, group_of

__all__ = ["DEFAULT_QUANTIZE", "GROUPS", "calibrate"]


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def calibrate(
    src: str | Path,
    out: str | Path,
    precision: str,
    *,
    data_dir: str | Path | None = None,
    stats_path: str | Path | None = None,
    smoothquant: float | None | str = "auto",
    percentile: float | None = None,
    quantize: tuple[str, ...] | None = None,
    embedding_fp16: bool | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    int4_method: str = "awq",
    force: bool = False,
    log=print,
) -> dict:
    """Write a quantized copy of the fp32 artifact ``src`` to ``out``; returns its manifest.

    ``out`` may be new, empty or a previous artifact; anything else, or a path that is, contains or lies inside
    ``src``, is refused before any work (`runtime.staging`; ``force`` allows other directories, never ``src``).

    ``smoothquant``: alpha in [0, 1], None for none, "auto" for 0.5 with INT8 and none with FP8 and INT4.
    ``quantize``: parts to quantize (`GROUPS`); None for the precision's default (`DEFAULT_QUANTIZE`).
    ``embedding_fp16``: the embedding gather reads an fp16 table (`calib.embedding`); None: when the LM head is
    quantized (then the gather is the table's only reader).
    ``block_size``, ``int4_method`` ("awq" or "rtn"): INT4 weight-only only (`calib.int4`).
    """
    import onnx_ir as ir

    from calib.data import prompts_for
    from exporter.share_weights import share_external_data
    from runtime.manifest import read_manifest, write_manifest
    from runtime.staging import check_output, staged_artifact

    t0 = time.perf_counter()
    if precision not in PRECISIONS and precision != "int4":
        raise ValueError(f"PRECISION={precision!r}; expected one of {', '.join([*PRECISIONS, 'int4'])}")
    prec = PRECISIONS.get(precision)
    if precision == "int4":
        from calib.int4 import BLOCK_SIZES

        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {block_size}; expected one of {', '.join(map(str, BLOCK_SIZES))}")
        if int4_method not in ("awq", "rtn"):
            raise ValueError(f"INT4 method {int4_method!r}; expected 'awq' or 'rtn'")
    if quantize is None:
        quantize = DEFAULT_QUANTIZE[precision]
    quantize = tuple(quantize)
    if embedding_fp16 is None:
        embedding_fp16 = "lm_head" in quantize
    if bad := [g for g in quantize if g not in GROUPS]:
        raise ValueError(f"cannot quantize {bad}; choose from {', '.join(GROUPS)}")
    if percentile is not None and not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile}; expected a value in (50, 100]")
    alpha = (0.5 if precision == "int8" else None) if smoothquant == "auto" else smoothquant
    if precision == "int4" and alpha is not None:
        raise ValueError("SmoothQuant is for W8A8; INT4 weight-only takes --int4-method awq|rtn")
    src, out = Path(src), Path(out)
    sources = {"source artifact": src}
    check_output(out, sources=sources, force=force)  # before any work; checked again when moved into place
    manifest = read_manifest(src)
    if manifest.get("precision", "fp32") != "fp32":
        raise ValueError(f"{src}: precision {manifest['precision']!r}; calibrate from an fp32 artifact")
    cfg = manifest["model_config"]

    if stats_path is not None:
        stats = Stats.load(stats_path)
        want = {k: v for k, v in manifest["files"].items() if k.endswith(".data") and "/" not in k}  # ort/ engines excluded
        if stats.meta.get("weights_sha256") != want:
            raise ValueError(f"{stats_path}: collected on other weights than {src} (weights sha256 differ)")
        log(f"[calibrate] statistics from {stats_path} ({stats.meta.get('prompts')} prompts)")
    else:
        prompts = prompts_for(data_dir, "calibration", cfg, has_tokenizer=bool(manifest.get("tokenizer")))
        log(f"[calibrate] collecting statistics on {len(prompts.prompts)} prompts from {prompts.source}")
        stats = collect_stats(src, prompts, log=log)

    graphs = {g: ir.load(str(src / manifest["graphs"][g]["file"])) for g in ("prefill", "decode")}
    linears = {g: find_linears(m) for g, m in graphs.items()}
    modules = [m for m in linears["prefill"] if group_of(m) in quantize]
    if missing := [m for m in modules if group_of(m) == "decoder" and m not in linears["decode"]]:
        raise ValueError(f"{src}: decode graph lacks Linears the prefill graph has: {missing[:3]}")
    extra = {}
    if precision == "int4":
        scales = _quantize_int4(graphs, linears, stats, modules, block_size, int4_method, log)
        fmt = ("DequantizeLinear (opset %d) of INT4 weights: symmetric block-wise along the input dim (axis 0, "
               "block_size %d, 2-D scales), zero points 0; activations fp32" % (manifest.get("opset", 24), block_size))
        extra = {"block_size": block_size, "int4_method": int4_method}
    else:
        plan = plan_smoothing(linears["prefill"], stats, modules, alpha) if alpha is not None else None
        if plan is not None:
            for g in ("prefill", "decode"):
                done = apply_smoothing(linears[g], plan)
                log(f"[calibrate] {g}: SmoothQuant alpha {alpha} folded {done['groups']} groups "
                    f"({done['norms']} norms, {done['linears']} Linears)")
            for module, why in sorted(plan.skipped.items()):
                log(f"[calibrate]   not smoothed: {module}: {why}")
        a_scales = activation_scales(stats, modules, prec, smooth=plan, percentile=percentile)
        w_scales = {m: weight_scales(linears["prefill"][m], prec) for m in modules}
        counts = {}
        for g in ("prefill", "decode"):
            counts[g] = quantize_graph(graphs[g], linears[g], a_scales, w_scales, prec)
            log(f"[calibrate] {g}: {counts[g]['linears']} Linears quantized to {precision}, "
                f"{counts[g]['activation_qdq']} activation Q/DQ pairs")

        scales = {
            "precision": precision,
            "qmax": prec.qmax,
            "activation_scale": a_scales,
            "weight_scale": {m: w.tolist() for m, w in w_scales.items()},
            "smoothquant": None if plan is None else {
                "alpha": plan.alpha,
                "groups": [{"modules": g.modules, "fold": g.kind, "into": g.source, "factors": g.factors.tolist()}
                           for g in plan.groups],
                "not_smoothed": plan.skipped,
            },
        }
        fmt = ("QuantizeLinear/DequantizeLinear (opset %d): static per-tensor activations, per-channel weights "
               "(axis = output), zero points 0" % manifest.get("opset", 24))
    if embedding_fp16:
        from calib.embedding import gather_fp16

        for g in ("prefill", "decode"):
            n = gather_fp16(graphs[g])
            log(f"[calibrate] {g}: {n} embedding Gather reads an fp16 table")
    with staged_artifact(out, sources=sources, force=force, log=log) as stage:
        for g, model in graphs.items():
            path = stage / manifest["graphs"][g]["file"]
            ir.save(model, path, external_data=f"{path.name}.data", max_in_flight_bytes=256 << 20)
            log(f"[calibrate] {path.name} written")
        if share_external_data(stage, log=log):
            log("[calibrate] prefill and decode share weights.data")
        for name in [*manifest.get("tokenizer", []), *filter(None, [manifest.get("generation_config")])]:
            shutil.copy2(src / name, stage / name)
        (stage / "calibration").mkdir()
        (stage / "calibration" / "scales.json").write_text(json.dumps(scales, indent=1) + "\n")
        stats.save(stage / "calibration" / "stats.npz")
        seconds = round(time.perf_counter() - t0, 2)
        new = {k: v for k, v in manifest.items() if k not in ("files", "engines", "plugin_graphs")}
        new |= {
            "precision": precision,
            "engines": {},
            "source": {"artifact": str(src), "from": manifest.get("source", {})},
            "quantization": {
                "precision": precision,
                "format": fmt,
                **extra,
                "quantized": list(quantize),
                "embedding": "fp16" if embedding_fp16 else "fp32",
                "linears": len(modules),
                "smoothquant_alpha": alpha,
                "percentile": percentile,
                "calibration_data": stats.meta.get("data"),
                "calibration_prompts": stats.meta.get("prompts"),
                "scales": "calibration/scales.json",
                "stats": "calibration/stats.npz",
                "seconds": seconds,
                "peak_rss_mib": round(_peak_rss_mib(), 1),
            },
        }
        result = write_manifest(stage, new)
    log(f"[calibrate] {precision} artifact ready: {out} ({seconds} s, peak RSS {_peak_rss_mib():.0f} MiB); "
        f"next: make build-engine OUT={out}")
    return result


def _quantize_int4(graphs, linears, stats, modules, block_size: int, method: str, log) -> dict:
    """INT4 weight-only into both graphs (`calib.int4`); returns the scales.json content."""
    from calib.int4 import plan_int4, quantize_graph_int4

    plan, muls, summary = plan_int4(linears["prefill"], stats, modules, block_size, method, log=log)
    for g in ("prefill", "decode"):
        if plan.groups:
            done = apply_smoothing(linears[g], plan)
            log(f"[calibrate] {g}: AWQ factors folded for {done['groups']} groups ({done['norms']} norms)")
        c = quantize_graph_int4(graphs[g], linears[g], modules, block_size, muls)
        log(f"[calibrate] {g}: {c['linears']} Linears quantized to int4 (block {block_size}, {method}), "
            f"{c['input_muls']} AWQ input Muls")
    return {
        "precision": "int4",
        "qmax": 7,
        "block_size": block_size,
        "method": method,
        "modules": modules,
        "awq": {
            "search": summary,
            "groups": [{"modules": g.modules, "fold": g.kind, "into": g.source, "factors": g.factors.tolist()}
                       for g in plan.groups],
            "input_mul": {m: f.tolist() for m, f in muls.items()},
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True,
                   help="fp32 artifact directory (from `make export`), or a checkpoint directory (quantized layer by "
                        "layer from its weights: calib.sequential)")
    p.add_argument("--out", required=True,
                   help="quantized artifact directory to write: new, empty or a previous artifact (replaced on success)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT even if it is a directory that is not an artifact (never the source)")
    p.add_argument("--precision", required=True, choices=sorted([*PRECISIONS, "int4"]))
    p.add_argument("--data", default=None, help="calibration data directory (default: the built-in set)")
    p.add_argument("--stats", default=None, help="reuse a stats.npz from an earlier calibration of the same weights")
    p.add_argument("--smoothquant", default="auto",
                   help="SmoothQuant alpha in [0, 1], 'none', or 'auto' (0.5 for int8, none for fp8)")
    p.add_argument("--percentile", type=float, default=None,
                   help="activation range from this percentile of |x| instead of the max (e.g. 99.99)")
    p.add_argument("--quantize", default=None,
                   help=f"comma-separated parts to quantize: {', '.join(GROUPS)} (default: decoder,lm_head for int8 "
                        "and int4, decoder for fp8; 'decoder' alone keeps the LM head fp32)")
    p.add_argument("--embedding", default="auto", choices=("auto", "fp16", "fp32"),
                   help="embedding table dtype: auto = fp16 when the LM head is quantized (the gather is then its "
                        "only reader), else fp32")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"INT4: input channels per weight scale (32, 64, 128; default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--int4-method", default="awq", choices=("awq", "rtn"),
                   help="INT4: activation-aware scale search (awq) or plain round-to-nearest (rtn)")
    a = p.parse_args(argv)
    sq = a.smoothquant
    try:
        sq = None if sq == "none" else sq if sq == "auto" else float(sq)
    except ValueError:
        print(f"calibrate: error: --smoothquant {a.smoothquant!r}: expected a number, 'none' or 'auto'", file=sys.stderr)
        return 2
    quantize = None if a.quantize is None else tuple(x.strip() for x in a.quantize.split(",") if x.strip())
    src = Path(a.src)
    if not (src / "manifest.json").exists() and (src / "config.json").is_file():  # a checkpoint, not an artifact
        if a.stats is not None or a.embedding != "auto":
            print(f"calibrate: error: {src} is a checkpoint: --stats and --embedding are for fp32 artifacts",
                  file=sys.stderr)
            return 2
        from calib.sequential import quantize_checkpoint
        from runtime.staging import error_message

        print(f"[calibrate] {src} is a checkpoint: quantizing layer by layer from its weights (calib.sequential)")
        try:
            quantize_checkpoint(str(src), a.out, precision=a.precision, block_size=a.block_size,
                                method=a.int4_method, smoothquant=sq, percentile=a.percentile,
                                quantize=quantize, data_dir=a.data, force=a.force)
        except (ValueError, OSError) as e:
            print(f"calibrate: error: {error_message(e)}", file=sys.stderr)
            return 2
        return 0
    try:
        calibrate(a.src, a.out, a.precision, data_dir=a.data, stats_path=a.stats, smoothquant=sq,
                  percentile=a.percentile,
                  quantize=quantize,
                  embedding_fp16=None if a.embedding == "auto" else a.embedding == "fp16",
                  block_size=a.block_size, int4_method=a.int4_method, force=a.force)
    except (ValueError, OSError) as e:  # ArtifactError, OutputRefused are ValueErrors; a full disk an OSError
        from runtime.staging import error_message

        print(f"calibrate: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
