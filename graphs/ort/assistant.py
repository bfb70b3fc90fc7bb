"""ONNX Runtime form of the artifact's assistant: K drafts in one call (``ort-assistant/assistant.onnx``).

The artifact's assistant graph (`exporter.export_assistant`) is one drafting step; the runtime called it K times a
round, and on small models each call's fixed cost (binding, launching ~190 kernels, the embedding gather in Python)
was most of a round.  This form runs the K steps inside one ``Loop``:

* every node of the step graph that does not depend on the step's ``token_embeds``/``hidden`` (attention masks
  from the ranges, rotary tables of the round's position, slices of the target caches) runs once, before the loop:
  a round's steps share ``position`` and the target entries they read (a quantized weight's
  ``DequantizeLinear`` stays in the body, beside the MatMul ONNX Runtime fuses it with);
* the loop body is the rest, headed by the embedding of the step's input token: ``Gather`` from the target's own
  table (the graph input ``embed_table``: the runtime binds the memory-mapped table by pointer, no copy), cast to
  fp32 and times sqrt(hidden), as `runtime.assistant.TargetEmbedding` computes it;
* each step's argmax token and hidden state are carried to the next step; its logits and token are collected.

Inputs: the step graph's, minus ``token_embeds`` (``sliding_offset`` keeps its default), plus ``token`` (B,) (the
round's last target token),
``num_tokens`` (a scalar: K) and ``embed_table`` (V, hidden); outputs ``tokens`` (B, K), ``logits`` (B, K, V) and
``next_hidden`` (B, hidden): what K step calls return.  The RMSNorms are fused first (`graphs.ort.norms`) and
casts to a value's own type dropped.  Same arithmetic as the step graph up to float rounding of the fused norms
(tests/test_assistant_loop.py compares the two).  Written by ``make build-engine`` (onnxruntime) when the artifact
has an assistant, and by ``make export-assistant`` when the artifact has an ONNX Runtime engine
(``python -m graphs.ort.assistant --artifact DIR``); built from the step form ONNX Runtime runs on this CPU
(`runtime.assistant.ort_graph`: an INT8 assistant's MatMulNBits form where exact, else the artifact's graph) and
recorded as ``assistant.loop`` with that file and its sha256, so a re-exported assistant makes it stale (the runtime
then drafts step by step, as it does where it would run another step form).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import read_manifest, write_manifest
from runtime.staging import check_writable_artifact, error_message, replace_dir, temp_name

__all__ = ["DIR", "add_ort_assistant", "build_ort_assistant", "loop_model"]

DIR = "ort-assistant"
FILE = f"{DIR}/assistant.onnx"
_STEP_IN = ("token_embeds", "hidden")  # what changes from one drafting step to the next
_RENAMED = {"hidden": "loop_hidden", "logits": "step_logits", "next_hidden": "step_hidden", "token": "step_token"}


def _lower_step(step: Path):
    """The step graph with its RMSNorms fused and its float->float casts removed (onnx_ir model)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common

    from graphs.ort.norms import fuse_skip_norms, lower_norms
    from graphs.ort.scale_fold import fold_scales_into_norms
    from graphs.ort.shapes import constant_shapes

    model = ir.load(str(step))
    common.ShapeInferencePass()(model)  # value types, for the casts below
    lower_norms(model, log=lambda *_: None)
    fuse_skip_norms(model, log=lambda *_: None)
    fold_scales_into_norms(model)
    constant_shapes(model)  # Reshape/Expand shapes computed from other tensors' dims: constants where they can be
    for node in [n for n in model.graph if n.op_type in ("Cast", "CastLike") and n.domain == ""]:
        src, out = node.inputs[0], node.outputs[0]
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            want = None if to is None else ir.DataType(to.as_int())
        else:
            want = node.inputs[1].dtype
        if want is None or src.dtype is None or src.dtype != want or out.is_graph_output():
            continue
        out.replace_all_uses_with(src)
        model.graph.remove(node, safe=True)
    common.RemoveUnusedNodesPass()(model)
    model.graph.sort()
    return ir.serde.serialize_model(model)


def _depends(node, variant: set[str]) -> bool:
    names = list(node.input)
    for a in node.attribute:  # a subgraph's outer-scope reads count too
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            names += [i for n in g.node for i in n.input]
    return any(i in variant for i in names if i)


def loop_model(step_proto, *, hidden: int, table_dtype: int, scale: float):
    """Wrap the step graph ``step_proto`` (onnx.ModelProto, topologically sorted) in a K-step Loop (module
    docstring); returns the new ModelProto (initializers and their external data references unchanged)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = step_proto.graph
    names = [i.name for i in g.input]
    if any(n not in names for n in _STEP_IN) or [o.name for o in g.output] != ["logits", "next_hidden", "token"]:
        raise ValueError(f"assistant step graph: inputs {names}, outputs {[o.name for o in g.output]}; expected "
                         "token_embeds and hidden among the inputs and outputs logits, next_hidden, token")
    variant, body, outer = set(_STEP_IN), [], []
    for node in g.node:
        if _depends(node, variant):
            body.append(node)
            variant.update(o for o in node.output if o)
        else:
            outer.append(node)
    # a weight's DequantizeLinear (INT4/INT8 graphs) stays beside its MatMul, where ONNX Runtime fuses the pair
    consts = {i.name for i in g.initializer} - set(names)  # an initializer that backs an input is no constant
    outer_uses = {i for n in outer for i in n.input}
    body_uses = {i for n in body for i in n.input}
    moved = [n for n in outer if n.input and all(i in consts for i in n.input if i)
             and any(o in body_uses for o in n.output) and not any(o in outer_uses for o in n.output)]
    outer = [n for n in outer if not any(n is m for m in moved)]
    body = moved + body
    for node in body:
        node.input[:] = [_RENAMED.get(i, i) for i in node.input]
        node.output[:] = [_RENAMED.get(o, o) for o in node.output]
    head = [helper.make_node("Gather", ["embed_table", "loop_token"], ["loop_embed_rows"], axis=0),
            helper.make_node("Cast", ["loop_embed_rows"], ["loop_embed_f32"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["loop_embed_f32", "loop_embed_scale"], ["token_embeds"])]
    tail = [helper.make_node("Identity", ["loop_cond"], ["loop_cond_out"]),
            helper.make_node("Identity", ["step_token"], ["loop_scan_token"]),
            helper.make_node("Identity", ["step_logits"], ["loop_scan_logits"])]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    body_graph = helper.make_graph(
        head + body + tail, "assistant_step",
        [helper.make_tensor_value_info("loop_iter", i64, []),
         helper.make_tensor_value_info("loop_cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("loop_token", i64, ["batch"]),
         helper.make_tensor_value_info("loop_hidden", f32, ["batch", hidden])],
        [helper.make_tensor_value_info("loop_cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("step_token", i64, ["batch"]),
         helper.make_tensor_value_info("step_hidden", f32, ["batch", hidden]),
         helper.make_tensor_value_info("loop_scan_token", i64, ["batch"]),
         helper.make_tensor_value_info("loop_scan_logits", f32, ["batch", None])])
    body_graph.value_info.extend(v for v in g.value_info if v.name in variant and v.name not in _RENAMED)
    # weights only the body reads live in the body: ONNX Runtime's DequantizeLinear -> MatMul fusion (MatMulNBits)
    # looks for the weight among the subgraph's own initializers
    outer_reads = {i for n in outer for i in n.input} | set(names)  # an input's default stays with the input
    local = [t for t in g.initializer if t.name not in outer_reads]
    body_graph.initializer.extend(local)
    local_names = {t.name for t in local}
    nodes = outer + [
        helper.make_node("Constant", [], ["loop_true"], value=helper.make_tensor("loop_true", TensorProto.BOOL, [], [True])),
        helper.make_node("Loop", ["num_tokens", "loop_true", "token", "hidden"],
                         ["last_token", "next_hidden", "loop_tokens", "loop_logits"], body=body_graph),
        helper.make_node("Transpose", ["loop_tokens"], ["tokens"], perm=[1, 0]),
        helper.make_node("Transpose", ["loop_logits"], ["logits"], perm=[1, 0, 2]),
    ]
    vocab = [d.dim_value or d.dim_param for d in g.output[0].type.tensor_type.shape.dim][-1]
    inputs = ([helper.make_tensor_value_info("token", i64, ["batch"])]
              + [i for i in g.input if i.name != "token_embeds"]
              + [helper.make_tensor_value_info("num_tokens", i64, []),
                 helper.make_tensor_value_info("embed_table", table_dtype, ["target_vocab", hidden])])
    outputs = [helper.make_tensor_value_info("tokens", i64, ["batch", "num_tokens"]),
               helper.make_tensor_value_info("logits", f32, ["batch", "num_tokens", vocab]),
               helper.make_tensor_value_info("next_hidden", f32, ["batch", hidden])]
    inits = [t for t in g.initializer if t.name not in local_names]
    inits.append(numpy_helper.from_array(np.array(scale, np.float32), "loop_embed_scale"))
    graph = helper.make_graph(nodes, "assistant_loop", inputs, outputs, inits,
                              value_info=[v for v in g.value_info if v.name not in variant])
    model = helper.make_model(graph, opset_imports=step_proto.opset_import, ir_version=step_proto.ir_version)
    return model


def _table_dtype(root: Path, manifest: dict) -> int:
    from runtime._onnx_refs import initializer_record
    from runtime.assistant import _EMBEDDING_SUFFIXES

    graph = root / manifest["graphs"]["decode"]["file"]
    rec = initializer_record(graph.read_bytes(), _EMBEDDING_SUFFIXES)
    if rec is None or rec["data_type"] not in (1, 10):
        raise ValueError(f"{graph}: no float32/float16 embedding table the assistant can read")
    return int(rec["data_type"])


def build_ort_assistant(root: Path, manifest: dict, stage: Path, *, log=print) -> dict:
    """Write the loop form of ``root``'s assistant into ``stage`` (``assistant.onnx`` + its weights), optimised by
    ONNX Runtime and checked to load; returns its ``assistant.loop`` record (file paths under `DIR`)."""
    import onnxruntime as ort

    from runtime.assistant import ort_graph

    record = manifest["assistant"]
    rel, config = ort_graph(record)  # the step form this CPU runs (an INT8 assistant's MatMulNBits form where exact)
    step = root / rel
    hidden = int(manifest["model_config"]["text"]["hidden_size"])
    table_dtype = _table_dtype(root, manifest)
    proto = loop_model(_lower_step(step), hidden=hidden, table_dtype=table_dtype,
                       scale=math.sqrt(hidden))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(step.parent))
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(stage / "assistant.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "assistant.onnx.data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    check = ort.SessionOptions()
    check.log_severity_level = 3
    ort.InferenceSession(str(stage / "assistant.onnx"), check, providers=["CPUExecutionProvider"])
    body = next(n for n in proto.graph.node if n.op_type == "Loop").attribute[0].g
    log(f"[build-engine] onnxruntime assistant: {len(proto.graph.node) - 4} nodes once per round, {len(body.node)} "
        f"per draft in one Loop -> {FILE}")
    return {"file": FILE, "from": rel, "from_sha256": manifest["files"][rel],
            "embed_table_dtype": "float16" if table_dtype == 10 else "float32"}


def add_ort_assistant(artifact: str | Path, *, manifest: dict | None = None, log=print) -> dict:
    """(Re)write ``DIR`` of an artifact that has an assistant, and record it in the manifest; returns the manifest.
    ``manifest``: the artifact's, just written by the caller (else read and verified here)."""
    root = Path(artifact)
    if manifest is None:
        manifest = read_manifest(root)
        check_writable_artifact(root, manifest, log=log)
    if "assistant" not in manifest:
        raise ValueError(f"{root}: the artifact has no assistant (make export-assistant ASSISTANT=<dir> OUT={root})")
    stage = root / temp_name(DIR)
    stage.mkdir()
    try:
        ort_record = build_ort_assistant(root, manifest, stage, log=log)
        replace_dir(stage, root / DIR, log=log)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    assistant = dict(manifest["assistant"], loop=ort_record)
    return write_manifest(root, dict(manifest, assistant=assistant))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphs.ort.assistant", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="an artifact with an assistant (make export-assistant)")
    p.add_argument("--if-engine", action="store_true",
                   help="only when the artifact has an ONNX Runtime engine (make export-assistant runs it so)")
    a = p.parse_args(argv)
    try:
        if a.if_engine and "onnxruntime" not in read_manifest(a.artifact, verify=False).get("engines", {}):
            print(f"ort-assistant: {a.artifact} has no ONNX Runtime engine yet; `make build-engine` writes the "
                  "assistant's loop form with it")
            return 0
        add_ort_assistant(a.artifact)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"ort-assistant: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
