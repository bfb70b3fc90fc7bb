"""ONNX Runtime lowering: a one-token call (every decode step) builds the sliding layers' mask with fewer kernels.

Pattern: the nodes `graphs.lower_ort_attention` makes once per graph for all sliding layers (named ``ort_lower_mask_*``):
token positions, the ring slots read, the additive mask over (ring, new keys) and the ring-write indices, handed to
the layers as the values named in ``SLIDING_SHARED``.  For any number S of new tokens they take ~60 kernels
(padding, the window, causality and bidirectional image blocks between new tokens).  With S = 1 most of it is
constant: the one query sees every filled ring slot inside its window and itself.

Rewrite: one ``If`` (S == 1, S from ``input_ids``).  The else-branch holds the general nodes unchanged; the
then-branch computes the same five values for S = 1 in ~30 kernels, by the same formulas specialised:

* positions: ``past_lens`` (B, 1); slots read n = max(1, min(W, max(past_lens))), as in the general form;
* mask (B, 1, 1, n + 1): ring slot j (position p_j = L - ((L - j) mod W), L = past_lens - 1) is valid iff
  p_j >= max(0, past_lens - W + 1) (filled and inside the window; causality holds: p_j < past_lens); the new key iff
  seq_lens > 0;
* ring write: first slot (past_lens + seq_lens - 1) mod W, and the gather index of that position: the new token
  (index n) if seq_lens > 0, else the ring's own slot (min(p mod W, n - 1)), as the general form computes it for U = 1.

The values are those of the general nodes for S = 1 (tests/test_lower_ort.py runs decode steps and one-token
prefills, padded rows included, against the plugin graphs).  Works on the serialized graph.
"""

from __future__ import annotations

import numpy as np

from graphs.lower_ort_attention import MASK, SLIDING_SHARED

__all__ = ["specialize_single_token"]

PREFIX = f"ort_lower_{MASK}"


def specialize_single_token(proto, geometry: tuple[int, int, int] | None, *, log=print) -> int:
    """Put the sliding layers' shared nodes under an ``If`` with a one-token branch, in place on the ModelProto
    ``proto``; ``geometry``: (window, kv heads, head dim) of the sliding layers.  Returns the general nodes moved
    into the else-branch (0: nothing to do or refused, with the reason logged)."""
    import onnx

    from graphs.lower_ort_embedders import renamed_copies, toposort

    g = proto.graph
    general = [n for n in g.node if n.name.startswith(PREFIX)]
    names = list(SLIDING_SHARED.values())
    inputs = {vi.name for vi in g.input}
    if not general or geometry is None:
        return 0
    made = {o for n in general for o in n.output if o}
    inside = {id(n) for n in general}
    read_outside = {i for n in g.node if id(n) not in inside for i in n.input} | {o.name for o in g.output}
    if not set(names) <= made or (made & read_outside) - set(names) or not {"input_ids", "past_lens",
                                                                             "seq_lens"} <= inputs:
        log("[ort-lower] one-token mask branch not made: the shared sliding nodes are not in the expected form")
        return 0
    w, hkv, d = geometry
    tag = "ort_lower_s1"
    h = onnx.helper
    consts = {
        f"{tag}_axes1": np.array([1], np.int64), f"{tag}_axes12": np.array([1, 2], np.int64),
        f"{tag}_axes123": np.array([1, 2, 3], np.int64), f"{tag}_one": np.array([1], np.int64),
        f"{tag}_zero": np.array([0], np.int64), f"{tag}_w": np.array([w], np.int64),
        f"{tag}_w1": np.array([w - 1], np.int64), f"{tag}_s0": np.array(0, np.int64),
        f"{tag}_s1": np.array(1, np.int64), f"{tag}_f0": np.array(0, np.float32),
        f"{tag}_fmin": np.array(np.finfo(np.float32).min, np.float32),
        f"{tag}_shape": np.array([1, hkv, 1, d], np.int64),
    }
    g.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in consts.items())
    c = {k.removeprefix(f"{tag}_"): k for k in consts}
    nodes, out = [], {}

    def add(op, ins, **attrs):
        name = f"{tag}_{op}_{len(nodes)}"
        nodes.append(h.make_node(op, ins, [name], name=name, **attrs))
        return name

    lens, sl = "past_lens", "seq_lens"
    out["pos"] = add("Unsqueeze", [lens, c["axes1"]])  # (B, 1)
    out["used"] = add("Max", [add("Min", [add("ReduceMax", [lens], keepdims=1), c["w"]]), c["one"]])  # (1,)
    last = add("Unsqueeze", [add("Sub", [lens, c["one"]]), c["axes1"]])  # (B, 1)
    slots = add("Range", [c["s0"], add("Squeeze", [out["used"], c["zero"]]), c["s1"]])  # (n,)
    ring_pos = add("Sub", [last, add("Mod", [add("Sub", [last, slots]), c["w"]], fmod=0)])  # (B, n)
    lo = add("Max", [add("Sub", [out["pos"], c["w1"]]), c["zero"]])  # (B, 1): max(0, past_lens - W + 1)
    new_ok = add("Greater", [add("Unsqueeze", [sl, c["axes1"]]), c["zero"]])  # (B, 1)
    ok = add("Concat", [add("GreaterOrEqual", [ring_pos, lo]), new_ok], axis=1)  # (B, n + 1)
    out["bias"] = add("Unsqueeze", [add("Where", [ok, c["f0"], c["fmin"]]), c["axes12"]])  # (B, 1, 1, n + 1)
    start = add("Sub", [add("Add", [lens, sl]), c["one"]])  # (B,): the one position written, may be -1
    out["first"] = add("Mod", [start, c["w"]], fmod=0)
    is_new = add("GreaterOrEqual", [start, lens])
    idx = add("Where", [is_new, add("Add", [add("Sub", [start, lens]), out["used"]]),
                        add("Min", [add("Mod", [start, c["w"]], fmod=0), add("Sub", [out["used"], c["one"]])])])
    out["gather"] = add("Expand", [add("Unsqueeze", [idx, c["axes123"]]), c["shape"]])  # (B, Hkv, 1, D)
    keys = list(SLIDING_SHARED)
    then_g = h.make_graph(nodes, f"{tag}_then", [], [onnx.ValueInfoProto(name=out[k]) for k in keys])
    rename = {o: f"{o}__{tag}_general" for o in made}
    else_nodes = renamed_copies(general, rename)
    else_g = h.make_graph(else_nodes, f"{tag}_else", [],
                          [onnx.ValueInfoProto(name=rename[SLIDING_SHARED[k]]) for k in keys])
    s = h.make_node("Shape", ["input_ids"], [f"{tag}_S"], name=f"{tag}_S", start=1, end=2)
    one_token = h.make_node("Equal", [f"{tag}_S", c["one"]], [f"{tag}_cond"], name=f"{tag}_cond")
    branch = h.make_node("If", [f"{tag}_cond"], [SLIDING_SHARED[k] for k in keys], name=tag,
                         then_branch=then_g, else_branch=else_g)
    first = next(k for k, n in enumerate(g.node) if id(n) in inside)
    kept = [n for n in g.node if id(n) not in inside]
    new = toposort(kept[:first] + [s, one_token, branch] + kept[first:])
    del g.node[:]
    g.node.extend(new)
    log(f"[ort-lower] sliding layers' shared mask: {len(general)} nodes for any S, {len(nodes)} for one token (If)")
    return len(general)
