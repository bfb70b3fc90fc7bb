"""Typed configuration for Gemma 4 Unified, read from a Hugging Face ``config.json`` or a named preset.

The dataclasses hold exactly what our model definition needs; `ModelConfig.from_hf_dict` reads the
``gemma4_unified`` layout (``text_config``, ``vision_config``, ``audio_config`` and top-level token ids) and
refuses features of the wider Gemma 4 family that the unified checkpoints do not use (KV sharing between layers,
bidirectional attention on all tokens), so a config we cannot run faithfully fails here, not at numerics time.
`to_hf_dict` writes the same layout back, which is how presets become checkpoints transformers can load.

Presets: ``gemma4-12b`` (the real numbers) and tiny configs with the real structure for tests.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AudioConfig",
    "ModelConfig",
    "PRESETS",
    "TEST_PRESETS",
    "TextConfig",
    "TokenIds",
    "VisionConfig",
    "load_config",
]

SLIDING = "sliding_attention"
FULL = "full_attention"


# config.json keys read as integers / numbers, per section; a wrong type is named instead of failing later
_INT_KEYS = {
    "text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "global_head_dim", "num_global_key_value_heads",
                    "sliding_window", "max_position_embeddings", "pad_token_id", "bos_token_id"),
    "vision_config": ("patch_size", "pooling_kernel_size", "mm_embed_dim", "mm_posemb_size", "output_proj_dims"),
    "audio_config": ("audio_embed_dim",),
    "": ("boi_token_id", "eoi_token_id", "image_token_id", "video_token_id", "boa_token_id", "eoa_token_index",
         "eoa_token_id", "audio_token_id", "turn_start_token_id", "turn_end_token_id"),
}
_FLOAT_KEYS = {"text_config": ("rms_norm_eps", "final_logit_softcapping"), "vision_config": ("rms_norm_eps",),
               "audio_config": ("rms_norm_eps",)}


def _check_value_types(d: dict[str, Any], source: str) -> None:
    """Refuse a config.json value of the wrong JSON type, naming the key (before anything computes with it)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    for section in sorted(set(_INT_KEYS) | set(_FLOAT_KEYS)):
        sub = d if section == "" else d.get(section)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ValueError(f"{source}: {section} must be an object, got {type(sub).__name__}")
        where = f"{section}." if section else ""
        for key in _INT_KEYS.get(section, ()):
            if key not in sub or (key == "pad_token_id" and sub[key] is None):
                continue
            v = sub[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{source}: {where}{key} must be a non-negative integer, got {v!r}")
        for key in _FLOAT_KEYS.get(section, ()):
            v = sub.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ValueError(f"{source}: {where}{key} must be a number, got {v!r}")
    eos = (d.get("text_config") or {}).get("eos_token_id")
    if eos is not None and not (isinstance(eos, int) or (isinstance(eos, list) and eos and
                                                         all(isinstance(e, int) for e in eos))):
        raise ValueError(f"{source}: text_config.eos_token_id must be an integer or a list of integers, got {eos!r}")
    lt = (d.get("text_config") or {}).get("layer_types")
    if lt is not None and not (isinstance(lt, list) and all(isinstance(x, str) for x in lt)):
        raise ValueError(f"{source}: text_config.layer_types must be a list of strings, got {lt!r}")


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 262_144
    hidden_size: int = 3840
    intermediate_size: int = 15360
    num_layers: int = 48
    num_heads: int = 16
    num_kv_heads: int = 8  # sliding layers
    head_dim: int = 256  # sliding layers
    global_head_dim: int = 512  # full layers
    num_global_kv_heads: int = 1  # full layers
    attention_k_eq_v: bool = True  # full layers: V is the raw k_proj output
    sliding_window: int = 1024
    sliding_rope_theta: float = 10_000.0
    full_rope_theta: float = 1_000_000.0
    full_partial_rotary_factor: float = 0.25
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 262_144
    layer_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.layer_types:
            types = tuple(SLIDING if (i + 1) % 6 else FULL for i in range(self.num_layers))
            object.__setattr__(self, "layer_types", types[:-1] + (FULL,))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            raise ValueError(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.layer_types[-1] != FULL:
            raise ValueError("the last layer of Gemma 4 must be a full_attention layer")
        for name, heads in (("num_kv_heads", self.num_kv_heads), ("num_global_kv_heads", self.num_global_kv_heads)):
            if self.num_heads % heads:
                raise ValueError(f"num_heads={self.num_heads} is not a multiple of {name}={heads}")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.num_kv_heads if self.is_sliding(layer) else self.num_global_kv_heads


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int = 16
    pooling_kernel_size: int = 3
    mm_embed_dim: int = 3840
    mm_posemb_size: int = 1120
    rms_norm_eps: float = 1e-6

    @property
    def patch_dim(self) -> int:
        """Values per soft token: a (pooling * patch)^2 RGB square, 6912 for 48 x 48 x 3."""
        return (self.patch_size * self.pooling_kernel_size) ** 2 * 3


@dataclass(frozen=True)
class AudioConfig:
    samples_per_token: int = 640
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class TokenIds:
    pad: int = 0
    eos: int = 1
    bos: int = 2
    boi: int = 255_999
    eoi: int = 258_882
    image: int = 258_880
    video: int = 258_884
    boa: int = 256_000
    eoa: int = 258_883
    audio: int = 258_881
    turn_start: int = 105
    turn_end: int = 106


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)
    audio: AudioConfig | None = field(default_factory=AudioConfig)
    tokens: TokenIds = field(default_factory=TokenIds)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type") != "gemma4_unified":
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, expected 'gemma4_unified'")
        _check_value_types(d, source)
        t = d.get("text_config") or {}
        if t.get("num_kv_shared_layers", 0):
            raise ValueError(f"{source}: num_kv_shared_layers > 0 (KV sharing) is not used by Gemma 4 Unified")
        if t.get("use_bidirectional_attention", "vision") not in ("vision", None):
            raise ValueError(f"{source}: use_bidirectional_attention={t['use_bidirectional_attention']!r} unsupported")
        if t.get("attention_bias", False):
            raise ValueError(f"{source}: attention_bias=true is not part of Gemma 4 Unified")
        layer_types = tuple(t.get("layer_types") or ())
        full = [i for i, lt in enumerate(layer_types) if lt == FULL]
        per_layer = {int(k): v for k, v in (t.get("per_layer_config") or {}).items()}
        over = per_layer.get(full[0], {}) if full else {}
        num_heads = t.get("num_attention_heads", 8)
        rope = t.get("rope_parameters") or {}
        full_rope = rope.get(FULL) or {}
        if full_rope and full_rope.get("rope_type", "proportional") != "proportional":
            raise ValueError(f"{source}: full-attention rope_type {full_rope.get('rope_type')!r} unsupported")
        eos = t.get("eos_token_id", 1)
        text = TextConfig(
            vocab_size=t.get("vocab_size", 262_144),
            hidden_size=t.get("hidden_size", 2304),
            intermediate_size=t.get("intermediate_size", 9216),
            num_layers=t.get("num_hidden_layers", len(layer_types) or 30),
            num_heads=num_heads,
            num_kv_heads=t.get("num_key_value_heads", 4),
            head_dim=t.get("head_dim", 256),
            global_head_dim=over.get("head_dim", t.get("global_head_dim", 512)),
            num_global_kv_heads=over.get(
                "num_key_value_heads", t.get("num_global_key_value_heads") or t.get("num_key_value_heads", 4)
            ),
            attention_k_eq_v=bool(t.get("attention_k_eq_v", False)),
            sliding_window=t.get("sliding_window", 1024),
            sliding_rope_theta=float((rope.get(SLIDING) or {}).get("rope_theta", 10_000.0)),
            full_rope_theta=float(full_rope.get("rope_theta", 1_000_000.0)),
            full_partial_rotary_factor=float(full_rope.get("partial_rotary_factor", 0.25)),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            final_logit_softcapping=t.get("final_logit_softcapping"),
            max_position_embeddings=t.get("max_position_embeddings", 262_144),
            layer_types=layer_types,
        )
        v = d.get("vision_config")
        vision = None
        if v is not None:
            vision = VisionConfig(
                patch_size=v.get("patch_size", 16),
                pooling_kernel_size=v.get("pooling_kernel_size", 3),
                mm_embed_dim=v.get("mm_embed_dim", 3840),
                mm_posemb_size=v.get("mm_posemb_size", 1120),
                rms_norm_eps=v.get("rms_norm_eps", 1e-6),
            )
            if v.get("output_proj_dims", vision.mm_embed_dim) != vision.mm_embed_dim:
                raise ValueError(f"{source}: vision output_proj_dims must equal mm_embed_dim")
        a = d.get("audio_config")
        audio = None if a is None else AudioConfig(a.get("audio_embed_dim", 640), a.get("rms_norm_eps", 1e-6))
        dflt = TokenIds()
        tokens = TokenIds(
            pad=t.get("pad_token_id", 0) if t.get("pad_token_id") is not None else 0,
            eos=eos[0] if isinstance(eos, list) else eos,
            bos=t.get("bos_token_id", 2),
            boi=d.get("boi_token_id", dflt.boi),
            eoi=d.get("eoi_token_id", dflt.eoi),
            image=d.get("image_token_id", dflt.image),
            video=d.get("video_token_id", dflt.video),
            boa=d.get("boa_token_id", dflt.boa),
            eoa=d.get("eoa_token_index", d.get("eoa_token_id", dflt.eoa)),
            audio=d.get("audio_token_id", dflt.audio),
            turn_start=d.get("turn_start_token_id", dflt.turn_start),
            turn_end=d.get("turn_end_token_id", dflt.turn_end),
        )
        return cls(text=text, vision=vision, audio=audio, tokens=tokens)

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self) -> dict[str, Any]:
        t, k = self.text, self.tokens
        text = {
            "model_type": "gemma4_unified_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "head_dim": t.head_dim,
            "global_head_dim": t.global_head_dim,
            "num_global_key_value_heads": t.num_global_kv_heads,
            "attention_k_eq_v": t.attention_k_eq_v,
            "sliding_window": t.sliding_window,
            "layer_types": list(t.layer_types),
            "rope_parameters": {
                SLIDING: {"rope_type": "default", "rope_theta": t.sliding_rope_theta},
                FULL: {
                    "rope_type": "proportional",
                    "partial_rotary_factor": t.full_partial_rotary_factor,
                    "rope_theta": t.full_rope_theta,
                },
            },
            "rms_norm_eps": t.rms_norm_eps,
            "final_logit_softcapping": t.final_logit_softcapping,
            "max_position_embeddings": t.max_position_embeddings,
            "hidden_activation": "gelu_pytorch_tanh",
            "use_bidirectional_attention": "vision",
            "tie_word_embeddings": True,
            "pad_token_id": k.pad,
            "eos_token_id": k.eos,
            "bos_token_id": k.bos,
        }
        out: dict[str, Any] = {
            "model_type": "gemma4_unified",
            "architectures": ["Gemma4UnifiedForConditionalGeneration"],
            "text_config": text,
            "vision_config": None,
            "audio_config": None,
            "boi_token_id": k.boi,
            "eoi_token_id": k.eoi,
            "image_token_id": k.image,
            "video_token_id": k.video,
            "boa_token_id": k.boa,
            "eoa_token_index": k.eoa,
            "audio_token_id": k.audio,
            "turn_start_token_id": k.turn_start,
            "turn_end_token_id": k.turn_end,
            "tie_word_embeddings": True,
        }
        if self.vision is not None:
            v = self.vision
            out["vision_config"] = {
                "model_type": "gemma4_unified_vision",
                "patch_size": v.patch_size,
                "pooling_kernel_size": v.pooling_kernel_size,
                "mm_embed_dim": v.mm_embed_dim,
                "output_proj_dims": v.mm_embed_dim,
                "mm_posemb_size": v.mm_posemb_size,
                "rms_norm_eps": v.rms_norm_eps,
            }
        if self.audio is not None:
            out["audio_config"] = {
                "model_type": "gemma4_unified_audio",
                "audio_embed_dim": self.audio.samples_per_token,
                "rms_norm_eps": self.audio.rms_norm_eps,
            }
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """Our own flat form, stored in artifact manifests."""
        return asdict(self)

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> ModelConfig:
        text = d["text"] | {"layer_types": tuple(d["text"]["layer_types"])}
        return cls(
            text=TextConfig(**text),
            vision=VisionConfig(**d["vision"]) if d.get("vision") else None,
            audio=AudioConfig(**d["audio"]) if d.get("audio") else None,
            tokens=TokenIds(**d["tokens"]),
        )


_TINY_TOKENS = TokenIds(boi=300, eoi=304, image=302, video=306, boa=301, eoa=305, audio=303)

PRESETS: dict[str, ModelConfig] = {
    "gemma4-12b": ModelConfig(),
    # 6 layers (5 sliding + 1 full), GQA 4:2 on sliding layers, one KV head of twice the width on the full layer.
    "tiny": ModelConfig(
        text=TextConfig(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=6, num_heads=4, num_kv_heads=2,
            head_dim=16, global_head_dim=32, num_global_kv_heads=1, sliding_window=8,
            max_position_embeddings=256,
        ),
        vision=VisionConfig(mm_embed_dim=48, mm_posemb_size=64),
        audio=AudioConfig(),
        tokens=_TINY_TOKENS,
    ),
    # 12 layers (two 5:1 groups), GQA 4:1, wider heads, a larger window; a second shape of the same structure.
    "tiny-deep": ModelConfig(
        text=TextConfig(
            vocab_size=320, hidden_size=48, intermediate_size=96, num_layers=12, num_heads=4, num_kv_heads=1,
            head_dim=24, global_head_dim=48, num_global_kv_heads=1, sliding_window=16,
            max_position_embeddings=256,
        ),
        vision=VisionConfig(mm_embed_dim=32, mm_posemb_size=40),
        audio=AudioConfig(),
        tokens=_TINY_TOKENS,
    ),
    # Text only: no vision or audio sections in the config.
    "tiny-text": ModelConfig(
        text=TextConfig(
            vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=6, num_heads=2, num_kv_heads=1,
            head_dim=16, global_head_dim=32, num_global_kv_heads=1, sliding_window=4,
            max_position_embeddings=128,
        ),
        vision=None,
        audio=None,
        tokens=_TINY_TOKENS,
    ),
}

# The demo model (demo/checkpoint): trained here on synthetic questions; compact token ids of its own tokenizer.
PRESETS["demo"] = ModelConfig(
    text=TextConfig(
        vocab_size=80, hidden_size=128, intermediate_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
        head_dim=32, global_head_dim=64, num_global_kv_heads=1, sliding_window=32, max_position_embeddings=512,
    ),
    vision=VisionConfig(mm_embed_dim=64, mm_posemb_size=16),
    audio=AudioConfig(),
    tokens=TokenIds(pad=0, eos=1, bos=2, turn_start=4, turn_end=5, boi=6, image=7, eoi=8, boa=9, audio=10, eoa=11,
                    video=12),
)

# Every tiny preset is a test configuration; tests/test_registry.py fails if one has no test.
TEST_PRESETS: tuple[str, ...] = tuple(name for name in PRESETS if name.startswith("tiny"))


def load_config(model: str | Path) -> ModelConfig:
    """A preset name, a checkpoint directory holding ``config.json``, or a path to such a file."""
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such config file; pass a checkpoint directory with config.json or a preset "
            f"({', '.join(PRESETS)})"
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return ModelConfig.from_hf_dict(d, source=str(path))

