"""ONNX Runtime lowering: a constant per-channel scale right after an RMSNorm folds into the norm's weight.

Pattern::

    y = Mul(SimplifiedLayerNormalization(x, w), k)      k a constant of shape (C,) or (), C = w's length

(same-type ``Cast``/``CastLike`` between the two are allowed and kept)

Check: ``k`` and ``w`` are constants used by these nodes only, the norm's output feeds only the ``Mul``, and the
norm's other outputs (mean, inverse std) are unused.  Rewrite: ``SimplifiedLayerNormalization(x, w * k)``, the
``Mul`` removed (its users read the norm).  Equal up to one float rounding of ``w * k``.

Where it applies: INT4 AWQ input scales that `calib.int4` had to keep as a ``Mul`` because the Linear's weight is
tied (the LM head shares the embedding's; the quantized LM head has its own copy, so at this stage the scale can go
into the final norm).  One kernel fewer per token, and the LM head then reads the norm's output as
onnxruntime-genai's does.  Does not touch a ``Mul`` whose constant or norm is shared, nor Q/DQ graphs' activation
quantizers (they sit between the norm and the Linear, so the pattern does not match).
"""

from __future__ import annotations

import numpy as np

from graphs.ort.softcap import _SAME_TYPE, _own_constant

__all__ = ["fold_scales_into_norms"]


def fold_scales_into_norms(model) -> int:
    """Apply the rewrite to every match in ``model`` (onnx_ir, in place); returns how many were folded."""
    import onnx_ir as ir

    graph = model.graph
    n = 0
    for norm in [x for x in graph if x.op_type == "SimplifiedLayerNormalization" and len(x.inputs) > 1]:
        if any(o.uses() for o in norm.outputs[1:]):
            continue
        v = norm.outputs[0]  # through same-type casts (the export's fp32 -> fp32 CastLike) to the Mul
        uses = list(v.uses())
        while (len(uses) == 1 and not v.is_graph_output() and uses[0].node.op_type in _SAME_TYPE
               and uses[0].idx == 0 and uses[0].node.outputs[0].dtype == v.dtype):
            v = uses[0].node.outputs[0]
            uses = list(v.uses())
        if len(uses) != 1 or v.is_graph_output():
            continue
        mul = uses[0].node
        if (mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2
                or mul.outputs[0].is_graph_output()):
            continue
        k_value = _own_constant(mul.inputs[1 - uses[0].idx])
        w_value = _own_constant(norm.inputs[1])
        if k_value is None or w_value is None:
            continue
        w, k = w_value.const_value.numpy(), k_value.const_value.numpy()
        if w.ndim != 1 or k.shape not in ((), (1,), (w.shape[0],)) or k.dtype != w.dtype:
            continue
        name = f"{w_value.name}.scale_folded"
        folded = ir.Value(name=name, shape=w_value.shape, type=w_value.type,
                          const_value=ir.tensor((w.astype(np.float64) * k.astype(np.float64)).astype(w.dtype),
                                                name=name))
        graph.register_initializer(folded)
        norm.replace_input_with(1, folded)
        graph.initializers.pop(w_value.name, None)
        ir.convenience.replace_all_uses_with(mul.outputs[0], v)
        graph.remove(mul, safe=True)
        graph.initializers.pop(k_value.name, None)
        n += 1
    return n
