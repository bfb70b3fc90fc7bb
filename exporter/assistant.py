"""Gemma 4's drafting assistant (transformers ``gemma4_unified_assistant``) in PyTorch, written for export.

The assistant is a small text stack whose every layer is KV-shared: it has no keys or values of its own and reads
the *target's* caches of the target's last sliding layer and last full layer.  One call of `AssistantModel.step`
drafts one token:

    x = pre_projection(concat(target input embedding of the last token, hidden))      (B, 2 Hb) -> (B, H)
    x = layers(x)   queries only (q_proj, q_norm, RoPE at ``position``), keys/values from the target's caches
    h = norm(x);  next hidden = post_projection(h);  logits = lm_head(h) (or the centroid-masked head)

``hidden`` is the target's last hidden state (its final norm's output, the LM head's input) for the first draft of
a round, then the previous step's ``next_hidden``; ``position`` stays at the position of the round's first input
token for the whole round (transformers' `SinglePositionMultiTokenCandidateGenerator`).  No soft-capping of the
assistant's logits (the reference applies none).

Which target positions a step reads is explicit (the reference derives it from the lengths of the tensors it is
given, see docs/speculative.md "Assistant"): full layer slots ``full_slots`` (the runner passes ``arange(L)``;
only those are read) below ``full_len``; sliding ring slots holding positions in ``[sliding_start,
sliding_end)``, position ``p`` in slot ``(p - sliding_offset) % R`` (R, the ring's slot count, may exceed the
window: slack for rejected drafts; the offset is 0 on a ring, and on ONNX Runtime's windowed cache (``--ort-sliding
window``) the position its row 0 holds, E(T), with R its length: no wrap there).  The reference's sliding mask spans the window plus one (``|q - k| <= window`` on the last
entries), so ``sliding_end - sliding_start`` is at most ``window + 1``.

Module names mirror the checkpoint (``model.layers.N.*``, ``pre_projection``, ``masked_embedding.*``), so a state
dict loads without renaming.  Config parsing is `AssistantConfig.from_hf_dict`; loading `load_assistant`; export
`exporter.export_assistant`.  Deliberately not here: the drafting loop (the runtime's `runtime.assistant`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.config import FULL, PRESETS, SLIDING, ModelConfig, TextConfig
from exporter.model import (
    AttentionCore,
    DecoderLayer,
    RMSNorm,
    Rope,
    apply_rope,
    rope_tables,
)

__all__ = ["ASSISTANT_PRESETS", "AssistantConfig", "AssistantModel", "load_assistant", "random_assistant"]


@dataclass(frozen=True)
class AssistantConfig:
    text: TextConfig  # intermediate_size already doubled when the checkpoint uses the double-wide MLP
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_top_k: int = 32
    double_wide_mlp: bool = False

    def __post_init__(self) -> None:
        if self.use_ordered_embeddings:
            if self.num_centroids < 1 or self.text.vocab_size % self.num_centroids:
                raise ValueError(f"vocab_size={self.text.vocab_size} is not a multiple of "
                                 f"num_centroids={self.num_centroids}")
            if not 1 <= self.centroid_top_k <= self.num_centroids:
                raise ValueError(f"centroid_intermediate_top_k={self.centroid_top_k} must be in "
                                 f"[1, num_centroids={self.num_centroids}]")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> AssistantConfig:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "gemma4_unified_assistant":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'gemma4_unified_assistant'")
        t = d.get("text_config")
        if not isinstance(t, dict):
            raise ValueError(f"{source}: text_config must be an object, got {type(t).__name__}")
        layers = t.get("num_hidden_layers")
        shared = t.get("num_kv_shared_layers") or layers
        if shared != layers:
            raise ValueError(f"{source}: text_config.num_kv_shared_layers={shared} but num_hidden_layers={layers}: "
                             "every assistant layer must read the target's keys and values")
        for key in ("backbone_hidden_size", "num_centroids", "centroid_intermediate_top_k"):
            v = d.get(key, 1)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{source}: {key} must be a positive integer, got {v!r}")
        # the text section has the target's layout (sizes, layer types, RoPE): parse it with the target's reader
        text = ModelConfig.from_hf_dict(
            {"model_type": "gemma4_unified", "text_config": {k: v for k, v in t.items() if k != "num_kv_shared_layers"}},
            source=f"{source} (text_config)",
        ).text
        wide = bool(t.get("use_double_wide_mlp", False))
        if wide:
            text = replace(text, intermediate_size=2 * text.intermediate_size)
        return cls(
            text=text,
            backbone_hidden_size=d.get("backbone_hidden_size", 3840),
            use_ordered_embeddings=bool(d.get("use_ordered_embeddings", False)),
            num_centroids=d.get("num_centroids", 2048),
            centroid_top_k=d.get("centroid_intermediate_top_k", 32),
            double_wide_mlp=wide,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        text = ModelConfig(text=self.text, vision=None, audio=None).to_hf_dict()["text_config"]
        if self.double_wide_mlp:
            text["intermediate_size"] = self.text.intermediate_size // 2
        text |= {"num_kv_shared_layers": self.text.num_layers, "use_double_wide_mlp": self.double_wide_mlp}
        return {
            "model_type": "gemma4_unified_assistant",
            "architectures": ["Gemma4UnifiedAssistantForCausalLM"],
            "text_config": text,
            "backbone_hidden_size": self.backbone_hidden_size,
            "use_ordered_embeddings": self.use_ordered_embeddings,
            "num_centroids": self.num_centroids,
            "centroid_intermediate_top_k": self.centroid_top_k,
            "tie_word_embeddings": True,
        }

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check_target(self, target: TextConfig) -> None:
        """Refuse a target whose caches this assistant cannot read (naming the mismatched field)."""
        a = self.text
        pairs = {
            "backbone_hidden_size / hidden_size": (self.backbone_hidden_size, target.hidden_size),
            "vocab_size": (a.vocab_size, target.vocab_size),
            "num_key_value_heads (sliding)": (a.num_kv_heads, target.num_kv_heads),
            "head_dim (sliding)": (a.head_dim, target.head_dim),
            "num_global_key_value_heads (full)": (a.num_global_kv_heads, target.num_global_kv_heads),
            "global_head_dim (full)": (a.global_head_dim, target.global_head_dim),
            "sliding rope_theta": (a.sliding_rope_theta, target.sliding_rope_theta),
            "full rope_theta": (a.full_rope_theta, target.full_rope_theta),
            "full partial_rotary_factor": (a.full_partial_rotary_factor, target.full_partial_rotary_factor),
        }
        bad = [f"{k}: assistant {x!r}, target {y!r}" for k, (x, y) in pairs.items() if x != y]
        if bad:
            raise ValueError("the assistant does not fit this target's caches: " + "; ".join(bad))


def _assistant_text(target: str, **sizes) -> TextConfig:
    """An assistant text stack reading the caches of preset ``target`` (same KV heads, head dims, RoPE, vocab)."""
    t = PRESETS[target].text
    return replace(t, layer_types=(), **sizes)


# Test assistants, one per target shape; tests/test_assistant.py runs every entry (a missing one fails there).
ASSISTANT_PRESETS: dict[str, tuple[str, AssistantConfig]] = {
    # 4 layers (3 sliding + 1 full), plain LM head
    "tiny-assistant": ("tiny", AssistantConfig(
        text=replace(_assistant_text("tiny", hidden_size=48, intermediate_size=96, num_layers=4),
                     layer_types=(SLIDING,) * 3 + (FULL,)),
        backbone_hidden_size=PRESETS["tiny"].text.hidden_size)),
    # the centroid-masked LM head (64 centroids of 5 tokens, top 4) and the double-wide MLP, on a wider-head target
    "tiny-deep-assistant": ("tiny-deep", AssistantConfig(
        text=replace(_assistant_text("tiny-deep", hidden_size=40, intermediate_size=2 * 64, num_layers=2),
                     layer_types=(SLIDING, FULL)),
        backbone_hidden_size=PRESETS["tiny-deep"].text.hidden_size, use_ordered_embeddings=True, num_centroids=64,
        centroid_top_k=4, double_wide_mlp=True)),
}


def load_assistant_config(path: str | Path) -> AssistantConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass the assistant checkpoint directory (with config.json)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return AssistantConfig.from_hf_dict(d, source=str(path))


# ---------------------------------------------------------------------------------------------------- modules
class QueryAttention(nn.Module):
    """Queries of one assistant layer against the target's keys and values (no k/v projections of its own)."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.layer_head_dim(layer)
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.core = AttentionCore(cfg, layer)  # for its scale-1.0 GQA `attend`

    def forward(self, x, k, v, allowed, position, inv_freq):
        """x (B, 1, H); k, v (B, Hkv, T, D) RoPE'd/normed target entries; allowed (B, T); position (B,) -> (B, 1, H).
        Activations keep their length-1 sequence axis so the Linears export as MatMul (the form `calib` quantizes)."""
        b = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(b, 1, self.num_heads, self.head_dim))  # (B, 1, Hq, D)
        cos, sin = rope_tables(position[:, None], inv_freq, q.dtype)  # (B, 1, D)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, Hq, 1, D)
        return self.o_proj(self.core.attend(q, k, v, allowed[:, None, :]))  # (B, 1, H)


class AssistantLayer(DecoderLayer):
    """The target's decoder layer (norms, MLP, layer scalar) around a query-only attention over the target's K/V."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__(cfg, layer, attention=QueryAttention)

    def forward(self, x, k, v, allowed, position, inv_freq):
        return self.finish(x, self.self_attn(self.input_layernorm(x), k, v, allowed, position, inv_freq))


class MaskedEmbedder(nn.Module):
    """The centroid-masked LM head: score ``num_centroids`` clusters, keep the top ``k``, compute the logits of
    their tokens only (``token_ordering`` lists each cluster's tokens); every other token gets the row's smallest
    computed logit minus 1 (the reference takes the minimum over the whole batch: equal at batch 1)."""

    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.top_k, self.vocab, self.num_centroids = cfg.centroid_top_k, cfg.text.vocab_size, cfg.num_centroids
        self.centroids = nn.Linear(cfg.text.hidden_size, cfg.num_centroids, bias=False)
        self.register_buffer("token_ordering", torch.zeros(cfg.text.vocab_size, dtype=torch.long))

    def forward(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """h (B, H); lm_head (V, H) -> logits (B, V)."""
        b = h.shape[0]
        top = torch.topk(self.centroids(h), self.top_k, dim=-1).indices  # (B, k)
        clusters = self.token_ordering.view(self.num_centroids, self.vocab // self.num_centroids)  # (C, V/C)
        tokens = clusters[top].reshape(b, -1)  # (B, k V/C)
        picked = torch.matmul(lm_head[tokens], h[:, :, None])[..., 0]  # (B, k V/C)
        fill = picked.min(dim=-1, keepdim=True).values - 1.0  # (B, 1)
        return (torch.zeros(b, self.vocab, dtype=h.dtype) + fill).scatter(1, tokens, picked)


class _Stack(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)  # only the (tied) LM head
        self.layers = nn.ModuleList(AssistantLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def _ring_positions(last: torch.Tensor, ring) -> torch.Tensor:
    """`exporter.kv.ring_positions` for a ring size that is a dynamic dim: slot j holds the largest position
    <= ``last`` (B,) that is j mod R.  (B, R); the modulus is a tensor, which torch.onnx exports."""
    slots = torch.arange(ring, device=last.device)  # (R,)
    size = slots[-1:] + 1  # (1,) == R
    return last[:, None] - torch.remainder(last[:, None] - slots[None, :], size)


class AssistantModel(nn.Module):
    def __init__(self, cfg: AssistantConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.model = _Stack(t)
        self.pre_projection = nn.Linear(2 * cfg.backbone_hidden_size, t.hidden_size, bias=False)
        self.post_projection = nn.Linear(t.hidden_size, cfg.backbone_hidden_size, bias=False)
        self.masked_embedding = MaskedEmbedder(cfg) if cfg.use_ordered_embeddings else None
        self.rope_sliding = Rope(t.head_dim, t.sliding_rope_theta)
        self.rope_full = Rope(t.global_head_dim, t.full_rope_theta, t.full_partial_rotary_factor)

    def step(self, token_embeds, hidden, position, full_slots, full_len, sliding_start, sliding_end,
             full_k, full_v, ring_k, ring_v, sliding_offset=None):
        """One draft.  token_embeds (B, Hb): the target's scaled input embedding of the last token; hidden (B, Hb);
        position, full_len, sliding_start, sliding_end (B,) int64; full_slots (L,) int64 slot indices to read;
        full_k/full_v (B, Hkv_f, T, D_f) the target's last full layer cache; ring_k/ring_v (B, Hkv_s, R, D_s) its
        last sliding layer's ring; sliding_offset (B,) or (1,) int64 (default 0): position p sits in ring slot
        (p - offset) mod R (a windowed cache: offset E(T), no wrap).  Returns logits (B, V), next hidden (B, Hb),
        argmax token (B,) int64."""
        fk, fv = full_k.index_select(2, full_slots), full_v.index_select(2, full_slots)  # (B, Hkv, L, D)
        full_ok = full_slots[None, :] < full_len[:, None]  # (B, L)
        if sliding_offset is None:
            sliding_offset = torch.zeros_like(sliding_end)
        offset = sliding_offset[:, None]  # (B or 1, 1)
        slot_pos = offset + _ring_positions(sliding_end - 1 - sliding_offset, ring_k.shape[2])  # (B, R)
        ring_ok = (slot_pos >= sliding_start[:, None]) & (slot_pos >= 0)
        x = self.pre_projection(torch.cat([token_embeds, hidden], dim=-1)[:, None])  # (B, 1, H)
        for layer in self.model.layers:
            if layer.self_attn.sliding:
                x = layer(x, ring_k, ring_v, ring_ok, position, self.rope_sliding.inv_freq)
            else:
                x = layer(x, fk, fv, full_ok, position, self.rope_full.inv_freq)
        h = self.model.norm(x)  # (B, 1, H)
        lm_head = self.model.embed_tokens.weight
        if self.masked_embedding is not None:
            logits = self.masked_embedding(h[:, 0], lm_head)
        else:
            logits = torch.matmul(h, lm_head.t())[:, 0]  # (B, V)
        return logits, self.post_projection(h)[:, 0], torch.argmax(logits, dim=-1)


# ---------------------------------------------------------------------------------------------------- weights
_IGNORED = ("lm_head.weight",)  # tied to model.embed_tokens.weight


def load_assistant(ckpt: str | Path, *, dtype: torch.dtype = torch.float32) -> AssistantModel:
    """`AssistantModel` from a checkpoint directory as transformers saves it; every missing, unexpected or
    mis-shaped tensor is reported together, naming the file."""
    from exporter.weights import CheckpointError, checkpoint_files, read_tensor

    ckpt = Path(ckpt)
    cfg = load_assistant_config(ckpt)
    model = AssistantModel(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    state, problems = {}, []
    for path in checkpoint_files(ckpt):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
        for name in names:
            if name in _IGNORED:
                continue
            if name not in expected:
                problems.append(f"unexpected tensor {name!r} in {path.name}")
                continue
            want = expected[name]
            t = read_tensor(path, name, want.dtype if not want.is_floating_point() else dtype)
            if tuple(t.shape) != tuple(want.shape):
                problems.append(f"tensor {name!r} in {path.name} has shape {tuple(t.shape)}, expected "
                                f"{tuple(want.shape)}")
            state[name] = t
    problems += [f"missing tensor {k!r}" for k in expected if k not in state]
    if problems:
        raise CheckpointError(f"{ckpt}: assistant checkpoint does not match its config:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)
    if cfg.use_ordered_embeddings:
        _check_ordering(model.masked_embedding.token_ordering, cfg.text.vocab_size, ckpt)
    model.source = {"checkpoint": str(ckpt.resolve())}
    return model.to(dtype).eval()


def _check_ordering(ordering: torch.Tensor, vocab: int, where: Path) -> None:
    if not torch.equal(torch.sort(ordering).values, torch.arange(vocab)):
        raise ValueError(f"{where}: masked_embedding.token_ordering is not a permutation of the {vocab} token ids")


def random_assistant(cfg: AssistantConfig, *, seed: int = 0) -> AssistantModel:
    """Seeded random weights (std 0.02, norms near 1, a random token ordering): for tests and presets."""
    gen = torch.Generator().manual_seed(seed)
    model = AssistantModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if name.endswith("norm.weight") else 0.02
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn(p.shape, generator=gen))
        if model.masked_embedding is not None:
            model.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text.vocab_size, generator=gen))
    return model.eval()
