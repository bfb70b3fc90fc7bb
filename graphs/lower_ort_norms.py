"""ONNX Runtime lowering: exported RMSNorms -> one ``SimplifiedLayerNormalization`` kernel each.

Pattern (what torch.onnx exports for `exporter.model.RMSNorm` in fp32)::

    y = x * Pow(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1) + eps, -0.5)      [* weight]

Check: the exponents are 2 and -0.5, the mean is over the last axis only with keepdims, ``eps`` is a scalar constant,
``weight`` (when present) a 1-D constant as long as the last axis, and every intermediate value is used only inside
the pattern; otherwise the nodes stay and the reason is counted.
Rewrite: ``SimplifiedLayerNormalization(x, weight or ones, axis=-1, epsilon=eps, stash_type=1)`` (computed in
fp32: ``x / sqrt(mean(x^2) + eps) * weight``, the same math; it differs from the exported form by float rounding
only).  ONNX Runtime's own optimiser then folds the residual ``Add`` before a norm into
``SkipSimplifiedLayerNormalization``.  Norms on quantized graphs are matched the same way (Q/DQ nodes sit on the
Linears' inputs, after the norm).  Does not touch anything else.
"""

from __future__ import annotations

import numpy as np

__all__ = ["lower_norms"]


class Refused(ValueError):
    pass


def _const(v) -> np.ndarray | None:
    """The value of ``v`` when it is an initializer/Constant, or a Reshape/Cast/Unsqueeze/Squeeze of ones."""
    if v is None:
        return None
    import onnx_ir as ir

    t = ir.convenience.get_const_tensor(v)
    if t is not None:
        return t.numpy()
    p = v.producer()
    if p is None:
        return None
    if p.op_type == "Reshape" and len(p.inputs) == 2:
        a, s = _const(p.inputs[0]), _const(p.inputs[1])
        if a is not None and s is not None and not (s == 0).any():
            return a.reshape(s)
    if p.op_type in ("Cast", "Identity") and len(p.inputs) == 1:
        return _const(p.inputs[0])
    return None


def _only_use(v, op_type: str):
    uses = list(v.uses())
    if len(uses) != 1 or v.is_graph_output() or uses[0].node.op_type != op_type:
        return None
    return uses[0].node


def _match(mean_node):
    """(x, eps, weight or None, output value, nodes) of one RMSNorm whose ReduceMean is ``mean_node``."""
    sq = mean_node.inputs[0].producer() if mean_node.inputs[0] is not None else None
    if sq is None or sq.op_type != "Pow":
        raise Refused("ReduceMean input is not Pow(x, 2)")
    two = _const(sq.inputs[1])
    if two is None or two.size != 1 or float(two.reshape(())) != 2.0:
        raise Refused("the square is not Pow(x, 2)")
    x = sq.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    axes = _const(mean_node.inputs[1]) if len(mean_node.inputs) > 1 else None
    if axes is None or axes.size != 1 or rank is None or int(axes.reshape(())) not in (-1, rank - 1):
        raise Refused(f"mean over axes {None if axes is None else axes.tolist()}, not the last axis only")
    if mean_node.attributes.get("keepdims") is not None and mean_node.attributes["keepdims"].value != 1:
        raise Refused("ReduceMean without keepdims")
    if _only_use(sq.outputs[0], "ReduceMean") is None:
        raise Refused("x^2 is used outside the norm")
    add = _only_use(mean_node.outputs[0], "Add")
    if add is None:
        raise Refused("mean(x^2) is not only added to eps")
    eps = _const(add.inputs[1] if add.inputs[0] is mean_node.outputs[0] else add.inputs[0])
    if eps is None or eps.size != 1:
        raise Refused("eps is not a scalar constant")
    rs = _only_use(add.outputs[0], "Pow")
    if rs is None or rs.inputs[0] is not add.outputs[0]:
        raise Refused("mean(x^2) + eps is not raised to -0.5")
    half = _const(rs.inputs[1])
    if half is None or half.size != 1 or float(half.reshape(())) != -0.5:
        raise Refused("the exponent is not -0.5")
    mul = _only_use(rs.outputs[0], "Mul")
    if mul is None or x not in mul.inputs:
        raise Refused("the normaliser does not multiply x")
    nodes, out, weight = [sq, mean_node, add, rs, mul], mul.outputs[0], None
    wmul = _only_use(out, "Mul")
    if wmul is not None:
        w = wmul.inputs[1] if wmul.inputs[0] is out else wmul.inputs[0]
        wv = _const(w)
        last = x.shape[-1] if x.shape is not None else None
        if wv is not None and wv.ndim == 1 and isinstance(last, int) and wv.shape[0] == last:
            nodes.append(wmul)
            out, weight = wmul.outputs[0], w
    return x, float(eps.reshape(())), weight, out, nodes


def lower_norms(model, *, log=print) -> dict:
    """Rewrite every exported RMSNorm of one graph in place; returns counts and refusal reasons (by count)."""
    import onnx_ir as ir

    graph = model.graph
    counts = {"SimplifiedLayerNormalization": 0, "refused": {}}
    ones: dict[tuple, object] = {}
    for mean_node in [n for n in graph if n.op_type == "ReduceMean" and n.domain == ""]:
        if mean_node.graph is not graph:
            continue  # already removed by an earlier match
        try:
            x, eps, weight, out, nodes = _match(mean_node)
        except Refused as e:
            counts["refused"][str(e)] = counts["refused"].get(str(e), 0) + 1
            continue
        if weight is None:  # RMSNorm without weight (v_norm, vision/audio): a scale of ones is exact
            d = x.shape[-1]
            if not isinstance(d, int):
                counts["refused"]["no weight and a dynamic last axis"] = \
                    counts["refused"].get("no weight and a dynamic last axis", 0) + 1
                continue
            if d not in ones:
                t = ir.tensor(np.ones(d, np.float32), name=f"ort_lower_norm_ones_{d}")
                v = ir.Value(name=t.name, type=ir.TensorType(t.dtype), shape=ir.Shape(t.shape), const_value=t)
                graph.register_initializer(v)
                ones[d] = v
            weight = ones[d]
        sln = ir.node("SimplifiedLayerNormalization", [x, weight],
                      attributes={"axis": -1, "epsilon": eps, "stash_type": 1},
                      name=f"ort_lower_rmsnorm_{counts['SimplifiedLayerNormalization']}")
        graph.insert_before(nodes[-1], sln)
        name = out.name
        sln.outputs[0].shape, sln.outputs[0].type = out.shape, out.type
        out.replace_all_uses_with(sln.outputs[0], replace_graph_outputs=True)
        out.name, sln.outputs[0].name = f"{name}__lowered", name
        graph.remove(list(reversed(nodes)), safe=True)
        counts["SimplifiedLayerNormalization"] += 1
    return counts
