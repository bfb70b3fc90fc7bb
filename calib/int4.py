"""INT4 weight-only (W4A16): symmetric block-wise 4-bit weights, activation-aware scales (AWQ) or round-to-nearest.

The weight-quantization pieces are pure functions over numpy arrays, one tensor at a time, so a checkpoint can be
quantized layer by layer without a graph (the 12B path):

* `quantize_int4_blockwise(w, block_size)` -> (packed uint8, scales): ``w`` is a Linear's weight pre-transposed to
  (in, out); blocks of ``block_size`` consecutive *input* channels per output column share one scale
  ``max|w_block| / 7``; values are ``clip(rint(w / scale), -8, 7)`` (so within [-7, 7]); scales have shape
  (ceil(in / block_size), out), the layout of ONNX ``DequantizeLinear(axis=0, block_size)``.  Packed two per byte,
  low nibble first, in the tensor's row-major order (ONNX INT4 and TensorRT's layout).
* `awq_search(w, x_stats, block_size)` -> `AwqResult`: per-input-channel factors ``s = x_absmean^alpha``
  (normalised to geometric mean 1 over max/min) with alpha from a grid, minimising the output error of
  ``X (W - Q(W s) / s)`` on the calibration activations (a sample of rows when given, else the diagonal
  approximation ``sum_j E[x_j^2] |dW_j|^2`` from per-channel second moments).  alpha = 0 is plain round-to-nearest,
  so the search is never worse than RTN on its objective.  The division by ``s`` of the activations is folded into
  the preceding RMSNorm weight (or up_proj's rows) the way SmoothQuant folds, or kept as a ``Mul`` where nothing
  can absorb it (o_proj).

Graph side (`quantize_graph_int4`): each quantized Linear becomes ``DequantizeLinear(W_int4 (in, out), scale
(in/bs, out), zero point int4 0, axis=0, block_size) -> MatMul``: the explicit form TensorRT takes for INT4
weight-only, and the one ONNX Runtime's QDQ optimizer fuses into ``MatMulNBits``.  Activations stay fp32 (no
activation Q/DQ).  Not done here: AWQ's per-block clipping search (``awq_clip``), asymmetric zero points (TensorRT
requires 0) and quantizing the embedding gather (the tied LM head can be quantized: ``--quantize lm_head``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from exporter.linears import Linear, drop_unused_weights

__all__ = [
    "AwqResult", "BLOCK_SIZES", "DEFAULT_BLOCK_SIZE", "awq_search", "dequantize_int4_blockwise", "int4_values", "pack_int4", "plan_int4",
    "quantize_int4_blockwise", "quantize_graph_int4", "unpack_int4", "weight_error",
]

QMAX = 7.0
BLOCK_SIZES = (16, 32, 64, 128, 256)
# With ONNX Runtime's MatMulNBits (accuracy level 4, AVX-512 VNNI) the bench INT4 engine decodes 1.4-1.6x faster at
# block 128 than at 32 at batch 1, 1.2-1.5x at batch 8 (bench/results/int4_block.json); the demo's INT4 accuracy
# holds (docs/quantization.md "Block size").  AWQ's and GPTQ's usual group size.
DEFAULT_BLOCK_SIZE = 128


def _blocks(k: int, block_size: int) -> int:
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}; expected a power of two >= 16 (e.g. 32, 64, 128)")
    return -(-k // block_size)


def _expand(scales: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """(nb, out) per-block scales -> (k, out) per-row scales."""
    return np.repeat(scales, block_size, axis=0)[:k]


def int4_values(w: np.ndarray, block_size: int, scales: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values in [-8, 7] of shape (in, out), float32 scales (ceil(in/bs), out)) of a (in, out) weight.

    ``scales`` given: quantize with them (e.g. from a clipping search); else ``max|w_block| / 7`` (a block of zeros
    gets scale 1)."""
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D (in, out) weight, got shape {w.shape}")
    k, n = w.shape
    nb = _blocks(k, block_size)
    if scales is None:
        pad = np.zeros((nb * block_size - k, n), np.float32)
        amax = np.abs(np.concatenate([w, pad])).reshape(nb, block_size, n).max(axis=1)
        scales = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    else:
        scales = np.asarray(scales, np.float32)
        if scales.shape != (nb, n) or not np.all(scales > 0):
            raise ValueError(f"scales of shape {scales.shape} for a ({k}, {n}) weight with block_size {block_size}: "
                             f"expected positive scales of shape ({nb}, {n})")
    q = np.clip(np.rint(w / _expand(scales, k, block_size)), -8, 7).astype(np.int8)
    return q, scales


def dequantize_int4_blockwise(q: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """float32 (in, out) weight from int4 values (int8 array) and (ceil(in/bs), out) scales."""
    return q.astype(np.float32) * _expand(np.asarray(scales, np.float32), q.shape[0], block_size)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Signed 4-bit values (an int array in [-8, 7]) -> uint8, two per byte, low nibble first, row-major order."""
    flat = np.asarray(q).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"values outside the int4 range [-8, 7]: min {flat.min()}, max {flat.max()}")
    nib = (flat & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `pack_int4`: int8 values of ``shape``."""
    p = np.asarray(packed, np.uint8).reshape(-1)
    count = int(np.prod(shape))
    if p.size != (count + 1) // 2:
        raise ValueError(f"{p.size} packed bytes for {count} int4 values; expected {(count + 1) // 2}")
    nib = np.empty(p.size * 2, np.uint8)
    nib[0::2], nib[1::2] = p & 0xF, p >> 4
    v = nib[:count].astype(np.int8)
    return np.where(v > 7, v - 16, v).astype(np.int8).reshape(shape)


def quantize_int4_blockwise(w: np.ndarray, block_size: int, scales_hint: np.ndarray | None = None):
    """(packed uint8, float32 scales (ceil(in/bs), out)) of a (in, out) weight; ``scales_hint`` as in `int4_values`."""
    q, scales = int4_values(w, block_size, scales_hint)
    return pack_int4(q), scales


def weight_error(w: np.ndarray, w_hat: np.ndarray, x_stats) -> float:
    """Output error of using ``w_hat`` for ``w`` (both (in, out)) on the calibration activations: mean squared
    ``x (w - w_hat)`` over the sampled rows ``x_stats.sample`` when present, else ``sum_j E[x_j^2] |dW_j|^2``."""
    d = np.asarray(w, np.float32) - np.asarray(w_hat, np.float32)
    sample = getattr(x_stats, "sample", None)
    if sample is not None and len(sample):
        y = np.asarray(sample, np.float32) @ d  # fp32 GEMM: the 12B's gate/up group is 128 x 3840 x 30720
        return float(np.mean(np.square(y, dtype=np.float64)))
    return float(np.asarray(x_stats.sqmean, np.float64) @ np.square(d, dtype=np.float64).sum(axis=1))


@dataclass(frozen=True)
class AwqResult:
    alpha: float
    factors: np.ndarray  # (in,) s: the weight's rows are multiplied by s, the activations divided by s
    loss: float  # calibration objective at alpha
    rtn_loss: float  # the same objective for plain round-to-nearest (alpha 0)


def awq_search(w: np.ndarray, x_stats, block_size: int, *, grid: int = 10) -> AwqResult:
    """Activation-aware per-input-channel factors for the (in, out) weight ``w`` (a group of Linears sharing one
    input: concatenate their weights along the output axis).  ``x_stats`` has ``absmean`` and ``sqmean`` (in,)
    and optionally ``sample`` (rows, in).  Tries alpha in {0, 1/grid, ..., (grid-1)/grid}."""
    w = np.asarray(w, np.float32)
    x_mean = np.maximum(np.asarray(x_stats.absmean, np.float64), 1e-8)
    if x_mean.shape != (w.shape[0],):
        raise ValueError(f"activation statistics for {x_mean.shape[0]} channels, weight has {w.shape[0]} inputs")
    best = None
    rtn = None
    for i in range(grid):
        alpha = i / grid
        s = np.power(x_mean, alpha)
        s = np.clip(s / np.sqrt(s.max() * s.min()), 1e-4, 1e4).astype(np.float32)
        q, scales = int4_values(w * s[:, None], block_size)
        w_hat = dequantize_int4_blockwise(q, scales, block_size) / s[:, None]
        loss = weight_error(w, w_hat, x_stats)
        if i == 0:
            rtn = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s)
    loss, alpha, s = best
    if alpha == 0.0:
        s = np.ones_like(s)
    return AwqResult(alpha, s, loss, rtn)


# ------------------------------------------------------------------------------------------------ graph
def _const(ir, name: str, array):
    return ir.Value(name=name, const_value=ir.tensor(array, name=name))


def _same_scope(src, *nodes) -> None:
    key = "pkg.torch.onnx.name_scopes"
    if key in src.metadata_props:
        for n in nodes:
            n.metadata_props[key] = src.metadata_props[key]


def quantize_graph_int4(model, linears: dict[str, Linear], modules: list[str], block_size: int,
                        input_factors: dict[str, np.ndarray] | None = None, *,
                        scales_cache: dict[str, np.ndarray] | None = None, on_module=None) -> dict[str, int]:
    """Replace the weights of ``modules`` (those this graph has) by int4 ``DequantizeLinear(axis=0, block_size)``.

    ``input_factors``: Linears whose activation must be divided by a per-channel factor in the graph (AWQ factors
    nothing upstream could absorb): a ``Mul`` by ``1/s`` is inserted before the MatMul, and the weight rows are
    multiplied by ``s`` before quantization.  Weights are quantized lazily when the graph is saved; their scales are
    computed now (one read of each weight), or taken from ``scales_cache`` (module -> scales, filled here: the
    second graph of a streamed export reuses the first one's).  ``on_module(module)`` is called after each."""
    import ml_dtypes
    import onnx_ir as ir

    graph = model.graph
    counts = {"linears": 0, "input_muls": 0}
    input_factors = input_factors or {}
    for module in modules:
        lin = linears.get(module)
        if lin is None:
            continue
        node = lin.node
        if node.op_type != "MatMul":
            raise ValueError(f"{module}: INT4 weight-only supports MatMul Linears, this one is a {node.op_type}")
        s = input_factors.get(module)
        if s is not None:
            inv = _const(ir, f"{module}.awq_input_scale", (1.0 / s).astype(np.float32))
            graph.register_initializer(inv)
            mul = ir.node("Mul", [lin.activation, inv], name=f"{module}.awq_mul")
            mul.outputs[0].name = f"{module}.awq_input"
            mul.outputs[0].dtype = ir.DataType.FLOAT
            mul.outputs[0].shape = lin.activation.shape
            _same_scope(node, mul)
            graph.insert_before(node, [mul])
            node.replace_input_with(0, mul.outputs[0])
            counts["input_muls"] += 1
        if scales_cache is not None and module in scales_cache:
            scales = scales_cache[module]
            out_f = scales.shape[1]
            in_f = (lin.weight.shape[1] if lin.out_in else lin.weight.shape[0])
        else:
            w_out_in = lin.weight_out_in()
            out_f, in_f = w_out_in.shape
            w_in_out = w_out_in.T if s is None else w_out_in.T * s[:, None]
            _, scales = int4_values(w_in_out, block_size)  # scales now (small); values lazily at save time
            del w_out_in, w_in_out
            if scales_cache is not None:
                scales_cache[module] = scales

        def make(lin=lin, s=s, scales=scales):
            w = lin.weight_out_in().T
            q, _ = int4_values(w if s is None else w * s[:, None], block_size, scales)
            return ir.tensor(np.ascontiguousarray(q).astype(ml_dtypes.int4))

        w_name = f"{module}.weight_int4"
        wq = ir.Value(name=w_name, const_value=ir.LazyTensor(make, dtype=ir.DataType.INT4,
                                                             shape=ir.Shape((in_f, out_f)), name=w_name))
        ws_v = _const(ir, f"{module}.weight_scale", scales)
        wzp_v = _const(ir, f"{module}.weight_zero_point", np.zeros(scales.shape, ml_dtypes.int4))
        for v in (wq, ws_v, wzp_v):
            graph.register_initializer(v)
        wdq = ir.node("DequantizeLinear", [wq, ws_v, wzp_v],
                      attributes={"axis": 0, "block_size": block_size}, name=f"{module}.weight_dequantize")
        wdq.outputs[0].name = f"{module}.weight_dq"
        wdq.outputs[0].dtype = ir.DataType.FLOAT
        _same_scope(node, wdq)
        graph.insert_before(node, [wdq])
        node.replace_input_with(1, wdq.outputs[0])
        counts["linears"] += 1
        if on_module is not None:
            on_module(module)
    drop_unused_weights(graph)
    return counts


def plan_int4(linears: dict[str, Linear], stats, modules: list[str], block_size: int, method: str = "awq", *,
              log=print):
    """AWQ factors for ``modules`` grouped by shared input.  Returns (`calib.smoothquant.SmoothPlan` of the groups
    whose factors fold into a norm or up_proj, {module: factors} kept as a Mul, {group: search summary})."""
    from calib.smoothquant import SmoothGroup, SmoothPlan, _fold_target

    if method not in ("awq", "rtn"):
        raise ValueError(f"INT4 method {method!r}; expected 'awq' or 'rtn'")
    plan, muls, summary = SmoothPlan(alpha=-1.0), {}, {}
    if method == "rtn":
        return plan, muls, summary
    by_input: dict[str, list[Linear]] = {}
    for m in modules:
        by_input.setdefault(linears[m].activation.name, []).append(linears[m])
    import time

    t0 = last = time.perf_counter()
    for i, group in enumerate(by_input.values()):
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            log(f"[calibrate] AWQ search: {i}/{len(by_input)} input groups ({last - t0:.0f} s)")
        names = [lin.module for lin in group]
        st = stats.tensors.get(names[0])
        if st is None:
            raise ValueError(f"no calibration statistics for {names[0]}: no calibration prompt reached it")
        if st.abssum is None:
            raise ValueError(f"the statistics for {names[0]} predate INT4 (no mean |x| or activation sample); "
                             "collect them again (drop --stats)")
        w = np.concatenate([lin.weight_out_in().T for lin in group], axis=1)  # (in, sum of outs)
        res = awq_search(w, st, block_size)
        summary[",".join(names)] = {"alpha": res.alpha, "loss": res.loss, "rtn_loss": res.rtn_loss}
        if res.alpha == 0.0:
            continue
        target = _fold_target(group, linears)
        if isinstance(target, str):
            muls.update({n: res.factors for n in names})
            plan.skipped.update({n: f"kept as a Mul: {target}" for n in names})
        else:
            plan.groups.append(SmoothGroup(names, target[0], target[2], res.factors))
    gain = [v["loss"] / v["rtn_loss"] for v in summary.values() if v["rtn_loss"] > 0]
    if gain:
        log(f"[calibrate] AWQ: {len(summary)} groups, output error {np.mean(gain):.3f}x RTN's on average "
            f"({len(plan.groups)} folded, {len({id(v) for v in muls.values()})} kept as Mul)")
    return plan, muls, summary
