"""ONNX Runtime (CPU) lowering of quantized Q/DQ graphs, applied by ``make build-engine`` before ORT's optimiser.

The artifact keeps the TensorRT-legal Q/DQ form; only the graph handed to ONNX Runtime changes:

* **INT8** (W8A8): each ``DQ(Q(x)) @ DequantizeLinear(int8 W (K, N), per-channel scale (N,), zero point 0)``
  becomes ``com.microsoft.MatMulNBits`` with ``bits=8`` reading the activation's DequantizeLinear output (the
  artifact's static fake quantization is kept, so the input is on the artifact's int8 grid), weights ``q + 128`` in
  its layout (N, K/bs, bs), the per-channel scale repeated over the K blocks (2-D (N, K/bs)) and no zero-point input
  (its default, 128, is our 0): the same dequantized weights.  ``accuracy_level`` 4 runs it on int8 dot products:
  the kernel re-quantizes its input per block of ``INT8_BLOCK_SIZE`` values with a scale of its own, which moves a
  value of the artifact's grid by at most half a step of that grid (the block's step is never coarser than the
  tensor's).  Linears sharing an input (q/k/v, gate/up) become one node and a ``Split``.  This is the kernel
  onnxruntime-genai's int8 models run; ORT's own QDQ fusion instead makes ``MatMulIntegerToFloat``, measured
  1.9x slower on the bench model's 262144 x 640 LM head (u8 x u8, 2 threads; 1.4x in its u8 x s8 mode, which also
  saturates int16 pair sums on x86 CPUs without VNNI).  Linears of another form are left to that fusion: each gets
  its own activation Q/DQ copy (`split_shared_activation_qdq`; ORT fuses a DQ with a single consumer only), ORT's
  CommonSubexpressionElimination is disabled so the copies survive, and ``session.x64quantprecision`` makes ORT
  store their weights as u8 and run the exact u8 x u8 kernel.  On a CPU where MatMulNBits' int8 path saturates
  (`runtime.ort_backend.int8_dot_products_exact` runs it on worst-case inputs; exact on AVX-512 VNNI and on AVX2
  without VNNI with ONNX Runtime 1.32) every Linear takes that fusion instead (``int8_kernel="auto"``); the engine
  record says which (``int8_kernel``) and the runtime refuses a MatMulNBits engine on such a CPU.
* **FP8**: CPUs have no FP8 arithmetic; ORT would dequantize every FP8 weight on every step.
  `fold_weight_dequantize` replaces each constant weight ``DequantizeLinear(W_fp8, scale)`` by its fp32 result
  (``float(W_fp8) * scale``, the same IEEE product ORT computes).  The activations' FP8 fake quantization
  (``QuantizeLinear -> DequantizeLinear`` to E4M3) is what a tensor core adds; on a CPU it is only cost (a scalar
  conversion per value and two kernels per Linear input: the bench model decoded at 0.89-0.92x and prefilled at
  0.7-0.75x our fp32), so by default (``fp8_activations="fp32"``) `drop_activation_qdq` removes it and the CPU
  engine is the fp32 graph on the FP8 weights: fp32 speed, weight rounding only (closer to fp32 than the
  artifact).  ``fp8_activations="qdq"`` keeps it: the artifact's numbers (TensorRT's arithmetic) on the CPU.  The
  accuracy report of `make calibrate` and `make check-quant` run the artifact's Q/DQ graphs, not this engine.
* **INT4** (W4A16): `matmul_nbits` turns each ``DequantizeLinear(int4 W (K, N), scale, zero point 0, axis 0,
  block_size) -> MatMul`` (the LM head too) into ``MatMulNBits`` itself, with the weights in its layout (N, K/bs,
  bs/2) as unsigned nibbles ``q + 8``, 2-D scales (N, K/bs) and *no* zero-point input (its default, 8, is our 0).
  ORT's own QDQ fusion makes the same node with an explicit zero-point tensor and 1-D scales, whose kernel is slower
  (bench model, 2 threads: decode 1.12x slower; the 262144 x 640 LM head alone 1.06x for the zero points and
  1.07-1.10x for the 1-D scales).  Same numbers: the dequantized weights are identical.  Linears sharing an input
  (q/k/v, gate/up) become one node and a ``Split``.  Accuracy level `ORT_INT4_ACCURACY_LEVEL`.

Works on the graph proto without loading its weights; folded FP8 weights are written to a temporary data file
beside the ORT build.  Does not touch fp32 graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "INT8_ACCURACY_LEVEL", "INT8_BLOCK_SIZE", "INT8_KERNELS", "ORT_INT4_ACCURACY_LEVEL", "ORT_INT8_EXACT",
    "auto_int8_kernel", "drop_activation_qdq",
    "fold_weight_dequantize",
    "fuse_shared_input_matmuls", "lower_quantized_for_ort", "matmul_nbits", "split_shared_activation_qdq",
]

# MatMulNBits accuracy level for INT4: 4 = int8 activations inside the kernel (block-wise dynamic quantization).
# Measured on the 225 M bench model and the demo (README, INT4 section): see `lower_quantized_for_ort`.
ORT_INT4_ACCURACY_LEVEL = 4
# INT8: ORT's precision mode for x86 without VNNI (u8 x u8 integer matmuls, no int16 saturation), for Linears left to
# ORT's QDQ fusion: see the docstring
ORT_INT8_EXACT = "session.x64quantprecision"
# INT8 as 8-bit MatMulNBits: int8 compute; the K block its input is re-quantized in (a power of two dividing K is
# taken, at most this).  Bench model's LM head (262144 x 640, 2 threads): block 128 1.35x faster than 32
INT8_ACCURACY_LEVEL = 4
INT8_BLOCK_SIZE = 128


def _consumers(graph) -> dict[str, list]:
    uses: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                uses.setdefault(name, []).append(node)
    return uses


def split_shared_activation_qdq(proto) -> int:
    """Give every consumer of a shared activation ``QuantizeLinear -> DequantizeLinear`` pair its own copy.
    Returns the number of copies made.  Edits ``proto`` (an onnx ModelProto) in place."""
    import onnx

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    uses = _consumers(graph)
    made = 0
    new_nodes = []
    for node in graph.node:
        new_nodes.append(node)
        if node.op_type != "DequantizeLinear" or node.input[0] not in producer:
            continue
        q = producer[node.input[0]]
        users = uses.get(node.output[0], [])
        if q.op_type != "QuantizeLinear" or len(users) < 2 or len(uses.get(q.output[0], [])) != 1:
            continue
        for i, user in enumerate(users[1:], start=1):
            q_out, dq_out = f"{q.output[0]}.split{i}", f"{node.output[0]}.split{i}"
            q2 = onnx.helper.make_node("QuantizeLinear", list(q.input), [q_out], name=f"{q.name}.split{i}")
            q2.attribute.extend(q.attribute)
            dq2 = onnx.helper.make_node("DequantizeLinear", [q_out, *node.input[1:]], [dq_out],
                                        name=f"{node.name}.split{i}")
            dq2.attribute.extend(node.attribute)
            for k, name in enumerate(user.input):
                if name == node.output[0]:
                    user.input[k] = dq_out
            new_nodes += [q2, dq2]
            made += 1
    if made:
        del graph.node[:]
        graph.node.extend(new_nodes)
    return made


def _read_initializer(tensor, base: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        t = onnx.TensorProto()
        t.CopyFrom(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(t, str(base))
        return numpy_helper.to_array(t)
    return numpy_helper.to_array(tensor)


def _used_names(graph) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (If/Loop bodies read outer initializers)."""
    import onnx

    used = set()
    for node in graph.node:
        used.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used |= _used_names(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    used |= _used_names(g)
    return used


def _set_nodes(graph, nodes: list, initializers: list) -> None:
    """Replace ``graph``'s nodes, add ``initializers`` and drop the initializers nothing uses any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(initializers)
    used = _used_names(graph)
    outputs = {o.name for o in graph.output}
    for t in list(graph.initializer):
        if t.name not in used and t.name not in outputs:
            graph.initializer.remove(t)


class _ExternalData:
    """Tensors written one after another into ``path`` as external data (location stored relative to ``base``, the
    directory the graph's external data is read from); ``tensors``: the TensorProtos made."""

    def __init__(self, path: Path, base: Path):
        self.path, self.base, self.offset, self.tensors = Path(path), Path(base), 0, []
        self._f = open(self.path, "wb")

    def add(self, name: str, array: np.ndarray, dtype: int) -> str:
        import onnx

        raw = np.ascontiguousarray(array).tobytes()
        self._f.write(raw)
        t = onnx.TensorProto(name=name, data_type=dtype, dims=list(array.shape))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, v in (("location", self.path.relative_to(self.base).as_posix()), ("offset", str(self.offset)),
                       ("length", str(len(raw)))):
            t.external_data.add(key=key, value=v)
        self.offset += len(raw)
        self.tensors.append(t)
        return name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _replace_groups(graph, made: dict[str, list], replaced: set[str], initializers: list) -> None:
    """Each node whose first output is a key of ``made`` -> those nodes; nodes whose first output is in
    ``replaced`` dropped; ``initializers`` added (`_set_nodes`)."""
    new_nodes = []
    for node in graph.node:
        if node.output and node.output[0] in made:
            new_nodes += made[node.output[0]]
        elif not (node.output and node.output[0] in replaced):
            new_nodes.append(node)
    _set_nodes(graph, new_nodes, initializers)


def drop_activation_qdq(proto, types=("FLOAT8E4M3FN",)) -> int:
    """Remove every ``QuantizeLinear(x) -> DequantizeLinear`` pair whose quantized type is one of ``types`` (the
    zero point's type): the DequantizeLinear's users read ``x``.  Returns the pairs removed."""
    import onnx

    graph = proto.graph
    kinds = {getattr(onnx.TensorProto, t) for t in types}
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses = _consumers(graph)
    bypass, drop = {}, set()
    for dq in graph.node:
        q = producer.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or inits.get(q.input[2]) is None:
            continue
        if inits[q.input[2]].data_type not in kinds or any(u is not dq for u in uses.get(q.output[0], [])):
            continue
        bypass[dq.output[0]] = q.input[0]
        drop.update((id(q), id(dq)))
    if not bypass:
        return 0
    outputs = {o.name for o in graph.output}
    if outputs & set(bypass):
        raise ValueError(f"activation Q/DQ pairs feeding graph outputs {sorted(outputs & set(bypass))}: not removed")
    kept = [n for n in graph.node if id(n) not in drop]
    for n in kept:
        n.input[:] = [bypass.get(i, i) for i in n.input]
    _set_nodes(graph, kept, [])
    return len(bypass)


def fold_weight_dequantize(proto, base: Path, data_file: Path, *, types=("FLOAT8E4M3FN",)) -> int:
    """Replace ``DequantizeLinear(constant W of one of ``types``, constant scale)`` by an fp32 initializer holding its
    result, written to ``data_file`` (external data; its location is stored relative to ``base``, the directory the
    graph's external data is read from).  Returns the number of weights folded."""
    import onnx

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    kinds = {getattr(onnx.TensorProto, t) for t in types}
    folded, keep = 0, []
    data_file = Path(data_file)
    with _ExternalData(data_file, base) as out:
        for node in graph.node:
            w = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if w is None or w.data_type not in kinds or any(n not in inits for n in node.input[1:] if n):
                keep.append(node)
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if any(a.name == "block_size" and a.i for a in node.attribute):
                keep.append(node)
                continue
            q = _read_initializer(w, base).astype(np.float32)
            scale = _read_initializer(inits[node.input[1]], base).astype(np.float32)
            if scale.ndim == 1:
                shape = [1] * q.ndim
                shape[axis % q.ndim] = -1
                scale = scale.reshape(shape)
            # DequantizeLinear with zero point 0
            out.add(node.output[0], np.ascontiguousarray(q * scale, dtype=np.float32), onnx.TensorProto.FLOAT)
            folded += 1
    if folded:
        _set_nodes(graph, keep, out.tensors)
    else:
        data_file.unlink()
    return folded


def _pack_nbits(q: np.ndarray, block_size: int) -> np.ndarray:
    """int4 values (K, N) in [-8, 7] -> MatMulNBits' B: uint8 (N, ceil(K / bs), bs / 2), nibbles ``q + 8``, the
    lower k in the low nibble; K padded with 0 values (nibble 8) to whole blocks."""
    u = _blocks(q, block_size, 8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def _blocks(q: np.ndarray, block_size: int, offset: int) -> np.ndarray:
    """int values (K, N) -> uint8 (N, ceil(K / bs), bs) holding ``q + offset``, K padded with 0 values."""
    k, n = q.shape
    nb = -(-k // block_size)
    u = np.full((nb * block_size, n), offset, np.uint8)
    u[:k] = (q.astype(np.int16) + offset).astype(np.uint8)
    return np.ascontiguousarray(u.T).reshape(n, nb, block_size)


def int8_block_size(k: int) -> int:
    """The K block of an 8-bit MatMulNBits: the largest power of two <= INT8_BLOCK_SIZE (>= 16) dividing ``k``; 16
    where none does (K then padded with zeros)."""
    bs = INT8_BLOCK_SIZE
    while bs > 16 and k % bs:
        bs //= 2
    return bs


def _nbits_form(dq, w, inits: dict, base: Path) -> tuple[int, int] | None:
    """(bits, block size) of a weight ``DequantizeLinear`` MatMulNBits can take as it is, else None: int4 with
    ``block_size`` along K (axis 0, scales (K/bs, N)) or int8 per output channel (axis 1, scales (N,)); constant
    inputs, zero point absent or 0."""
    import onnx

    attrs = {a.name: a.i for a in dq.attribute}
    if w is None or len(w.dims) != 2 or any(i not in inits for i in dq.input[1:] if i):
        return None
    if len(dq.input) > 2 and dq.input[2] and _read_initializer(inits[dq.input[2]], base).astype(np.int16).any():
        return None  # a non-zero zero point: left to ORT's own fusion
    if w.data_type == onnx.TensorProto.INT4 and attrs.get("axis") == 0 and attrs.get("block_size"):
        return 4, attrs["block_size"]
    scale = inits[dq.input[1]]
    if (w.data_type == onnx.TensorProto.INT8 and attrs.get("axis", 1) % 2 == 1 and not attrs.get("block_size")
            and list(scale.dims) == [w.dims[1]]):
        return 8, int8_block_size(int(w.dims[0]))
    return None


def matmul_nbits(proto, base: Path, data_file: Path, *, accuracy_level: int = ORT_INT4_ACCURACY_LEVEL,
                 int8_accuracy_level: int = INT8_ACCURACY_LEVEL, bits: tuple[int, ...] = (4, 8),
                 fuse: bool = True, widest_only: bool = False) -> dict[str, int]:
    """Replace every ``MatMul(x, DequantizeLinear(W))`` whose DequantizeLinear has that MatMul as its only user and
    whose W is int4 (K, N) with ``block_size`` along K (scale (K/bs, N), axis 0) or int8 (K, N) per output channel
    (scale (N,), axis 1), zero point 0, by a ``com.microsoft.MatMulNBits`` without zero points, its weights written
    to ``data_file`` (location relative to ``base``); ``bits`` says which of the two.  ``fuse``: MatMuls reading the
    same input (q/k/v, gate/up) become one MatMulNBits over their concatenated weights and a ``Split`` of its output
    (one kernel call and one activation quantization instead of two or three).  ``widest_only``: only the Linear(s)
    with the most outputs (the LM head).  Returns {"linears": replaced, "nodes": made}."""
    import onnx

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: nd for nd in graph.node for o in nd.output}
    uses = _consumers(graph)
    # pass 1: which MatMuls qualify (no weights read yet), grouped by (input, bits, block size)
    found: dict[tuple[str, int, int], list] = {}
    for node in graph.node:
        dq = producer.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(uses.get(dq.output[0], [])) != 1:
            continue
        w = inits.get(dq.input[0])
        form = _nbits_form(dq, w, inits, base)
        if form is None or form[0] not in bits:
            continue
        key = (node.input[0] if fuse else node.output[0], *form)
        found.setdefault(key, []).append((node, dq, w))
    if widest_only and found:
        widest = max(int(w.dims[1]) for group in found.values() for _, _, w in group)
        found = {key: kept for key, group in found.items()
                 if (kept := [m for m in group if int(m[2].dims[1]) == widest])}
    if not found:
        return {"linears": 0, "nodes": 0}
    # pass 2: one group at a time (the 12B's weights are never all in memory)
    made = {}  # output of the group's first MatMul -> nodes replacing the group
    replaced: set[str] = set()  # outputs of the MatMuls and DequantizeLinears replaced
    with _ExternalData(data_file, base) as out_data:
        for (x, nbits, bs), group in found.items():
            packed, scales, widths = [], [], []
            for node, dq, w in group:
                q = _read_initializer(w, base).astype(np.int8)  # (K, N)
                scale = _read_initializer(inits[dq.input[1]], base).astype(np.float32)
                if nbits == 4:
                    packed.append(_pack_nbits(q, bs))
                    scales.append(np.ascontiguousarray(scale.T))  # (N, K/bs)
                else:  # the channel's scale in each of its K blocks; unsigned q + 128 (the default zero point)
                    packed.append(_blocks(q, bs, 128))
                    scales.append(np.repeat(scale[:, None], packed[-1].shape[1], axis=1))
                widths.append(q.shape[1])
                replaced.update((node.output[0], dq.output[0]))
            k, first = int(group[0][2].dims[0]), group[0][0]
            tag = f"{group[0][2].name}.nbits" + (f"_x{len(group)}" if len(group) > 1 else "")
            b = out_data.add(f"{tag}.B", np.concatenate(packed), onnx.TensorProto.UINT8)  # (N total, K/bs, bs * bits / 8)
            # 2-D (N total, K/bs): with the same values flattened to 1-D, as ORT's own fusion writes them, the
            # kernel ran the 262144 x 640 LM head 1.07-1.10x slower (interleaved single-node runs, 2 threads)
            sc = out_data.add(f"{tag}.scales", np.concatenate(scales), onnx.TensorProto.FLOAT)
            out = first.output[0] if len(group) == 1 else f"{tag}.out"
            nodes = [onnx.helper.make_node(
                "MatMulNBits", [x, b, sc], [out], name=f"{first.name}.nbits", domain="com.microsoft",
                K=k, N=sum(widths), bits=nbits, block_size=bs,
                accuracy_level=accuracy_level if nbits == 4 else int8_accuracy_level)]
            if len(group) > 1:
                split = onnx.numpy_helper.from_array(np.array(widths, np.int64), f"{tag}.split")
                graph.initializer.append(split)
                nodes.append(onnx.helper.make_node("Split", [out, split.name], [nd.output[0] for nd, _, _ in group],
                                                   name=f"{first.name}.nbits_split", axis=-1))
            made[first.output[0]] = nodes
    _replace_groups(graph, made, replaced, out_data.tensors)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return {"linears": sum(len(g) for g in found.values()), "nodes": len(found)}


def fuse_shared_input_matmuls(proto, base: Path, data_file: Path) -> dict[str, int]:
    """fp32 Linears reading the same input (q/k/v, gate/up): ``MatMul(x, W_i)`` with 2-D fp32 initializers (K, N_i)
    of the same K used by nothing else, or ``Transpose`` of (N_i, K) ones (the exporter's form) -> one ``MatMul(x, concat(W_i))`` and a ``Split`` (one larger GEMV: the bench
    model's 640 x 2048 gate/up projections ran at ~22 GB/s against ~27 GB/s for its large LM head).  Each output is
    the same dot product over K.  The concatenated weights go to ``data_file`` (location relative to ``base``), one
    group at a time.  Returns {"linears": fused, "nodes": made}."""
    import onnx

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses = _consumers(graph)
    found: dict[tuple[str, int], list] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        w, tr = inits.get(node.input[1]), None
        if w is None and node.input[1] in producer:  # the exporter's form: MatMul(x, Transpose(W (out, in)))
            tr = producer[node.input[1]]
            perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
            w = inits.get(tr.input[0]) if tr.op_type == "Transpose" and perm == [1, 0] else None
            if w is not None and len(uses.get(tr.output[0], [])) != 1:
                w = None
        if (w is None or w.data_type != onnx.TensorProto.FLOAT or len(w.dims) != 2
                or len(uses.get(w.name, [])) != 1):
            continue
        k = int(w.dims[1] if tr is not None else w.dims[0])
        found.setdefault((node.input[0], k), []).append((node, w, tr))
    groups = [g for g in found.values() if len(g) > 1]
    if not groups:
        return {"linears": 0, "nodes": 0}
    made, replaced, splits = {}, set(), []
    with _ExternalData(data_file, base) as out:
        for group in groups:
            w = np.concatenate([_read_initializer(t, base).astype(np.float32).T if tr is not None
                                else _read_initializer(t, base).astype(np.float32) for _, t, tr in group], axis=1)
            first = group[0][0]
            tag = out.add(f"{group[0][1].name}.fused_x{len(group)}", w, onnx.TensorProto.FLOAT)
            widths = [int(t_.dims[0] if tr is not None else t_.dims[1]) for _, t_, tr in group]
            split = onnx.numpy_helper.from_array(np.array(widths, np.int64), f"{tag}.split")
            splits.append(split)
            made[first.output[0]] = [
                onnx.helper.make_node("MatMul", [first.input[0], tag], [f"{tag}.out"], name=f"{first.name}.fused"),
                onnx.helper.make_node("Split", [f"{tag}.out", split.name], [nd.output[0] for nd, _, _ in group],
                                      name=f"{first.name}.fused_split", axis=-1)]
            replaced.update(nd.output[0] for nd, _, _ in group)
            replaced.update(tr.output[0] for _, _, tr in group if tr is not None)
    _replace_groups(graph, made, replaced, out.tensors + splits)
    return {"linears": sum(len(g) for g in groups), "nodes": len(groups)}


# INT8 forms on ONNX Runtime: every Linear as 8-bit MatMulNBits; every Linear as ORT's MatMulIntegerToFloat; "mixed":
# the LM head as MatMulNBits (the widest GEMV, M = 1 per sequence at every call), the rest MatMulIntegerToFloat
INT8_KERNELS = ("MatMulNBits", "MatMulIntegerToFloat", "mixed")


def auto_int8_kernel() -> str:
    """The INT8 form build-engine takes on this CPU: ``MatMulNBits`` with VNNI (fastest at decode and prefill there,
    README INT8); ``mixed`` where 8-bit MatMulNBits is exact without VNNI (AVX2: MatMulNBits decoded 1.19x genai
    int8 against 1.10x, but prefilled 1.05-1.35x slower than our fp32 at M > 1, so only the LM head takes it);
    ``MatMulIntegerToFloat`` where MatMulNBits saturates (`runtime.ort_backend.int8_dot_products_exact`)."""
    from runtime.ort_backend import cpu_has_vnni, int8_dot_products_exact

    if not int8_dot_products_exact():
        return "MatMulIntegerToFloat"
    return "MatMulNBits" if cpu_has_vnni() else "mixed"


def lower_quantized_for_ort(src: Path, precision: str, stage: Path, *, int8_kernel: str = "auto",
                            fp8_activations: str = "fp32", log=print):
    """What ONNX Runtime should load to optimise ``src`` (a graph of the artifact): (model path or serialized bytes,
    session config entries, optimisers to disable, counts).  fp32 graphs: Linears sharing an input fused.  ``int8_kernel``:
    ``MatMulNBits``, ``MatMulIntegerToFloat``, ``mixed`` or ``auto`` (`auto_int8_kernel`).
    ``fp8_activations``: ``fp32`` (FP8 weights only) or ``qdq`` (the artifact's activation fake quantization kept)."""
    src = Path(src)
    import onnx

    proto = onnx.load(str(src), load_external_data=False)
    if precision not in ("int8", "fp8", "int4"):
        n = fuse_shared_input_matmuls(proto, src.parent, Path(stage) / f"{src.stem}.fused.tmp")
        if not n["nodes"]:
            return src, {}, [], {}
        log(f"[build-engine] {src.name}: {n['linears']} fp32 Linears sharing an input as {n['nodes']} MatMuls")
        return (proto.SerializeToString(),
                {"session.model_external_initializers_file_folder_path": str(src.parent)}, [], {"matmuls_fused": n})
    config = {"session.model_external_initializers_file_folder_path": str(src.parent)}
    if precision == "int4":
        config["session.qdq_matmulnbits_accuracy_level"] = str(ORT_INT4_ACCURACY_LEVEL)  # any ORT fuses itself
        n = matmul_nbits(proto, src.parent, Path(stage) / f"{src.stem}.nbits.tmp", bits=(4,))
        log(f"[build-engine] {src.name}: {n['linears']} INT4 Linears as {n['nodes']} MatMulNBits (no zero-point "
            "input; Linears sharing an input in one)")
        return proto.SerializeToString(), config, [], {"matmul_nbits": n}
    if precision == "int8":
        if int8_kernel == "auto":
            int8_kernel = auto_int8_kernel()
        if int8_kernel not in INT8_KERNELS:
            raise ValueError(f"int8_kernel={int8_kernel!r}; expected auto or one of {', '.join(INT8_KERNELS)}")
        n = {"linears": 0, "nodes": 0}
        if int8_kernel in ("MatMulNBits", "mixed"):
            n = matmul_nbits(proto, src.parent, Path(stage) / f"{src.stem}.nbits.tmp", bits=(8,),
                             widest_only=int8_kernel == "mixed")
            log(f"[build-engine] {src.name}: {n['linears']} INT8 Linears as {n['nodes']} 8-bit MatMulNBits "
                + ("(the LM head; activation Q/DQ kept)" if int8_kernel == "mixed" else
                   "(activation Q/DQ kept; Linears sharing an input in one)"))
        split = split_shared_activation_qdq(proto)  # the rest go to ORT's QDQ fusion: one Q/DQ pair per Linear
        if split or not n["linears"]:
            log(f"[build-engine] {src.name}: {split} shared activation Q/DQ pairs split (one per Linear: "
                "MatMulIntegerToFloat)")
        config[ORT_INT8_EXACT] = "1"  # u8 x u8 where ORT's own fusion's u8 x s8 could saturate (module docstring)
        return (proto.SerializeToString(), config, ["CommonSubexpressionElimination"] if split else [],
                {"matmul_nbits": n, "activation_qdq_split": split, "int8_kernel": int8_kernel})
    if fp8_activations not in ("fp32", "qdq"):
        raise ValueError(f"fp8_activations={fp8_activations!r}; expected fp32 or qdq")
    n = fold_weight_dequantize(proto, src.parent, Path(stage) / f"{src.stem}.fp8_folded.tmp")
    dropped = drop_activation_qdq(proto) if fp8_activations == "fp32" else 0
    fused = fuse_shared_input_matmuls(proto, src.parent, Path(stage) / f"{src.stem}.fused.tmp")
    log(f"[build-engine] {src.name}: {n} FP8 weights dequantized to fp32 once; activations "
        + (f"fp32 ({dropped} FP8 Q/DQ pairs removed)" if fp8_activations == "fp32" else "FP8 fake-quantized (kept)"))
    return proto.SerializeToString(), config, [], {"weights_folded": n, "activation_qdq_removed": dropped,
                                                    "fp8_activations": fp8_activations, "matmuls_fused": fused}
