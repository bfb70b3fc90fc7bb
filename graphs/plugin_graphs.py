"""Driver: write an artifact's plugin graphs, ``prefill.plugin.onnx`` and ``decode.plugin.onnx``.

Applies the rewrites in a fixed order (`graphs.fuse_attention`, then `graphs.fuse_patch_embed` on prefill), checks
the result (`graphs.check_plugins`), and saves each graph beside the exported one so both read the same
``weights.data`` (nothing is copied).  Files appear only when complete.  Returns what each rewrite changed.
`graphs.build` calls this before building engines: TensorRT parses the plugin nodes, ONNX Runtime inlines their
function bodies.
"""

from __future__ import annotations

import os
from pathlib import Path

from exporter.config import ModelConfig
from graphs.check_plugins import check_plugin_graph
from graphs.fuse_attention import fuse_attention
from graphs.fuse_patch_embed import fuse_patch_embed
from runtime.staging import temp_name

__all__ = ["plugin_graph_name", "make_plugin_graphs", "rewrite_graph"]


def plugin_graph_name(graph_file: str) -> str:
    return graph_file.removesuffix(".onnx") + ".plugin.onnx"


def rewrite_graph(model, cfg: ModelConfig, graph: str, *, log=print) -> dict:
    """Apply the plugin rewrites to one onnx_ir model in place and check it; returns the counts."""
    result = {"FusedAttention": fuse_attention(model, cfg.text, decode=graph == "decode", log=log)}
    if graph == "prefill":
        result["PatchEmbed"] = fuse_patch_embed(model, cfg.vision, log=log)
    model.graph.sort()
    result["nodes"] = check_plugin_graph(model, cfg, graph)
    return result


def make_plugin_graphs(root: str | Path, manifest: dict, *, log=print) -> dict:
    import onnx
    import onnx_ir as ir

    root = Path(root)
    cfg = ModelConfig.from_json_dict(manifest["model_config"])
    written, report = [], {}
    try:
        for graph in ("prefill", "decode"):
            src = manifest["graphs"][graph]["file"]
            model = ir.load(str(root / src))
            report[graph] = rewrite_graph(model, cfg, graph, log=log)
            dst = root / plugin_graph_name(src)
            tmp = dst.with_name(temp_name(dst.name, "tmp"))
            onnx.save(ir.serde.serialize_model(model), str(tmp))  # weights stay in the shared external file
            written.append((tmp, dst))
            log(f"[plugins] {dst.name}: {report[graph]['nodes']}")
        for tmp, dst in written:
            os.replace(tmp, dst)
    finally:
        for tmp, _ in written:
            if tmp.exists():
                tmp.unlink()
    return {g: {"file": plugin_graph_name(manifest["graphs"][g]["file"]), **report[g]} for g in report}
