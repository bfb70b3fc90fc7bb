"""Export without holding the weights: trace under FakeTensorMode, stream every weight into external data.

The model is built with fake parameters (shapes and dtypes only), traced by torch.onnx, and every initializer of
the resulting graph is replaced by an ``onnx_ir`` lazy tensor that produces its data when ``onnx_ir.save`` writes
it, in row blocks of at most 64 MiB.  Peak memory is the tracer's plus one block, whatever the model size: this is
the path the 12B takes, for checkpoints and for presets alike.

Weight sources (both give fp32 row blocks of one tensor at a time):

* `CheckpointWeights`: a Hugging Face checkpoint (safetensors, read by slices);
* `SeededWeights`: seeded random weights for presets.  Each tensor is generated in fixed row blocks, each block
  from its own generator seeded by (seed, tensor name, block), so any tensor (or block) can be regenerated alone
  and the streamed artifact equals `preset_model` (the same weights in memory) bit for bit.

A ``rewrite`` callback may change the graph before it is saved (lower the Linears to bf16/fp16, quantize them);
its lazy tensors read the sources' tensors one at a time.  The graphs are not run through the onnxscript
optimiser here (constant folding would need the weights); ONNX Runtime's optimisations are applied by
``make build-engine``.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from exporter.config import ModelConfig
from exporter.model import Gemma4Model

__all__ = [
    "CheckpointWeights",
    "SeededWeights",
    "cast_rewrite",
    "fake_model",
    "lazy_tensor",
    "preset_model",
    "seeded_tensor",
    "stream_graph",
]

_PREFIX = "m."  # the export wrappers hold the model as attribute ``m``
_BLOCK_ELEMS = 1 << 24  # 64 MiB of fp32 per block


def fake_model(cfg: ModelConfig) -> Gemma4Model:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return Gemma4Model(cfg).eval()


def _block_rows(shape: tuple[int, ...]) -> int:
    """Rows per block of a tensor: fixed by its shape, so generation and streaming agree on block boundaries."""
    row = max(1, math.prod(shape[1:])) if len(shape) > 1 else 1
    return max(1, _BLOCK_ELEMS // row)


# ---------------------------------------------------------------------------------------------- seeded weights
def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _is_norm(name: str) -> bool:
    return name.endswith(("norm.weight", "_ln1.weight", "_ln2.weight"))


def _seeded_block(name: str, shape: tuple[int, ...], seed: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) (one block) of the seeded tensor ``name``, fp32."""
    block_shape = (stop - start, *shape[1:]) if shape else ()
    if name.endswith("layer_scalar"):
        return torch.ones(block_shape)
    gen = torch.Generator().manual_seed(_block_seed(seed, name, start // _block_rows(shape)))
    x = torch.randn(block_shape, generator=gen)
    return 1.0 + 0.1 * x if _is_norm(name) else 0.02 * x


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The whole seeded random tensor ``name`` (fp32): norms ~ 1 + 0.1 N(0, 1), layer scalars 1, else 0.02 N(0, 1)."""
    if not shape:
        return _seeded_block(name, shape, seed, 0, 1)
    step = _block_rows(shape)
    return torch.cat([_seeded_block(name, shape, seed, s, min(s + step, shape[0])) for s in range(0, shape[0], step)])


class SeededWeights:
    """Seeded random weights for a config (presets), produced one row block at a time."""

    def __init__(self, cfg: ModelConfig, seed: int = 0):
        from exporter.weights import expected_tensors

        self.cfg, self.seed = cfg, seed
        self.shapes = expected_tensors(cfg)
        self.source = {"random_weights": "per-tensor seeded blocks", "seed": seed}

    def blocks(self, name: str) -> Iterator[torch.Tensor]:
        shape = self.shapes[name]
        if not shape:
            yield _seeded_block(name, shape, self.seed, 0, 1)
            return
        step = _block_rows(shape)
        for s in range(0, shape[0], step):
            yield _seeded_block(name, shape, self.seed, s, min(s + step, shape[0]))

    def tensor(self, name: str) -> torch.Tensor:
        return seeded_tensor(name, self.shapes[name], self.seed)


class CheckpointWeights:
    """The tensors of a Hugging Face checkpoint, checked against the config first (`exporter.weights`)."""

    def __init__(self, ckpt: str | Path, cfg: ModelConfig):
        from exporter.weights import expected_tensors, plan_checkpoint

        self.ckpt, self.cfg = Path(ckpt), cfg
        self.plan = plan_checkpoint(self.ckpt, cfg)
        self.shapes = expected_tensors(cfg)
        self.source = {"checkpoint": str(self.ckpt.resolve())}

    def blocks(self, name: str) -> Iterator[torch.Tensor]:
        from exporter.weights import CheckpointError, _open

        path, key = self.plan[name]
        shape = self.shapes[name]
        with _open(path) as f:
            view = f.get_slice(key)
            try:
                if not shape:
                    yield view[:].to(torch.float32)
                    return
                step = _block_rows(shape)
                for s in range(0, shape[0], step):
                    yield view[s:s + step].to(torch.float32)
            except Exception as e:  # safetensors raises several kinds on truncated data
                raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e}); is the file truncated?") from e

    def tensor(self, name: str) -> torch.Tensor:
        from exporter.weights import read_tensor

        return read_tensor(*self.plan[name], torch.float32)


def preset_model(cfg: ModelConfig, seed: int = 0) -> Gemma4Model:
    """`Gemma4Model` holding the `SeededWeights` in memory (fp32): what a streamed preset export contains."""
    from exporter.weights import real_buffers

    src = SeededWeights(cfg, seed)
    with torch.device("meta"):
        model = Gemma4Model(cfg)
    model.load_state_dict({n: src.tensor(n) for n in src.shapes}, strict=True, assign=True)
    for name, value in real_buffers(cfg).items():
        getattr(model, name.split(".")[0]).inv_freq = value
    model.source = dict(src.source)
    return model.eval()


# ---------------------------------------------------------------------------------------------- streaming save
def lazy_tensor(blocks: Callable[[], Iterator[np.ndarray]], dtype, shape, *, name: str | None = None,
                progress=None):
    """An ``onnx_ir`` lazy tensor whose data comes from ``blocks()`` (numpy row blocks in order): ``onnx_ir.save``
    writes it block by block (never whole); ``.numpy()`` concatenates them (for small tensors and checks)."""
    import onnx_ir as ir

    class _Blocks(ir.LazyTensor):
        def iter_blocks(self):
            return blocks()

        def tofile(self, out) -> None:
            for b in blocks():
                data = np.ascontiguousarray(b).tobytes()
                out.write(data)
                if progress is not None:
                    progress.update(len(data))

    def whole():
        parts = list(blocks())
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return ir.tensor(np.ascontiguousarray(arr).reshape(shape), name=name)

    return _Blocks(whole, dtype=dtype, shape=ir.Shape(shape), name=name)


SHARE_MIN_BYTES = 1 << 20  # `stream_graph(share_with=...)` shares tensors at least this large


def _external_entries(graph_path: Path) -> dict[str, object]:
    """name -> TensorProto (no data) of every initializer ``graph_path`` keeps in external data."""
    import onnx

    proto = onnx.load(str(graph_path), load_external_data=False)
    return {t.name: t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def stream_graph(program, path: Path, source, cfg: ModelConfig, *, rewrite=None, share_with: Path | None = None,
                 log=print) -> None:
    """Replace the traced program's fake initializers with lazy reads of ``source`` (a `CheckpointWeights`,
    `SeededWeights` or checkpoint directory), apply ``rewrite(model, source, progress)`` if given, and save with
    external data (``<graph>.onnx.data``).

    ``share_with``: a graph of the same export already written beside ``path`` (the prefill graph when this is the
    decode graph).  Initializers it holds under the same name, type and shape are the same tensors (one source, one
    rewrite), so they are not computed or written again: this graph's entries point into that graph's data file.
    The artifact's disk peak is then one copy of the weights, not two (12B INT4: the quantization also runs once)."""
    import onnx_ir as ir

    from exporter.weights import real_buffers
    from runtime.progress import Progress

    if isinstance(source, (str, Path)):
        source = CheckpointWeights(source, cfg)
    computed = real_buffers(cfg)
    model = program.model
    progress = Progress(None, f"export {path.name}", unit="B")
    unknown = []
    for name, value in model.graph.initializers.items():
        ours = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
        shape = tuple(value.shape.numpy()) if value.shape is not None else ()
        if ours in source.shapes:
            blocks = lambda n=ours: (b.numpy() for b in source.blocks(n))  # noqa: E731
        elif ours in computed:
            blocks = lambda t=computed[ours]: iter([t.float().numpy()])  # noqa: E731
        else:
            unknown.append(name)
            continue
        value.const_value = lazy_tensor(blocks, ir.DataType.FLOAT, shape, name=name, progress=progress)
    if unknown:
        raise RuntimeError(f"{path.name}: traced initializers with no weight source: {unknown}")
    if rewrite is not None:
        log(f"[export] {path.name}: rewriting the weights' graph form (e.g. quantization scales) ...")
        rewrite(model, source, progress)
    shared = {}
    if share_with is not None:
        theirs = _external_entries(Path(share_with))
        for name, value in list(model.graph.initializers.items()):
            t = theirs.get(name)
            c = value.const_value
            if t is None or c is None or int(c.dtype) != t.data_type or tuple(c.shape.numpy()) != tuple(t.dims):
                continue
            if c.nbytes < SHARE_MIN_BYTES:  # small tensors are written (and matched by content later)
                continue
            shared[name] = t
            model.graph.initializers.pop(name)  # kept as a value of the graph: its entry is added after saving
        if shared:
            log(f"[export] {path.name}: {len(shared)} weight tensors "
                f"({sum(int(next(e.value for e in t.external_data if e.key == 'length')) for t in shared.values()) / 2**30:.2f} GiB)"
                f" shared with {Path(share_with).name}, not written again")
    progress.total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    progress.t0 = time.perf_counter()  # the ETA covers the writing only

    def count_plain(tensor, info) -> None:  # lazy block tensors count themselves while writing
        if not hasattr(tensor, "tofile") or type(tensor).__name__ != "_Blocks":
            progress.update(tensor.nbytes)

    ir.save(model, path, external_data=f"{path.name}.data", callback=count_plain, max_in_flight_bytes=256 << 20)
    progress.close()
    if shared:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        proto.graph.initializer.extend(shared.values())  # location/offset/length in the other graph's data file
        onnx.save(proto, str(path))
        own = path.with_name(f"{path.name}.data")
        if own.exists() and not any(e.key == "location" and e.value == own.name
                                    for t in proto.graph.initializer for e in t.external_data):
            own.unlink()  # everything was shared: the file ir.save left is unreferenced


def cast_rewrite(dtype: str):
    """A ``stream_graph`` rewrite storing the decoder Linears' weights in ``dtype`` (bf16/fp16;
    `exporter.cast_precision`: the GEMM in that type, activations cast around it, everything else fp32).  The tied
    embedding/LM head stays fp32 (lowering the LM head alone would store a second copy of it).  Each weight is read
    and converted when saved."""

    def rewrite(model, source, progress) -> None:
        from exporter.cast_precision import cast_linears

        cast_linears(model, dtype, groups=("decoder",))

    return rewrite
