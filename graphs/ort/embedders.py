"""ONNX Runtime lowering: the vision and audio embedders run only when their inputs have rows.

Pattern: the nodes that depend on nothing but one modality's inputs (``image_patches`` + ``image_positions``, or
``audio_frames``), initializers and constants: the patch embedder, its position embedding, the projections into the
text width (the *cone* of those inputs).  A text prompt and every decode step (the one-graph engine runs decode as
a one-token prefill) feed them zero rows, and ONNX Runtime still runs each node of the cone on empty tensors: ~46
kernels per step on the bench model, ~0.5 ms of a 10 ms INT4 step.

Rewrite: one ``If`` (rows > 0).  Its then-branch holds the cone's nodes unchanged (the numbers of an image or audio
prompt are the same); its else-branch returns constants: the values the cone computes from zero rows, found by
running the cone alone in ONNX Runtime at build time, so a prompt without images or audio gets exactly what it got
before.  The If's outputs are the cone's values read outside it (the soft-token features, row counts), under their
names, so nothing else changes.  Refused (left as it is): an input whose non-row dims are not static, a cone whose
zero-row values ONNX Runtime cannot compute, or nothing read outside the cone.

Works on the serialized graph (onnx protos), weights left in their external data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["GROUPS", "gate_embedders", "renamed_copies", "toposort"]

# the inputs of each modality (those present in a graph are gated together)
GROUPS = (("image_patches", "image_positions"), ("audio_frames",))


def _cone(graph, inputs: list[str]) -> tuple[list, set[str]]:
    """Nodes (graph order) that read only ``inputs``, constants (initializers, Constant nodes and what is computed
    from constants alone) and each other's outputs, and at least one of ``inputs`` or of each other's outputs; the
    names of the values they make."""
    known = {t.name for t in graph.initializer} | {""}
    reached = set(inputs)
    nodes = []
    for node in graph.node:  # graphs are sorted: a node's producers come before it
        if _has_subgraph(node) or not all(i in known or i in reached for i in node.input):
            continue
        if any(i in reached for i in node.input):
            nodes.append(node)
            reached.update(o for o in node.output if o)
        else:  # constant-derived: stays outside, read by the branch from the outer scope
            known.update(node.output)
    return nodes, reached - set(inputs)


def _has_subgraph(node) -> bool:
    import onnx

    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _reads(node) -> set[str]:
    """Values a node reads, those of its subgraphs' nodes included (outer-scope references and their own)."""
    out = set(node.input)
    for a in node.attribute:
        for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in sub.node:
                out |= _reads(n)
    return out


def renamed_copies(nodes: list, rename: dict[str, str]) -> list:
    """Copies of ``nodes`` reading and writing ``rename[name]`` instead of each name it has (for a branch body: no
    value in a subgraph may shadow one of the outer graph)."""
    import onnx

    out = []
    for n in nodes:
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = [rename.get(i, i) for i in n.input]
        c.output[:] = [rename.get(o, o) for o in n.output]
        out.append(c)
    return out


def toposort(nodes: list) -> list:
    """Nodes in an order where every value is made before it is read (subgraph reads included), keeping the given
    order wherever it already is one."""
    made_by = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    deps = [{made_by[i] for i in _reads(n) if i in made_by and made_by[i] != k} for k, n in enumerate(nodes)]
    users: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(k)
    import heapq

    waiting = [len(d) for d in deps]
    ready = [k for k, w in enumerate(waiting) if not w]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for u in users.get(k, []):
            waiting[u] -= 1
            if not waiting[u]:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ValueError("the graph has a cycle")
    return order


def _zero_row_values(proto, nodes: list, inputs: list, outputs: list[str], base: Path) -> list[np.ndarray]:
    """What ``nodes`` compute for ``outputs`` from zero-row ``inputs`` (ValueInfoProtos), run alone in ONNX Runtime
    (their initializers' external data read from ``base``)."""
    import onnx
    import onnxruntime as ort

    g = proto.graph
    used = {i for n in nodes for i in n.input}
    # the constant-derived values the cone reads, computed in the probe too
    made_by = {o: n for n in g.node for o in n.output if o}
    need, stack = [], [i for i in used if i in made_by and made_by[i] not in nodes]
    seen = set()
    while stack:
        n = made_by[stack.pop()]
        if id(n) in seen:
            continue
        seen.add(id(n))
        need.append(n)
        used |= set(n.input)
        stack += [i for i in n.input if i in made_by]
    inits = [t for t in g.initializer if t.name in used]
    order = {id(n): k for k, n in enumerate(g.node)}
    consts = sorted(need, key=lambda n: order[id(n)])
    probe = onnx.helper.make_graph(consts + list(nodes), "zero_rows", list(inputs),
                                   [onnx.ValueInfoProto(name=o) for o in outputs], inits)
    model = onnx.helper.make_model(probe, opset_imports=list(proto.opset_import), ir_version=proto.ir_version)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(base))
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for vi in inputs:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim][1:]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = np.zeros((0, *dims), dtype)
    return sess.run(outputs, feeds)


def gate_embedders(proto, base: Path, *, log=print, drop: tuple[str, ...] = ()) -> dict[str, int]:
    """Put each modality's cone (module docstring) under an ``If`` on its first input having rows, in place on the
    ModelProto ``proto`` (weights read from ``base`` only to compute the zero-row constants).  Returns
    {first input name: nodes moved} for the groups gated.  A group whose first input is in ``drop`` (an engine that
    refuses that modality) keeps only the else-branches: its zero-row constants and the embeddings passed through,
    with no ``If`` and no embedder left to run."""
    import onnx

    g = proto.graph
    graph_inputs = {vi.name: vi for vi in g.input}
    done = {}
    for group in GROUPS:
        names = [n for n in group if n in graph_inputs]
        if not names:
            continue
        vis = [graph_inputs[n] for n in names]
        static = all(len(vi.type.tensor_type.shape.dim) >= 1 and all(d.HasField("dim_value") for d in
                     vi.type.tensor_type.shape.dim[1:]) for vi in vis)
        if not static:
            log(f"[ort-lower] {names[0]}: embedder not gated: non-row dims are not static")
            continue
        nodes, made = _cone(g, names)
        inside = {id(n) for n in nodes}
        read_outside = {i for n in g.node if id(n) not in inside for i in n.input} | {o.name for o in g.output}
        boundary = [o for n in nodes for o in n.output if o in made and o in read_outside]
        if not nodes or not boundary:
            continue
        try:
            empty = _zero_row_values(proto, nodes, vis, boundary, base)
        except Exception as e:  # noqa: BLE001 - any ORT failure leaves the graph as it was
            log(f"[ort-lower] {names[0]}: embedder not gated: its zero-row values could not be computed ({e})")
            continue
        tag = f"ort_lower_gate_{names[0]}"
        # then: the cone as it is, every value it makes renamed inside the branch (no shadowing of outer names)
        rename = {o: f"{o}__{tag}" for o in made}
        then_nodes = renamed_copies(nodes, rename)
        then_g = onnx.helper.make_graph(then_nodes, f"{tag}_then", [],
                                        [onnx.ValueInfoProto(name=rename[o]) for o in boundary])
        else_nodes = [onnx.helper.make_node("Constant", [], [f"{o}__{tag}_empty"], name=f"{tag}_empty_{k}",
                                            value=onnx.numpy_helper.from_array(np.asarray(v), f"{o}__{tag}_empty"))
                      for k, (o, v) in enumerate(zip(boundary, empty))]
        else_g = onnx.helper.make_graph(else_nodes, f"{tag}_else", [],
                                        [onnx.ValueInfoProto(name=f"{o}__{tag}_empty") for o in boundary])
        rows = onnx.helper.make_node("Shape", [names[0]], [f"{tag}_rows"], name=f"{tag}_rows", start=0, end=1)
        zero = onnx.numpy_helper.from_array(np.array([0], np.int64), f"{tag}_zero")
        has = onnx.helper.make_node("Greater", [f"{tag}_rows", zero.name], [f"{tag}_has"], name=f"{tag}_has")
        gate = onnx.helper.make_node("If", [f"{tag}_has"], boundary, name=tag, then_branch=then_g,
                                     else_branch=else_g)
        g.initializer.append(zero)
        first = next(k for k, n in enumerate(g.node) if id(n) in inside)
        kept = [n for n in g.node if id(n) not in inside]
        new = toposort(kept[:first] + [rows, has, gate] + kept[first:])
        del g.node[:]
        g.node.extend(new)
        merged = _gate_merge(g, tag, boundary, f"{tag}_has")
        done[names[0]] = len(nodes) + merged
        if names[0] in drop:
            _keep_else_branches(g, {tag, f"{tag}_merge"})
            log(f"[ort-lower] {names[0]}: refused by this engine: its embedder and soft-token placing removed")
            continue
        log(f"[ort-lower] {names[0]}: {len(nodes)} embedder nodes run only when it has rows (If; zero-row values "
            f"{[tuple(v.shape) for v in empty]} as constants otherwise); {merged} nodes placing its soft tokens too")
    return done


def _keep_else_branches(g, names: set[str]) -> None:
    """Replace each ``If`` named in ``names`` by its else-branch's nodes (outputs renamed to the If's), then drop
    the nodes nothing reads any more (the branch conditions, the row counts)."""
    import onnx

    new = []
    for n in g.node:
        if n.op_type != "If" or n.name not in names:
            new.append(n)
            continue
        branch = next(a.g for a in n.attribute if a.name == "else_branch")
        rename = {o.name: outer for o, outer in zip(branch.output, n.output)}
        for inner in branch.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            copy.output[:] = [rename.get(o, o) for o in inner.output]
            new.append(copy)
    outputs = {o.name for o in g.output}
    while True:  # dead nodes: no output read by another node or the graph
        read = {i for n in new for i in _reads(n)} | outputs  # subgraphs read outer values too
        live = [n for n in new if any(o in read for o in n.output if o)]
        if len(live) == len(new):
            break
        new = live
    del g.node[:]
    g.node.extend(toposort(new))


def _gate_merge(g, tag: str, gated: list[str], cond: str) -> int:
    """The nodes that place one modality's soft tokens into the text embeddings, ending in
    ``Where(slot mask, soft features, embeddings)``, under an ``If`` on ``cond`` too: without rows the mask is false
    everywhere (`gate_soft_token_slots` ANDs it with "has rows"), so the Where returns its third input, which the
    else-branch passes through (an Identity).  The moved nodes are those between ``gated`` (the embedder If's
    outputs) and that Where; refused (0) unless nothing outside reads them.  Returns the nodes moved."""
    import onnx

    down = set(gated)  # values computed from the embedder's outputs
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
        if any(i in down for i in n.input):
            down.update(o for o in n.output if o)
    made_by = {o: n for n in g.node for o in n.output if o}
    outputs = {o.name for o in g.output}
    for join in g.node:
        if (join.op_type != "Where" or len(join.input) != 3 or join.input[0] not in down
                or join.input[1] not in down or join.input[2] in down):
            continue
        moved, stack = {id(join): join}, [join.input[0], join.input[1]]
        while stack:  # the join's ancestors among the values computed from the embedder's outputs
            v = stack.pop()
            n = made_by.get(v)
            if v in gated or n is None or id(n) in moved or v not in down:
                continue
            moved[id(n)] = n
            stack += list(n.input)
        inner = [n for n in g.node if id(n) in moved]
        leaks = [o for n in inner if n is not join for o in n.output
                 if o in outputs or any(id(u) not in moved for u in users.get(o, []))]
        if leaks or len(inner) < 3:
            continue
        made = {o for n in inner for o in n.output if o}
        rename = {o: f"{o}__{tag}_merge" for o in made}
        then_g = onnx.helper.make_graph(renamed_copies(inner, rename), f"{tag}_merge_then", [],
                                        [onnx.ValueInfoProto(name=rename[join.output[0]])])
        passed = f"{join.output[0]}__{tag}_merge_else"
        else_g = onnx.helper.make_graph([onnx.helper.make_node("Identity", [join.input[2]], [passed],
                                                               name=f"{tag}_merge_else")],
                                        f"{tag}_merge_else", [], [onnx.ValueInfoProto(name=passed)])
        branch = onnx.helper.make_node("If", [cond], [join.output[0]], name=f"{tag}_merge", then_branch=then_g,
                                       else_branch=else_g)
        first = next(k for k, n in enumerate(g.node) if id(n) in moved)
        kept = [n for n in g.node if id(n) not in moved]
        new = toposort(kept[:first] + [branch] + kept[first:])
        del g.node[:]
        g.node.extend(new)
        return len(inner)
    return 0
