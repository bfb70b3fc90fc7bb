"""Driver: the ONNX Runtime lowering that ``make build-engine`` applies to the graphs it hands to ONNX Runtime.

Fixed order, each pass in its own file, counts returned:

1. `graphs.lower_ort_attention`: ``FusedAttention`` nodes -> GroupQueryAttention / RotaryEmbedding + Attention
   where exact (sliding layers in prefill: RotaryEmbedding + Attention + an in-place ring write);
2. `graphs.lower_ort_norms`: RMSNorms -> ``SimplifiedLayerNormalization`` (ONNX Runtime then fuses the residual
   adds into ``SkipSimplifiedLayerNormalization``).

The lowered graph is written beside the source (so its external weights are shared, never copied) under a
temporary name that the caller removes once ONNX Runtime has optimised and saved it (`remove_lowered`).  The
artifact's own graphs, including the TensorRT plugin graphs, are never modified.  Quantized graphs (Q/DQ Linears,
`graphs.lower_qdq_ort`) go through the same passes: neither pass touches a Linear.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["lower_graph", "lower_to_file", "remove_lowered"]

LOWERED_SUFFIX = ".ort-lowered.tmp.onnx"


def lower_graph(model, *, decode: bool, max_len: int, log=print) -> dict:
    """Apply the passes in order to one onnx_ir model, in place; returns each pass's counts."""
    from graphs.lower_ort_attention import lower_attention
    from graphs.lower_ort_norms import lower_norms

    report = {"attention": lower_attention(model, decode=decode, max_len=max_len, log=log)}
    report["norms"] = lower_norms(model, log=log)
    model.graph.sort()
    return report


def lower_to_file(src: Path, manifest: dict, *, decode: bool, log=print) -> tuple[Path, dict]:
    """Lower the graph ``src`` into a temporary file beside it (sharing its external weights); returns the file and
    the counts.  `remove_lowered` deletes it.  Graphs without FusedAttention nodes (``--no-plugins``) get the norm
    pass only."""
    import onnx
    import onnx_ir as ir

    src = Path(src)
    model = ir.load(str(src))
    report = lower_graph(model, decode=decode, max_len=int(manifest["max_len"]), log=log)
    dst = src.with_name(src.name.removesuffix(".onnx") + LOWERED_SUFFIX)
    try:
        onnx.save(ir.serde.serialize_model(model), str(dst))  # weights stay in the source's external data
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    a, n = report["attention"], report["norms"]
    log(f"[build-engine] {src.name}: lowered for ONNX Runtime: {a['GroupQueryAttention']} GroupQueryAttention, "
        f"{a['Attention']} Attention, {a['kept']} attention bodies kept, {len(a['refused'])} refused; "
        f"{n['SimplifiedLayerNormalization']} RMSNorms fused")
    return dst, report


def remove_lowered(root: Path) -> None:
    """Delete the temporary lowered graphs `lower_to_file` wrote into ``root``."""
    for f in Path(root).glob("*" + LOWERED_SUFFIX):
        f.unlink(missing_ok=True)
