"""Train the demo checkpoint: ``python -m demo.train [--out demo/checkpoint] [--init DIR] [--focus KINDS] [--seed 0]``;
``python -m demo.train --assistant [...]`` trains the demo assistant instead (`demo.assistant`, its own options).

Our own `Gemma4Model` (the exact Gemma 4 Unified structure at the ``demo`` preset's sizes) is trained with
cross-entropy on the answer tokens of freshly generated examples (an endless stream: no example repeats; each example
weighs the same whatever its answer's length), on the CPU.  Every ``--eval-every`` steps it measures exact-answer
accuracy (every answer token and the stop token right, given the answer so far: what greedy decoding writes) on the
validation split, overall and per kind, and stops once it reaches ``--target`` twice in a row (the held-out split is
left for ``make eval``), or when ``--minutes`` run out.  ``--init`` starts from a former demo checkpoint instead of
seeded random weights (its embedding rows follow their words to the new ids); ``--focus`` fills half of every batch
with the given kinds.  The result is written in the Hugging Face layout (config.json, model.safetensors,
tokenizer.json, training.json), loadable by transformers and by our exporter.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo.tasks import KINDS, Example, examples, prompt_text
from demo.tokenizer import build_tokenizer
from exporter.config import PRESETS
from exporter.weights import load_model, random_model
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


def answer_loss(logits, targets, n_rows: int):
    """Cross-entropy on the answer tokens, each example weighted once (a 37-token answer counts as much as a
    one-word one)."""
    rows, pos, tgt = (torch.tensor(x) for x in zip(*targets))
    per_token = F.cross_entropy(logits[rows, pos], tgt, reduction="none")
    lengths = torch.bincount(rows, minlength=n_rows).float()
    return (per_token / lengths[rows]).sum() / n_rows


@torch.no_grad()
def accuracy(model, tok, cfg, data: list[Example], batch: int = 50) -> tuple[float, dict[str, float]]:
    """Exact answers (overall, per kind): the argmax at every answer position, stop token included, given the
    answer so far, is the answer's token, which is exactly when greedy decoding writes the answer and stops."""
    model.eval()
    ok = []
    for i in range(0, len(data), batch):
        chunk = data[i:i + batch]
        inputs, targets = encode_batch(chunk, tok, cfg)
        pred = forward(model, inputs, all_logits=True).argmax(-1)
        wrong = set(row for row, pos, t in targets if int(pred[row, pos]) != t)
        ok += [row not in wrong for row in range(len(chunk))]
    model.train()
    kinds = sorted({ex.kind for ex in data})
    per_kind = {k: round(sum(o for o, ex in zip(ok, data) if ex.kind == k) / sum(ex.kind == k for ex in data), 3)
                for k in kinds}
    return sum(ok) / len(data), per_kind


def warm_start(tok, init: Path, seed: int):
    """A former demo checkpoint as the starting point: every tensor as saved, except that the (tied) embedding rows
    move to the ids their words have in ``tok`` (the word-level vocabulary is sorted, so new words shift the ids);
    words the former vocabulary lacks keep fresh rows of the same scale."""
    old_vocab = json.loads((init / "tokenizer.json").read_text())["model"]["vocab"]
    model = load_model(init)
    table = model.state_dict()["model.language_model.embed_tokens.weight"]
    fresh = random_model(model.cfg, seed=seed).state_dict()["model.language_model.embed_tokens.weight"]
    moved = table.clone()
    for word, new_id in tok.get_vocab().items():
        moved[new_id] = table[old_vocab[word]] if word in old_vocab else fresh[new_id]
    with torch.no_grad():
        model.model.language_model.embed_tokens.weight.copy_(moved)
    before = json.loads((init / "training.json").read_text()) if (init / "training.json").is_file() else {}
    record = {k: before[k] for k in ("seed", "steps", "batch", "lr", "minutes", "kinds", "focus", "init",
                                     "init_training") if k in before}
    return model, {"init": str(init), "init_training": record,
                   "new_words": sorted(set(tok.get_vocab()) - set(old_vocab))}


def train(out: Path, *, minutes: float, seed: int, steps: int, batch: int, lr: float, target: float,
          eval_every: int, init: Path | None = None, focus: tuple[str, ...] = (), log=print) -> dict:
    torch.manual_seed(seed)
    cfg = PRESETS["demo"]
    tok = build_tokenizer()
    model, start = warm_start(tok, init, seed) if init else (random_model(cfg, seed=seed), {})
    if model.cfg != cfg:
        raise ValueError(f"--init {init}: its config.json is not the demo preset's")
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    validation = examples("validation", 210, seed=seed)
    stream = np.random.default_rng([seed, 2])
    t0 = time.perf_counter()
    hits, history, step = 0, [], 0
    for step in range(1, steps + 1):
        warm = min(1.0, step / 100)
        opt.param_groups[0]["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        data = examples("train", batch - batch // 2 * bool(focus), seed=int(stream.integers(1 << 31)))
        if focus:  # half of the batch from the focus kinds
            data += examples("train", batch // 2, seed=int(stream.integers(1 << 31)), kinds=focus)
        inputs, targets = encode_batch(data, tok, cfg)
        loss = answer_loss(forward(model, inputs, all_logits=True), targets, len(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed = (time.perf_counter() - t0) / 60
        if step % eval_every == 0 or step == steps or elapsed > minutes:
            acc, per_kind = accuracy(model, tok, cfg, validation)
            history.append({"step": step, "minutes": round(elapsed, 2), "loss": round(loss.item(), 4), "validation": acc,
                            "per_kind": per_kind})
            log(f"[train] step {step} loss {loss.item():.4f} validation accuracy {acc:.3f} {per_kind} "
                f"({elapsed:.1f} min)", flush=True)
            hits = hits + 1 if acc >= target else 0
            if hits >= 2 or elapsed > minutes:
                break
    save(model, tok, out, {"seed": seed, "steps": step, "batch": batch, "lr": lr, "kinds": list(KINDS), **start,
                           "focus": list(focus),
                           "minutes": round((time.perf_counter() - t0) / 60, 2), "history": history})
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--assistant" in argv:
        from demo.assistant import main as train_assistant_main

        return train_assistant_main([x for x in argv if x != "--assistant"])
    p = argparse.ArgumentParser(prog="python -m demo.train", description="Train the demo checkpoint (see demo/train.py).")
    p.add_argument("--assistant", action="store_true",
                   help="train the demo assistant by distillation instead (python -m demo.train --assistant --help)")
    p.add_argument("--out", default="demo/checkpoint")
    p.add_argument("--minutes", type=float, default=240.0)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.98)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--init", help="start from this former demo checkpoint (embedding rows moved to the new word ids)")
    p.add_argument("--focus", default="", help="comma-separated kinds that fill half of every batch")
    a = p.parse_args(argv)
    focus = tuple(k for k in a.focus.split(",") if k)
    if set(focus) - set(KINDS):
        p.error(f"--focus {a.focus}: expected kinds among {', '.join(KINDS)}")
    last = train(Path(a.out), minutes=a.minutes, seed=a.seed, steps=a.steps, batch=a.batch, lr=a.lr,
                 target=a.target, eval_every=a.eval_every, init=Path(a.init) if a.init else None, focus=focus)
    print(f"[train] done: validation accuracy {last['validation']:.3f} after {last['step']} steps ({last['minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
