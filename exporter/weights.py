"""Load a Hugging Face Gemma 4 Unified checkpoint (safetensors) into `Gemma4Model`.

The model is built on the meta device, so no random weights are materialised; each checkpoint tensor is read
once, cast to the requested dtype and assigned, so at most one copy of the weights is held.  Every missing,
unexpected or mis-shaped tensor is reported together, naming the file and tensor.

Accepted layouts: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``; vision weights
under ``model.vision_embedder.*`` or ``model.embed_vision.*``; the vision projection as
``model.embed_vision.embedding_projection.weight`` or ``...embed_vision.multimodal_embedder.embedding_projection``.
``lm_head.weight`` is ignored (the LM head is tied to the embedding).

`checkpoint_tensors` yields (our name, file, checkpoint name) without reading data: it is what a streaming
exporter uses to write weights into external data without holding them (not done yet for the 12B; see README).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from exporter.config import ModelConfig, load_config
from exporter.model import Gemma4Model, Rope

__all__ = ["CheckpointError", "checkpoint_files", "checkpoint_tensors", "load_model"]

_VISION_PARTS = ("patch_ln1.", "patch_dense.", "patch_ln2.", "pos_embedding", "pos_norm.")
_IGNORED = ("lm_head.weight",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as the config describes; the message lists every problem."""


def checkpoint_files(ckpt: Path) -> list[Path]:
    ckpt = Path(ckpt)
    index = ckpt / "model.safetensors.index.json"
    single = ckpt / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (no readable 'weight_map': {e})") from e
        files = [ckpt / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    raise CheckpointError(f"{ckpt}: no model.safetensors or model.safetensors.index.json found")


def _our_name(name: str) -> str | None:
    if name in _IGNORED:
        return None
    if name == "model.embed_vision.multimodal_embedder.embedding_projection.weight":
        return "model.embed_vision.embedding_projection.weight"
    prefix = "model.embed_vision."
    if name.startswith(prefix) and name[len(prefix):].startswith(_VISION_PARTS):
        return "model.vision_embedder." + name[len(prefix):]
    return name


def _open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read as safetensors ({e}); is the file truncated or corrupt?") from e


def checkpoint_tensors(ckpt: Path) -> Iterator[tuple[str, Path, str]]:
    """(our name, file, name in file) for every tensor we use, without reading any data."""
    for path in checkpoint_files(ckpt):
        with _open(path) as f:
            for name in f.keys():
                ours = _our_name(name)
                if ours is not None:
                    yield ours, path, name


def load_model(ckpt: str | Path, *, dtype: torch.dtype = torch.float32, cfg: ModelConfig | None = None) -> Gemma4Model:
    """Build `Gemma4Model` from a checkpoint directory, checking every tensor against the config."""
    from safetensors import SafetensorError

    ckpt = Path(ckpt)
    cfg = cfg or load_config(ckpt)
    with torch.device("meta"):
        model = Gemma4Model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for path in checkpoint_files(ckpt):
        with _open(path) as f:
            for name in f.keys():
                ours = _our_name(name)
                if ours is None:
                    continue
                if ours not in expected:
                    problems.append(f"unexpected tensor {name!r} in {path.name}")
                    continue
                if ours in state:
                    problems.append(f"tensor {name!r} appears twice (again in {path.name})")
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[ours]:
                    problems.append(f"tensor {name!r} in {path.name} has shape {shape}, expected {expected[ours]}")
                    continue
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); is the file truncated?") from e
                if not tensor.is_floating_point():
                    problems.append(f"tensor {name!r} in {path.name} has dtype {tensor.dtype}, expected a float")
                    continue
                state[ours] = tensor.to(dtype)
    problems += [f"missing tensor {k!r}" for k in expected if k not in state]
    if problems:
        raise CheckpointError(f"{ckpt}: checkpoint does not match its config:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    t = cfg.text
    model.rope_sliding = Rope(t.head_dim, t.sliding_rope_theta)
    model.rope_full = Rope(t.global_head_dim, t.full_rope_theta, t.full_partial_rotary_factor)
    model.source = {"checkpoint": str(ckpt.resolve())}
    return model.eval()


def random_model(cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Gemma4Model:
    """Seeded random weights at the scale of the reference initialiser (std 0.02), for presets without weights."""
    gen = torch.Generator().manual_seed(seed)
    model = Gemma4Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_ln1.weight") or name.endswith("_ln2.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.source = {"random_weights": True, "seed": seed}
    return model.to(dtype).eval()
