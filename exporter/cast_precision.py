"""Cast a GPU graph's decoder Linears to bf16 or fp16, keeping norms, softmax, attention and the vision path in fp32.

For every decoder projection (q/k/v/o, gate/up/down; found by module path, `exporter.linears`) and the LM head: the
weight is stored in the low precision (already transposed to (in, out), so the MatMul needs no Transpose), the
activation is cast down before the MatMul and the product cast back to fp32 after it.  Everything between
Linears (RMSNorms, residual adds, GELU, the FusedAttention plugin with its softmax, the KV cache) stays fp32, and
the vision and audio paths are not touched (the vision activations exceed fp16's range).  In a strongly typed
TensorRT network this runs the GEMMs, which hold nearly all of the FLOPs and weight bytes, on bf16/fp16 tensor
cores and halves the weights.  It does not lower the KV cache or attention to 16 bits (a plugin attribute away,
not done yet).  Q/DQ (int8/fp8) graphs are not cast: their precision is already explicit.
Weights are converted lazily when the graph is saved.
"""

from __future__ import annotations

import numpy as np

from exporter.linears import drop_unused_weights, find_linears, group_of

__all__ = ["DTYPES", "cast_linears", "cast_output_to_float"]

DTYPES = ("bf16", "fp16")


def _np_dtype(dtype: str):
    if dtype == "fp16":
        return np.float16
    import ml_dtypes

    return ml_dtypes.bfloat16



def cast_output_to_float(graph, node, low, *, name: str):
    """``node`` now computes in ``low`` (its output's new dtype): a Cast back to fp32 right after it takes over
    every user of the output; returns the Cast's output."""
    import onnx_ir as ir

    out = node.outputs[0]
    users = list(out.uses())  # before the Cast below becomes one
    up = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT}, name=name)
    up.metadata_props.update(node.metadata_props)
    up.outputs[0].dtype, up.outputs[0].shape = ir.DataType.FLOAT, out.shape
    graph.insert_after(node, [up])
    for use in users:
        use.node.replace_input_with(use.idx, up.outputs[0])
    out.dtype = low
    return up.outputs[0]


def cast_linears(model, dtype: str = "bf16", groups: tuple[str, ...] = ("decoder", "lm_head")) -> dict[str, int]:
    """Rewrite ``model`` (onnx_ir) in place; returns ``{"linears": n, "casts": m}``.  ``groups``: which Linears
    (`exporter.linears.group_of`); the streaming exporter leaves the tied LM head out (it would copy the embedding)."""
    import onnx_ir as ir

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    low = ir.DataType.BFLOAT16 if dtype == "bf16" else ir.DataType.FLOAT16
    graph = model.graph
    linears = {m: lin for m, lin in find_linears(model).items() if group_of(m) in groups}
    down: dict[int, object] = {}  # one down-cast per activation value
    casts = 0
    for module, lin in linears.items():
        node = lin.node
        if node.op_type != "MatMul":
            continue
        act = lin.activation
        if id(act) not in down:
            c = ir.node("Cast", [act], attributes={"to": low}, name=f"{module}.input.cast_{dtype}")
            c.outputs[0].name = f"{module}.input_{dtype}"
            c.outputs[0].dtype, c.outputs[0].shape = low, act.shape
            c.metadata_props.update(node.metadata_props)
            graph.insert_before(node, [c])
            down[id(act)] = c.outputs[0]
            casts += 1
        node.replace_input_with(0, down[id(act)])
        old = lin.weight.const_value
        shape = (old.shape[1], old.shape[0]) if lin.out_in else tuple(old.shape)
        name = f"{module}.weight_{dtype}"

        def make(lin=lin):
            w = lin.weight_out_in().T  # (in, out)
            return ir.tensor(np.ascontiguousarray(w.astype(_np_dtype(dtype))))

        w_low = ir.Value(name=name, const_value=ir.LazyTensor(make, dtype=low, shape=ir.Shape(shape), name=name))
        graph.register_initializer(w_low)
        node.replace_input_with(1, w_low)
        out = node.outputs[0]
        up = cast_output_to_float(graph, node, low, name=f"{module}.output.cast_fp32")
        for i, g_out in enumerate(graph.outputs):
            if g_out is out:
                graph.outputs[i] = up
                name_out = out.name
                out.name = f"{name_out}_{dtype}"
                up.name = name_out
        casts += 1
    drop_unused_weights(graph)
    return {"linears": len(linears), "casts": casts}
