"""The assistant's TensorRT engine (``engines/assistant.engine``): its step graph prepared for TensorRT and built.

The artifact's assistant graph (`exporter.export_assistant`) is one drafting step that reads the target's last full
and last sliding layer caches.  On TensorRT its attention runs as **TensorRT-native ops**, not through our
``gemma4::FusedAttention`` plugin, whose contract (`plugins.fused_attention`) does not fit a query-only reader:

* the plugin writes the call's keys and values into the cache (its presents alias the pasts); the assistant has no
  keys or values and must leave the target's caches untouched;
* the plugin's keys are fixed by ``past_lens`` (full: slots <= the query's position, the query's own key included;
  sliding: the last ``window`` positions); the assistant reads explicit ranges: full ``[0, full_len)`` (its query
  position's slot is not written yet), sliding ``[sliding_start, sliding_end)``, up to ``window + 1`` entries;
* the plugin ropes the keys it is given; the target's cached keys are roped already.

The step graph's attention is plain ONNX (``Gather`` of the full slots read, ring positions by ``Mod``, masks by
comparisons, ``MatMul``/``Softmax``/``Where``), every op of which the TensorRT ONNX parser imports natively
(onnx-tensorrt ``docs/operators.md``: `TENSORRT_OPS` below, with the restrictions it documents checked by
`check_tensorrt_ops`).  So the preparation is small, and CPU-testable (the prepared graph runs on ONNX Runtime):

1. an fp32 assistant's Linears cast to bf16 / fp16 like the target's (`exporter.cast_precision.cast_linears`:
   weights in the low type, activations cast down before each MatMul and back after it; norms, softmax, the cache
   reads and the hidden state stay fp32); a Q/DQ (INT8/INT4) assistant keeps its precision, fp32 builds as is;
2. constants folded (onnxscript's ``fold_constants``): the exporter computes ReduceMean/Slice axes as Reshapes of
   Constants, and the parser documents those inputs as initializers only;
3. the ops checked against what the parser documents (an op it lacks fails here, naming the node, not in the
   builder on a GPU machine).

The engine has one optimization profile: batch 1..``max_batch``, ``full_slots`` 1..max_len, the cache inputs at the
target's cache shapes (max_len and the ring's slot count are the artifact's).  Its I/O is the step graph's
(fp32 and int64): the runner (`runtime.trt_assistant`) binds the TensorRT backend's own fp32 cache tensors by
address.  Built into the staging directory of the target's engine (`graphs.build_tensorrt`), so ``engines/``
holds both or neither; `add_trt_assistant` (``python -m graphs.trt_assistant --artifact DIR``) builds it alone
for an artifact whose target engine exists (after ``make export-assistant``), moving the finished file in.
Recorded as ``assistant.engines.tensorrt`` (``file``, ``from``: the step graph, ``from_sha256``, the dtype, the
TensorRT version, the profile); a record whose step graph hash is not the current one is stale (refused).
Not here: the drafting loop; the embedding table (the runner gathers the target's rows on the host, as on ONNX
Runtime: a table inside the engine would be a second device copy of the target's, 1 GB in bf16 for the 12B).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from runtime.assistant import OFFSET
from runtime.manifest import read_manifest, write_manifest
from runtime.staging import check_writable_artifact, error_message, temp_name

__all__ = ["ENGINE_FILE", "TENSORRT_OPS", "add_trt_assistant", "assistant_profile", "build_assistant_engine",
           "check_tensorrt_ops", "prepare_assistant"]

ENGINE_FILE = "engines/assistant.engine"
# ONNX ops the TensorRT 10 ONNX parser imports (onnx-tensorrt docs/operators.md), those an assistant graph (fp32,
# cast, INT8 / INT4 Q/DQ, centroid-masked head) can contain
TENSORRT_OPS = frozenset({
    "Add", "And", "ArgMax", "Cast", "CastLike", "Concat", "Constant", "ConstantOfShape", "Cos", "CumSum",
    "DequantizeLinear", "Div", "Equal", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm",
    "Greater", "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "MatMul", "Max", "Min", "Mod", "Mul", "Neg",
    "Not", "Or", "Pow", "QuantizeLinear", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum",
    "Reshape", "ScatterElements", "ScatterND", "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Sqrt", "Squeeze",
    "Sub", "Tanh", "Tile", "TopK", "Transpose", "Unsqueeze", "Where",
})
# input index that the parser documents must be an initializer (a Constant node's output counts)
_CONSTANT_INPUT = {"ReduceMean": 1, "ReduceMax": 1, "ReduceMin": 1, "ReduceSum": 1, "Slice": 3, "Squeeze": 1,
                   "Unsqueeze": 1, "TopK": 1, "CumSum": 1}
_FLOAT_ONLY = {"Pow", "MatMul", "Softmax", "Sin", "Cos", "Sqrt", "Tanh", "Reciprocal"}
TOPK_LIMIT = 3840  # "K input must be less than 3840"


def _constant(value) -> Any:
    """The numpy value of an initializer or Constant node output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def check_tensorrt_ops(model) -> dict[str, int]:
    """Raise ValueError naming every node of ``model`` (onnx_ir, shapes inferred) that the TensorRT ONNX parser does
    not import as written (an op it lacks; a non-constant axes/K input; an integer Pow/MatMul; TopK K >= 3840 or
    unsorted); returns the op counts."""
    import onnx_ir as ir

    floats = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    counts: dict[str, int] = {}
    bad = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op = node.op_type
        counts[op] = counts.get(op, 0) + 1
        where = f"{node.name or '(unnamed)'} ({op})"
        if node.domain not in ("", "ai.onnx") or op not in TENSORRT_OPS:
            bad.append(f"{where}: not an op the TensorRT ONNX parser imports")
            continue
        i = _CONSTANT_INPUT.get(op)
        if i is not None and i < len(node.inputs) and node.inputs[i] is not None and _constant(node.inputs[i]) is None:
            bad.append(f"{where}: input {i} must be a constant for TensorRT")
        if op in _FLOAT_ONLY and node.inputs[0].dtype is not None and node.inputs[0].dtype not in floats:
            bad.append(f"{where}: on {node.inputs[0].dtype}; TensorRT documents float types only")
        if op == "TopK":
            k = _constant(node.inputs[1])
            if k is not None and int(k.reshape(-1)[0]) >= TOPK_LIMIT:
                bad.append(f"{where}: K = {int(k.reshape(-1)[0])}; TensorRT takes K < {TOPK_LIMIT}")
            if node.attributes.get_int("sorted", 1) != 1:
                bad.append(f"{where}: sorted=0; TensorRT takes sorted=1 only")
    if bad:
        raise ValueError("the assistant graph has nodes TensorRT cannot import:\n  " + "\n  ".join(bad))
    return counts


def prepare_assistant(step: str | Path, *, dtype: str, precision: str = "fp32"):
    """The step graph at ``step`` prepared for TensorRT (module docstring): (onnx_ir model, report).  ``dtype``
    bf16/fp16 casts an fp32 assistant's Linears; fp32, or a quantized assistant, keeps the graph's precision."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    from exporter.cast_precision import DTYPES, cast_linears

    if dtype not in (*DTYPES, "fp32"):
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join((*DTYPES, 'fp32'))}")
    model = ir.load(str(step))
    # TensorRT caches are rings: the optional sliding_offset input keeps its default 0 as a constant
    model.graph.inputs[:] = [v for v in model.graph.inputs if v.name != OFFSET]
    report: dict[str, Any] = {"dtype": dtype if precision == "fp32" else precision, "linears": 0, "casts": 0}
    if precision == "fp32" and dtype != "fp32":
        report.update(cast_linears(model, dtype))  # first: it finds the Linears in the exported form
    # axes and shapes computed from constants (Reshape of a Constant) become constants: the parser takes axes
    # only from initializers
    fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    common.ShapeInferencePass()(model)  # value types for the checks
    report["ops"] = check_tensorrt_ops(model)
    return model, report


def assistant_profile(manifest: dict, *, max_batch: int, opt_read: int = 512) -> dict[str, tuple]:
    """input name -> (min, opt, max) shapes of the assistant engine's one profile: batch 1..``max_batch`` (opt 1:
    the speculative loop drafts one row at a time), ``full_slots`` 1..max_len, the caches at the target's shapes."""
    max_len = int(manifest["max_len"])
    record = manifest["assistant"]
    decode = {s["name"]: s for s in manifest["graphs"]["decode"]["inputs"]}
    out = {}
    for spec in record["inputs"]:
        name = spec["name"]
        if name == OFFSET:  # a constant in the prepared graph (`prepare_assistant`)
            continue
        shape = decode[record["target_caches"][name]]["shape"] if name in record["target_caches"] else spec["shape"]
        dims = []
        for d in shape:
            if d == "batch":
                dims.append((1, 1, max_batch))
            elif d in ("full_read", "max_len"):
                dims.append((1, min(opt_read, max_len), max_len) if d == "full_read" else (max_len,) * 3)
            elif isinstance(d, int) or str(d).isdigit():
                dims.append((int(d),) * 3)
            else:
                raise ValueError(f"assistant input {name!r}: dim {d!r} has no size in the TensorRT profile")
        out[name] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return out


def _save(model, path: Path) -> None:
    import onnx_ir as ir

    ir.save(model, path, external_data=f"{path.name}.data")


def build_assistant_engine(root: Path, manifest: dict, stage: Path, *, dtype: str, max_batch: int,
                           log=print) -> dict:
    """Prepare the assistant's step graph under ``stage``/cast, build its engine as ``stage``/assistant.engine and
    return its record (``assistant.engines.tensorrt``); the cast copy is removed."""
    import tensorrt as trt
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )

    t0 = time.perf_counter()
    record = manifest["assistant"]
    model, report = prepare_assistant(root / record["file"], dtype=dtype, precision=record.get("precision", "fp32"))
    work = stage / "assistant-cast"
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"assistant.{report['dtype']}.onnx"
    _save(model, path)
    shapes = assistant_profile(manifest, max_batch=max_batch)
    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    network = NetworkFromOnnxPath(str(path), strongly_typed=True)  # precision from the graph, as the target's
    engine = EngineFromNetwork(network, config=CreateConfig(profiles=[profile]))
    SaveEngine(engine, path=str(stage / Path(ENGINE_FILE).name))()
    shutil.rmtree(work, ignore_errors=True)
    log(f"[build-engine] tensorrt assistant: {ENGINE_FILE} ({report['linears']} Linears cast to {report['dtype']}, "
        f"attention as TensorRT ops; {time.perf_counter() - t0:.0f} s)")
    return {"file": ENGINE_FILE, "from": record["file"], "from_sha256": manifest["files"][record["file"]],
            "dtype": report["dtype"], "tensorrt": trt.__version__, "max_batch": max_batch,
            "profile": {k: [list(d) for d in v] for k, v in shapes.items()}}


def add_trt_assistant(artifact: str | Path, *, dtype: str | None = None, max_batch: int | None = None,
                      log=print) -> dict:
    """Build the assistant's engine for an artifact whose target TensorRT engine exists (dtype and max_batch
    default to the target engine's) and record it; returns the manifest.  Nothing changes on failure."""
    root = Path(artifact)
    manifest = read_manifest(root)
    check_writable_artifact(root, manifest, log=log)
    if "assistant" not in manifest:
        raise ValueError(f"{root}: the artifact has no assistant (make export-assistant ASSISTANT=<dir> OUT={root})")
    target = manifest.get("engines", {}).get("tensorrt")
    if target is None:
        raise ValueError(f"{root}: no TensorRT engine of the target; build both with "
                         f"`make build-engine BACKEND=tensorrt OUT={root}`")
    dtype = dtype or target.get("dtype", "bf16")
    dtype = dtype if dtype in ("bf16", "fp16", "fp32") else "bf16"  # a Q/DQ target records its precision
    stage = root / temp_name("engines")
    stage.mkdir()
    try:
        import plugins.tensorrt_plugins  # noqa: F401  (the backend loads them beside this engine)

        rec = build_assistant_engine(root, manifest, stage, dtype=dtype,
                                     max_batch=max_batch or int(target.get("max_batch", 8)), log=log)
        (root / ENGINE_FILE).parent.mkdir(exist_ok=True)
        os.replace(stage / Path(ENGINE_FILE).name, root / ENGINE_FILE)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    assistant = dict(manifest["assistant"])
    assistant["engines"] = dict(assistant.get("engines", {}), tensorrt=rec)
    return write_manifest(root, dict(manifest, assistant=assistant))


def _unavailable() -> str | None:
    """Why this machine cannot build the engine (`graphs.build.tensorrt_unavailable_reason`, which imports this
    module's importer), or None."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError as e:
        return f"tensorrt or torch is not importable ({e})"
    return None if torch.cuda.is_available() else "no CUDA device is visible to torch"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphs.trt_assistant", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="an artifact with an assistant and a target TensorRT engine")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="the Linears' precision (default: the target engine's)")
    p.add_argument("--if-engine", action="store_true",
                   help="only when the artifact has a target TensorRT engine and this machine can build one")
    a = p.parse_args(argv)
    try:
        if a.if_engine:
            has = "tensorrt" in read_manifest(a.artifact, verify=False).get("engines", {})
            reason = None if not has else _unavailable()
            if not has or reason:
                print(f"trt-assistant: {a.artifact}: {'no target TensorRT engine' if not has else reason}; "
                      "no TensorRT assistant engine built")
                return 0
        add_trt_assistant(a.artifact, dtype=a.dtype)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"trt-assistant: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
