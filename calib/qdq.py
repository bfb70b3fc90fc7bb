"""Explicit Q/DQ: quantized weights and activation QuantizeLinear/DequantizeLinear pairs around each Linear.

What a Linear becomes (W8A8 INT8 or FP8 E4M3), in the only forms TensorRT takes precision from:

    x -> QuantizeLinear(scale_x, zp 0) -> DequantizeLinear(scale_x, zp 0) --\\
                                                                             MatMul -> y
    W_q (int8 / float8e4m3fn, (in, out)) -> DequantizeLinear(scale_w[out], zp 0, axis=1) --/

* activations: one static per-tensor scale ``amax / qmax`` (qmax 127 for INT8, 448 for FP8), from the calibration
  statistics (max, or a percentile), after SmoothQuant when it was applied; Linears sharing an input share one pair;
* weights: symmetric per output channel, ``scale = max|W_row| / qmax`` (a row of zeros gets scale 1), stored
  already quantized and transposed to (in, out), so the MatMul needs no Transpose; INT8 uses [-127, 127];
* zero points are explicit zeros of the quantized type (INT8 or FLOAT8E4M3FN), which also fixes Q's output type.

Weights are quantized lazily when the graph is saved, one tensor at a time.  The pass only touches the Linears it
is given; `calib.calibrate` decides which (decoder projections by default).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from exporter.linears import Linear, drop_unused_weights

__all__ = ["PRECISIONS", "Precision", "activation_scales", "quantize_graph", "quantized_weight", "weight_scales"]


@dataclass(frozen=True)
class Precision:
    name: str
    qmax: float
    onnx_type: str  # onnx_ir.DataType member name

    def ir_type(self):
        import onnx_ir as ir

        return getattr(ir.DataType, self.onnx_type)

    def numpy_type(self):
        if self.name == "int8":
            return np.int8
        import ml_dtypes

        return ml_dtypes.float8_e4m3fn

    def quantize(self, x: np.ndarray, scale) -> np.ndarray:
        y = np.asarray(x, np.float32) / scale
        if self.name == "int8":
            return np.clip(np.rint(y), -self.qmax, self.qmax).astype(np.int8)
        return np.clip(y, -self.qmax, self.qmax).astype(self.numpy_type())


PRECISIONS = {"int8": Precision("int8", 127.0, "INT8"), "fp8": Precision("fp8", 448.0, "FLOAT8E4M3FN")}


def activation_scales(stats, modules: list[str], precision: Precision, *, smooth=None, percentile: float | None = None):
    """module -> per-tensor activation scale.  With SmoothQuant the per-tensor amax is that of X/s, exact from
    the per-channel absmax; a percentile is carried over as its ratio to the unsmoothed amax."""
    scales = {}
    for m in modules:
        st = stats.tensors.get(m)
        if st is None:
            raise ValueError(f"no calibration statistics for {m}: no calibration prompt reached it (add prompts "
                             f"with images/audio, or leave that part in high precision)")
        s = smooth.factor_of(m) if smooth is not None else None
        amax = float((st.absmax / s).max()) if s is not None else st.amax
        if percentile is not None:
            amax *= st.percentile(percentile) / st.amax if st.amax > 0 else 1.0
        scales[m] = max(amax, 1e-8) / precision.qmax
    return scales


def _row_blocks(lin: Linear):
    """The Linear's (out, in) weight as float32 blocks of output rows.  A weight streamed from a checkpoint in row
    blocks (`exporter.stream.lazy_tensor`: the 12B's tied 262144 x 3840 LM head) is never held whole in fp32."""
    t = lin.weight.const_value
    if lin.out_in and hasattr(t, "iter_blocks"):
        for b in t.iter_blocks():
            b = np.asarray(b, np.float32)
            yield b.reshape(-1, b.shape[-1])
    else:
        yield lin.weight_out_in()


def weight_scales(lin: Linear, precision: Precision) -> np.ndarray:
    """Per output channel scale of the Linear's (possibly smoothed) weight."""
    rows = np.concatenate([np.abs(b).max(axis=1) for b in _row_blocks(lin)])
    return np.where(rows > 0, rows / precision.qmax, 1.0).astype(np.float32)


def quantized_weight(lin: Linear, ws: np.ndarray, precision: Precision, *, out_in: bool) -> np.ndarray:
    """The weight quantized with per-output-channel scales ``ws``, laid out (out, in) or (in, out), filled one block
    of output rows at a time."""
    blocks = _row_blocks(lin)
    first = next(blocks)
    in_f = first.shape[1]
    q = np.empty((len(ws), in_f) if out_in else (in_f, len(ws)), precision.numpy_type())
    start = 0
    for b in itertools.chain([first], blocks):  # one block in memory at a time
        qb = precision.quantize(b, ws[start:start + len(b), None])
        if out_in:
            q[start:start + len(b)] = qb
        else:
            q[:, start:start + len(b)] = qb.T
        start += len(b)
    if start != len(ws):
        raise ValueError(f"{lin.module}: the weight has {start} output channels, its scales {len(ws)}")
    return q


def _const(ir, name: str, array: np.ndarray):
    return ir.Value(name=name, const_value=ir.tensor(array, name=name))


def _zero(precision: Precision, shape=()):
    return np.zeros(shape, dtype=precision.numpy_type())


def quantize_graph(model, linears: dict[str, Linear], act_scales: dict[str, float], w_scales: dict[str, np.ndarray],
                   precision: Precision) -> dict[str, int]:
    """Insert Q/DQ for the Linears in ``act_scales`` that this graph has.  Returns counts of what changed."""
    import onnx_ir as ir

    graph = model.graph
    counts = {"linears": 0, "activation_qdq": 0, "weights": 0}
    act_pairs: dict[tuple[str, float], object] = {}
    for module, a_scale in act_scales.items():
        lin = linears.get(module)
        if lin is None:
            continue
        node, act = lin.node, lin.activation
        # activation: one Q/DQ pair per (input, scale)
        key = (act.name, float(a_scale))
        if key not in act_pairs:
            tag = f"{module}.input"
            scale_v = _const(ir, f"{tag}.scale", np.array(a_scale, np.float32))
            zp_v = _const(ir, f"{tag}.zero_point", _zero(precision))
            graph.register_initializer(scale_v)
            graph.register_initializer(zp_v)
            q = ir.node("QuantizeLinear", [act, scale_v, zp_v], name=f"{tag}.quantize")
            q.outputs[0].name = f"{tag}.q"
            dq = ir.node("DequantizeLinear", [q.outputs[0], scale_v, zp_v], name=f"{tag}.dequantize")
            dq.outputs[0].name = f"{tag}.dq"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = act.shape
            _same_scope(node, q, dq)  # the plugin rewrites read module paths: Q/DQ belong to their Linear
            graph.insert_before(node, [q, dq])
            act_pairs[key] = dq.outputs[0]
            counts["activation_qdq"] += 1
        node.replace_input_with(0, act_pairs[key])
        # weight: quantized initializer + DequantizeLinear along the output axis
        ws = w_scales[module]
        keep_out_in = node.op_type == "Gemm" and lin.out_in  # Gemm(transB=1) takes (out, in) as it is
        old = lin.weight.const_value
        out_f, in_f = len(ws), (old.shape[1] if lin.out_in else old.shape[0])
        shape = (out_f, in_f) if keep_out_in else (in_f, out_f)

        def make(lin=lin, ws=ws, keep=keep_out_in):
            return ir.tensor(quantized_weight(lin, ws, precision, out_in=keep))

        w_name = f"{module}.weight_{precision.name}"
        wq = ir.Value(name=w_name, const_value=ir.LazyTensor(make, dtype=precision.ir_type(), shape=ir.Shape(shape), name=w_name))
        ws_v = _const(ir, f"{module}.weight_scale", ws)
        wzp_v = _const(ir, f"{module}.weight_zero_point", _zero(precision, (out_f,)))
        for v in (wq, ws_v, wzp_v):
            graph.register_initializer(v)
        wdq = ir.node("DequantizeLinear", [wq, ws_v, wzp_v], attributes={"axis": 0 if keep_out_in else 1},
                      name=f"{module}.weight_dequantize")
        wdq.outputs[0].name = f"{module}.weight_dq"
        wdq.outputs[0].dtype = ir.DataType.FLOAT
        _same_scope(node, wdq)
        graph.insert_before(node, [wdq])
        if node.op_type == "Gemm" and not keep_out_in:
            node.attributes["transB"] = ir.AttrInt64("transB", 0)
        node.replace_input_with(1, wdq.outputs[0])
        counts["weights"] += 1
        counts["linears"] += 1
    drop_unused_weights(graph)
    return counts


def _same_scope(src, *nodes) -> None:
    key = "pkg.torch.onnx.name_scopes"
    if key in src.metadata_props:
        for n in nodes:
            n.metadata_props[key] = src.metadata_props[key]
