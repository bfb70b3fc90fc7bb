"""Train the demo checkpoint: ``python -m demo.train [--out demo/checkpoint] [--minutes 25] [--seed 0]``.

Our own `Gemma4Model` (the exact Gemma 4 Unified structure at the ``demo`` preset's sizes) is trained with
cross-entropy on the answer tokens of freshly generated examples (an endless stream: no example repeats), on the
CPU.  Every ``--eval-every`` steps it measures exact-answer accuracy with greedy decoding and
stops once it reaches ``--target`` twice in a row on the validation split (the held-out split is left for
``make eval``), or when ``--minutes`` run out.  The result is written in the
Hugging Face layout (config.json, model.safetensors, tokenizer.json), loadable by transformers and by our exporter.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo.tasks import Example, examples, prompt_text
from demo.tokenizer import build_tokenizer
from exporter.config import PRESETS
from exporter.weights import random_model
from runtime.prompt import expand_prompt, pack_batch

__all__ = ["encode_batch", "train"]

MAX_SOFT_TOKENS = 70


def encode_batch(batch: list[Example], tok, cfg, *, with_answers: bool = True):
    """Prefill tensors for a batch, and for training the (row, position, target) of every answer token."""
    cfg_d = cfg.to_json_dict()
    turn_end = cfg.tokens.turn_end
    prepared, targets = [], []
    for row, ex in enumerate(batch):
        ids = [cfg.tokens.bos] + tok.encode(prompt_text(ex), add_special_tokens=False).ids
        p = expand_prompt(ids, ex.images, ex.audio, cfg_d, max_soft_tokens=MAX_SOFT_TOKENS)
        if with_answers:
            answer = tok.encode(ex.answer, add_special_tokens=False).ids + [turn_end]
            start = len(p.ids)
            p.ids = p.ids + answer
            targets += [(row, start - 1 + i, t) for i, t in enumerate(answer)]
        prepared.append(p)
    packed = pack_batch(prepared, cfg.tokens.pad)
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    inputs = (t(packed.input_ids), t(packed.past_lens), t(packed.seq_lens), t(packed.image_patches),
              t(packed.image_positions), t(packed.audio_frames))
    return inputs, targets


def forward(model, inputs, *, all_logits: bool):
    ids, past, lens, patches, positions, frames = inputs
    caches = model.empty_caches(ids.shape[0], ids.shape[1])
    logits, _ = model.prefill(ids, past, lens, caches, patches, positions, frames, all_logits=all_logits)
    return logits


@torch.no_grad()
def accuracy(model, tok, cfg, data: list[Example], batch: int = 50) -> float:
    """Exact answers: the first predicted token is the answer word (every answer is one word)."""
    model.eval()
    right = 0
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        inputs, _ = encode_batch(chunk, tok, cfg, with_answers=False)
        pred = forward(model, inputs, all_logits=False).argmax(-1).tolist()
        right += sum(tok.decode([p]) == ex.answer for p, ex in zip(pred, chunk))
    model.train()
    return right / len(data)


def train(out: Path, *, minutes: float, seed: int, steps: int, batch: int, lr: float, target: float,
          eval_every: int, log=print) -> dict:
    torch.manual_seed(seed)
    cfg = PRESETS["demo"]
    tok = build_tokenizer()
    model = random_model(cfg, seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    validation = examples("validation", 150, seed=seed)
    stream = np.random.default_rng([seed, 2])
    t0 = time.perf_counter()
    hits, history, step = 0, [], 0
    for step in range(1, steps + 1):
        warm = min(1.0, step / 100)
        opt.param_groups[0]["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        data = examples("train", batch, seed=int(stream.integers(1 << 31)))
        inputs, targets = encode_batch(data, tok, cfg)
        logits = forward(model, inputs, all_logits=True)
        rows, pos, tgt = (torch.tensor(x) for x in zip(*targets))
        loss = F.cross_entropy(logits[rows, pos], tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = (time.perf_counter() - t0) / 60
        if step % eval_every == 0 or elapsed > minutes:
            acc = accuracy(model, tok, cfg, validation)
            history.append({"step": step, "minutes": round(elapsed, 2), "loss": round(loss.item(), 4), "validation": acc})
            log(f"[train] step {step} loss {loss.item():.4f} validation accuracy {acc:.3f} ({elapsed:.1f} min)")
            hits = hits + 1 if acc >= target else 0
            if hits >= 2 or elapsed > minutes:
                break
    save(model, tok, out, {"seed": seed, "steps": step, "minutes": round((time.perf_counter() - t0) / 60, 2),
                           "history": history})
    return history[-1]


def save(model, tok, out: Path, info: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="demo/checkpoint")
    p.add_argument("--minutes", type=float, default=27.0)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.98)
    p.add_argument("--eval-every", type=int, default=200)
    a = p.parse_args(argv)
    last = train(Path(a.out), minutes=a.minutes, seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr,
                 target=a.target, eval_every=a.eval_every)
    print(f"[train] done: validation accuracy {last['validation']:.3f} after {last['step']} steps ({last['minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
