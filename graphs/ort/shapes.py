"""ONNX Runtime lowering: shape arguments computed at run time from dims a node already has become constants.

Pattern: the exporter writes each ``view``/``expand`` as ``Reshape(x, Concat(batch, seq, H, D))`` or
``Expand(x, Concat(batch, 1, hidden))`` with ``batch`` and ``seq`` taken from other tensors at run time
(``Shape -> Squeeze -> Reshape -> Concat``): ~11 kernels per call on the bench model, run by every decode step.
Check (from the graph's symbolic shapes): the shape argument is computed (not a constant); for ``Reshape`` the
input and output are rank >= 2, every output dim is a static int or the *same named* symbolic dim as the input's
dim at that position; for ``Expand`` every output dim is a static int or the input's own named dim at that
position.
Rewrite: the shape argument becomes a constant: ``0`` ("copy the input's dim"; ``allowzero`` set to 0, refused
where a static output dim is 0) for a Reshape,
``1`` (broadcast keeps the input's dim) for an Expand, the static ints as they are.  Exact: the same shapes.  The
nodes that computed the old argument are left without users and removed by the driver (`graphs.ort.lower`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["constant_shapes"]


def _dims(v) -> list | None:
    if v is None or v.shape is None:
        return None
    return list(v.shape)


def _named(d) -> str | None:
    value = getattr(d, "value", None)
    return value if isinstance(value, str) and value else None


def constant_shapes(model) -> int:
    """Rewrite in place; returns how many shape arguments became constants."""
    import onnx_ir as ir

    graph = model.graph
    n = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Reshape", "Expand") or len(node.inputs) != 2:
            continue
        x, shape = node.inputs
        if shape is None or ir.convenience.get_const_tensor(shape) is not None or shape.producer() is None:
            continue
        src, out = _dims(x), _dims(node.outputs[0])
        if src is None or out is None or len(out) < 2:
            continue
        target = []
        for i, d in enumerate(out):
            if isinstance(d, int):
                target.append(d)
            elif _named(d) and i < len(src) and _named(src[i]) == _named(d) and (
                    node.op_type == "Expand" or len(src) >= 2):
                target.append(0 if node.op_type == "Reshape" else 1)
            else:
                break
        else:
            if node.op_type == "Reshape" and 0 in [d for d in out if isinstance(d, int)]:
                continue  # a literal 0 dim would mean "copy" under allowzero 0
            if node.op_type == "Expand" and len(src) != len(out):
                continue
            name = f"ort_lower_shape_{n}"
            const = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(target)]),
                             const_value=ir.tensor(np.array(target, np.int64), name=name))
            graph.register_initializer(const)
            node.replace_input_with(1, const)
            if node.op_type == "Reshape":  # the exporter writes allowzero=1; 0 must mean "copy" now
                node.attributes["allowzero"] = ir.AttrInt64("allowzero", 0)
            n += 1
    return n
