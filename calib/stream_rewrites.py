"""What `calib.sequential` applies while the export streams a checkpoint's weights: the AWQ/SmoothQuant factors
folded into the weights (`FoldedWeights`) and the graph rewrites that quantize the Linears (`int4_rewrite`,
`w8a8_rewrite`), each weight quantized as it is saved.  The factors come from `calib.layerwise`; nothing here reads
activations.
"""

from __future__ import annotations

import numpy as np
import torch

from calib.layerwise import LayerPlan

__all__ = ["FoldedWeights", "int4_rewrite", "w8a8_rewrite"]


# ---------------------------------------------------------------------------------------------- folding
class FoldedWeights:
    """A weight source with AWQ factors applied as the tensors stream: norm weights / s, the Linears' input
    columns * s, up_proj's output rows / s (down_proj's factors).  Mul groups are left to the graph rewrite."""

    def __init__(self, source, plan: LayerPlan):
        self.inner, self.shapes, self.source = source, source.shapes, source.source
        self.col: dict[str, np.ndarray] = {}
        self.row: dict[str, np.ndarray] = {}
        self.vec: dict[str, np.ndarray] = {}
        for mods, (target, s) in plan.groups.items():
            if target is None:
                continue
            for m in mods:
                self.col[m + ".weight"] = s
            if target.endswith("up_proj.weight"):
                self.row[target] = s
            else:
                self.vec[target] = s

    def _apply(self, name: str, t: torch.Tensor, start: int = 0) -> torch.Tensor:
        if name in self.vec:
            t = t / torch.from_numpy(self.vec[name])
        if name in self.col:
            t = t * torch.from_numpy(self.col[name])[None, :]
        if name in self.row:
            t = t / torch.from_numpy(self.row[name][start:start + t.shape[0]])[:, None]
        return t

    def tensor(self, name: str) -> torch.Tensor:
        return self._apply(name, self.inner.tensor(name))

    def blocks(self, name: str):
        start = 0
        for b in self.inner.blocks(name):
            yield self._apply(name, b, start)
            start += b.shape[0] if b.dim() else 1


# ---------------------------------------------------------------------------------------------- graph rewrite
def int4_rewrite(plan: LayerPlan, block_size: int, *, lm_head: bool = True, embedding_fp16: bool = True):
    """A `exporter.stream.stream_graph` rewrite: decoder Linears (and the LM head) to block-wise INT4.  The
    weights' scales are computed once (one read of every weight, with a progress bar) and reused for the second
    graph."""
    cache: dict[str, np.ndarray] = {}

    def rewrite(model, source, progress) -> None:
        from calib.int4 import quantize_graph_int4
        from exporter.linears import LM_HEAD, find_linears, group_of
        from runtime.progress import Progress

        linears = find_linears(model)
        modules = [m for m in linears if group_of(m) == "decoder"]
        todo = sum(m not in cache for m in modules)
        with Progress(todo, "int4 weight scales", unit="Linears") as bar:
            quantize_graph_int4(model, linears, modules, block_size, plan.input_muls(), scales_cache=cache,
                                on_module=lambda m: bar.update(1 if todo else 0,
                                                               note=m.removeprefix("model.language_model.")))
        if lm_head and LM_HEAD in linears:
            _quantize_lm_head(model, linears[LM_HEAD], block_size)
        if embedding_fp16:
            from calib.embedding import gather_fp16

            gather_fp16(model)

    return rewrite


def w8a8_rewrite(plan: LayerPlan, stats, precision, quantize: tuple[str, ...], *, embedding_fp16: bool,
                 percentile: float | None = None, scales: dict | None = None):
    """A `exporter.stream.stream_graph` rewrite: the Linears of the ``quantize`` groups to W8A8 Q/DQ
    (`calib.qdq.quantize_graph`), activation scales from ``stats`` after the ``plan``'s SmoothQuant factors.  Weight
    scales are computed once (from the folded weights, block by block) and reused for the second graph; ``scales``,
    if given, receives the scales.json content."""
    cache: dict[str, np.ndarray] = {}

    def rewrite(model, source, progress) -> None:
        from exporter.linears import find_linears, group_of
        from calib.qdq import activation_scales, quantize_graph, weight_scales

        from runtime.progress import Progress

        linears = find_linears(model)
        modules = [m for m in linears if group_of(m) in quantize]
        a_scales = activation_scales(stats, modules, precision, smooth=plan, percentile=percentile)
        todo = [m for m in modules if m not in cache]
        with Progress(len(todo), f"{precision.name} weight scales", unit="Linears") as bar:
            for m in todo:  # reads every weight once (block by block, folded): minutes for the 12B
                cache[m] = weight_scales(linears[m], precision)
                bar.update(1, note=m.removeprefix("model.language_model."))
        quantize_graph(model, linears, a_scales, {m: cache[m] for m in modules}, precision)
        if embedding_fp16:
            from calib.embedding import gather_fp16

            gather_fp16(model)
        if scales is not None:
            scales.setdefault("activation_scale", {}).update(a_scales)
            scales.setdefault("weight_scale", {}).update({m: cache[m].tolist() for m in modules})

    return rewrite


def _quantize_lm_head(model, lin, block_size: int) -> None:
    """The tied LM head in the same INT4 form, quantized from the embedding's row blocks (each block of rows is a
    block of output columns, quantized independently), so the 262144 x 3840 table is never held in fp32: the
    int4 values (1 byte each while collected, 0.5 packed) and the small scales are all that is kept."""
    import ml_dtypes
    import onnx_ir as ir

    from calib.int4 import int4_values
    from exporter.linears import LM_HEAD

    emb = lin.weight.const_value  # (out, in) lazy block tensor of the embedding
    out_f, in_f = (int(d) for d in emb.shape.numpy())
    nb = -(-in_f // block_size)
    cache: dict = {}

    def compute():
        if "q" not in cache:
            q = np.empty((in_f, out_f), ml_dtypes.int4)
            scales = np.empty((nb, out_f), np.float32)
            start = 0
            blocks = emb.iter_blocks() if hasattr(emb, "iter_blocks") else iter([emb.numpy()])
            for rows in blocks:
                rows = np.asarray(rows, np.float32)
                qb, sb = int4_values(rows.T, block_size)
                q[:, start:start + len(rows)] = qb.astype(ml_dtypes.int4)
                scales[:, start:start + len(rows)] = sb
                start += len(rows)
            cache["q"], cache["scales"] = q, scales
        return cache["q"], cache["scales"]

    def make():
        q = compute()[0]
        cache.clear()  # the values are written once per graph; recomputed for the next one
        return ir.tensor(q)

    name = f"{LM_HEAD}.weight_int4"
    wq = ir.Value(name=name, const_value=ir.LazyTensor(make, dtype=ir.DataType.INT4, shape=ir.Shape((in_f, out_f)),
                                                       name=name))
    scales = compute()[1]  # one pass now for the scales (small); the values are recomputed when saved
    cache.pop("q", None)
    ws = ir.Value(name=f"{LM_HEAD}.weight_scale", const_value=ir.tensor(scales, name=f"{LM_HEAD}.weight_scale"))
    zp = ir.Value(name=f"{LM_HEAD}.weight_zero_point",
                  const_value=ir.tensor(np.zeros(scales.shape, ml_dtypes.int4), name=f"{LM_HEAD}.weight_zero_point"))
    graph = model.graph
    for v in (wq, ws, zp):
        graph.register_initializer(v)
    node = lin.node
    dq = ir.node("DequantizeLinear", [wq, ws, zp], attributes={"axis": 0, "block_size": block_size},
                 name=f"{LM_HEAD}.weight_dequantize")
    dq.outputs[0].name = f"{LM_HEAD}.weight_dq"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.metadata_props.update(node.metadata_props)
    graph.insert_before(node, [dq])
    node.replace_input_with(1, dq.outputs[0])
