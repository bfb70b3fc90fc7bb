"""Quantize straight from a checkpoint in bounded memory: layer-by-layer statistics, then a streamed INT4 export.

For models whose fp32 artifact does not fit (the 12B: 48 GB), `make calibrate` (which runs the fp32 graph) is not
an option.  This module does what llm-compressor's sequential pipeline and AutoAWQ do:

1. **Statistics, one decoder layer at a time** (`calib.layerwise`): the calibration prompts are embedded (only
   the embedding rows they use are read) and their hidden states carried from layer to layer through our PyTorch
   model (`exporter.model`).  Each layer's weights are read from the checkpoint, run on every prompt with hooks
   on its Linears (`calib.stats.TensorStats`: absmax, mean |x|, mean x^2, a row sample), then dropped.  While the
   layer is in memory its AWQ factors are searched (`calib.int4.awq_search`) per group of Linears sharing an input.
   Peak memory: one layer in fp32 plus the prompts' activations.
2. **Export** (`quantize_checkpoint`): the model is traced without weights (`exporter.stream`), and every weight
   streams from the checkpoint into external data, the decoder Linears quantized tensor by tensor on the way
   (`calib.int4.quantize_graph_int4`: ``DequantizeLinear(int4, axis 0, block_size) -> MatMul``, the same graph
   form as ``make calibrate PRECISION=int4``).  AWQ factors fold into the input RMSNorms (q/k/v, gate/up) and
   up_proj's rows (down_proj) as the weights stream (`calib.stream_rewrites`), or stay a ``Mul`` before o_proj.
   The tied LM head is quantized too (``lm_head``), and the embedding gather reads an fp16 copy
   of the table (rows are cast to fp32 after the gather), so the 12B's 1 B-parameter table costs 2 GB + 0.5 GB
   instead of 4 GB: that is what keeps the INT4 12B under 9 GB.

**W8A8** (``precision`` int8 / fp8): the same per-layer statistics give the activation ranges (and, for the LM head,
the final norm's output over every calibration position); SmoothQuant factors (INT8: alpha 0.5 by default) are
computed while a layer's weights are in memory, from the same formula as ``make calibrate``
(`calib.smoothquant.smoothing_factors`), and folded as the weights stream (`FoldedWeights`); the graph gets the
Q/DQ form of `calib.qdq.quantize_graph` (static per-tensor activations, per-channel weights), each weight quantized
block by block as it is saved (the tied LM head from the embedding's row blocks).  The artifact is what
``make calibrate`` makes from an fp32 artifact, with ``calibration/scales.json`` and ``stats.npz``; the only
difference is the LM head's activation range, taken over every position rather than each prompt's last.

No fp32 artifact is written and no whole fp32 model is held.  Not done here: AWQ's clipping search.
"""

from __future__ import annotations

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from calib.int4 import DEFAULT_BLOCK_SIZE
from calib.layerwise import LayerPlan, _prompt_inputs, collect_sequential
from calib.stream_rewrites import FoldedWeights, int4_rewrite, w8a8_rewrite

__all__ = ["FoldedWeights", "LayerPlan", "collect_sequential", "quantize_checkpoint"]


def quantize_checkpoint(model_arg: str, out: str | Path, *, precision: str = "int4", block_size: int = DEFAULT_BLOCK_SIZE,
                        method: str = "awq", smoothquant: float | None | str = "auto", percentile: float | None = None,
                        quantize: tuple[str, ...] | None = None, data_dir=None, max_prompts: int = 8,
                        max_soft_tokens: int = 70, max_len: int | None = None, seed: int = 0, awq_grid: int = 10,
                        awq_objective: str = "sample", force: bool = False, log=print) -> dict:
    """A quantized artifact from a checkpoint directory (or a preset's seeded weights) in bounded memory.

    ``precision`` int4 (weight-only; ``method`` awq|rtn, ``block_size``) or int8 / fp8 (W8A8; ``smoothquant`` alpha,
    None, or "auto": 0.5 for int8, none for fp8; ``quantize``: parts as in ``make calibrate``, default its
    `calib.parts.DEFAULT_QUANTIZE`; ``percentile`` of |x| for the activation ranges instead of the max)."""
    import resource

    from calib.parts import DEFAULT_QUANTIZE, GROUPS
    from calib.qdq import PRECISIONS
    from exporter.config import PRESETS, load_config
    from exporter.export import export_artifact
    from exporter.stream import CheckpointWeights, SeededWeights, fake_model
    from runtime.staging import check_output

    t0 = time.perf_counter()
    if precision not in ("int4", *PRECISIONS):
        raise ValueError(f"precision {precision!r}; expected int4, {', '.join(PRECISIONS)}")
    w8a8 = precision != "int4"
    alpha = (0.5 if precision == "int8" else None) if smoothquant == "auto" else smoothquant
    if not w8a8 and alpha is not None:
        raise ValueError("SmoothQuant is for W8A8; INT4 weight-only takes --method awq|rtn")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha={alpha}; expected a value in [0, 1]")
    if percentile is not None and not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile}; expected a value in (50, 100]")
    if w8a8:
        quantize = tuple(quantize or DEFAULT_QUANTIZE[precision])
        if bad := [g for g in quantize if g not in GROUPS]:
            raise ValueError(f"cannot quantize {bad}; choose from {', '.join(GROUPS)}")
    elif quantize is not None and tuple(quantize) != ("decoder", "lm_head"):
        raise ValueError("INT4 from a checkpoint quantizes the decoder and the LM head (--quantize is for int8/fp8)")
    is_preset = model_arg in PRESETS and not Path(model_arg).exists()
    check_output(out, sources={"checkpoint": None if is_preset else model_arg}, force=force)  # before any work
    cfg = load_config(model_arg)
    source = SeededWeights(cfg, seed) if is_preset else CheckpointWeights(model_arg, cfg)
    tok_dir = None if is_preset else Path(model_arg)
    if max_len is None:
        max_len = min(cfg.text.max_position_embeddings, 8192)
    if not 2 <= max_len <= cfg.text.max_position_embeddings:
        raise ValueError(f"max_len={max_len} must be in [2, {cfg.text.max_position_embeddings}] for this model")
    inputs, data_meta = _prompt_inputs(cfg, data_dir, tok_dir, max_prompts, max_soft_tokens, max_len)
    how = (f"SmoothQuant alpha {alpha}" if alpha is not None else "no smoothing") if w8a8 \
        else f"{method}, block {block_size}"
    log(f"[quantize] {data_meta['prompts']} calibration prompts ({data_meta['tokens']} tokens) from "
        f"{data_meta['data']}; statistics layer by layer ({precision}: {how})")
    stats, plan, records = collect_sequential(source, cfg, inputs, block_size=block_size,
                                              method=None if w8a8 else method, smooth_alpha=alpha,
                                              awq_grid=awq_grid, awq_objective=awq_objective, log=log)
    t_stats = time.perf_counter() - t0
    rss_stats = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del inputs
    log(f"[quantize] statistics in {t_stats:.0f} s (peak RSS {rss_stats:.2f} GiB); exporting with {precision} weights")
    common = {
        "precision": precision,
        "from_checkpoint": True,
        "sequential": {"layers": records, "statistics_seconds": round(t_stats, 1)},
        "calibration_data": data_meta["data"],
        "calibration_prompts": data_meta["prompts"],
        "calibration_tokens": data_meta["tokens"],
        "max_soft_tokens": data_meta["max_soft_tokens"],
    }
    add_files = None
    if w8a8:
        prec = PRECISIONS[precision]
        embedding_fp16 = "lm_head" in quantize
        scales: dict = {"precision": precision, "qmax": prec.qmax}
        rewrite = w8a8_rewrite(plan, stats, prec, quantize, embedding_fp16=embedding_fp16, percentile=percentile,
                               scales=scales)

        def add_files(stage: Path) -> None:
            scales["smoothquant"] = None if alpha is None else {
                "alpha": alpha,
                "groups": [{"modules": list(mods), "fold": "linear" if tgt.endswith("up_proj.weight") else "norm",
                            "into": tgt.removesuffix(".weight"), "factors": f.tolist()}
                           for mods, (tgt, f) in plan.groups.items()],
                "not_smoothed": {m: "its input comes from attention (no weighted norm or Linear output to fold into)"
                                 for m in scales["activation_scale"] if m.endswith("o_proj")},
            }
            (stage / "calibration").mkdir()
            (stage / "calibration" / "scales.json").write_text(json.dumps(scales, indent=1) + "\n")
            stats.save(stage / "calibration" / "stats.npz")

        extra = {"precision": precision, "quantization": {
            "format": "QuantizeLinear/DequantizeLinear (opset 24): static per-tensor activations, per-channel weights "
                      "(axis = output), zero points 0",
            "quantized": list(quantize),
            "embedding": "fp16" if embedding_fp16 else "fp32",
            "smoothquant_alpha": alpha,
            "percentile": percentile,
            "lm_head_activation_range": "the final norm's output at every calibration position",
            "scales": "calibration/scales.json",
            "stats": "calibration/stats.npz",
            **common,
        }}
    else:
        rewrite = int4_rewrite(plan, block_size)
        extra = {"precision": "int4", "quantization": {
            "format": "DequantizeLinear (opset 24) of INT4 weights: symmetric block-wise along the input dim "
                      f"(axis 0, block_size {block_size}, 2-D scales), zero points 0; activations fp32",
            "block_size": block_size,
            "int4_method": method,
            "awq_grid": awq_grid if method == "awq" else None,
            "awq_objective": awq_objective if method == "awq" else None,
            "quantized": ["decoder", "lm_head"],
            "embedding": "fp16 table, rows cast to fp32 after the gather",
            "awq": plan.to_json()["search"],
            **common,
        }}
    src_meta = {"preset": model_arg, "seed": seed, "generator": "exporter.stream.SeededWeights"} if is_preset \
        else {"checkpoint": str(Path(model_arg).resolve())}
    manifest = export_artifact(fake_model(cfg), out, max_len=max_len, source=src_meta,
                               tokenizer_dir=tok_dir, weights_from=None if is_preset else Path(model_arg),
                               weights=FoldedWeights(source, plan), rewrite=rewrite,
                               manifest_extra=extra, add_files=add_files, force=force, log=log)
    log(f"[quantize] {precision} artifact ready: {out} ({time.perf_counter() - t0:.0f} s, peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.sequential", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="bf16/fp32 checkpoint directory, or a preset (seeded weights)")
    p.add_argument("--out", required=True, help="quantized artifact directory to write")
    p.add_argument("--precision", default="int4", choices=("int4", "int8", "fp8"))
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, choices=(32, 64, 128),
                   help="INT4: input channels per scale")
    p.add_argument("--method", default="awq", choices=("awq", "rtn"), help="INT4: AWQ search or round-to-nearest")
    p.add_argument("--smoothquant", default="auto",
                   help="INT8/FP8: SmoothQuant alpha in [0, 1], 'none', or 'auto' (0.5 for int8, none for fp8)")
    p.add_argument("--percentile", type=float, default=None,
                   help="INT8/FP8: activation range from this percentile of |x| instead of the max")
    p.add_argument("--quantize", default=None,
                   help="INT8/FP8: comma-separated parts (decoder, lm_head, vision, audio); default as make calibrate")
    p.add_argument("--data", default=None, help="calibration data directory (default: the built-in set)")
    p.add_argument("--max-prompts", type=int, default=8)
    p.add_argument("--max-soft-tokens", type=int, default=70, choices=(70, 140, 280, 560, 1120))
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--awq-grid", type=int, default=10, help="alpha candidates of the AWQ search")
    p.add_argument("--awq-objective", default="sample", choices=("sample", "diag"),
                   help="score AWQ candidates on sampled activation rows, or on per-channel moments (cheaper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    try:
        sq = None if a.smoothquant == "none" else a.smoothquant if a.smoothquant == "auto" else float(a.smoothquant)
    except ValueError:
        print(f"quantize: error: --smoothquant {a.smoothquant!r}: expected a number, 'none' or 'auto'", file=sys.stderr)
        return 2
    quantize = None if a.quantize is None else tuple(x.strip() for x in a.quantize.split(",") if x.strip())
    try:
        quantize_checkpoint(a.model, a.out, precision=a.precision, block_size=a.block_size, method=a.method,
                            smoothquant=sq, percentile=a.percentile, quantize=quantize, data_dir=a.data,
                            max_prompts=a.max_prompts, max_soft_tokens=a.max_soft_tokens, max_len=a.max_len,
                            seed=a.seed, awq_grid=a.awq_grid, awq_objective=a.awq_objective, force=a.force)
    except (ValueError, OSError) as e:
        from runtime.staging import error_message

        print(f"quantize: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
