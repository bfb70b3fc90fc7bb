"""ONNX Runtime lowering: each ``gemma4::FusedAttention`` node -> ONNX Runtime's own attention kernels, where exact.

Pattern: a ``FusedAttention`` node of the plugin graphs (`plugins.fused_attention` is the contract).
Check: scale 1.0, whole heads per KV head, an even ``rotary_dim`` <= ``head_dim``, cache inputs of static
``(Hkv, T, D)`` matching the attributes, sliding rings of exactly ``window`` slots, decode with one new token.
Rewrite:

* full layers (prefill and decode): one ``com.microsoft.GroupQueryAttention`` over the shared past/present buffer
  (in place under IOBinding) with ``do_rotary`` and cos/sin tables of ``max_len`` rows.  Gemma 4's proportional
  RoPE is the rotate-half RoPE over the whole head_dim with zero frequencies beyond ``rotary_dim``, so the tables
  span head_dim / 2 with cos = 1, sin = 0 in the tail (exact identity).  ``seqlens_k = past_lens + S - 1``: it reads
  keys up to each query's position only, so a full layer costs the valid length, not ``max_len``.  GQA refuses a
  prompt with past context at batch > 1 (a continued or chunked prefill of several sequences): the lowered graph
  does not take that call, and the engine record says so (``prefill_with_past: per_sequence``), so
  `runtime.ort_backend` runs it one sequence at a time on views of the cache rows.  (An ``If`` holding the plugin
  node's body for that case cost more than it saved: outputs leaving an ``If`` are copies, so every step copied
  each full layer's whole cache, ~2 ms per full layer per step on the bench model at max_len 512.)
* sliding layers, decode: ``RotaryEmbedding`` (q, k), the ring write (``TensorScatter`` circular, in place) and one
  ``Attention`` (opset 23) over the ring with a mask of filled slots (slot j is filled iff j <= past_lens: a ring
  slot holds a position within the window whenever it is filled, and attention does not depend on key order).
* sliding layers, prefill (any S, also 1): ``RotaryEmbedding`` (q, k), one ``Attention`` over concat(old ring, new
  keys) with the contract's mask as an additive bias (validity, window, causal or same image block), and the ring
  written in place by one circular ``TensorScatter`` of min(S, W) tokens per row (`_sliding_prefill`).
  GroupQueryAttention has no ring buffer and cannot open the bidirectional image blocks.  With every cache written
  in place, the lowered prefill graph also serves decode (one ONNX Runtime session; `graphs.build`).

Does not touch projections, norms or anything outside the nodes; the TensorRT plugin graphs are not modified (this
runs on a copy loaded for the ONNX Runtime build).
"""

from __future__ import annotations

import numpy as np

from plugins import fused_attention as fa

__all__ = ["MASK", "SLIDING_SHARED", "lower_attention", "rope_tables"]

# name prefix of the nodes the sliding layers share (positions, slots read, mask, ring-write indices) and the names
# of the values they hand to the layers
MASK = "mask_"
SLIDING_SHARED = {k: f"ort_lower_sliding_{k}" for k in ("pos", "used", "bias", "first", "gather")}


class Refused(ValueError):
    """A FusedAttention node this pass leaves alone; the message says why."""


def rope_tables(head_dim: int, rotary_dim: int, theta: float, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (rows, head_dim / 2) float32 for positions 0..rows-1, angles as the contract computes them
    (float32 position * float32 inv_freq), cos/sin rounded once from float64."""
    ang = np.arange(rows, dtype=np.float32)[:, None] * fa.inv_freq(head_dim, rotary_dim, theta)[None, :]
    return np.cos(ang.astype(np.float64)).astype(np.float32), np.sin(ang.astype(np.float64)).astype(np.float32)


def _attrs(node) -> dict:
    return {k: a.value for k, a in node.attributes.items()}


def _check(node, decode: bool) -> dict:
    a = _attrs(node)
    need = ("mode", "sliding", "window", "num_heads", "num_kv_heads", "head_dim", "rotary_dim", "rope_theta")
    missing = [k for k in need if k not in a]
    if missing:
        raise Refused(f"attributes {missing} missing")
    if a["mode"] != int(decode):
        raise Refused(f"mode={a['mode']} in a {'decode' if decode else 'prefill'} graph")
    if float(a.get("scale", 1.0)) != 1.0:
        raise Refused(f"scale={a['scale']}; the lowering is written for Gemma 4's scale 1.0")
    h, hkv, d, rot = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"]
    if hkv <= 0 or h % hkv:
        raise Refused(f"num_heads={h} is not a multiple of num_kv_heads={hkv}")
    if rot % 2 or not 0 < rot <= d:
        raise Refused(f"rotary_dim={rot} must be even and in (0, head_dim={d}]")
    if len(node.inputs) != len(fa.INPUTS) or len(node.outputs) != len(fa.OUTPUTS):
        raise Refused(f"{len(node.inputs)} inputs / {len(node.outputs)} outputs; the contract has "
                      f"{len(fa.INPUTS)} / {len(fa.OUTPUTS)}")
    for i, name in ((3, "past_key"), (4, "past_value")):
        shape = node.inputs[i].shape
        dims = None if shape is None else [x if isinstance(x, int) else None for x in shape]
        if dims is None or len(dims) != 4 or dims[1] != hkv or dims[3] != d:
            raise Refused(f"{name} has shape {shape}; expected (B, {hkv}, T, {d})")
        if a["sliding"] and dims[2] != a["window"]:
            raise Refused(f"{name} has {dims[2]} slots; a sliding ring has window={a['window']}")
    if decode:
        qs = node.inputs[0].shape
        if qs is None or len(qs) != 4 or qs[1] != 1:
            raise Refused(f"decode q has shape {qs}; expected one new token (B, 1, H, D)")
    return a


class _Builder:
    """New nodes before the first FusedAttention node; shared helper values made once per graph."""

    def __init__(self, model, max_len: int):
        import onnx_ir as ir

        self.ir, self.model, self.graph, self.max_len = ir, model, model.graph, max_len
        self.cache: dict = {}
        self.n = 0
        self.tag = ""  # node name prefix ("mask_": the sliding layers' shared mask/position nodes)

    def const(self, key, array: np.ndarray, name: str):
        if key not in self.cache:
            t = self.ir.tensor(np.asarray(array), name=name)
            v = self.ir.Value(name=name, type=self.ir.TensorType(t.dtype), shape=self.ir.Shape(t.shape), const_value=t)
            self.graph.register_initializer(v)
            self.cache[key] = v
        return self.cache[key]

    def ints(self, values) -> object:
        values = tuple(int(x) for x in values)
        return self.const(("i64", values), np.array(values, np.int64), f"ort_lower_i64_{'_'.join(map(str, values))}"
                          .replace("-", "m"))

    def node(self, op, inputs, *, before, domain="", attrs=None, outputs=1, name=None):
        self.n += 1
        nd = self.ir.node(op, inputs, attributes=attrs or {}, domain=domain, num_outputs=outputs,
                          name=name or f"ort_lower_{self.tag}{op}_{self.n}")
        self.graph.insert_before(before, nd)
        return nd.outputs if outputs > 1 else nd.outputs[0]

    def rope(self, a: dict):
        key = ("rope", a["head_dim"], a["rotary_dim"], float(a["rope_theta"]))
        if key not in self.cache:
            cos, sin = rope_tables(a["head_dim"], a["rotary_dim"], a["rope_theta"], self.max_len)
            tag = f"{a['head_dim']}_{a['rotary_dim']}_{int(a['rope_theta'])}"
            self.cache[key] = (self.const(key + ("cos",), cos, f"ort_lower_rope_cos_{tag}"),
                               self.const(key + ("sin",), sin, f"ort_lower_rope_sin_{tag}"))
        return self.cache[key]

    def shared(self, key, make, tag: str = ""):
        if key not in self.cache:
            old, self.tag = self.tag, tag or self.tag
            try:
                self.cache[key] = make()
            finally:
                self.tag = old
        return self.cache[key]


def _lens(b: _Builder, q, past_lens, before):
    """seqlens_k = past_lens + S - 1 (int32, per sequence) and total_sequence_length = max(past_lens + S)."""
    def make():
        s = b.node("Shape", [q], before=before, attrs={"start": 1, "end": 2})  # (1,) new tokens S
        end = b.node("Add", [past_lens, s], before=before)  # (B,)
        seqlens_k = b.node("Cast", [b.node("Sub", [end, b.ints([1])], before=before)], before=before,
                           attrs={"to": b.ir.DataType.INT32})
        total = b.node("Cast", [b.node("ReduceMax", [end], before=before, attrs={"keepdims": 0})], before=before,
                       attrs={"to": b.ir.DataType.INT32})
        return seqlens_k, total

    return b.shared(("lens", id(past_lens), repr(q.shape[1])), make)


def _gqa(b: _Builder, node, a: dict, before, into=None):
    """GroupQueryAttention for a full layer: helper nodes before ``before``, the GQA node there too or appended to
    the graph ``into``; returns its (out, present_key, present_value)."""
    q, k, v, pk, pv, past_lens = node.inputs[:6]
    h, hkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    seqlens_k, total = _lens(b, q, past_lens, before)
    cos, sin = b.rope(a)
    q3 = b.node("Reshape", [q, b.ints([0, 0, h * d])], before=before)  # (B, S, H * D)
    k3 = b.node("Reshape", [k, b.ints([0, 0, hkv * d])], before=before)
    v3 = b.node("Reshape", [v, b.ints([0, 0, hkv * d])], before=before)
    attrs = {"num_heads": h, "kv_num_heads": hkv, "scale": 1.0, "do_rotary": 1, "rotary_interleaved": 0}
    inputs = [q3, k3, v3, pk, pv, seqlens_k, total, cos, sin]
    if into is None:
        return b.node("GroupQueryAttention", inputs, before=before, domain="com.microsoft", outputs=3, attrs=attrs)
    b.n += 1
    nd = b.ir.node("GroupQueryAttention", inputs, attributes=attrs, domain="com.microsoft", num_outputs=3,
                   name=f"ort_lower_GroupQueryAttention_{b.n}")
    into.append(nd)
    return nd.outputs


def _seq_key(q):
    """What identifies q's token count: its named symbolic dim (the same in every layer), else q itself."""
    dim = None if q.shape is None or len(q.shape) < 2 else q.shape[1]
    value = getattr(dim, "value", None)
    return ("dim", value) if isinstance(value, str) and value else ("value", id(q))


def _sliding_decode(b: _Builder, node, a: dict, before):
    q, k, v, pk, pv, past_lens = node.inputs[:6]
    h, hkv, d, w = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["window"]
    cos, sin = b.rope(a)
    pos_ids = b.shared(("pos_ids", id(past_lens)),
                       lambda: b.node("Unsqueeze", [past_lens, b.ints([1])], before=before))  # (B, 1)
    mask = b.shared(("ring_mask", w, id(past_lens)), lambda: b.node(  # (B, 1, 1, W): slot filled
        "LessOrEqual", [b.const(("slots", w), np.arange(w, dtype=np.int64), f"ort_lower_slots_{w}"),
                        b.node("Unsqueeze", [past_lens, b.ints([1, 2, 3])], before=before)], before=before))
    q3 = b.node("Reshape", [q, b.ints([0, 0, h * d])], before=before)
    k3 = b.node("Reshape", [k, b.ints([0, 0, hkv * d])], before=before)
    qr = b.node("RotaryEmbedding", [q3, cos, sin, pos_ids], before=before, attrs={"num_heads": h})
    kr = b.node("RotaryEmbedding", [k3, cos, sin, pos_ids], before=before, attrs={"num_heads": hkv})
    k4 = b.node("Reshape", [kr, b.ints([0, hkv, 1, d])], before=before)  # (B, Hkv, 1, D): S = 1
    v4 = b.node("Reshape", [v, b.ints([0, hkv, 1, d])], before=before)
    scatter = {"mode": "circular", "axis": -2}
    present_k = b.node("TensorScatter", [pk, k4, past_lens], before=before, attrs=scatter)
    present_v = b.node("TensorScatter", [pv, v4, past_lens], before=before, attrs=scatter)
    q4 = b.node("Reshape", [qr, b.ints([0, h, 1, d])], before=before)  # (B, H, 1, D)
    o4 = b.node("Attention", [q4, present_k, present_v, mask], before=before, attrs={"scale": 1.0})
    out = b.node("Reshape", [o4, b.ints([0, 1, h * d])], before=before)  # (B, 1, H * D)
    return out, present_k, present_v


def _sliding_prefill(b: _Builder, node, a: dict, before):
    """Sliding layer, any number S of new tokens (also S = 1: the decode step of a one-graph engine).

    RotaryEmbedding on q and the new k at positions past_lens + i; one ``Attention`` over concat(old ring, new keys)
    (a copy of one ring per layer per call) with the contract's mask as an additive bias: key valid (ring slot j
    holds position p_j = L - ((L - j) mod W), L = past_lens - 1, valid iff p_j >= 0; new key i valid iff i <
    seq_lens) and within the window (kp > qp - W) and (causal or both in the same image block).  The ring is then
    written in place with one circular ``TensorScatter`` of U = min(S, W) tokens per row starting at slot
    (e - U) mod W, e = past_lens + seq_lens: positions e - U .. e - 1, taken from the new tokens where p >=
    past_lens and from the ring itself (rewriting a slot with its own value) where 0 <= p < past_lens, so
    right-padded tokens never reach the ring and rows of different lengths share one scatter; slots of positions
    p < 0 (a row shorter than U) hold no valid key before or after and are written with any ring value.

    Until a ring has wrapped in some row, its slots at and after max(past_lens) hold nothing: the attention reads
    the first n = max(1, min(W, max(past_lens))) slots only (the rest are masked in every row anyway), so a short
    context costs its length, not the window."""
    q, k, v, pk, pv, past_lens, seq_lens, blk = node.inputs[:8]
    h, hkv, d, w = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["window"]
    cos, sin = b.rope(a)

    def positions():
        s = b.node("Shape", [q], before=before, attrs={"start": 1, "end": 2})  # (1,)
        ar = b.node("Range", [b.const(("zero",), np.array(0, np.int64), "ort_lower_i64_0d_0"),
                              b.node("Squeeze", [s, b.ints([0])], before=before),
                              b.const(("one",), np.array(1, np.int64), "ort_lower_i64_0d_1")], before=before)  # (S,)
        pl = b.node("Unsqueeze", [past_lens, b.ints([1])], before=before)  # (B, 1)
        return s, ar, pl, b.node("Add", [pl, b.node("Unsqueeze", [ar, b.ints([0])], before=before)], before=before)

    s, ar, pl, pos = b.shared(("spos", id(past_lens), _seq_key(q)), positions, MASK)  # pos (B, S), once per graph

    def used():  # (1,) slots read: max(1, min(W, max(past_lens)))
        most = b.node("ReduceMax", [past_lens], before=before, attrs={"keepdims": 1})  # (1,)
        return b.node("Max", [b.node("Min", [most, b.ints([w])], before=before), b.ints([1])], before=before)

    n = b.shared(("sused", w, id(past_lens)), used, MASK)

    def mask():
        last = b.node("Sub", [pl, b.ints([1])], before=before)  # (B, 1)
        slots = b.node("Range", [b.const(("zero",), np.array(0, np.int64), "ort_lower_i64_0d_0"),
                                 b.node("Squeeze", [n, b.ints([0])], before=before),
                                 b.const(("one",), np.array(1, np.int64), "ort_lower_i64_0d_1")],
                       before=before)  # (n,) the slots read
        ring_pos = b.node("Sub", [last, b.node("Mod", [b.node("Sub", [last, slots], before=before), b.ints([w])],
                                               before=before, attrs={"fmod": 0})], before=before)  # (B, n)
        k_pos = b.node("Concat", [ring_pos, pos], before=before, attrs={"axis": 1})  # (B, n + S)
        ring_ok = b.node("GreaterOrEqual", [ring_pos, b.ints([0])], before=before)
        new_ok = b.node("Less", [b.node("Unsqueeze", [ar, b.ints([0])], before=before),
                                 b.node("Unsqueeze", [seq_lens, b.ints([1])], before=before)], before=before)
        k_ok = b.node("Concat", [ring_ok, new_ok], before=before, attrs={"axis": 1})
        neg = b.node("Sub", [b.node("Mul", [ring_pos, b.ints([0])], before=before), b.ints([1])], before=before)
        k_blk = b.node("Concat", [neg, blk], before=before, attrs={"axis": 1})  # (B, n + S)
        qp = b.node("Unsqueeze", [pos, b.ints([2])], before=before)  # (B, S, 1)
        kp = b.node("Unsqueeze", [k_pos, b.ints([1])], before=before)  # (B, 1, n + S)
        qb = b.node("Unsqueeze", [blk, b.ints([2])], before=before)
        same = b.node("And", [b.node("Equal", [qb, b.node("Unsqueeze", [k_blk, b.ints([1])], before=before)],
                                     before=before),
                              b.node("GreaterOrEqual", [qb, b.ints([0])], before=before)], before=before)
        in_win = b.node("Greater", [kp, b.node("Sub", [qp, b.ints([w])], before=before)], before=before)
        causal = b.node("Or", [b.node("LessOrEqual", [kp, qp], before=before), same], before=before)
        ok = b.node("And", [b.node("And", [b.node("Unsqueeze", [k_ok, b.ints([1])], before=before), in_win],
                                   before=before), causal], before=before)  # (B, S, n + S)
        bias = b.node("Where", [ok, b.const(("f0",), np.array(0, np.float32), "ort_lower_f32_0"),
                                b.const(("fmin",), np.array(np.finfo(np.float32).min, np.float32),
                                        "ort_lower_f32_min")], before=before)
        return b.node("Unsqueeze", [bias, b.ints([1])], before=before)  # (B, 1, S, n + S)

    bias = b.shared(("smask", w, id(past_lens), id(blk)), mask, MASK)  # (B, 1, S, n + S)

    def write_index():  # U, the ring-write start slot (B,), gather indices (B, 1, U, 1) into concat(ring, new)
        u = b.node("Min", [s, b.ints([w])], before=before)  # (1,)
        end = b.node("Add", [past_lens, seq_lens], before=before)  # (B,)
        start = b.node("Sub", [end, u], before=before)  # (B,) may be < 0
        first = b.node("Mod", [start, b.ints([w])], before=before, attrs={"fmod": 0})
        ur = b.node("Range", [b.const(("zero",), np.array(0, np.int64), "ort_lower_i64_0d_0"),
                              b.node("Squeeze", [u, b.ints([0])], before=before),
                              b.const(("one",), np.array(1, np.int64), "ort_lower_i64_0d_1")], before=before)
        p = b.node("Add", [b.node("Unsqueeze", [start, b.ints([1])], before=before),
                           b.node("Unsqueeze", [ur, b.ints([0])], before=before)], before=before)  # (B, U)
        is_new = b.node("GreaterOrEqual", [p, pl], before=before)
        idx = b.node("Where", [is_new, b.node("Add", [b.node("Sub", [p, pl], before=before), n],
                                              before=before),  # new token i sits at n + i after the n slots
                               b.node("Min", [b.node("Mod", [p, b.ints([w])], before=before, attrs={"fmod": 0}),
                                              b.node("Sub", [n, b.ints([1])], before=before)], before=before)],
                       before=before)  # old slots (p < past_lens): < n unless p < 0 (never valid: any slot read)
        idx4 = b.node("Unsqueeze", [idx, b.ints([1, 3])], before=before)  # (B, 1, U, 1)
        return first, b.node("Expand", [idx4, b.node("Concat", [b.ints([1, hkv]), u, b.ints([d])], before=before,
                                                            attrs={"axis": 0})], before=before)

    first, gidx = b.shared(("swrite", w, id(past_lens), id(seq_lens)), write_index, MASK)  # after `n` (shared)
    for value, key in ((pos, "pos"), (n, "used"), (bias, "bias"), (first, "first"), (gidx, "gather")):
        value.name = SLIDING_SHARED[key]  # what `graphs.lower_ort_single_token` replaces for one-token calls
    b.cache.setdefault("sliding_geometry", (w, hkv, d))
    q3 = b.node("Reshape", [q, b.ints([0, 0, h * d])], before=before)
    k3 = b.node("Reshape", [k, b.ints([0, 0, hkv * d])], before=before)
    v3 = b.node("Reshape", [v, b.ints([0, 0, hkv * d])], before=before)
    qr = b.node("RotaryEmbedding", [q3, cos, sin, pos], before=before, attrs={"num_heads": h})
    kr = b.node("RotaryEmbedding", [k3, cos, sin, pos], before=before, attrs={"num_heads": hkv})
    # 3-D q/k/v with the ring as past: Attention concatenates (B, Hkv, n + S, D) itself and returns it as present
    zero1 = b.ints([0])
    ring_k = b.node("Slice", [pk, zero1, n, b.ints([2])], before=before)  # (B, Hkv, n, D): a view's copy
    ring_v = b.node("Slice", [pv, zero1, n, b.ints([2])], before=before)
    out, k_all, v_all = b.node("Attention", [qr, kr, v3, bias, ring_k, ring_v], before=before, outputs=3,
                               attrs={"scale": 1.0, "q_num_heads": h, "kv_num_heads": hkv})  # out (B, S, H * D)
    scatter = {"mode": "circular", "axis": -2}
    # the updates are gathered from the concat copies, so the in-place writes run after every read of the ring
    present_k = b.node("TensorScatter", [pk, b.node("GatherElements", [k_all, gidx], before=before,
                                                    attrs={"axis": 2}), first], before=before, attrs=scatter)
    present_v = b.node("TensorScatter", [pv, b.node("GatherElements", [v_all, gidx], before=before,
                                                    attrs={"axis": 2}), first], before=before, attrs=scatter)
    return out, present_k, present_v


def lower_attention(model, *, decode: bool, max_len: int, log=print) -> dict:
    """Lower every FusedAttention node of one graph in place; returns counts per form and refusals by node."""
    if model.opset_imports.get("", 0) < 24:
        raise Refused(f"opset {model.opset_imports.get('')}: the lowering needs opset >= 24 (TensorScatter)")
    b = _Builder(model, max_len)
    counts = {"GroupQueryAttention": 0, "Attention": 0, "kept": 0}
    refused = {}
    targets = [n for n in model.graph if n.domain == fa.DOMAIN and n.op_type == fa.OP]
    for node in targets:
        try:
            a = _check(node, decode)
        except Refused as e:
            refused[node.name or node.overload] = str(e)
            log(f"[ort-lower] {node.name or node.overload}: left as the plugin node: {e}")
            continue
        if a["sliding"] and not decode:
            new = _sliding_prefill(b, node, a, node)
            counts["Attention"] += 1
        elif a["sliding"]:
            new = _sliding_decode(b, node, a, node)
            counts["Attention"] += 1
        else:
            new = _gqa(b, node, a, node)
            counts["GroupQueryAttention"] += 1
        for old, nv in zip(node.outputs, new):
            name = old.name
            nv.shape, nv.type = old.shape, old.type
            old.replace_all_uses_with(nv, replace_graph_outputs=True)
            old.name, nv.name = f"{name}__lowered", name  # graph outputs keep their names (present_key_N ...)
        model.graph.remove(node, safe=True)
    if counts["GroupQueryAttention"]:
        model.opset_imports.setdefault("com.microsoft", 1)
    if model.functions:
        # local functions left (the PatchEmbed plugin's body): inline them so the later passes see their nodes, with
        # names unique across the graph
        import onnx_ir.passes.common as common

        common.InlinePass()(model)
        common.NameFixPass()(model)
    return {**counts, "refused": refused, "sliding_geometry": b.cache.get("sliding_geometry")}
