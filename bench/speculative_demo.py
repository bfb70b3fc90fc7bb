"""Speculative decoding on the demo pair, measured with transformers itself (torch, CPU) -> bench/results/speculative_demo.json.

For held-out questions of every kind (the split ``make eval`` scores), the demo target (``demo/checkpoint``) answers
three ways with greedy decoding in transformers' ``generate``: plain; with the demo assistant
(``assistant_model=``, transformers' ``SinglePositionMultiTokenCandidateGenerator``, ``num_assistant_tokens`` drafts
per round); with prompt lookup (``prompt_lookup_num_tokens``, n-gram matches in the prompt and the output so far).
Per kind it records whether the speculative answers equal the plain ones token for token, the drafted and accepted
tokens (the candidate generators' own ``num_matches`` after each verification), the acceptance rate
(accepted / drafted), and the target's forward passes (a forward hook: prefill + one per step or per verification)
against plain decoding's.  No timings: this measures what the pair can save, not the runtime's speed.

Usage: ``python bench/speculative_demo.py [--n 140] [--k 6] [--prompt-lookup-k 6]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.paths import repo_path  # noqa: E402


@contextmanager
def counting(cls, record: list):
    """Record (drafted, accepted) per verification of a transformers candidate generator class."""
    get, update = cls.get_candidates, cls.update_candidate_strategy
    pending = {}

    def get_candidates(self, input_ids, *args, **kwargs):
        out = get(self, input_ids, *args, **kwargs)
        pending[id(self)] = out[0].shape[1] - input_ids.shape[1]
        return out

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        record.append((pending.pop(id(self), 0), int(num_matches)))
        return update(self, input_ids, scores, num_matches)

    cls.get_candidates, cls.update_candidate_strategy = get_candidates, update_candidate_strategy
    try:
        yield
    finally:
        cls.get_candidates, cls.update_candidate_strategy = get, update


def answer_tokens(out, prompt_len: int, stop: list[int]) -> list[int]:
    new = out[0, prompt_len:].tolist()
    for i, t in enumerate(new):
        if t in stop:
            return new[: i + 1]
    return new


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", default=str(ROOT / "demo" / "checkpoint"))
    p.add_argument("--assistant", default=str(ROOT / "demo" / "assistant"))
    p.add_argument("--n", type=int, default=140, help="held-out questions (all kinds, as make eval draws them)")
    p.add_argument("--k", type=int, default=None, help="assistant drafts per round (default: its generation_config)")
    p.add_argument("--prompt-lookup-k", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "speculative_demo.json"))
    a = p.parse_args()

    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import Gemma4UnifiedAssistantForCausalLM
    from transformers.generation.candidate_generator import (
        PromptLookupCandidateGenerator,
        SinglePositionMultiTokenCandidateGenerator,
    )

    from demo.assistant import hf_inputs, load_target
    from demo.tasks import examples
    from exporter.config import load_config

    torch.set_num_threads(1)
    target = load_target(a.target)
    assistant = Gemma4UnifiedAssistantForCausalLM.from_pretrained(a.assistant).eval()
    assistant.set_attn_implementation("eager")
    k = a.k or assistant.generation_config.num_assistant_tokens
    assistant.generation_config.num_assistant_tokens = k
    tok = Tokenizer.from_file(str(Path(a.target) / "tokenizer.json"))
    cfg = load_config(a.target).to_json_dict()
    tokens = cfg["tokens"]
    stop = [tokens["eos"], tokens["turn_end"]]
    passes = [0]
    target.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    common = dict(do_sample=False, max_new_tokens=a.max_new_tokens, eos_token_id=stop, pad_token_id=tokens["pad"])

    def run(inputs, **kw):
        passes[0] = 0
        out = target.generate(**inputs, **common, **kw)
        return answer_tokens(out, inputs["input_ids"].shape[1], stop), passes[0]

    stats = defaultdict(lambda: defaultdict(int))
    t0 = time.perf_counter()
    for ex in examples("heldout", a.n, seed=0):
        inputs = hf_inputs(ex, tok, tokens, cfg)
        s = stats[ex.kind]
        plain, plain_passes = run(inputs)
        s["prompts"] += 1
        s["answer_tokens"] += len(plain)
        s["plain_target_passes"] += plain_passes
        s["plain_correct"] += tok.decode(plain[:-1] if plain and plain[-1] in stop else plain) == ex.answer
        for name, kw, cls in (("assistant", {"assistant_model": assistant}, SinglePositionMultiTokenCandidateGenerator),
                              ("prompt_lookup", {"prompt_lookup_num_tokens": a.prompt_lookup_k},
                               PromptLookupCandidateGenerator)):
            rounds: list = []
            with counting(cls, rounds):
                got, n_passes = run(inputs, **kw)
            s[f"{name}_equal_to_plain"] += got == plain
            s[f"{name}_target_passes"] += n_passes
            s[f"{name}_drafted"] += sum(d for d, _ in rounds)
            s[f"{name}_accepted"] += sum(m for _, m in rounds)
    minutes = (time.perf_counter() - t0) / 60

    def summary(s: dict) -> dict:
        row = {"prompts": s["prompts"], "answer_tokens": s["answer_tokens"], "plain_correct": s["plain_correct"],
               "plain_target_passes": s["plain_target_passes"]}
        for name in ("assistant", "prompt_lookup"):
            drafted, accepted = s[f"{name}_drafted"], s[f"{name}_accepted"]
            row[name] = {
                "equal_to_plain": f"{s[f'{name}_equal_to_plain']}/{s['prompts']}",
                "drafted": drafted, "accepted": accepted,
                "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                "target_passes": s[f"{name}_target_passes"],
                "target_passes_saved": s["plain_target_passes"] - s[f"{name}_target_passes"],
                "tokens_per_target_pass": round(s["answer_tokens"] / max(s[f"{name}_target_passes"], 1), 2),
            }
        row["plain_tokens_per_target_pass"] = round(s["answer_tokens"] / max(s["plain_target_passes"], 1), 2)
        return row

    total = defaultdict(int)
    for s in stats.values():
        for key, v in s.items():
            total[key] += v
    result = {
        "command": f"python bench/speculative_demo.py --n {a.n} --k {k} --prompt-lookup-k {a.prompt_lookup_k}",
        "target": repo_path(a.target), "assistant": repo_path(a.assistant),
        "split": "heldout (seed 0, the questions make eval scores)", "greedy": True,
        "num_assistant_tokens": k, "prompt_lookup_num_tokens": a.prompt_lookup_k,
        "max_new_tokens": a.max_new_tokens, "reference": f"transformers {transformers.__version__} generate, torch CPU",
        "machine": f"{os.cpu_count()} CPU cores, shared; torch 1 thread", "minutes": round(minutes, 1),
        "notes": ("accepted = the sum of transformers' num_matches, which leaves out an accepted draft that is the stop "
                  "token; a one-word answer (word + stop) takes the prefill and one more pass with or without drafts, "
                  "so the short kinds can save nothing"),
        "per_kind": {kind: summary(stats[kind]) for kind in sorted(stats)},
        "all": summary(total),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for kind, row in result["per_kind"].items():
        print(f"{kind:9s} assistant acceptance {row['assistant']['acceptance_rate']} passes {row['plain_target_passes']}"
              f" -> {row['assistant']['target_passes']} | prompt lookup {row['prompt_lookup']['acceptance_rate']}"
              f" -> {row['prompt_lookup']['target_passes']} | equal {row['assistant']['equal_to_plain']}"
              f" {row['prompt_lookup']['equal_to_plain']}")
    print(f"wrote {repo_path(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
