"""Export Gemma 4's drafting assistant into an existing artifact as its own graph, ``assistant/assistant.onnx``.

One call of the graph is one draft (`exporter.assistant.AssistantModel.step`); the runtime loops it K times
(`runtime.assistant`), or runs its ONNX Runtime loop form (`graphs.ort.assistant`, K drafts in one call), which
``make export-assistant`` writes next when the artifact has an ONNX Runtime engine (an older one is removed here).  Its cache inputs are the target's last full and last sliding layer caches, in the target's
layout: the runtime binds the very OrtValues the target backend writes (IOBinding, no copy), so the graph reads
them in place and writes nothing.  Its optional input ``sliding_offset`` (default ``[0]``, an initializer of the
same name) places position p in sliding slot (p - offset) mod R: 0 on rings, E(T) on ONNX Runtime's windowed
cache.  The manifest's ``assistant`` record names the graph, its inputs and outputs, which target cache inputs feed
it (``target_caches``) and the assistant's config; the files are listed with their sha256 like every other file.

The target's input embedding of each drafted token is a graph *input* (``token_embeds``): the runtime gathers that
row from the target's own table (memory-mapped from the target graph's external data: `runtime.assistant`), so the
12B's 1 GB (fp32: 4 GB) table is not stored twice, and it follows whatever form the target's table has (fp32, or
fp16 after `calib.embedding`).  The assistant's LM head is its own (tied to its own small embedding).

INT4 weights: `python -m calib.assistant_int4` (the same export, its graph rewritten by `calib.int4`); W8A8 INT8:
`python -m calib.assistant_int8` (calibrated on the assistant's inputs in drafting rounds of the target).
Its TensorRT engine is built from this graph by ``make build-engine BACKEND=tensorrt`` (`graphs.trt_assistant`).
Not done: activation-aware (AWQ) INT4 with calibration data.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporter.assistant import AssistantModel, load_assistant
from exporter.config import FULL, SLIDING, ModelConfig
from runtime.manifest import read_manifest, write_manifest
from runtime.staging import check_writable_artifact, error_message, replace_dir, temp_name

__all__ = ["assistant_io", "export_assistant", "target_caches"]

OPSET = 24
OFFSET = "sliding_offset"  # the optional input: position p in ring slot (p - offset) mod R; default [0]
GRAPH = "assistant/assistant.onnx"
ORT_FORM = "ort-assistant"  # graphs.ort.assistant.DIR


def target_caches(target: ModelConfig) -> dict[str, str]:
    """The target cache inputs the assistant reads: its last full and last sliding layer's key and value."""
    types = target.text.layer_types
    if SLIDING not in types or FULL not in types:
        raise ValueError("the target needs at least one sliding and one full attention layer for the assistant")
    full = max(i for i, t in enumerate(types) if t == FULL)
    sliding = max(i for i, t in enumerate(types) if t == SLIDING)
    return {"full_key": f"past_key_{full}", "full_value": f"past_value_{full}",
            "ring_key": f"past_key_{sliding}", "ring_value": f"past_value_{sliding}"}


def assistant_io(model: AssistantModel, target: ModelConfig) -> tuple[list[dict], list[dict]]:
    """Input and output specs of the assistant graph (named dynamic dims)."""
    cfg, t = model.cfg, target.text
    hb = cfg.backbone_hidden_size
    f32 = "float32"
    inputs = [
        {"name": "token_embeds", "dtype": f32, "shape": ["batch", hb]},
        {"name": "hidden", "dtype": f32, "shape": ["batch", hb]},
        {"name": "position", "dtype": "int64", "shape": ["batch"]},
        {"name": "full_slots", "dtype": "int64", "shape": ["full_read"]},
        {"name": "full_len", "dtype": "int64", "shape": ["batch"]},
        {"name": "sliding_start", "dtype": "int64", "shape": ["batch"]},
        {"name": "sliding_end", "dtype": "int64", "shape": ["batch"]},
        # optional (an initializer of [0] backs it: a ring; callers that predate it feed nothing): (B,) or (1,)
        {"name": OFFSET, "dtype": "int64", "shape": ["offset_rows"]},
        {"name": "full_key", "dtype": f32, "shape": ["batch", t.num_global_kv_heads, "max_len", t.global_head_dim]},
        {"name": "full_value", "dtype": f32, "shape": ["batch", t.num_global_kv_heads, "max_len", t.global_head_dim]},
        {"name": "ring_key", "dtype": f32, "shape": ["batch", t.num_kv_heads, "ring_slots", t.head_dim]},
        {"name": "ring_value", "dtype": f32, "shape": ["batch", t.num_kv_heads, "ring_slots", t.head_dim]},
    ]
    outputs = [
        {"name": "logits", "dtype": f32, "shape": ["batch", cfg.text.vocab_size]},
        {"name": "next_hidden", "dtype": f32, "shape": ["batch", hb]},
        {"name": "token", "dtype": "int64", "shape": ["batch"]},
    ]
    return inputs, outputs


class _Step(nn.Module):
    def __init__(self, model: AssistantModel):
        super().__init__()
        self.m = model

    def forward(self, *args):
        return self.m.step(*args)


def _example(model: AssistantModel, target: ModelConfig):
    """Tracing inputs whose sizes differ from each other and from every static dim, so nothing specialises."""
    from torch.export import Dim

    t, hb = target.text, model.cfg.backbone_hidden_size
    batch, max_len, ring, read = 3, 29, 13, 17
    args = (
        torch.randn(batch, hb), torch.randn(batch, hb), torch.tensor([9, 14, 16]), torch.arange(read),
        torch.tensor([9, 14, 16]), torch.tensor([0, 4, 6]), torch.tensor([9, 14, 16]),
        torch.randn(batch, t.num_global_kv_heads, max_len, t.global_head_dim),
        torch.randn(batch, t.num_global_kv_heads, max_len, t.global_head_dim),
        torch.randn(batch, t.num_kv_heads, ring, t.head_dim), torch.randn(batch, t.num_kv_heads, ring, t.head_dim),
        torch.tensor([0, 3, 5]),
    )
    b, n = Dim("batch", min=1, max=1024), Dim("max_len", min=2, max=1 << 22)
    r, f = Dim("ring_slots", min=2, max=1 << 20), Dim("full_read", min=1, max=1 << 22)
    dyn = ({0: b}, {0: b}, {0: b}, {0: f}, {0: b}, {0: b}, {0: b}, {0: b, 2: n}, {0: b, 2: n}, {0: b, 2: r},
           {0: b, 2: r}, {0: b})  # the offset's rows: traced as the batch, named offset_rows after (1 or B)
    return args, (dyn,)


def export_graph(model: AssistantModel, target: ModelConfig, path: Path) -> None:
    """Trace ``model.step`` into ``path`` (weights in ``<name>.data`` beside it), I/O named as `assistant_io`."""
    import onnx

    from exporter.export import _name_dims, _quiet_torch_logs

    inputs, outputs = assistant_io(model, target)
    args, dyn = _example(model, target)
    with warnings.catch_warnings(), _quiet_torch_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Step(model).eval(), args, dynamo=True, opset_version=OPSET, dynamic_shapes=dyn,
            input_names=[i["name"] for i in inputs if i["name"] != OFFSET] + [OFFSET],  # step's argument order
            output_names=[o["name"] for o in outputs],
            external_data=True, optimize=False, verbose=False,  # ORT optimises at load
        )
    program.save(str(path), external_data=True)
    proto = onnx.load(str(path), load_external_data=False)
    _name_dims(proto, [dict(i, shape=["batch"]) if i["name"] == OFFSET else i for i in inputs] + outputs)
    by_name = {i.name: i for i in proto.graph.input}
    by_name[OFFSET].type.tensor_type.shape.dim[0].dim_param = "offset_rows"  # 1 or B rows
    ordered = [onnx.ValueInfoProto() for _ in inputs]  # traced last (step's keyword), listed beside its kin
    for vi, spec in zip(ordered, inputs):
        vi.CopyFrom(by_name[spec["name"]])
    del proto.graph.input[:]
    proto.graph.input.extend(ordered)
    # the default of the optional input: an initializer of the same name (ONNX Runtime feeds it when the caller
    # does not), so a ring's callers that predate the input run the graph unchanged
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.int64), OFFSET))
    onnx.save(proto, str(path))
    got = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    if got != ([i["name"] for i in inputs], [o["name"] for o in outputs]):
        raise RuntimeError(f"{path.name}: exported graph I/O {got} differs from the contract")


def export_assistant(assistant: str | Path | AssistantModel, artifact: str | Path, *, rewrite=None,
                     precision: str = "fp32", log=print) -> dict[str, Any]:
    """Export the assistant (a checkpoint directory or a model) into ``artifact``; returns the new manifest.
    ``rewrite(path)`` rewrites the saved graph in place before it is checked (``calib.assistant_int4``: INT4
    weights; ``calib.assistant_int8``: INT8) and returns counts to log, with under ``record`` what it adds to the
    manifest's assistant record (files it wrote beside the graph); ``precision`` is recorded.

    The artifact must be intact (every file matches its sha256) and hold no unlisted files; a previous assistant
    is replaced only once the new graph is written and loads in ONNX Runtime."""
    root = Path(artifact)
    manifest = read_manifest(root)
    check_writable_artifact(root, manifest, log=log)
    target = ModelConfig.from_json_dict(manifest["model_config"])
    model = assistant if isinstance(assistant, AssistantModel) else load_assistant(assistant)
    try:
        model.cfg.check_target(target.text)
    except ValueError as e:
        raise ValueError(f"{assistant} -> {root}: {e}") from None
    caches = target_caches(target)
    decode_inputs = {s["name"]: s for s in manifest["graphs"]["decode"]["inputs"]}
    if any(name not in decode_inputs for name in caches.values()):
        raise ValueError(f"{root}: the decode graph lacks the cache inputs {sorted(caches.values())}")
    stage = root / temp_name("assistant")
    stage.mkdir()
    try:
        t0 = time.perf_counter()
        log(f"[export-assistant] tracing the assistant step graph ({sum(p.numel() for p in model.parameters()):,} "
            "parameters) ...")
        export_graph(model, target, stage / Path(GRAPH).name)
        extra = {}
        if rewrite is not None:
            done = rewrite(stage / Path(GRAPH).name)
            extra = done.pop("record", {}) if isinstance(done, dict) else {}
            log(f"[export-assistant] {precision}: {done}")
        _check_loads(stage / Path(GRAPH).name)
        replace_dir(stage, root / Path(GRAPH).parent, log=log)
    except BaseException:
        if stage.exists():
            import shutil

            shutil.rmtree(stage, ignore_errors=True)
        raise
    stale = root / ORT_FORM  # the loop form of the assistant replaced (graphs.ort.assistant): rebuilt from the new one
    if stale.is_dir():
        import shutil

        shutil.rmtree(stale)
    inputs, outputs = assistant_io(model, target)
    record = {
        "file": GRAPH, "inputs": inputs, "outputs": outputs, "target_caches": caches,
        "embedding": "token_embeds: the target's input embedding rows (graphs.decode's table, times "
                     "sqrt(hidden)), gathered by the runtime",
        "config": model.cfg.to_json_dict(), "source": getattr(model, "source", {}),
        "precision": precision,
        "export_seconds": round(time.perf_counter() - t0, 2), **extra,
    }
    manifest = write_manifest(root, dict(manifest, assistant=record))
    log(f"[export-assistant] {root}: assistant graph {GRAPH} recorded in manifest.json")
    return manifest


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # not the warning that the optional input's default (an initializer) is no constant
    try:
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types; reported with the file
        raise RuntimeError(f"{path}: ONNX Runtime cannot load the exported assistant graph ({e})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.export_assistant", description=__doc__.split("\n")[0])
    p.add_argument("--assistant", required=True, help="assistant checkpoint directory (transformers' format)")
    p.add_argument("--artifact", required=True, help="the target's artifact directory (written by `make export`)")
    a = p.parse_args(argv)
    try:
        export_assistant(a.assistant, a.artifact)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"export-assistant: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
