"""Driver: the ONNX Runtime lowering that ``make build-engine`` applies to the graphs it hands to ONNX Runtime.

Fixed order, each pass in its own file, counts returned:

1. `graphs.ort.attention`: ``FusedAttention`` nodes -> GroupQueryAttention / RotaryEmbedding + Attention
   where exact (sliding layers in prefill: RotaryEmbedding + Attention + an in-place ring write), the shared
   attention geometry as engine inputs;
2. `graphs.ort.norms`: RMSNorms -> ``SimplifiedLayerNormalization``, and a residual add feeding one ->
   ``SkipSimplifiedLayerNormalization``;
3. `graphs.ort.scale_fold`: a constant channel scale after a norm (the LM head's AWQ input scale) goes into the
   norm's weight; `graphs.ort.softcap`: the final logit softcap's division moves in front of the LM head (into a constant
   of its input side): one pass over the vocabulary fewer per token;
4. soft-token slots gated on their inputs having rows (`gate_soft_token_slots`, below);
5. `graphs.ort.shapes`: Reshape/Expand shape arguments computed from dims the node already has -> constants;
   then nodes left without a user removed (those, and the exported graph's image-block ids: the runtime computes
   the attention geometry, `runtime.ort_attention`);
6. `graphs.ort.embedders`: the vision and audio embedders under an ``If`` on their inputs having rows (on the
   serialized graph: its zero-row constants are computed by ONNX Runtime).

The lowered graph is written beside the source (so its external weights are shared, never copied) under a
temporary name that the caller removes once ONNX Runtime has optimised and saved it (`remove_lowered`).  The
artifact's own graphs, including the TensorRT plugin graphs, are never modified.  Quantized graphs (Q/DQ Linears,
`graphs.ort.qdq`) go through the same passes: neither pass touches a Linear.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["lower_graph", "lower_to_file", "remove_lowered"]

LOWERED_SUFFIX = ".ort-lowered.tmp.onnx"


def _scalar(value):
    """The integer a constant scalar value holds, else None."""
    import numpy as np

    t = value.const_value
    if t is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        t = None if attr is None else attr.value
    if t is None:
        return None
    a = np.asarray(t.numpy())
    return int(a.reshape(())) if a.size == 1 and a.dtype.kind in "iu" else None


def gate_soft_token_slots(model, soft_inputs: dict[int, str]) -> int:
    """Placeholder slots only where soft tokens are given: ``input_ids == <image/audio token>`` masks that place soft
    tokens or open image blocks (every such Equal not feeding only the text embedding's ``Or``) are ANDed with
    "``soft_inputs[token]`` has rows".  A prefill with images or audio is unchanged; a decode step run by the prefill
    graph (no soft rows) embeds a generated placeholder id as text, as the decode graph and transformers do."""
    import numpy as np
    import onnx_ir as ir

    g = model.graph
    ids = next((v for v in g.inputs if v.name == "input_ids"), None)
    feeds = {v.name: v for v in g.inputs}
    if ids is None:
        return 0
    n = 0
    zero = None
    for node in list(g):
        if node.op_type != "Equal" or node.domain not in ("", "ai.onnx") or ids not in node.inputs:
            continue
        other = node.inputs[1] if node.inputs[0] is ids else node.inputs[0]
        token = _scalar(other)
        src = feeds.get(soft_inputs.get(token, ""))
        out = node.outputs[0]
        uses = [u for u, _ in out.uses()]
        if src is None or not uses or all(u.op_type == "Or" for u in uses):
            continue
        if zero is None:
            zero = ir.Value(name="ort_lower_soft_zero", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]),
                            const_value=ir.tensor(np.array([0], np.int64), name="ort_lower_soft_zero"))
            g.register_initializer(zero)
        rows = ir.node("Shape", [src], attributes={"start": 0, "end": 1}, name=f"ort_lower_soft_rows_{n}")
        has = ir.node("Greater", [rows.outputs[0], zero], name=f"ort_lower_soft_has_{n}")
        gated = ir.node("And", [out, has.outputs[0]], name=f"ort_lower_soft_gate_{n}")
        g.insert_after(node, [rows, has, gated])
        for u in uses:
            for i, x in enumerate(u.inputs):
                if x is out:
                    u.replace_input_with(i, gated.outputs[0])
        gated.outputs[0].shape, gated.outputs[0].type = out.shape, out.type
        n += 1
    return n


def lower_graph(model, *, decode: bool, max_len: int, log=print, soft_inputs: dict[int, str] | None = None,
                sliding: str = "ring", slack: int | None = None, ring_decode: str = "auto") -> dict:
    """Apply the passes in order to one onnx_ir model, in place; returns each pass's counts.  ``sliding``/``slack``/
    ``ring_decode``: the sliding layers' form (`graphs.ort.attention.lower_attention`)."""
    from graphs.ort.attention import lower_attention
    from graphs.ort.norms import fuse_skip_norms, lower_norms
    from graphs.ort.scale_fold import fold_scales_into_norms
    from graphs.ort.softcap import fold_softcap_divisor

    extra = {} if slack is None else {"slack": slack}
    report = {"attention": lower_attention(model, decode=decode, max_len=max_len, log=log, sliding=sliding,
                                           ring_decode=ring_decode, **extra)}
    report["norms"] = lower_norms(model, log=log)
    report["norms"]["SkipSimplifiedLayerNormalization"] = fuse_skip_norms(model, log=log)
    report["norms"]["scales_folded"] = fold_scales_into_norms(model)
    report["softcap"] = fold_softcap_divisor(model)
    report["soft_token_gates"] = gate_soft_token_slots(model, soft_inputs or {})
    from graphs.ort.shapes import constant_shapes

    report["constant_shapes"] = constant_shapes(model)
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
    model.graph.sort()
    return report


def lower_to_file(src: Path, manifest: dict, *, decode: bool, log=print, sliding: str = "ring",
                  slack: int | None = None, ring_decode: str = "auto") -> tuple[Path, dict]:
    """Lower the graph ``src`` into a temporary file beside it (sharing its external weights); returns the file and
    the counts.  `remove_lowered` deletes it.  Graphs without FusedAttention nodes (``--no-plugins``) get the norm
    pass only."""
    import onnx
    import onnx_ir as ir

    src = Path(src)
    model = ir.load(str(src))
    tokens = manifest.get("model_config", {}).get("tokens", {})
    soft = {int(tokens[k]): f for k, f in (("image", "image_patches"), ("audio", "audio_frames")) if k in tokens}
    from graphs.ort.embedders import gate_embedders

    report = lower_graph(model, decode=decode, max_len=int(manifest["max_len"]), log=log, soft_inputs=soft,
                         sliding=sliding, slack=slack, ring_decode=ring_decode)
    proto = ir.serde.serialize_model(model)
    # an engine without image attention (--ort-sliding window) drops the vision path: the runtime refuses images
    report["gated_embedders"] = gate_embedders(proto, src.parent, log=log,
                                               drop=("image_patches",) if sliding == "window" else ())
    dst = src.with_name(src.name.removesuffix(".onnx") + LOWERED_SUFFIX)
    try:
        onnx.save(proto, str(dst))  # weights stay in the source's external data
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    a, n = report["attention"], report["norms"]
    log(f"[build-engine] {src.name}: lowered for ONNX Runtime: {a['GroupQueryAttention']} GroupQueryAttention, "
        f"{a['Attention']} Attention, {a['kept']} attention bodies kept, {len(a['refused'])} refused; "
        f"{n['SimplifiedLayerNormalization']} RMSNorms fused, {n['SkipSimplifiedLayerNormalization']} with their residual add")
    return dst, report


def remove_lowered(root: Path) -> None:
    """Delete the temporary lowered graphs `lower_to_file` wrote into ``root``."""
    for f in Path(root).glob("*" + LOWERED_SUFFIX):
        f.unlink(missing_ok=True)
