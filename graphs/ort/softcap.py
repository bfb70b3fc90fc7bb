"""ONNX Runtime lowering: the final logit softcap's division moves in front of the LM head.

Pattern (Gemma 4's ``final_logit_softcapping``, as exported)::

    logits = Mul(Tanh(Div(MatMul(a, W), c)), c)        c a scalar constant, W the (vocab, hidden) LM head

The ``Div`` reads and writes B x S x vocab floats (262,144 per token: ~1 % of an INT4 decode step of the bench
model, as much as the whole embedding lookup and norm of a layer).  Since ``MatMul(a, W) / c = MatMul(a / c, W)``,
the ``1/c`` is put where it costs nothing, in this order:

1. the constant of the node that makes ``a`` (through same-type ``Cast``/``CastLike``), when ``a`` feeds only the LM head: a ``Mul`` by a constant (an AWQ input
   scale) or a ``SimplifiedLayerNormalization`` weight (the final norm), used by that node only;
2. the LM head's weight dequantization scale (``DequantizeLinear(Wq, scale)`` with its own scale constant: INT8 and
   FP8 Q/DQ graphs, whose activation quantizer must keep seeing the unscaled norm output);
3. else a ``Mul(a, 1/c)`` on the hidden state (hidden_size floats per token), unless ``a`` comes out of a
   ``DequantizeLinear`` (the Mul would keep ONNX Runtime from fusing it into an integer MatMul).

The result equals the exported form up to float rounding (one more rounding of a few constants).  Refusals are
returned with their reason; nothing else in the graph is touched.  Does not fuse ``Tanh`` and the final ``Mul``:
ONNX Runtime has no kernel for ``c * tanh(x)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fold_softcap_divisor"]


_SAME_TYPE = ("Cast", "CastLike", "Identity")


def _scalar(v) -> float | None:
    import onnx_ir as ir

    t = ir.convenience.get_const_tensor(v) if v is not None else None
    if t is None:
        return None
    a = t.numpy()
    return float(a.reshape(())) if a.size == 1 and a.dtype.kind == "f" else None


def _only_user(v):
    """The one node using ``v`` (once), or None (several users, a graph output, or none)."""
    uses = list(v.uses())
    return uses[0].node if len(uses) == 1 and not v.is_graph_output() else None


def _own_constant(v):
    """``v`` when it is an initializer used by exactly one node, else None (a shared constant must not change)."""
    if v is None or not v.is_initializer() or v.const_value is None or v.is_graph_output():
        return None
    return v if len(list(v.uses())) == 1 else None


def _scale_constant(graph, v, factor: float) -> None:
    """Replace the initializer ``v`` by ``v * factor`` (same dtype), under a new name so that an external tensor
    of the artifact is never rewritten in place."""
    import onnx_ir as ir

    a = v.const_value.numpy()
    scaled = (a.astype(np.float64) * factor).astype(a.dtype)
    name = f"{v.name}.softcap_folded"
    new = ir.Value(name=name, shape=v.shape, type=v.type, const_value=ir.tensor(scaled, name=name))
    graph.register_initializer(new)
    for node, index in list(v.uses()):
        node.replace_input_with(index, new)
    graph.initializers.pop(v.name, None)


def _fold(graph, lm_head, factor: float) -> str | None:
    """Put ``factor`` on the LM head's input side; returns how, or None if no place was safe."""
    import onnx_ir as ir

    a, w = lm_head.inputs[0], lm_head.inputs[1]
    v, user = a, lm_head
    while (v.producer() is not None and v.producer().op_type in _SAME_TYPE and _only_user(v) is user
           and v.producer().inputs[0].dtype == v.dtype):  # an fp32 -> fp32 CastLike of the export
        v, user = v.producer().inputs[0], v.producer()
    maker = v.producer()
    if maker is not None and _only_user(v) is user and v is maker.outputs[0]:
        if maker.op_type == "Mul" and maker.domain in ("", "ai.onnx"):
            const = next((c for c in map(_own_constant, maker.inputs) if c is not None), None)
            if const is not None:
                _scale_constant(graph, const, factor)
                return "input scale"
        if maker.op_type == "SimplifiedLayerNormalization" and len(maker.inputs) > 1:
            const = _own_constant(maker.inputs[1])
            if const is not None:
                _scale_constant(graph, const, factor)
                return "norm weight"
    dq = w.producer() if w is not None else None
    if dq is not None and dq.op_type == "DequantizeLinear" and _only_user(w) is lm_head and len(dq.inputs) > 1:
        const = _own_constant(dq.inputs[1])
        if const is not None:
            _scale_constant(graph, const, factor)
            return "weight scale"
    if maker is not None and maker.op_type == "DequantizeLinear":
        return None
    tag = lm_head.name or lm_head.outputs[0].name
    k = ir.Value(name=f"{tag}.softcap_inverse",
                 const_value=ir.tensor(np.array(factor, np.float32), name=f"{tag}.softcap_inverse"))
    graph.register_initializer(k)
    mul = ir.node("Mul", [a, k], name=f"{tag}.softcap_divide")
    mul.outputs[0].name = f"{tag}.softcap_input"
    if a.type is not None:
        mul.outputs[0].type, mul.outputs[0].shape = a.type, a.shape
    graph.insert_before(lm_head, [mul])
    lm_head.replace_input_with(0, mul.outputs[0])
    return "hidden-state Mul"


def fold_softcap_divisor(model) -> dict:
    """Apply the rewrite to every match in ``model`` (onnx_ir, in place); returns {"folded": [how, ...],
    "refused": [reason, ...]}."""
    graph = model.graph
    report: dict[str, list[str]] = {"folded": [], "refused": []}
    for tanh in [n for n in graph if n.op_type == "Tanh" and n.domain in ("", "ai.onnx")]:
        div = tanh.inputs[0].producer()
        if div is None or div.op_type != "Div" or _only_user(div.outputs[0]) is not tanh:
            continue
        c = _scalar(div.inputs[1])
        lm_head = div.inputs[0].producer()
        if c is None or c == 0.0 or lm_head is None or lm_head.op_type != "MatMul":
            report["refused"].append(f"{div.name}: not a division of a MatMul by a non-zero scalar constant")
            continue
        if _only_user(lm_head.outputs[0]) is not div:
            report["refused"].append(f"{lm_head.name}: its output has users besides the softcap")
            continue
        how = _fold(graph, lm_head, 1.0 / c)
        if how is None:
            report["refused"].append(f"{lm_head.name}: its input comes straight from a DequantizeLinear and its "
                                     "weight scale is shared")
            continue
        tanh.replace_input_with(0, lm_head.outputs[0])
        graph.remove(div, safe=True)
        report["folded"].append(how)
    return report
