"""Export from a checkpoint without holding its weights: trace under FakeTensorMode, stream weights to disk.

The model is built with fake parameters (shapes and dtypes only), traced by torch.onnx, and every initializer of
the resulting graph is replaced by an ``onnx_ir.LazyTensor`` that reads its checkpoint tensor when
``onnx_ir.save`` writes it into external data, one tensor at a time (``max_in_flight_bytes`` bounds what is held).
Peak memory is then the tracer's plus roughly one tensor, not the model: this is the path the 12B takes.

The graphs are not run through the onnxscript optimiser here (constant folding would need the weights); ONNX
Runtime's optimisations are applied by ``make build-engine``.  Used by `exporter.export` for checkpoints.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from exporter.config import ModelConfig
from exporter.model import Gemma4Model
from exporter.weights import plan_checkpoint, read_tensor, real_buffers

__all__ = ["fake_model", "stream_graph"]

_PREFIX = "m."  # the export wrappers hold the model as attribute ``m``


def fake_model(cfg: ModelConfig) -> Gemma4Model:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return Gemma4Model(cfg).eval()


_CHUNK_BYTES = 64 << 20


def _lazy(fn, shape) -> object:
    import onnx_ir as ir

    return ir.LazyTensor(lambda: ir.tensor(fn().numpy()), dtype=ir.DataType.FLOAT, shape=ir.Shape(shape))


def _streamed(file: Path, key: str, shape) -> object:
    """A lazy fp32 tensor that ``onnx_ir.save`` writes in row chunks read straight from the safetensors file, so
    even the 262144 x 3840 embedding never exists whole in memory (bf16 -> fp32 would otherwise need 5.6 GiB)."""
    import onnx_ir as ir

    class _Streamed(ir.LazyTensor):
        def tofile(self, out) -> None:
            from safetensors import safe_open

            rows = shape[0] if shape else 1
            row_bytes = 4 * max(1, math.prod(shape[1:])) if shape else 4
            step = max(1, _CHUNK_BYTES // row_bytes)
            with safe_open(str(file), framework="pt") as f:
                view = f.get_slice(key)
                for start in range(0, rows, step):
                    chunk = view[start:start + step] if shape else view[:]
                    out.write(chunk.to(torch.float32).contiguous().numpy().tobytes())

    return _Streamed(
        lambda: ir.tensor(read_tensor(file, key, torch.float32).numpy()), dtype=ir.DataType.FLOAT,
        shape=ir.Shape(shape),
    )


def stream_graph(program, path: Path, ckpt: Path, cfg: ModelConfig, *, log=print) -> None:
    """Replace the traced program's fake initializers with lazy checkpoint reads and save with external data."""
    import onnx_ir as ir

    plan = plan_checkpoint(ckpt, cfg)
    computed = real_buffers(cfg)
    model = program.model
    unknown = []
    for name, value in model.graph.initializers.items():
        ours = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        shape = tuple(value.shape.numpy()) if value.shape is not None else ()
        if ours in plan:
            value.const_value = _streamed(*plan[ours], shape)
        elif ours in computed:
            value.const_value = _lazy(lambda t=computed[ours]: t, shape)
        else:
            unknown.append(name)
    if unknown:
        raise RuntimeError(f"{path.name}: traced initializers with no checkpoint source: {unknown}")
    state = {"done": 0, "bytes": 0, "t0": time.perf_counter(), "last": 0.0}

    def progress(tensor, info) -> None:
        state["done"] += 1
        state["bytes"] += tensor.nbytes
        now = time.perf_counter()
        if now - state["last"] > 5 or state["done"] == info.total:
            state["last"] = now
            log(f"[export] {path.name}: {state['done']}/{info.total} tensors, {state['bytes'] / 2**20:.0f} MiB written")

    ir.save(model, path, external_data=f"{path.name}.data", callback=progress, max_in_flight_bytes=256 << 20)
