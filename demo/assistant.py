"""Train the demo assistant by distillation: ``python -m demo.train --assistant [--target demo/checkpoint]
[--out demo/assistant] [--minutes 20] [--seed 0]`` (``make train-demo-assistant``).

The assistant is transformers' ``Gemma4UnifiedAssistantForCausalLM``, the drafter Gemma 4 ships for speculative
decoding, at the demo's size: two Q-only layers (one sliding, one full) of the target's hidden size that have no
keys or values of their own.  They attend to the target's keys and values of its last sliding and last full layer.
transformers drives it (``SinglePositionMultiTokenCandidateGenerator``) in rounds: at a round that starts with token
``x_t`` at position ``t`` (accepted, not yet seen by the target), the target has keys and values up to ``t - 1`` and
its last hidden state ``h_{t-1}`` (the one that chose ``x_t``); the assistant's input is
``pre_projection(concat(target_embedding(x_t), h_{t-1}))`` at position id ``t``, its output gives the draft of
``x_{t+1}`` (LM head) and, through ``post_projection``, the hidden state that goes with the draft into the next step;
``position_ids`` stay at ``t`` for the whole round.

Distillation: the target (transformers, eager attention) runs once over each training prompt followed by its own
greedy answer (the task's answer where the target's argmax agrees with it, cut after the target's first different
token: exactly what greedy decoding writes up to there); its hidden states and shared keys and values are kept.
The assistant then learns, for every round start ``t`` in the answer at once (masks give the query at ``t`` the
keys ``<= t - 1``, the last 33 of them on the sliding layer, as transformers' masks do), to predict the target's
next tokens ``x_{t+1} .. x_{t+K}`` unrolled the way the candidate generator unrolls it (each step's input: the
previous step's token, teacher-forced to the target's, and the assistant's own projected hidden state), with
cross-entropy on the target's greedy tokens.  The result is written in transformers' layout (config.json,
model.safetensors, generation_config.json) with training.json, and loads with ``from_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from demo.tasks import Example, examples, prompt_text
from exporter.config import load_config

__all__ = ["Trace", "assistant_config", "hf_inputs", "load_target", "round_logits", "round_loss", "target_trace",
           "train_assistant"]

MAX_SOFT_TOKENS = 70
SLIDING_SEEN = 33  # keys the assistant's sliding layer sees (transformers' bidirectional window mask, flipped)


def load_target(path: str | Path):
    """The demo target in transformers (eager attention: what the tests compare with), in eval mode."""
    from transformers import Gemma4UnifiedForConditionalGeneration

    model = Gemma4UnifiedForConditionalGeneration.from_pretrained(path).eval()
    model.set_attn_implementation("eager")
    return model


def hf_inputs(ex: Example, tok, tokens: dict, config: dict) -> dict:
    """transformers' inputs (batch of one) for an example's prompt, soft tokens prepared by our runtime."""
    from runtime.prompt import expand_prompt

    ids = [tokens["bos"]] + tok.encode(prompt_text(ex), add_special_tokens=False).ids
    prepared = expand_prompt(ids, ex.images, ex.audio, config, max_soft_tokens=MAX_SOFT_TOKENS)
    ids = torch.tensor([prepared.ids])
    mm = torch.zeros_like(ids)
    mm[ids == tokens["image"]] = 1
    mm[ids == tokens["audio"]] = 3
    out = {"input_ids": ids, "mm_token_type_ids": mm}
    if prepared.image_patches:  # the demo's prompts hold at most one image and one clip
        out |= {"pixel_values": torch.from_numpy(np.stack(prepared.image_patches)),
                "image_position_ids": torch.from_numpy(np.stack(prepared.image_positions))}
    if prepared.audio_frames:
        feats = torch.from_numpy(np.stack(prepared.audio_frames))
        out |= {"input_features": feats, "input_features_mask": torch.ones(feats.shape[:2], dtype=torch.bool)}
    return out


@dataclass
class Trace:
    """One prompt and the target's greedy answer: ids (prompt + answer), where the answer starts, the target's last
    hidden state at every position, and its shared keys and values {layer type: (k, v)}, each (heads, S, dim)."""

    kind: str
    ids: torch.Tensor
    start: int
    hidden: torch.Tensor
    kv: dict


@torch.no_grad()
def target_trace(target, ex: Example, tok, tokens: dict, config: dict) -> Trace:
    inputs = hf_inputs(ex, tok, tokens, config)
    prompt = inputs["input_ids"]
    answer = torch.tensor([tok.encode(ex.answer, add_special_tokens=False).ids + [tokens["turn_end"]]])
    full = torch.cat([prompt, answer], 1)
    mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    out = target(**(inputs | {"input_ids": full, "mm_token_type_ids": mm}), output_hidden_states=True,
                 return_shared_kv_states=True, use_cache=False)
    start = prompt.shape[1]
    greedy = out.logits[0, start - 1:-1].argmax(-1)
    differ = (greedy != answer[0]).nonzero()
    ids = full[0]
    if len(differ):  # the target's greedy answer leaves the task's answer here: keep its own token, stop there
        cut = int(differ[0])
        ids = torch.cat([ids[: start + cut], greedy[cut: cut + 1]])
    kv = {name: (k[0], v[0]) for name, (k, v) in out.shared_kv_states.items()}
    return Trace(ex.kind, ids, start, out.hidden_states[-1][0], kv)


def assistant_config(target_dir: Path, *, layers: int = 2, hidden: int | None = None,
                     intermediate: int | None = None):
    """An assistant config for the target checkpoint in ``target_dir``: the target's attention geometry (it reads the
    target's keys and values), ``layers`` layers ending with a full one, sliding before it."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedTextConfig

    t = json.loads((Path(target_dir) / "config.json").read_text())["text_config"]
    hidden = hidden or t["hidden_size"]
    keep = ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim",
            "num_global_key_value_heads", "attention_k_eq_v", "sliding_window", "rope_parameters", "rms_norm_eps",
            "max_position_embeddings", "hidden_activation", "pad_token_id", "eos_token_id", "bos_token_id")
    text = Gemma4UnifiedTextConfig(
        **{k: t[k] for k in keep if k in t}, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        final_logit_softcapping=None, tie_word_embeddings=True,
    )
    config = Gemma4UnifiedAssistantConfig(text_config=text, backbone_hidden_size=t["hidden_size"])
    config.architectures = ["Gemma4UnifiedAssistantForCausalLM"]
    return config


def _masks(lengths: list[int], n: int) -> dict:
    """Additive masks (B, 1, n, n): the query of round start t sees keys 0..t-1 (full) and the last
    ``SLIDING_SEEN`` of them (sliding); rows past a sequence's end see key 0 only (never scored)."""
    t = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    full = k < t
    sliding = full & (k >= t - SLIDING_SEEN)
    out = {}
    for name, allowed in (("full_attention", full), ("sliding_attention", sliding)):
        allowed = allowed.clone()
        allowed[0, 0] = True
        m = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
        out[name] = m[None, None].expand(len(lengths), 1, n, n)
    return out


def _pad(traces: list[Trace]):
    n = max(len(tr.ids) for tr in traces)
    ids = torch.zeros(len(traces), n, dtype=torch.long)
    hidden = torch.zeros(len(traces), n, traces[0].hidden.shape[-1])
    kv = {}
    for name in traces[0].kv:
        k0, v0 = traces[0].kv[name]
        ks = torch.zeros(len(traces), k0.shape[0], n, k0.shape[-1])
        vs = torch.zeros(len(traces), v0.shape[0], n, v0.shape[-1])
        for i, tr in enumerate(traces):
            k, v = tr.kv[name]
            s = min(k.shape[1], n)
            ks[i, :, :s], vs[i, :, :s] = k[:, :s], v[:, :s]
        kv[name] = (ks, vs)
    for i, tr in enumerate(traces):
        ids[i, : len(tr.ids)] = tr.ids
        s = min(tr.hidden.shape[0], n)
        hidden[i, :s] = tr.hidden[:s]
    return ids, hidden, kv, n


def _step(assistant, embed, token, state, masks, kv):
    """One draft step for every round start at once: (logits, the hidden state handed to the next step)."""
    x = assistant.pre_projection(torch.cat([embed(token), state], -1))
    positions = torch.arange(token.shape[1])[None].expand(token.shape[0], -1)
    out = assistant.model(inputs_embeds=x, attention_mask=masks, position_ids=positions, shared_kv_states=kv,
                          use_cache=False)
    return assistant.lm_head(out.last_hidden_state), assistant.post_projection(out.last_hidden_state)


def round_logits(assistant, embed, trace: Trace, t: int, depth: int) -> torch.Tensor:
    """(depth, vocab) logits of the round that starts at position ``t`` of ``trace``, each step fed the previous
    step's own draft, as the candidate generator drafts."""
    ids, hidden, kv, n = _pad([trace])
    masks = _masks([len(trace.ids)], n)
    state = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], 1)
    token, rows = ids.clone(), []
    for _ in range(depth):
        logits, state = _step(assistant, embed, token, state, masks, kv)
        rows.append(logits[0, t])
        token = token.clone()
        token[0, t] = logits[0, t].argmax()
    return torch.stack(rows)


def round_loss(assistant, embed, traces: list[Trace], depth: int):
    """Mean cross-entropy over every round start in the answers and every draft step 1..depth (each step weighted
    alike), and the number of scored and right drafts per step."""
    ids, hidden, kv, n = _pad(traces)
    masks = _masks([len(tr.ids) for tr in traces], n)
    # round start t: token x_t with the target's hidden state at t - 1 (position 0 never starts a round)
    state = torch.cat([torch.zeros_like(hidden[:, :1]), hidden[:, :-1]], 1)
    token = ids
    losses, stats = [], []
    for j in range(1, depth + 1):
        logits, state = _step(assistant, embed, token, state, masks, kv)
        # the draft of x_{t+j} from round start t is scored when t >= start and t + j is in the sequence
        target = torch.full_like(ids, -100)
        for i, tr in enumerate(traces):
            hi = len(tr.ids) - j
            if hi > tr.start:
                target[i, tr.start:hi] = tr.ids[tr.start + j: len(tr.ids)]
        valid = target >= 0
        if not valid.any():
            break
        losses.append(F.cross_entropy(logits[valid], target[valid]))
        stats.append((int(valid.sum()), int((logits[valid].argmax(-1) == target[valid]).sum())))
        token = torch.cat([ids[:, j:], torch.zeros_like(ids[:, :j])], 1)  # teacher-forced: x_{t+j}
    return torch.stack(losses).mean(), stats


def _traces(target, tok, tokens, config, data: list[Example], log, what: str) -> list[Trace]:
    out, t0 = [], time.perf_counter()
    for i, ex in enumerate(data):
        out.append(target_trace(target, ex, tok, tokens, config))
        if (i + 1) % 500 == 0:
            log(f"[assistant] {what}: {i + 1}/{len(data)} target passes ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


@torch.no_grad()
def draft_accuracy(assistant, embed, traces: list[Trace], depth: int) -> dict:
    assistant.eval()
    totals = np.zeros((depth, 2))
    for i in range(0, len(traces), 32):
        _, stats = round_loss(assistant, embed, traces[i:i + 32], depth)
        totals[: len(stats)] += np.array(stats)
    assistant.train()
    return {f"step{j + 1}": round(float(r / s), 4) for j, (s, r) in enumerate(totals) if s}


def train_assistant(target_dir: Path, out: Path, *, n_train: int, steps: int, batch: int, lr: float, depth: int,
                    layers: int, seed: int, minutes: float, eval_every: int, log=print) -> dict:
    from tokenizers import Tokenizer
    from transformers import Gemma4UnifiedAssistantForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    target = load_target(target_dir)
    for p in target.parameters():
        p.requires_grad_(False)
    embed = target.get_input_embeddings()
    tok = Tokenizer.from_file(str(target_dir / "tokenizer.json"))
    cfg = load_config(target_dir).to_json_dict()
    tokens = cfg["tokens"]
    t0 = time.perf_counter()
    # a train-split seed stream of its own: not the target's training batches, not validation or held-out
    train_set = _traces(target, tok, tokens, cfg, examples("train", n_train, seed=seed + 1000), log, "train")
    val_set = _traces(target, tok, tokens, cfg, examples("validation", 210, seed=seed + 1000), log, "validation")
    # a round needs an accepted answer token and one more to draft
    train_set = [tr for tr in train_set if len(tr.ids) - tr.start >= 2]
    val_set = [tr for tr in val_set if len(tr.ids) - tr.start >= 2]
    if not train_set or not val_set:
        raise ValueError(f"{target_dir}: the target's greedy answers are all shorter than two tokens; nothing to "
                         "distil (is it the trained demo checkpoint?)")
    traced = time.perf_counter() - t0
    log(f"[assistant] traced {len(train_set)} + {len(val_set)} prompts in {traced:.0f} s", flush=True)

    config = assistant_config(target_dir, layers=layers)
    assistant = Gemma4UnifiedAssistantForCausalLM(config)
    assistant.set_attn_implementation("eager")
    assistant.train()
    opt = torch.optim.AdamW(assistant.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng([seed, 7])
    history, step, t1 = [], 0, time.perf_counter()
    for step in range(1, steps + 1):
        opt.param_groups[0]["lr"] = lr * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        picks = rng.choice(len(train_set), batch, replace=False)
        loss, _ = round_loss(assistant, embed, [train_set[i] for i in picks], depth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(assistant.parameters(), 1.0)
        opt.step()
        elapsed = (time.perf_counter() - t1) / 60
        if step % eval_every == 0 or step == steps or elapsed > minutes:
            acc = draft_accuracy(assistant, embed, val_set, depth)
            history.append({"step": step, "minutes": round(elapsed, 2), "loss": round(loss.item(), 4),
                            "validation_draft_accuracy": acc})
            log(f"[assistant] step {step} loss {loss.item():.4f} validation draft accuracy {acc} ({elapsed:.1f} min)",
                flush=True)
            if elapsed > minutes:
                break
    kinds = sorted({tr.kind for tr in train_set})
    info = {
        "target": str(target_dir), "seed": seed, "steps": step, "batch": batch, "lr": lr, "depth": depth,
        "layers": layers, "parameters": sum(p.numel() for p in assistant.parameters()),
        "data": {"train_prompts": len(train_set), "validation_prompts": len(val_set), "split": "train/validation",
                 "seed": seed + 1000, "kinds": kinds, "answer_tokens": sum(len(t.ids) - t.start for t in train_set),
                 "labels": "the target's greedy tokens (argmax), unrolled depth steps from every answer position"},
        "trace_minutes": round(traced / 60, 2), "minutes": round((time.perf_counter() - t1) / 60, 2),
        "history": history,
    }
    assistant.generation_config = GenerationConfig(num_assistant_tokens=depth, num_assistant_tokens_schedule="constant",
                                                   bos_token_id=tokens["bos"], eos_token_id=tokens["eos"],
                                                   pad_token_id=tokens["pad"])
    save(assistant.eval(), out, info)
    return history[-1]


def save(assistant, out: Path, info: dict) -> None:
    """Write into a fresh sibling directory, then swap it in: nothing is left half-written on failure."""
    import shutil

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    assistant.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.train --assistant", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="demo/checkpoint", help="the demo target checkpoint to distil")
    p.add_argument("--out", default="demo/assistant")
    p.add_argument("--prompts", type=int, default=3000, help="training prompts (the target answers each once)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--depth", type=int, default=6, help="draft steps per round (num_assistant_tokens)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--eval-every", type=int, default=250)
    a = p.parse_args(argv)
    if not (Path(a.target) / "config.json").is_file():
        p.error(f"--target {a.target}: no config.json there; expected the demo checkpoint directory")
    if a.layers < 1 or a.depth < 1:
        p.error("--layers and --depth must be at least 1")
    last = train_assistant(Path(a.target), Path(a.out), n_train=a.prompts, steps=a.steps, batch=a.batch, lr=a.lr,
                           depth=a.depth, layers=a.layers, seed=a.seed, minutes=a.minutes, eval_every=a.eval_every)
    print(f"[assistant] done: validation draft accuracy {last['validation_draft_accuracy']} after {last['step']} "
          f"steps, written to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
