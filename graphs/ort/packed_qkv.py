"""ONNX Runtime lowering: one packed Q/K/V input per GroupQueryAttention, its per-head norms in one kernel.

Pattern (a sliding layer after `graphs.ort.attention`, `graphs.ort.norms` and the fused q/k/v
projection of `graphs.ort.qdq`)::

    q, k, v = Split(P)                                             P: (B, S, (Hq + 2 Hkv) D), one projection
    x' = Reshape(SimplifiedLayerNormalization(Reshape(x, (.., H, D)), w_x), (.., H D))       for x in q, k, v
    (fp32 -> fp32 CastLike/Cast/Identity between the norm and the outer Reshape are dropped with them)
    GroupQueryAttention(q', k', v', ...)

Twelve kernels per layer from the projection to the attention.  GroupQueryAttention also takes Q, K and V packed
in one tensor (its ``query`` input, ``key``/``value`` omitted), and the three norms differ only in their weights, so
the rewrite is::

    GroupQueryAttention(Reshape(SimplifiedLayerNormalization(Reshape(P, (0, 0, -1, D)), W), (0, 0, -1)), ...)

with ``W`` (Hq + 2 Hkv, D) the q weight on the query heads' rows, k's on the key heads', v's on the value heads':
four kernels, the same arithmetic.  ONNX Runtime's SimplifiedLayerNormalization normalises the last axis and
broadcasts a weight of the trailing (H, D) shape over the rest (ONNX Runtime 1.32; tests/test_lower_ort_packed_qkv.py
checks it against numpy, so an ONNX Runtime that stops doing so fails there, not in a user's engine).

A full layer whose value is its key (``attention_k_eq_v``: a 2-way Split, the key's Reshape read by the key's and the
value's norms) takes ``Concat(P, Slice(P, key columns))`` as its packed input: nine kernels -> five.

Check: the Split has exactly the three outputs (two with a shared key), in the attention's q, k, v order, each used
only by its Reshape; every intermediate is used once (the shared key's Reshape by the two norms); the norms normalise
the last axis of the same head size with the same epsilon and stash type and have constant 1-D weights; the Split's
widths agree with the attention's ``num_heads`` / ``kv_num_heads``.  Anything else (unfused projections) is left as
it is and counted with the reason.  Works on the graph proto (weights of the norms read from the
external data when they live there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["pack_qkv"]


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _no_op_cast(node) -> bool:
    """A cast to fp32 (the only activation type of an ONNX Runtime engine: bf16 is refused, fp16 never made)."""
    import onnx

    if node.op_type == "Identity":
        return True
    return node.op_type == "CastLike" or (node.op_type == "Cast" and _attr(node, "to") == onnx.TensorProto.FLOAT)


def _data_uses(uses: dict, name: str) -> list:
    """The nodes reading ``name`` as data (a CastLike reading it only for its type does not count: such a CastLike
    is one of the chain's, dropped with it)."""
    return [n for n in uses.get(name, []) if not (n.op_type == "CastLike" and n.input[0] != name)]


def _match(gqa, producer, uses, inits, base: Path):
    """(P, split node, nodes to drop, (wq, wk, wv), epsilon, stash type, head size, shared key) or a reason string.
    ``shared key``: the value is the key's projection (a 2-way Split; one Reshape read by the key's and the value's
    norms), as on full layers with ``attention_k_eq_v``."""
    from graphs.ort.qdq import _read_initializer

    if len(gqa.input) < 3 or not all(gqa.input[:3]):
        return "its key/value are already packed or absent"
    chain, weights, eps, stash, dims, r1s = [], [], set(), set(), set(), []
    for slot, name in enumerate(gqa.input[:3]):
        r2 = producer.get(name)
        sln = producer.get(r2.input[0]) if r2 is not None and r2.op_type == "Reshape" else None
        while sln is not None and _no_op_cast(sln):  # the export's fp32 -> fp32 CastLike (ORT drops it later)
            chain.append(sln)
            if len(_data_uses(uses, sln.output[0])) != 1:
                return f"input {slot}: an intermediate value has other users"
            sln = producer.get(sln.input[0])
        r1 = producer.get(sln.input[0]) if sln is not None and sln.op_type == "SimplifiedLayerNormalization" else None
        sp = producer.get(r1.input[0]) if r1 is not None and r1.op_type == "Reshape" else None
        if sp is None or sp.op_type != "Split":
            return f"input {slot} is not Reshape(SimplifiedLayerNormalization(Reshape(Split(...))))"
        if any(len(_data_uses(uses, v)) != 1 for v in (name, r2.input[0], r1.input[0])):
            return f"input {slot}: an intermediate value has other users"
        if len(sln.input) < 2 or sln.input[1] not in inits or _attr(sln, "axis", -1) != -1:
            return f"input {slot}: the norm has no constant weight or does not normalise the last axis"
        w = _read_initializer(inits[sln.input[1]], base).astype(np.float32)
        if w.ndim != 1:
            return f"input {slot}: the norm weight has shape {w.shape}"
        weights.append(w)
        eps.add(float(_attr(sln, "epsilon", 1e-5)))
        stash.add(int(_attr(sln, "stash_type", 1)))
        dims.add(w.shape[0])
        chain += [r2, sln, r1]
        r1s.append((r1, sp, sln))
    (rq, split, nq), (rk, sk, nk), (rv, sv, nv) = r1s
    shared = rk is rv
    if sk is not split or sv is not split:
        return "q, k and v do not come from one Split"
    outs = [rq.input[0], rk.input[0]] + ([] if shared else [rv.input[0]])
    if list(split.output) != outs:
        return "q, k and v are not the outputs 0, 1, 2 of one Split (or 0, 1 with the value read from the key)"
    readers = {id(n) for n in _data_uses(uses, rk.output[0])}
    if readers != ({id(nk), id(nv)} if shared else {id(nk)}) or len(_data_uses(uses, rq.output[0])) != 1 or (
            not shared and len(_data_uses(uses, rv.output[0])) != 1):
        return "a per-head value has other users"
    if _attr(split, "axis", 0) not in (-1, 2):
        return "the Split does not split the last axis"
    if len(eps) != 1 or len(stash) != 1 or len(dims) != 1:
        return f"the norms differ: epsilon {sorted(eps)}, stash {sorted(stash)}, head size {sorted(dims)}"
    return split.input[0], split, chain, weights, eps.pop(), stash.pop(), dims.pop(), shared


def pack_qkv(proto, base: Path) -> dict:
    """Apply the rewrite to every GroupQueryAttention of ``proto`` (onnx ModelProto, in place); ``base``: the
    directory its external data is read from.  Returns {"packed": n, "refused": {node: reason}}."""
    import onnx

    from graphs.ort.qdq import _consumers, _read_initializer, _set_nodes

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    uses = _consumers(graph)
    inits = {t.name: t for t in graph.initializer}
    drop, before, new_inits = set(), {}, []
    report = {"packed": 0, "refused": {}}
    for gqa in [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]:
        m = _match(gqa, producer, uses, inits, base)
        if isinstance(m, str):
            report["refused"][gqa.name] = m
            continue
        packed_in, split, chain, (wq, wk, wv), eps, stash, d, shared = m
        hq, hkv = int(_attr(gqa, "num_heads")), int(_attr(gqa, "kv_num_heads"))
        sizes = inits.get(split.input[1]) if len(split.input) > 1 else None
        widths = None if sizes is None else _read_initializer(sizes, base).tolist()
        if widths != [hq * d, hkv * d] + ([] if shared else [hkv * d]):
            report["refused"][gqa.name] = (f"the Split makes widths {widths}, not num_heads x head size and "
                                           f"kv_num_heads x head size {'once' if shared else 'twice'} "
                                           f"({hq}, {hkv}, {d})")
            continue
        tag = f"{gqa.name}.packed_qkv"
        nodes = []
        if shared:  # the value is the key's projection: append it once more, (B, S, (Hq + 2 Hkv) D)
            bounds = {f"{tag}.key_start": [hq * d], f"{tag}.key_end": [(hq + hkv) * d], f"{tag}.last_axis": [-1]}
            new_inits += [onnx.numpy_helper.from_array(np.array(v, np.int64), k) for k, v in bounds.items()]
            nodes += [onnx.helper.make_node("Slice", [packed_in, *bounds], [f"{tag}.key"], name=f"{tag}.key"),
                      onnx.helper.make_node("Concat", [packed_in, f"{tag}.key"], [f"{tag}.qkv"], name=f"{tag}.qkv",
                                            axis=-1)]
            packed_in = f"{tag}.qkv"
        w = np.concatenate([np.tile(wq, (hq, 1)), np.tile(wk, (hkv, 1)), np.tile(wv, (hkv, 1))])  # (Hq+2Hkv, D)
        consts = {f"{tag}.heads_shape": np.array([0, 0, -1, d], np.int64), f"{tag}.weight": w,
                  f"{tag}.flat_shape": np.array([0, 0, -1], np.int64)}
        new_inits += [onnx.numpy_helper.from_array(a, k) for k, a in consts.items()]
        nodes += [
            onnx.helper.make_node("Reshape", [packed_in, f"{tag}.heads_shape"], [f"{tag}.heads"], name=f"{tag}.reshape"),
            onnx.helper.make_node("SimplifiedLayerNormalization", [f"{tag}.heads", f"{tag}.weight"], [f"{tag}.normed"],
                                  name=f"{tag}.norm", axis=-1, epsilon=eps, stash_type=stash),
            onnx.helper.make_node("Reshape", [f"{tag}.normed", f"{tag}.flat_shape"], [f"{tag}.out"],
                                  name=f"{tag}.flatten"),
        ]
        before[id(gqa)] = nodes
        drop.update(id(n) for n in (split, *chain))
        gqa.input[0], gqa.input[1], gqa.input[2] = f"{tag}.out", "", ""
        report["packed"] += 1
    if report["packed"]:
        out = []
        for node in graph.node:
            if id(node) in drop:
                continue
            out += before.get(id(node), []) + [node]
        _set_nodes(graph, out, new_inits)
    return report
