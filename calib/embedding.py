"""The embedding table in fp16: ``Gather(table_fp16, ids) -> Cast(fp32)`` instead of ``Gather(table_fp32, ids)``.

Once the tied LM head is quantized (its own int8/int4 weights), the fp32 embedding table is read only by the token
Gather, and it is the largest tensor left in a quantized artifact (262144 x 3840 on the 12B: 4 GB in fp32).  Halving it
halves the artifact's biggest file and the memory a runtime that loads it whole spends on it.  The gathered rows are
the fp16-rounded table (relative error <= 2^-11, below the INT8/INT4 weight error of every Linear after it); the
``* sqrt(hidden)`` scaling and everything downstream stay fp32.  Plain ONNX (Gather on fp16 data, Cast): TensorRT and
ONNX Runtime both run it.  Used by `calib.calibrate` (quantized LM head) and `calib.sequential` (streamed INT4).

Not done here: a quantized (int8/int4) table; that is an ONNX Runtime-only op (``GatherBlockQuantized``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["EMBEDDING", "gather_fp16"]

EMBEDDING = "embed_tokens.weight"


def gather_fp16(model) -> int:
    """Every Gather of ``model`` (onnx_ir) reading an fp32 ``*embed_tokens.weight`` initializer reads an fp16 copy
    (``<name>_fp16``, computed when the graph is saved, block by block for a streamed table) and casts its rows to
    fp32.  The fp32 table is dropped when nothing else reads it.  Returns the number of Gathers rewritten."""
    import onnx_ir as ir

    from exporter.cast_precision import cast_output_to_float
    from exporter.linears import drop_unused_weights
    from exporter.stream import lazy_tensor

    graph = model.graph
    done = 0
    for node in list(graph):
        if node.op_type != "Gather":
            continue
        data = node.inputs[0]
        if data is None or not data.is_initializer() or not data.name.endswith(EMBEDDING):
            continue
        if data.dtype != ir.DataType.FLOAT:
            continue
        old = data.const_value
        shape = tuple(old.shape.numpy())

        def half(old=old):
            if hasattr(old, "iter_blocks"):
                return (np.asarray(b, np.float32).astype(np.float16) for b in old.iter_blocks())
            return iter([np.asarray(old.numpy(), np.float32).astype(np.float16)])

        name = data.name + "_fp16"
        v = ir.Value(name=name, const_value=lazy_tensor(half, ir.DataType.FLOAT16, shape, name=name))
        graph.register_initializer(v)
        node.replace_input_with(0, v)
        cast_output_to_float(graph, node, ir.DataType.FLOAT16, name=f"{node.name}.cast_fp32")
        done += 1
    drop_unused_weights(graph)
    return done
