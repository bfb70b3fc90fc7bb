"""Write a Gemma 4 12B-shaped checkpoint by code, in the real Hugging Face layout, one tensor at a time.

``python bench/make_12b_checkpoint.py OUT [--layers N] [--vocab V] [--intermediate I] [--seed S]``

* weights: `exporter.stream.SeededWeights` (the same per-tensor seeded values `make export MODEL=gemma4-12b` uses),
  stored bf16 in ``model-0000k-of-0000n.safetensors`` shards of about ``--shard-gib`` GiB with a
  ``model.safetensors.index.json``; tensor names as transformers 5.24 saves them (``model.embed_vision.*``,
  ``model.embed_vision.multimodal_embedder.embedding_projection.weight``).  Each shard is written by streaming:
  the safetensors header is computed from the shapes, then every tensor is generated block by block and appended,
  so memory stays at one 64 MiB block whatever the size (the 12B's 24 GB included);
* ``config.json``: `exporter.config.ModelConfig.to_hf_dict` (``model_type: gemma4_unified``, the keys
  transformers' ``Gemma4UnifiedConfig`` reads; the tests build that class from the same dict);
* ``tokenizer.json``: a word-level tokenizer (`tokenizers`) with the 12B's special token ids (pad 0, eos 1, bos 2,
  ``<|turn>`` 105, ``<turn|>`` 106, ``<|image>`` 255999, ``<|image|>`` 258880, ...), the demo's words and the
  calibration prompts' words at low ids, and ``<unused_i>`` fillers up to the vocabulary size.  It is not Gemma's
  SentencePiece model (that is not ours to ship); it tokenizes the calibration and demo prompts.

``--layers``, ``--vocab`` and ``--intermediate`` make slices with the 12B's other dimensions unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

__all__ = ["config_12b", "hf_name", "write_checkpoint", "write_tokenizer"]


def config_12b(layers: int = 48, vocab: int | None = None, intermediate: int | None = None):
    """The 12B's config with ``layers`` decoder layers (5 sliding : 1 full, last full) and optionally a smaller
    vocabulary (special token ids then move to the top of it) or MLP."""
    from exporter.config import PRESETS, TokenIds

    base = PRESETS["gemma4-12b"]
    text = replace(base.text, num_layers=layers, layer_types=(),
                   vocab_size=vocab or base.text.vocab_size,
                   intermediate_size=intermediate or base.text.intermediate_size)
    tokens = base.tokens
    if vocab is not None and vocab < 262_144:
        top = vocab - 16
        tokens = TokenIds(boi=top, boa=top + 1, image=top + 2, audio=top + 3, eoi=top + 4, eoa=top + 5, video=top + 6)
    return replace(base, text=text, tokens=tokens)


def hf_name(ours: str) -> str:
    """Our state-dict name -> the name transformers 5.24 writes (inverse of `exporter.weights`' mapping)."""
    if ours == "model.embed_vision.embedding_projection.weight":
        return "model.embed_vision.multimodal_embedder.embedding_projection.weight"
    if ours.startswith("model.vision_embedder."):
        return "model.embed_vision." + ours[len("model.vision_embedder."):]
    return ours


def _write_shard(path: Path, names: list[str], source, dtype: str) -> int:
    """One safetensors file written tensor by tensor, block by block (header first, from the shapes)."""
    import torch

    tdt = {"BF16": torch.bfloat16, "F32": torch.float32}[dtype]
    item = 2 if dtype == "BF16" else 4
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        size = item * math.prod(source.shapes[n])
        header[hf_name(n)] = {"dtype": dtype, "shape": list(source.shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n in names:
            for block in source.blocks(n):
                f.write(block.to(tdt).contiguous().view(torch.uint8).numpy().tobytes())
    tmp.replace(path)
    return offset


def write_checkpoint(cfg, out: Path, *, seed: int = 0, shard_bytes: int = 2 << 30, dtype: str = "bf16",
                     tokenizer: bool = True, log=print) -> int:
    """Write the checkpoint into the new directory ``out``; returns the weight bytes written."""
    from exporter.stream import SeededWeights
    from runtime.progress import Progress

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    source = SeededWeights(cfg, seed)
    st_dtype = {"bf16": "BF16", "fp32": "F32"}[dtype]
    item = 2 if dtype == "bf16" else 4
    shards: list[list[str]] = [[]]
    size = 0
    for n, shape in source.shapes.items():
        b = item * math.prod(shape)
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    total_bytes = sum(item * math.prod(s) for s in source.shapes.values())
    weight_map, total = {}, 0
    with Progress(len(shards), "checkpoint shards", unit="shards") as bar:
        for k, names in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            total += _write_shard(out / fname, names, source, st_dtype)
            weight_map.update({hf_name(n): fname for n in names})
            bar.update(1, note=f"{total / 2**30:.1f} of {total_bytes / 2**30:.1f} GiB")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    hf = cfg.to_hf_dict() | {"dtype": "bfloat16" if dtype == "bf16" else "float32", "transformers_version": "5.24.0"}
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    if tokenizer:
        write_tokenizer(cfg, out)
    log(f"[checkpoint] {out}: {total / 2**30:.2f} GiB in {len(shards)} shards")
    return total


def write_tokenizer(cfg, out: Path) -> None:
    """A word-level ``tokenizer.json`` with the config's special token ids (see the module docstring)."""
    import re

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from demo.tasks import vocabulary

    k = cfg.tokens
    specials = {"<pad>": k.pad, "<eos>": k.eos, "<bos>": k.bos, "<unk>": 3, "<|turn>": k.turn_start,
                "<turn|>": k.turn_end, "<|image>": k.boi, "<|image|>": k.image, "<image|>": k.eoi, "<|audio>": k.boa,
                "<|audio|>": k.audio, "<audio|>": k.eoa, "<|video|>": k.video}
    taken = set(specials.values())
    words = list(dict.fromkeys(vocabulary()))
    data = ROOT / "calib" / "default_data"
    for txt in sorted(data.glob("*/*.txt")):
        words += [w for w in re.split(r"\s+", txt.read_text()) if w and w not in specials]
    vocab = dict(specials)
    free = (i for i in range(cfg.text.vocab_size) if i not in taken)
    for w in dict.fromkeys(words):
        vocab[w] = next(free)
    for i in free:
        vocab[f"<unused_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(specials))
    tok.save(str(out / "tokenizer.json"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="new checkpoint directory")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--vocab", type=int, default=None, help="smaller vocabulary (slices for tests)")
    p.add_argument("--intermediate", type=int, default=None, help="smaller MLP (slices for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--shard-gib", type=float, default=2.0)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    if Path(a.out).exists():
        print(f"make_12b_checkpoint: error: {a.out} exists; give a new directory", file=sys.stderr)
        return 2
    cfg = config_12b(a.layers, a.vocab, a.intermediate)
    write_checkpoint(cfg, Path(a.out), seed=a.seed, shard_bytes=int(a.shard_gib * 2**30), dtype=a.dtype)
    print(f"[checkpoint] done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
