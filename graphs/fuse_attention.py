"""Rewrite: each layer's attention core (RoPE, mask, attention, cache write) -> one ``gemma4::FusedAttention`` node.

Pattern: the nodes exported from ``model.language_model.layers.N.self_attn.core`` (`exporter.model.AttentionCore`).
Check: the region reads exactly q, k, v (made by q_norm / k_norm / v_norm), ``past_key_N`` / ``past_value_N``,
``past_lens``, the sequence lengths, the image-block ids and RoPE constants, and produces exactly the attention
output and ``present_key_N`` / ``present_value_N``; anything else and the layer is left alone with the reason.
Rewrite: `graphs.outline.outline` with the contract's attributes (`plugins.fused_attention.attributes`).
"""

from __future__ import annotations

from graphs.outline import Refused, outline, region, scopes_of, shape_scalar
from plugins import fused_attention as fa

__all__ = ["fuse_attention"]


def _classify(reg, layer: int, defaults: dict):
    """Contract inputs and outputs of one layer's region, or raise `Refused`.  ``defaults``: values for contract
    inputs a region may not read (decode reads neither seq_lens nor image_block)."""
    slots: dict[str, object] = {}
    embed, sizes = [], []

    def put(name, v):
        if name in slots and slots[name] is not v:
            raise Refused(f"two different values for contract input {name!r}")
        slots[name] = v

    for v in reg.inputs:
        name = v.name or ""
        if v.is_graph_input():
            wanted = {f"past_key_{layer}": "past_key", f"past_value_{layer}": "past_value",
                      "past_lens": "past_lens", "seq_lens": "seq_lens"}
            if name not in wanted:
                raise Refused(f"reads graph input {name!r}, which is not part of the contract")
            put(wanted[name], v)
        elif v.is_initializer():
            if not name.endswith("inv_freq"):
                raise Refused(f"reads initializer {name!r}; only RoPE constants may be folded in")
            embed.append(v)
        elif v.producer().op_type == "Constant" and not v.producer().inputs:
            embed.append(v)
        elif shape_scalar(v) is not None:
            sizes.append(v)
        else:
            producer_scopes = scopes_of(v.producer())
            norm = next((n for n in ("q_norm", "k_norm", "v_norm") if any(s.endswith(f".self_attn.{n}")
                                                                            for s in producer_scopes)), None)
            rank = len(v.shape) if v.shape is not None else None
            if norm is not None:
                put(norm[0], v)
            elif rank == 2:
                put("image_block", v)
            elif rank == 1:
                put("seq_lens", v)
            else:
                raise Refused(f"reads {name!r} (made by {v.producer().op_type}), which is not part of the contract")
    for name, v in defaults.items():
        slots.setdefault(name, v)
    missing = [n for n in fa.INPUTS if n not in slots]
    if missing:
        raise Refused(f"contract inputs not found: {missing}")
    contract = [slots[n] for n in fa.INPUTS]
    derived = {}
    for v in sizes:  # a size read from another tensor: find the same symbolic dim on a contract input
        source, axis = shape_scalar(v)
        dim = source.shape[axis] if source.shape is not None else None
        found = [(i, a) for i, c in enumerate(contract) if c.shape is not None
                 for a, d in enumerate(c.shape) if dim is not None and not isinstance(d, int) and d == dim]
        if not found:
            raise Refused(f"reads size {v.name!r} of {source.name!r} axis {axis}, not a dim of a contract input")
        derived[v] = found[0]
    outs: dict[str, object] = {}
    for o in reg.outputs:
        if o.name == f"present_key_{layer}":
            outs["present_key"] = o
        elif o.name == f"present_value_{layer}":
            outs["present_value"] = o
        elif "out" not in outs and all(any(sc.endswith(".self_attn.o_proj") for sc in scopes_of(u.node))
                                       for u in o.uses()):
            outs["out"] = o
        else:
            raise Refused(f"a value made inside ({o.name!r}) is used outside besides the attention output")
    if len(outs) != 3:
        raise Refused(f"outputs {sorted(outs)}; expected out, present_key, present_value")
    return contract, [outs[n] for n in fa.OUTPUTS], embed, derived


def _prefill_defaults(model, text_cfg) -> dict:
    """Prefill's full layers read neither seq_lens nor the image blocks; the contract takes both."""
    graph = model.graph
    out = {"seq_lens": next(v for v in graph.inputs if v.name == "seq_lens")}
    for layer in range(text_cfg.num_layers):  # the image-block ids a sliding layer reads
        reg = region(graph, (_core_scope(layer),))
        for v in reg.inputs if reg else []:
            if not v.is_graph_input() and not v.is_initializer() and v.shape is not None and len(v.shape) == 2 \
                    and v.dtype is not None and v.dtype.name == "INT64":
                out["image_block"] = v
                return out
    out["image_block"] = _filled(model, [("prefill_image_block", "input_ids", -1)])[0]
    return out


def _decode_defaults(model) -> dict:
    """Decode's seq_lens (ones) and image_block (-1s): the decode graph computes neither, the contract takes both."""
    made = _filled(model, [("decode_seq_lens", "past_lens", 1), ("decode_image_block", "input_ids", -1)])
    return {"seq_lens": made[0], "image_block": made[1]}


def _filled(model, specs) -> list:
    """New int64 tensors shaped like graph inputs, filled with a constant: [(name, input name, fill)]."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    by_name = {v.name: v for v in graph.inputs}
    first = next(iter(graph))
    nodes = []
    for name, src_name, fill in specs:
        src = by_name[src_name]
        sh = ir.node("Shape", [src])
        fill_node = ir.node("ConstantOfShape", [sh.outputs[0]], attributes={"value": ir.tensor(np.array([fill], np.int64))})
        fill_node.outputs[0].name = name
        fill_node.outputs[0].dtype = ir.DataType.INT64
        fill_node.outputs[0].shape = src.shape
        nodes += [sh, fill_node]
    graph.insert_before(first, nodes)
    return [n.outputs[0] for n in nodes[1::2]]


def _core_scope(layer: int) -> str:
    return f"model.language_model.layers.{layer}.self_attn.core"


def _core_of(node) -> int | None:
    for sc in scopes_of(node):
        if sc.endswith(".self_attn.core") and ".layers." in sc:
            return int(sc.split(".layers.")[1].split(".")[0])
    return None


def _localize(graph, layer: int) -> int:
    """Give ``layer``'s region its own copy of values it reads from another layer's core (the exporter computes
    some shared helpers, e.g. ``past_lens - 1``, once and reuses them).  Returns the number of nodes copied."""
    import onnx_ir as ir

    reg = region(graph, (_core_scope(layer),))
    if reg is None:
        return 0
    copies: dict[int, object] = {}
    new_nodes = []
    scope_meta = repr(["", _core_scope(layer)])

    def local(v):
        p = v.producer()
        if p is None or _core_of(p) in (None, layer):
            return v
        if id(v) not in copies:
            clone = ir.Node(p.domain, p.op_type, [None if i is None else local(i) for i in p.inputs],
                            attributes=list(p.attributes.values()), num_outputs=len(p.outputs), overload=p.overload)
            clone.metadata_props["pkg.torch.onnx.name_scopes"] = scope_meta
            for o, co in zip(p.outputs, clone.outputs):
                co.name, co.type, co.shape = f"{o.name}__l{layer}", o.type, o.shape
                copies[id(o)] = co
            new_nodes.append(clone)
        return copies[id(v)]

    for n in reg.nodes:
        for i, v in enumerate(n.inputs):
            if v is not None and v.producer() is not None and _core_of(v.producer()) not in (None, layer):
                n.replace_input_with(i, local(v))
    if new_nodes:
        graph.insert_before(reg.nodes[0], new_nodes)
    return len(new_nodes)


def fuse_attention(model, text_cfg, *, decode: bool, log=print) -> dict:
    """Rewrite every layer; returns ``{"rewritten": n, "refused": {layer: reason}}``."""
    opset = model.opset_imports.get("", 24)
    done, refused = 0, {}
    for layer in range(text_cfg.num_layers):
        _localize(model.graph, layer)
    defaults = _decode_defaults(model) if decode else _prefill_defaults(model, text_cfg)
    for layer in range(text_cfg.num_layers):
        reg = region(model.graph, (_core_scope(layer),))
        if reg is None:
            refused[layer] = "no nodes from this layer's attention core (not an export of exporter.model?)"
            continue
        try:
            inputs, outputs, embed, derived = _classify(reg, layer, defaults)
            outline(model, reg, domain=fa.DOMAIN, op_type=fa.OP, overload=f"layer{layer}", inputs=inputs,
                    outputs=outputs, embed=embed, attributes=fa.attributes(text_cfg, layer, decode=decode),
                    opset=opset, derived=derived)
            done += 1
        except Refused as e:
            refused[layer] = str(e)
            log(f"[plugins] layer {layer}: FusedAttention not applied: {e}")
    return {"rewritten": done, "refused": refused}
