"""Load a Hugging Face Gemma 4 Unified checkpoint (safetensors) into `Gemma4Model`.

The model is built on the meta device, so no random weights are materialised; each checkpoint tensor is read
once, cast to the requested dtype and assigned, so at most one copy of the weights is held.  Every missing,
unexpected or mis-shaped tensor is reported together, naming the file and tensor.

Accepted layouts: ``model.safetensors``, or shards listed in ``model.safetensors.index.json``; vision weights
under ``model.vision_embedder.*`` or ``model.embed_vision.*``; the vision projection as
``model.embed_vision.embedding_projection.weight`` or ``...embed_vision.multimodal_embedder.embedding_projection``.
``lm_head.weight`` is ignored (the LM head is tied to the embedding).

`plan_checkpoint` checks names, shapes and dtypes and maps each tensor to its file without reading any data; the
streaming exporter (`exporter.stream`) uses it to write weights into external data one tensor at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exporter.config import ModelConfig, load_config
from exporter.model import Gemma4Model, Rope

__all__ = [
    "CheckpointError",
    "checkpoint_files",
    "expected_tensors",
    "load_model",
    "plan_checkpoint",
    "random_model",
    "read_tensor",
    "real_buffers",
]

_VISION_PARTS = ("patch_ln1.", "patch_dense.", "patch_ln2.", "pos_embedding", "pos_norm.")
_IGNORED = ("lm_head.weight",)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


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


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict names and shapes for a config, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = Gemma4Model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def plan_checkpoint(ckpt: Path, cfg: ModelConfig) -> dict[str, tuple[Path, str]]:
    """Map each of our tensor names to (file, name in file), checking names and shapes without reading data.

    Raises `CheckpointError` listing every missing, unexpected, duplicated, mis-shaped or non-float tensor.
    """
    expected = expected_tensors(cfg)
    plan: dict[str, tuple[Path, str]] = {}
    problems: list[str] = []
    for path in checkpoint_files(ckpt):
        with _open(path) as f:
            for name in f.keys():
                ours = _our_name(name)
                if ours is None:
                    continue
                if ours not in expected:
                    problems.append(f"unexpected tensor {name!r} in {path.name}")
                elif ours in plan:
                    problems.append(f"tensor {name!r} appears twice (again in {path.name})")
                else:
                    info = f.get_slice(name)
                    shape, dtype = tuple(info.get_shape()), info.get_dtype()
                    if shape != expected[ours]:
                        problems.append(f"tensor {name!r} in {path.name} has shape {shape}, expected {expected[ours]}")
                    elif dtype not in _FLOAT_DTYPES:
                        problems.append(f"tensor {name!r} in {path.name} has dtype {dtype}, expected a float")
                    else:
                        plan[ours] = (path, name)
    problems += [f"missing tensor {k!r}" for k in expected if k not in plan]
    if problems:
        raise CheckpointError(f"{ckpt}: checkpoint does not match its config:\n  " + "\n  ".join(problems))
    return plan


def read_tensor(path: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
    """One tensor from a safetensors file, cast to ``dtype``; a clear error if the file is truncated."""
    from safetensors import SafetensorError

    with _open(path) as f:
        try:
            return f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e}); is the file truncated?") from e


def real_buffers(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Buffers computed from the config rather than stored in the checkpoint (RoPE inverse frequencies)."""
    t = cfg.text
    return {
        "rope_sliding.inv_freq": Rope(t.head_dim, t.sliding_rope_theta).inv_freq,
        "rope_full.inv_freq": Rope(t.global_head_dim, t.full_rope_theta, t.full_partial_rotary_factor).inv_freq,
    }


def load_model(ckpt: str | Path, *, dtype: torch.dtype = torch.float32, cfg: ModelConfig | None = None) -> Gemma4Model:
    """Build `Gemma4Model` from a checkpoint directory, checking every tensor against the config."""
    ckpt = Path(ckpt)
    cfg = cfg or load_config(ckpt)
    plan = plan_checkpoint(ckpt, cfg)
    with torch.device("meta"):
        model = Gemma4Model(cfg)
    state = {ours: read_tensor(path, name, dtype) for ours, (path, name) in plan.items()}
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
