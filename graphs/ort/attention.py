"""ONNX Runtime lowering: each ``gemma4::FusedAttention`` node -> ONNX Runtime's own attention kernels, where exact.

Pattern: a ``FusedAttention`` node of the plugin graphs (`plugins.fused_attention` is the contract).
Check: scale 1.0, whole heads per KV head, an even ``rotary_dim`` <= ``head_dim``, cache inputs of static
``(Hkv, T, D)`` matching the attributes, sliding rings of at least ``window`` slots (more in a speculative
artifact: the geometry takes the slot count, ``ring_slots``; the two-graph decode form only exactly ``window``),
decode with one new token.
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
* sliding layers, the two-graph form's decode graph: ``RotaryEmbedding`` (q, k), the ring write (``TensorScatter``
  circular, in place) and one ``Attention`` (opset 23) over the ring with a mask of filled slots (slot j is filled
  iff j <= past_lens: a ring slot holds a position within the window whenever it is filled, and attention does not
  depend on key order).
* sliding layers, prefill (any S, also 1): ``RotaryEmbedding`` (q, k), one ``Attention`` over concat(old ring, new
  keys) with the contract's mask as an additive bias (validity, window, causal or same image block), and the ring
  written in place by one circular ``TensorScatter`` of min(S, W) tokens per row (`_sliding_prefill`).  A call of
  one token in every row (a decode step), or of S tokens in one text row whose ring has not wrapped (a verify pass,
  before: Slice + Attention + the If's copies, ~0.5 ms per sliding layer on the 12B slice at 2 tokens), takes a
  branch instead (``If`` on the host's ``write_first``, which gives the scatter the new tokens themselves): the new
  tokens are written first (the slots they replace hold positions outside their windows), then
  ``com.microsoft.GroupQueryAttention`` reads the ring where it lies, each row its own filled slots (`_ring_gqa`;
  engines built before the verify form take ``one_token``, the branch for one token only).
  Before it, the branch ran an opset-23 ``Attention`` over a ``Slice`` of the ring's first
  max(past_lens) + 1 slots: profiled on a 6-layer slice with the 12B's dimensions (INT4, one thread), the
  ``Slice`` copies and that ``Attention`` took 1.5 ms per sliding layer per step at 275 cached tokens and 4.5 ms at
  1000 (the copy, then each KV head read once per query head, every row as long as the longest); the
  GroupQueryAttention reads 0.58 and 1.6 ms, about what reading those slots from memory takes, and a row's result
  no longer depends on its neighbours' lengths.  The ring path itself copies the slots it reads twice (a ``Slice``,
  then the concat) per layer, for K and V (2.5 GiB per step for the 12B): ``ring_decode="copy"`` keeps it for
  decode too.
* sliding layers, ``sliding="window"`` (build-engine ``--ort-sliding window``): GroupQueryAttention over ONNX
  Runtime's windowed cache instead of the ring, for text and audio (no bidirectional image blocks): `lower_attention`.
* the geometry every layer of a kind shares (sliding: positions, slots read, the mask, ring-write indices; full:
  GQA's lengths) is an engine input computed by the runtime (`runtime.ort_attention`, where the formulas are):
  inside the graph it took ~50 small kernels per call, and a decode step is ~500 kernels in all.
  GroupQueryAttention has no ring buffer and cannot open the bidirectional image blocks.  With every cache written
  in place, the lowered prefill graph also serves decode (one ONNX Runtime session; `graphs.build`).

Does not touch projections, norms or anything outside the nodes; the TensorRT plugin graphs are not modified (this
runs on a copy loaded for the ONNX Runtime build).
"""

from __future__ import annotations

import numpy as np

from plugins import fused_attention as fa

__all__ = ["RING_DECODE_FORMS", "SLIDING_FORMS", "WINDOW_SLACK", "lower_attention",
           "ring_decode_in_place", "rope_tables", "window_slots"]

SLIDING_FORMS = ("ring", "window")
# a ring engine's decode step: "in_place" (the one-token branch: the ring written first, then read where it lies by
# GroupQueryAttention, `_ring_gqa`), "copy" (the prefill path at one token: the slots read are copied twice per
# layer), "auto" = in_place: as fast as the copy on the 234 M bench model's 1 MiB rings, faster on the 12B's 16 MiB
# ones, and each row's attention reads its own slots only, so its logits do not depend on its neighbours' lengths
# (bench/results/image_decode.json, docs/speed.md)
RING_DECODE_FORMS = ("auto", "in_place", "copy")
# slots a windowed sliding cache holds beyond the window (`window_slots`): GroupQueryAttention compacts the cache
# (moves ~window rows) once every WINDOW_SLACK + 1 tokens; 12B: 256 x 8 KV heads x 256 x 4 B x 2 = 16 MiB per layer
WINDOW_SLACK = 256


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
        if a["sliding"] and (dims[2] is None or dims[2] < a["window"] or (decode and dims[2] != a["window"])):
            raise Refused(f"{name} has {dims[2]} slots; a sliding ring has {'' if decode else 'at least '}"
                          f"window={a['window']}")
    if decode:
        qs = node.inputs[0].shape
        if qs is None or len(qs) != 4 or qs[1] != 1:
            raise Refused(f"decode q has shape {qs}; expected one new token (B, 1, H, D)")
    return a


class _Builder:
    """New nodes before the first FusedAttention node; shared helper values made once per graph."""

    def __init__(self, model, max_len: int, host: bool = False):
        import onnx_ir as ir

        self.ir, self.model, self.graph, self.max_len, self.host = ir, model, model.graph, max_len, host
        self.query_seqlens = False  # GroupQueryAttention nodes take the host's query_seqlens (windowed form)
        self.one_token_branch = False  # ring sliding layers: a write-first call attends over the ring in place
        self.cache: dict = {}
        self.n = 0

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
                          name=name or f"ort_lower_{op}_{self.n}")
        self.graph.insert_before(before, nd)
        return nd.outputs if outputs > 1 else nd.outputs[0]

    def if_node(self, cond, *, then, orelse, outputs: int, before=None, emit=None):
        """An ``If`` on ``cond`` before ``before`` in the graph (or, ``emit``, inside the branch being built): each
        branch is a function given its own ``emit(op, inputs, attrs=, outputs=)`` that returns the branch's
        outputs (values of nodes it emitted).  Returns the If's outputs."""
        branches = {}
        for key, build in (("then_branch", then), ("else_branch", orelse)):
            nodes = []

            def emit_in(op, inputs, *, attrs=None, outputs=1, _nodes=nodes):
                self.n += 1
                nd = self.ir.node(op, inputs, attributes=attrs or {}, num_outputs=outputs,
                                  name=f"ort_lower_{op}_{self.n}")
                for i, value in enumerate(nd.outputs):  # named here: no branch value may shadow an outer one
                    value.name = f"{nd.name}_out{i}"
                _nodes.append(nd)
                return nd.outputs if outputs > 1 else nd.outputs[0]

            outs = list(build(emit_in))
            if len(outs) != outputs:
                raise ValueError(f"If branch {key}: {len(outs)} outputs, expected {outputs}")
            branches[key] = self.ir.Graph((), outs, nodes=nodes, name=f"ort_lower_{key}_{self.n}")
        if emit is not None:
            return emit("If", [cond], attrs=branches, outputs=outputs)
        return self.node("If", [cond], before=before, attrs=branches, outputs=outputs)

    def rope(self, a: dict):
        key = ("rope", a["head_dim"], a["rotary_dim"], float(a["rope_theta"]))
        if key not in self.cache:
            cos, sin = rope_tables(a["head_dim"], a["rotary_dim"], a["rope_theta"], self.max_len)
            tag = f"{a['head_dim']}_{a['rotary_dim']}_{int(a['rope_theta'])}"
            self.cache[key] = (self.const(key + ("cos",), cos, f"ort_lower_rope_cos_{tag}"),
                               self.const(key + ("sin",), sin, f"ort_lower_rope_sin_{tag}"))
        return self.cache[key]

    def host_input(self, key: str):
        """The graph input `runtime.ort_attention.INPUTS[key]` (added once), with the batch and sequence dims of
        ``input_ids``."""
        from runtime.ort_attention import INPUTS

        if ("input", key) not in self.cache:
            ids = next((v for v in self.graph.inputs if v.name == "input_ids"), None)
            bdim, sdim = (ids.shape[0], ids.shape[1]) if ids is not None and ids.shape is not None else ("B", "S")
            i64, ty = self.ir.DataType.INT64, self.ir.DataType
            dtype, shape = {
                "positions": (i64, [bdim, sdim]), "ring_used": (i64, [1]),
                "ring_bias": (ty.FLOAT, [bdim, 1, sdim, "ring_keys"]), "ring_first": (i64, [bdim]),
                "ring_gather": (i64, [bdim, 1, "ring_writes", 1]), "seqlens_k": (ty.INT32, [bdim]),
                "total_len": (ty.INT32, []), "query_seqlens": (ty.INT32, [bdim]),
                "write_first": (ty.BOOL, []), "ring_seqlens_k": (ty.INT32, [bdim]), "ring_total": (ty.INT32, []),
                "ring_last": (i64, [bdim, 1, "ring_query", 1]),
                "ring_bias_read": (ty.FLOAT, [bdim, 1, "ring_query", "ring_read"]),
            }[key]
            v = self.ir.Value(name=INPUTS[key], type=self.ir.TensorType(dtype), shape=self.ir.Shape(shape))
            self.graph.inputs.append(v)
            self.cache[("input", key)] = v
        return self.cache[("input", key)]

    def shared(self, key, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def _lens(b: _Builder, q, past_lens, before):
    """seqlens_k = past_lens + S - 1 (int32, per sequence) and total_sequence_length = max(past_lens + S): engine
    inputs in a host-fed graph (`runtime.ort_attention`), else computed here."""
    if b.host:
        return b.host_input("seqlens_k"), b.host_input("total_len")

    def make():
        s = b.node("Shape", [q], before=before, attrs={"start": 1, "end": 2})  # (1,) new tokens S
        end = b.node("Add", [past_lens, s], before=before)  # (B,)
        seqlens_k = b.node("Cast", [b.node("Sub", [end, b.ints([1])], before=before)], before=before,
                           attrs={"to": b.ir.DataType.INT32})
        total = b.node("Cast", [b.node("ReduceMax", [end], before=before, attrs={"keepdims": 0})], before=before,
                       attrs={"to": b.ir.DataType.INT32})
        return seqlens_k, total

    return b.shared(("lens", id(past_lens), repr(q.shape[1])), make)


def _gqa(b: _Builder, node, a: dict, before, into=None, window: bool = False):
    """GroupQueryAttention for a full layer (or, ``window``, a sliding layer over ONNX Runtime's windowed cache:
    `lower_attention`'s ``sliding="window"``): helper nodes before ``before``, the GQA node there too or appended
    to the graph ``into``; returns its (out, present_key, present_value)."""
    q, k, v, pk, pv, past_lens = node.inputs[:6]
    h, hkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    seqlens_k, total = _lens(b, q, past_lens, before)
    cos, sin = b.rope(a)
    q3 = b.node("Reshape", [q, b.ints([0, 0, h * d])], before=before)  # (B, S, H * D)
    k3 = b.node("Reshape", [k, b.ints([0, 0, hkv * d])], before=before)
    v3 = b.node("Reshape", [v, b.ints([0, 0, hkv * d])], before=before)
    attrs = {"num_heads": h, "kv_num_heads": hkv, "scale": 1.0, "do_rotary": 1, "rotary_interleaved": 0}
    if window:  # keys kp > qp - W: ORT's left window counts the W - 1 earlier keys and the query's own (tested)
        attrs.update(local_window_size=int(a["window"]), sliding_window_cache=1)
    inputs = [q3, k3, v3, pk, pv, seqlens_k, total, cos, sin]
    if b.query_seqlens:  # right-padded rows: only each row's valid tokens enter the cache (any batch, any past)
        inputs += [None] * 7 + [b.host_input("query_seqlens")]
    if into is None:
        return b.node("GroupQueryAttention", inputs, before=before, domain="com.microsoft", outputs=3, attrs=attrs)
    b.n += 1
    nd = b.ir.node("GroupQueryAttention", inputs, attributes=attrs, domain="com.microsoft", num_outputs=3,
                   name=f"ort_lower_GroupQueryAttention_{b.n}")
    into.append(nd)
    return nd.outputs


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

    RotaryEmbedding on q and the new k at the given positions; one ``Attention`` over concat(first n ring slots,
    new keys) (a copy of those slots per layer per call) with the given additive mask; the ring then written in
    place with one circular ``TensorScatter`` of U = min(S, W) tokens per row from slot ``first``, each gathered
    from that concat (the new token, or the slot's own value for positions before past_lens: right-padded tokens
    never reach the ring, and rows of different lengths share one scatter).  Slots of positions < 0 (a row shorter
    than U) hold no valid key before or after and may be written with any ring value.  n, the mask, ``first`` and
    the gather indices come from `runtime.ort_attention` (the formulas are there): until a ring has wrapped its later
    slots hold nothing, so n = max(1, min(W, max(past_lens))) and a short context costs its length, not the
    window.

    With ``b.one_token_branch`` a call of one token in every row, or of several tokens in one text row before its
    ring wraps (a verify pass; the host's ``write_first``), skips the copies: an ``If`` gives the scatter the new
    tokens themselves and their queries (else the ring path's gathered updates, output and a dummy query), the
    ring is written in place at top level, then read where it lies by GroupQueryAttention (`_ring_gqa`); a
    ``Where`` picks its output or the ring path's."""
    q, k, v, pk, pv = node.inputs[:5]
    h, hkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    cos, sin = b.rope(a)
    # the shared geometry, computed by the runtime (`runtime.ort_attention`): positions (B, S), slots read n (1,),
    # the additive mask (B, 1, S, n + S), the ring-write start slot (B,) and gather indices (B, 1, U, 1)
    pos, n, bias, first = (b.host_input(key) for key in ("positions", "ring_used", "ring_bias", "ring_first"))
    gidx = b.shared(("sgather", hkv, d), lambda: b.node("Expand", [b.host_input("ring_gather"), b.ints([1, hkv, 1, d])],
                                                        before=before))  # (B, Hkv, U, D)
    b.cache.setdefault("window", a["window"])
    q3 = b.node("Reshape", [q, b.ints([0, 0, h * d])], before=before)
    k3 = b.node("Reshape", [k, b.ints([0, 0, hkv * d])], before=before)
    v3 = b.node("Reshape", [v, b.ints([0, 0, hkv * d])], before=before)
    qr = b.node("RotaryEmbedding", [q3, cos, sin, pos], before=before, attrs={"num_heads": h})
    kr = b.node("RotaryEmbedding", [k3, cos, sin, pos], before=before, attrs={"num_heads": hkv})
    # 3-D q/k/v with the ring as past: Attention concatenates (B, Hkv, n + S, D) itself and returns it as present
    zero1, axis2 = b.ints([0]), b.ints([2])

    def ring_attention(emit):
        ring_k = emit("Slice", [pk, zero1, n, axis2])  # (B, Hkv, n, D): a view's copy
        ring_v = emit("Slice", [pv, zero1, n, axis2])
        out, k_all, v_all = emit("Attention", [qr, kr, v3, bias, ring_k, ring_v], outputs=3,
                                 attrs={"scale": 1.0, "q_num_heads": h, "kv_num_heads": hkv})  # out (B, S, H * D)
        # the updates are gathered from the concat copies, so the in-place writes run after every read of the ring
        return (emit("GatherElements", [k_all, gidx], attrs={"axis": 2}),
                emit("GatherElements", [v_all, gidx], attrs={"axis": 2}), out)

    scatter = {"mode": "circular", "axis": -2}
    if not b.one_token_branch:
        upd_k, upd_v, out = ring_attention(lambda op, ins, **kw: b.node(op, ins, before=before, **kw))
        present_k = b.node("TensorScatter", [pk, upd_k, first], before=before, attrs=scatter)
        present_v = b.node("TensorScatter", [pv, upd_v, first], before=before, attrs=scatter)
        return out, present_k, present_v
    # one new token per row (a decode step), or S in one row of an unwrapped ring (a verify pass): the ring is written
    # first (a slot it replaces holds a position outside the new queries' window), then GroupQueryAttention reads it
    # where it lies (`_ring_gqa`): no copy of the ring
    one = b.host_input("write_first")
    nothing = b.const(("zeros111",), np.zeros((1, 1, 1), np.float32), "ort_lower_zeros_1_1_1")

    def heads_first(emit, x):  # (B, S, Hkv * D) -> (B, Hkv, S, D)
        return emit("Transpose", [emit("Reshape", [x, b.ints([0, 0, hkv, d])])], attrs={"perm": [0, 2, 1, 3]})

    upd_k, upd_v, out_many, q_one = b.if_node(
        one, before=before, outputs=4,
        then=lambda emit: (heads_first(emit, kr), heads_first(emit, v3), emit("Identity", [nothing]),
                           emit("Identity", [qr])),
        orelse=lambda emit: (*ring_attention(emit), emit("Slice", [qr, zero1, b.ints([1]), b.ints([1])])))
    written_k = b.node("TensorScatter", [pk, upd_k, first], before=before, attrs=scatter)
    written_v = b.node("TensorScatter", [pv, upd_v, first], before=before, attrs=scatter)
    out_one = _ring_gqa(b, node, a, before, q_one, written_k, written_v)
    out = b.node("Where", [one, out_one, out_many], before=before)  # (B, S, H * D): the branch's, or the ring path's
    return out, written_k, written_v


def _ring_gqa(b: _Builder, node, a: dict, before, q_one, written_k, written_v):
    """GroupQueryAttention of one query per row (or S of one row) over the ring as the ring write left it, in place.

    GroupQueryAttention writes its new key at slot ``seqlens_k`` of a shared past/present buffer and attends slots
    0..seqlens_k.  With ``seqlens_k = min(past_lens, R - 1)`` (R ring slots) those are the slots the query may see:
    before the ring wraps, slots 0..past_lens (position j in slot j, the new token's included), once wrapped all R.
    Its "new" key is slot seqlens_k of the written ring itself (gathered, B x Hkv x D values), so it writes back
    what is there; the additive bias (B, 1, 1, T) masks slots by the position they hold (all zeros for a ring of
    exactly W slots; a ring with slack masks its slots older than the window).  S queries of one row (unwrapped:
    slot = position) take seqlens_k = past_lens + S - 1, their own slots as the new keys and a bias (1, 1, S, T) by
    the window; GroupQueryAttention's causal mask does the rest.  The host's values are `runtime.ort_attention`'s
    (`_one_token`); a call the ring path takes gives it slot 0 and a dummy query (its output is not used).

    The ring write stays the producer of the cache outputs (an engine run without IOBinding still returns the whole
    written ring); GroupQueryAttention's own present outputs leave the graph as extra outputs
    (`runtime.ort_attention.gqa_output`) that the runtime binds to the same buffers: it then sees past and present
    as one buffer and writes back only its queries' slots' own values.  Returns (out (B, S', H * D))."""
    from runtime.ort_attention import gqa_output

    b.model.opset_imports.setdefault("com.microsoft", 1)
    h, hkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    last = b.shared(("ring_last", hkv, d), lambda: b.node("Expand", [b.host_input("ring_last"), b.ints([1, hkv, 1, d])],
                                                           before=before))  # (B, Hkv, S', D): the queries' slots
    own = [b.node("Reshape", [b.node("Transpose", [b.node("GatherElements", [c, last], before=before, attrs={"axis": 2})],
                                     before=before, attrs={"perm": [0, 2, 1, 3]}), b.ints([0, 0, hkv * d])],
                  before=before) for c in (written_k, written_v)]  # (B, S', Hkv * D)
    inputs = [q_one, *own, written_k, written_v, b.host_input("ring_seqlens_k"), b.host_input("ring_total"),
              None, None, None, b.host_input("ring_bias_read")]
    out, gqa_k, gqa_v = b.node("GroupQueryAttention", inputs, before=before, domain="com.microsoft", outputs=3,
                               attrs={"num_heads": h, "kv_num_heads": hkv, "scale": 1.0})
    for value, cache in ((gqa_k, node.outputs[1]), (gqa_v, node.outputs[2])):
        value.name, value.shape, value.type = gqa_output(cache.name), cache.shape, cache.type
        b.graph.outputs.append(value)
    return out


def ring_decode_in_place(form: str) -> bool:
    """Whether ring sliding layers get the one-token branch (``form``: `RING_DECODE_FORMS`)."""
    if form not in RING_DECODE_FORMS:
        raise ValueError(f"ring decode form {form!r}; expected one of {', '.join(RING_DECODE_FORMS)}")
    return form != "copy"


def window_slots(window: int, max_len: int, slack: int = WINDOW_SLACK) -> int:
    """Capacity of a windowed sliding cache (``sliding="window"``): the window plus ``slack`` slots, which ONNX
    Runtime's GroupQueryAttention fills before it compacts (it moves the window to row 0 every slack + 1 tokens),
    never more than ``max_len`` needs, never less than the window (its minimum)."""
    if slack < 0:
        raise ValueError(f"sliding-cache slack {slack}; expected >= 0")
    return max(int(window), min(int(window) + int(slack), int(max_len)))


def lower_attention(model, *, decode: bool, max_len: int, log=print, sliding: str = "ring",
                    slack: int = WINDOW_SLACK, ring_decode: str = "auto") -> dict:
    """Lower every FusedAttention node of one graph in place; returns counts per form, refusals by node and the
    sliding window (``window``, None without sliding layers).  A prefill graph takes the shared attention geometry
    as inputs (`runtime.ort_attention.INPUTS`), the two-graph decode form computes its own from ``past_lens``.

    ``sliding="window"`` (prefill graphs only): sliding layers become GroupQueryAttention too, with ONNX Runtime's
    windowed cache (``sliding_window_cache``; `window_slots` slots instead of the ring's window, its own layout:
    the resident positions in order from row 0), and every GroupQueryAttention takes ``query_seqlens`` (right
    padding never enters a cache, so batched prompts with past context need no per-sequence calls).  One kernel per
    sliding layer instead of the ring's seven, but causal only: the bidirectional image blocks of the sliding
    layers cannot be expressed, so such an engine takes text and audio, not images (the runtime refuses them).

    ``ring_decode`` (`RING_DECODE_FORMS`, ring prefill graphs): whether the sliding layers get the one-token branch
    (`_sliding_prefill`; ``auto``: `ring_decode_in_place`); the report's ``ring_decode`` says what was built."""
    if sliding not in SLIDING_FORMS:
        raise ValueError(f"sliding={sliding!r}; expected one of {SLIDING_FORMS}")
    if sliding == "window" and decode:
        raise Refused("the windowed sliding form is for the one-graph engine (prefill graph)")
    if model.opset_imports.get("", 0) < 24:
        raise Refused(f"opset {model.opset_imports.get('')}: the lowering needs opset >= 24 (TensorScatter)")
    b = _Builder(model, max_len, host=not decode)
    b.query_seqlens = sliding == "window"
    if ring_decode not in RING_DECODE_FORMS:
        raise ValueError(f"ring decode form {ring_decode!r}; expected one of {', '.join(RING_DECODE_FORMS)}")
    slots = None
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
        if a["sliding"] and sliding == "window":
            slots = window_slots(a["window"], max_len, slack)
            for value in (*node.inputs[3:5], *node.outputs[1:3]):  # the caches: graph inputs and outputs
                if value.shape is None:
                    continue
                dims = list(value.shape)
                dims[2] = slots
                value.shape = b.ir.Shape(dims)
            b.cache.setdefault("window", a["window"])
            new = _gqa(b, node, a, node, window=True)
            counts["GroupQueryAttention"] += 1
        elif a["sliding"] and not decode:
            b.cache.setdefault("ring_slots", node.inputs[3].shape[2])  # every layer's ring has the same slots
            b.one_token_branch = ring_decode_in_place(ring_decode)
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
    return {**counts, "refused": refused, "window": b.cache.get("window"), "sliding": sliding,
            **({"ring_decode": "in_place" if b.one_token_branch else "copy"} if counts["Attention"] and not decode
               else {}),
            **({"sliding_slots": slots} if slots else {}),
            # rings with slack beyond the window (a speculative artifact): the runtime's geometry needs the count
            **({"ring_slots": b.cache["ring_slots"]} if b.cache.get("ring_slots", b.cache.get("window"))
               != b.cache.get("window") else {})}
