"""Outline a region of an exported graph into one custom node whose model-local function is the region itself.

torch.onnx records each node's module path (``pkg.torch.onnx.name_scopes`` metadata); the plugin rewrites select
the nodes of one module call (for example ``layers.3.self_attn.core``), check that the region's inputs and outputs
are exactly the plugin's contract, and replace it by a single node ``domain::op_type``.  The replaced nodes become
the body of a model-local function with the same name (one overload per region, since layers differ in shapes and
constants), so ONNX Runtime runs the node exactly as before while TensorRT, seeing ``plugin_namespace``, runs the
plugin.  Small constants the region reads (RoPE frequencies) move into the body; weights stay node inputs.

Used by `graphs.fuse_attention` and `graphs.fuse_patch_embed`; it does not decide what a region means.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

import numpy as np

__all__ = ["Region", "Refused", "outline", "region", "scopes_of", "shape_scalar"]

SCOPE_KEY = "pkg.torch.onnx.name_scopes"


class Refused(ValueError):
    """A region that does not match a contract; the message says why (the graph is left unchanged)."""


def scopes_of(node) -> list[str]:
    raw = node.metadata_props.get(SCOPE_KEY)
    if not raw:
        return []
    try:
        return [s.removeprefix("m.") for s in ast.literal_eval(raw)]
    except (ValueError, SyntaxError):
        return []


@dataclass
class Region:
    nodes: list  # in graph order
    inputs: list  # values read from outside (graph inputs, initializers, other nodes' outputs), first-use order
    outputs: list  # values used outside the region or graph outputs


def region(graph, scopes: tuple[str, ...]) -> Region | None:
    """The nodes called under any of ``scopes`` (module paths without the wrapper's ``m.``), plus constant-only
    helper nodes used solely by them; None when no node has such a scope."""
    nodes = [n for n in graph if any(s in scopes for s in scopes_of(n))]
    if not nodes:
        return None
    inside = set(nodes)
    changed = True
    while changed:  # absorb Constant-like producers (no inputs) whose every use is inside
        changed = False
        for n in graph:
            if n in inside or n.inputs:
                continue
            if all(use.node in inside for o in n.outputs for use in o.uses()) and any(o.uses() for o in n.outputs):
                inside.add(n)
                changed = True
    for n in [n for n in inside if not n.inputs]:  # a constant also used outside stays outside (and is copied in)
        if any(use.node not in inside for o in n.outputs for use in o.uses()):
            inside.discard(n)
    nodes = [n for n in graph if n in inside]
    inputs, seen = [], set()
    for n in nodes:
        for v in n.inputs:
            if v is None or id(v) in seen:
                continue
            if v.producer() is None or v.producer() not in inside:
                inputs.append(v)
                seen.add(id(v))
    graph_outputs = set(id(v) for v in graph.outputs)
    outputs = [
        o for n in nodes for o in n.outputs
        if id(o) in graph_outputs or any(use.node not in inside for use in o.uses())
    ]
    return Region(nodes, inputs, outputs)


def _const_array(value) -> np.ndarray:
    return np.asarray(value.const_value.numpy())


def shape_scalar(value):
    """(source value, axis) when ``value`` is ``Squeeze(Shape(source, start=axis, end=axis + 1))``, else None."""
    sq = value.producer()
    if sq is None or sq.op_type != "Squeeze" or sq.inputs[0] is None:
        return None
    sh = sq.inputs[0].producer()
    if sh is None or sh.op_type != "Shape":
        return None
    start, end = sh.attributes.get_int("start", 0), sh.attributes.get_int("end", None)
    if end is None or end != start + 1:
        return None
    return sh.inputs[0], start


def outline(model, reg: Region, *, domain: str, op_type: str, overload: str, inputs: list, outputs: list,
            embed: list, attributes: dict, opset: int, derived: dict | None = None) -> object:
    """Replace ``reg`` by one node ``domain::op_type`` (inputs/outputs in contract order).  ``embed``: initializers
    and Constant outputs copied into the body; ``derived``: ``{value: (input index, axis)}`` for size scalars the
    region read from elsewhere, recomputed in the body from that contract input's shape.  Returns the new node."""
    import onnx_ir as ir

    graph = model.graph
    derived = derived or {}
    covered = {id(v) for v in inputs} | {id(v) for v in embed} | {id(v) for v in derived}
    if not {id(v) for v in reg.inputs} <= covered:
        raise Refused("contract inputs do not cover the region's inputs")
    if {id(v) for v in outputs} != {id(v) for v in reg.outputs}:
        raise Refused("contract outputs do not cover the region's outputs")
    attrs = []
    for k, v in attributes.items():
        if isinstance(v, str):
            attrs.append(ir.AttrString(k, v))
        elif isinstance(v, float):
            attrs.append(ir.AttrFloat32(k, v))
        else:
            attrs.append(ir.AttrInt64(k, int(v)))
    node = ir.Node(domain, op_type, inputs, attrs, overload=overload, num_outputs=len(outputs),
                   name=f"{op_type}_{overload}")
    graph.insert_before(reg.nodes[0], node)
    inside = set(reg.nodes)
    for old, new in zip(outputs, node.outputs):
        new.type, new.shape = old.type, old.shape
        for use in list(old.uses()):
            if use.node not in inside:
                use.node.replace_input_with(use.idx, new)
        for i, g_out in enumerate(graph.outputs):
            if g_out is old:
                graph.outputs[i] = new
                name = old.name
                old.name = f"{name}__{overload}"
                new.name = name
        if new.name is None or new.name == old.name:
            new.name = f"{old.name}__out"
    body_inputs = []
    for v in inputs:
        fv = ir.Value(name=v.name, type=v.type, shape=v.shape)
        body_inputs.append(fv)
        for use in list(v.uses()):
            if use.node in inside:
                use.node.replace_input_with(use.idx, fv)
    consts = []
    for v in embed:
        if v.is_initializer():
            c = ir.node("Constant", [], attributes={"value": ir.tensor(_const_array(v), name=v.name)})
        else:  # a Constant node shared with other regions: copy it
            c = ir.node("Constant", [], attributes=dict(v.producer().attributes))
        c.outputs[0].name = v.name
        consts.append(c)
        for use in list(v.uses()):
            if use.node in inside:
                use.node.replace_input_with(use.idx, c.outputs[0])
    for v, (index, axis) in derived.items():
        sh = ir.node("Shape", [body_inputs[index]], attributes={"start": axis, "end": axis + 1})
        sq = ir.node("Squeeze", [sh.outputs[0]])
        sq.outputs[0].name = v.name
        consts += [sh, sq]
        for use in list(v.uses()):
            if use.node in inside:
                use.node.replace_input_with(use.idx, sq.outputs[0])
    graph.remove(reg.nodes, safe=False)
    for v in embed:
        if not v.uses() and v.name in graph.initializers:
            graph.initializers.pop(v.name)
    body = ir.Graph(body_inputs, outputs, nodes=consts + reg.nodes, opset_imports={"": opset},
                    name=f"{op_type}_{overload}")
    model.functions[(domain, op_type, overload)] = ir.Function(domain, op_type, overload, graph=body, attributes=[])
    model.opset_imports.setdefault(domain, 1)
    return node
