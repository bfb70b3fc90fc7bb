"""ONNX Runtime lowering: exported RMSNorms -> one ``SimplifiedLayerNormalization`` kernel each.

Pattern (what torch.onnx exports for `exporter.model.RMSNorm` in fp32)::

    y = x * Pow(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1) + eps, -0.5)      [* weight]

Check: the exponents are 2 and -0.5, the mean is over the last axis only with keepdims, ``eps`` is a scalar constant,
``weight`` (when present) a 1-D constant as long as the last axis, and every intermediate value is used only inside
the pattern; otherwise the nodes stay and the reason is counted.
Rewrite: ``SimplifiedLayerNormalization(x, weight or ones, axis=-1, epsilon=eps, stash_type=1)`` (computed in
fp32: ``x / sqrt(mean(x^2) + eps) * weight``, the same math; it differs from the exported form by float rounding
only).  Norms on quantized graphs are matched the same way (Q/DQ nodes sit on the Linears' inputs, after the norm).

Then (`fuse_skip_norms`) a residual ``Add(a, b)`` of two same-shaped 3-D tensors whose sum feeds a
``SimplifiedLayerNormalization`` becomes one ``SkipSimplifiedLayerNormalization(a, b, weight)``: its output 0 is the
norm, output 3 the sum for the Add's other users (the next residual).  ONNX Runtime 1.32 does not do this on its own
for these graphs (its fusion wants shapes it cannot see here): two kernels fewer per decoder layer.  Before that,
Gemma 4's per-layer scale of the residual sum (``Mul(Add(h, SLN(y)), layer_scalar)``) moves into the norm weight and
a ``Mul`` on the residual (`scale_into_residual`), so the next norm reads the Add and fuses too.  Does not touch
anything else.
"""

from __future__ import annotations

import numpy as np

__all__ = ["fuse_skip_norms", "lower_norms", "scale_into_residual"]


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


def _same_3d(a, b) -> bool:
    """Both values are 3-D with equal shapes (symbolic dims by name): an Add without broadcasting."""
    if a.shape is None or b.shape is None or len(a.shape) != 3 or len(b.shape) != 3:
        return False
    return all(str(x) == str(y) and (isinstance(x, int) or getattr(x, "value", None)) for x, y in zip(a.shape, b.shape))


def _norm_behind(v):
    """The SimplifiedLayerNormalization making ``v`` (directly or through a float-to-float Cast/CastLike, as the
    exporter writes the norm's cast back to the input type) when each value on the way has that one use."""
    import onnx_ir as ir

    if v is None or len(list(v.uses())) != 1 or v.is_graph_output():
        return None
    p = v.producer()
    if p is not None and p.op_type in ("Cast", "CastLike") and p.inputs[0] is not None:
        src = p.inputs[0]
        if src.type is None or v.type is None or src.type.dtype != ir.DataType.FLOAT or v.type.dtype != src.type.dtype:
            return None
        return _norm_behind(src)
    return p if p is not None and p.op_type == "SimplifiedLayerNormalization" else None


def scale_into_residual(model) -> int:
    """Gemma 4's ``layer_scalar``: ``Mul(Add(h, SLN(y, w)), c) -> SLN`` (c a constant scalar or per-channel vector)
    becomes ``Add(Mul(h, c), SLN(y, w * c)) -> SLN``: the scale folded into the norm weight and carried by the
    residual, so the sum feeds the next norm directly and `fuse_skip_norms` makes it one Skip norm (one kernel
    fewer per decoder layer; the same products in another rounding order).  Only where the Add's sum and the
    SLN's output have no other user.  Returns how many."""
    import onnx_ir as ir

    graph = model.graph
    n = 0
    for mul in [x for x in graph if x.op_type == "Mul" and x.domain in ("", "ai.onnx")]:
        if mul.graph is not graph or len(mul.inputs) != 2:
            continue
        total, c = mul.inputs
        add = total.producer() if total is not None else None
        scale = _const(c)
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or scale is None:
            continue
        if scale.dtype != np.float32 or scale.ndim > 1 or len(list(total.uses())) != 1 or total.is_graph_output():
            continue
        if not any(u.op_type == "SimplifiedLayerNormalization" and u.inputs[0] is mul.outputs[0]
                   for u, _ in mul.outputs[0].uses()):
            continue
        a, b = add.inputs
        if not _same_3d(a, b):
            continue
        found = [(v, _norm_behind(v)) for v in (b, a)]
        v, norm = next(((v, nrm) for v, nrm in found if nrm is not None), (None, None))
        weight = _const(norm.inputs[1]) if norm is not None and len(norm.inputs) > 1 else None
        last = a.shape[-1] if a.shape is not None else None
        if weight is None or weight.ndim != 1 or not isinstance(last, int) or scale.size not in (1, last):
            continue
        other = a if v is b else b
        folded = (weight.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)
        name = f"ort_lower_scaled_norm_weight_{n}"
        w = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(folded.shape),
                     const_value=ir.tensor(folded, name=name))
        graph.register_initializer(w)
        norm.replace_input_with(1, w)
        scaled = ir.node("Mul", [other, c], name=f"ort_lower_residual_scale_{n}")
        graph.insert_before(add, scaled)
        scaled.outputs[0].shape, scaled.outputs[0].type = other.shape, other.type
        add.replace_input_with(0 if add.inputs[0] is other else 1, scaled.outputs[0])
        out = mul.outputs[0]
        name = out.name
        out.replace_all_uses_with(total, replace_graph_outputs=True)
        total.shape, total.type = out.shape, out.type
        graph.remove(mul, safe=True)
        total.name = name
        n += 1
    return n


def fuse_skip_norms(model, *, log=print) -> int:
    """``Add(a, b) -> SimplifiedLayerNormalization`` pairs -> ``SkipSimplifiedLayerNormalization``; returns how many
    (after `scale_into_residual`)."""
    import onnx_ir as ir

    graph = model.graph
    scale_into_residual(model)
    n = 0
    for norm in [x for x in graph if x.op_type == "SimplifiedLayerNormalization" and x.domain in ("", "ai.onnx")]:
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not graph:
            continue
        a, b = add.inputs
        axis = norm.attributes.get_int("axis", -1)
        if not _same_3d(a, b) or axis not in (-1, 2) or norm.attributes.get_int("stash_type", 1) != 1:
            continue
        if a.type != b.type or a.type is None or a.type.dtype != ir.DataType.FLOAT:
            continue
        total = add.outputs[0]
        others = [u for u, _ in total.uses() if u is not norm]
        if any(u.op_type == "SimplifiedLayerNormalization" and u.inputs[0] is total for u in others):
            continue  # two norms of one sum: leave both as they are
        eps = norm.attributes.get_float("epsilon", 1e-5)
        fused = ir.node("SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]], domain="com.microsoft",
                        attributes={"epsilon": eps}, num_outputs=4, name=f"ort_lower_skip_rmsnorm_{n}")
        graph.insert_before(norm, fused)
        y, s = fused.outputs[0], fused.outputs[3]
        y.shape, y.type = norm.outputs[0].shape, norm.outputs[0].type
        s.shape, s.type = total.shape, total.type
        for old, new in ((norm.outputs[0], y), (total, s)):
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name, new.name = f"{name}__lowered", name
        fused.outputs[1].name, fused.outputs[2].name = "", ""
        graph.remove([norm, add], safe=True)
        n += 1
    if n:
        model.opset_imports.setdefault("com.microsoft", 1)
    return n
