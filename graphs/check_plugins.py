"""Check a plugin graph: exactly one ``FusedAttention`` per layer, one ``PatchEmbed`` in prefill when the model has
vision (none in decode), TensorRT routing attributes present, a function body for every plugin node, and no node
of an attention core or the vision embedder left outside them.  Raises `PluginGraphError` naming what is wrong."""

from __future__ import annotations

from collections import Counter

from graphs.outline import scopes_of
from plugins import fused_attention as fa
from plugins import patch_embed as pe

__all__ = ["PluginGraphError", "check_plugin_graph"]


class PluginGraphError(ValueError):
    pass


def check_plugin_graph(model, cfg, graph: str) -> dict[str, int]:
    counts = Counter((n.domain, n.op_type) for n in model.graph if n.domain == fa.DOMAIN)
    want = {(fa.DOMAIN, fa.OP): cfg.text.num_layers}
    if graph == "prefill" and cfg.vision is not None:
        want[(pe.DOMAIN, pe.OP)] = 1
    problems = []
    for key, n in want.items():
        if counts.get(key, 0) != n:
            problems.append(f"{counts.get(key, 0)} {key[1]} nodes, expected {n}")
    for key in counts:
        if key not in want:
            problems.append(f"unexpected {key[1]} nodes: {counts[key]}")
    layers = sorted(n.attributes.get_int("sliding", -1) for n in model.graph if n.op_type == fa.OP)
    if len(layers) == cfg.text.num_layers:
        n_sliding = sum(cfg.text.is_sliding(i) for i in range(cfg.text.num_layers))
        if layers.count(1) != n_sliding:
            problems.append(f"{layers.count(1)} sliding FusedAttention nodes, expected {n_sliding}")
    for n in model.graph:
        if n.domain != fa.DOMAIN:
            if n.inputs and any(s.endswith(".self_attn.core") or s.startswith(("model.vision_embedder", "model.embed_vision"))
                   for s in scopes_of(n)):
                problems.append(f"node {n.name} ({n.op_type}) of a fused region is still outside a plugin")
            continue
        if n.attributes.get_string("plugin_namespace", None) != fa.DOMAIN or n.attributes.get_string(
                "plugin_version", None) != fa.VERSION:
            problems.append(f"{n.name}: plugin_namespace/plugin_version attributes missing")
        if (n.domain, n.op_type, n.overload) not in model.functions:
            problems.append(f"{n.name}: no model-local function {n.op_type}:{n.overload} (ONNX Runtime needs it)")
    if problems:
        raise PluginGraphError(f"{graph} plugin graph: " + "; ".join(problems[:8]))
    return {k[1]: v for k, v in counts.items()}
