"""What one prompt-lookup draft costs: `runtime.speculative.prompt_lookup` against transformers' class.

Times `PromptLookup.propose` on contexts of 512 to 16384 tokens of three kinds (random ids from the 12B's
vocabulary: no match; an answer that quotes its prompt: a 3-gram match; ids from 50 values: matches everywhere),
given an int64 array and given a Python list (the conversion dominates then), against transformers'
`PromptLookupCandidateGenerator.get_candidates` on the same tokens, interleaved in one process (this machine's
speed drifts), checks that both draft the same tokens, and writes the medians to
``bench/results/prompt_lookup.json``.

    python bench/prompt_lookup_cost.py [--rounds 30] [--out bench/results/prompt_lookup.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.speculative.prompt_lookup import PromptLookup  # noqa: E402

NUM_TOKENS = 8


def contexts(length: int, rng) -> dict[str, np.ndarray]:
    quote = rng.integers(0, 262144, length)
    quote[-100:] = quote[length // 4 : length // 4 + 100]  # the answer so far copies a passage of the prompt
    return {
        "random_262144": rng.integers(0, 262144, length),
        "quotes_prompt": quote,
        "random_50": rng.integers(0, 50, length),
    }


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    import torch
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/prompt_lookup.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for max_ngram in (2, 3):
        ours = PromptLookup(max_ngram=max_ngram)
        ref = PromptLookupCandidateGenerator(
            num_output_tokens=NUM_TOKENS, max_matching_ngram_size=max_ngram, max_length=10**9
        )
        for length in (512, 4096, 16384):
            for kind, tokens in contexts(length, rng).items():
                tokens = tokens.astype(np.int64)
                as_list, as_torch = tokens.tolist(), torch.from_numpy(tokens)[None]
                drafts = ours.propose(tokens, NUM_TOKENS)
                expected = ref.get_candidates(as_torch)[0][0, length:].tolist()
                if drafts.tolist() != expected:
                    raise SystemExit(f"drafts differ for {kind} at {length} tokens: {drafts.tolist()} != {expected}")
                times = {"array_us": [], "list_us": [], "transformers_us": []}
                for _ in range(args.rounds):  # interleaved turns
                    times["array_us"].append(per_call_us(lambda: ours.propose(tokens, NUM_TOKENS), 20))
                    times["list_us"].append(per_call_us(lambda: ours.propose(as_list, NUM_TOKENS), 2))
                    times["transformers_us"].append(per_call_us(lambda: ref.get_candidates(as_torch), 2))
                row = {"max_ngram": max_ngram, "context": length, "kind": kind, "drafts": len(expected)}
                row |= {name: round(statistics.median(values), 1) for name, values in times.items()}
                rows.append(row)
                print(json.dumps(row))
    result = {
        "what": f"one prompt-lookup proposal of {NUM_TOKENS} tokens: runtime.speculative.prompt_lookup (int64 array "
        "or Python list) vs transformers' PromptLookupCandidateGenerator.get_candidates (torch, 1 thread), same "
        "drafts checked, median microseconds of interleaved turns",
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
