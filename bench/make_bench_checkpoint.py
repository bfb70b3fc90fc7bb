"""The speed-benchmark checkpoint: a seeded random-weight Gemma 4 Unified of 234 M parameters with the 12B's structure.

Structure kept from ``gemma4-12b``: the 262,144-entry vocabulary (tied embedding / LM head, 168 M of the 234 M
parameters, as the 12B's 1 B embedding is its largest single matrix), 12 layers in the 5 sliding : 1 full pattern
with the last layer full, grouped-query attention on the sliding layers (4 query heads, 2 KV heads of 128), one KV
head of twice the width (256) on the full layers with ``attention_k_eq_v`` (V is the raw K projection), proportional
RoPE (partial factor 0.25, theta 1e6) on the full layers, a GeGLU MLP (3.2x the hidden size; the 12B's is 4x,
narrowed so the total lands on 234 M), logit soft-capping, and the vision (patch embedder + position table) and
audio embedders.  The sliding window is 512 so a 2048-token prompt wraps the sliding layers' ring buffers.

Weights: transformers' own initialiser under ``torch.manual_seed(seed)``, then norms, biases and layer scalars
perturbed away from ones/zeros (seeded), and a wider embedding so greedy choices are not near-ties.  Written by
``Gemma4UnifiedForConditionalGeneration(config).save_pretrained`` (fp32 safetensors, ~0.94 GB) with a byte-level
tokenizer (``tokenizer.json`` + ``tokenizer_config.json``): the Gemma special tokens at their real ids, the 256
byte symbols, the rest of the vocabulary as ``<unused_N>`` entries, so text round-trips and every id decodes.

Usage: ``python bench/make_bench_checkpoint.py [OUT] [--seed 0] [--force]`` (default OUT:
``bench/checkpoints/bench-234m``).  Staged in a temporary sibling directory and renamed into place: an interrupted
run leaves no half-written checkpoint; an existing OUT is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_OUT = ROOT / "bench" / "checkpoints" / "bench-234m"
BYTE_BASE = 1000  # ids BYTE_BASE .. BYTE_BASE+255: the byte-level symbols


def bench_config():
    """Our typed config of the bench model (12B structure, 234 M parameters)."""
    from exporter.config import AudioConfig, ModelConfig, TextConfig, VisionConfig

    return ModelConfig(
        text=TextConfig(
            vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_layers=12, num_heads=4, num_kv_heads=2,
            head_dim=128, global_head_dim=256, num_global_kv_heads=1, attention_k_eq_v=True, sliding_window=512,
            max_position_embeddings=8192,
        ),
        vision=VisionConfig(mm_embed_dim=640, mm_posemb_size=1120),
        audio=AudioConfig(),
    )


def _special_tokens(cfg) -> dict[int, str]:
    k = cfg.tokens
    return {
        k.pad: "<pad>", k.eos: "<eos>", k.bos: "<bos>", 3: "<unk>", k.turn_start: "<|turn>", k.turn_end: "<turn|>",
        k.boi: "<|image>", k.image: "<|image|>", k.eoi: "<image|>", k.boa: "<|audio>", k.audio: "<|audio|>",
        k.eoa: "<audio|>", k.video: "<|video|>",
    }


def write_tokenizer(cfg, out: Path) -> None:
    """Byte-level BPE without merges over the full vocabulary: specials at Gemma's ids, bytes at BYTE_BASE."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    special = _special_tokens(cfg)
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    if len(byte_symbols) != 256:
        raise RuntimeError(f"byte-level alphabet has {len(byte_symbols)} symbols, expected 256")
    vocab: dict[str, int] = {}
    for i in range(cfg.text.vocab_size):
        if i in special:
            vocab[special[i]] = i
        elif BYTE_BASE <= i < BYTE_BASE + 256:
            vocab[byte_symbols[i - BYTE_BASE]] = i
        else:
            vocab[f"<unused_{i}>"] = i
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for _, s in sorted(special.items())])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": cfg.text.max_position_embeddings,
    }, indent=2))


def build_model(cfg, seed: int):
    import torch
    from transformers import Gemma4UnifiedConfig, Gemma4UnifiedForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma4UnifiedForConditionalGeneration(Gemma4UnifiedConfig(**cfg.to_hf_dict())).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 0.5, generator=gen)  # logits well apart: greedy choices away from ties
            elif name.endswith(".weight") and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias") or name.endswith("pos_embedding"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        for i, layer in enumerate(model.model.language_model.layers):
            layer.layer_scalar.fill_(0.6 + 0.15 * (i % 4))
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing OUT")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    if (out / "config.json").exists() and not a.force:
        print(f"{out}: exists (use --force to rebuild)")
        return 0
    if out.exists() and not (out / "config.json").exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not a checkpoint; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = bench_config()
    t0 = time.perf_counter()
    print(f"building the bench model (seed {a.seed}) ...", flush=True)
    model = build_model(cfg, a.seed)
    n = sum(p.numel() for p in model.parameters())
    stage = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        print(f"{n / 1e6:.1f} M parameters; writing {out} ...", flush=True)
        model.save_pretrained(stage)
        write_tokenizer(cfg, stage)
        (stage / "bench_checkpoint.json").write_text(json.dumps({"seed": a.seed, "parameters": n}, indent=2))
        stage.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    print(f"done in {time.perf_counter() - t0:.1f} s: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
