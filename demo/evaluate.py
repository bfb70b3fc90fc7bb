"""``make eval [OUT=<artifact>]`` (default ``artifacts/demo``) and ``make demo``: answer held-out questions with `runtime.generate`.

``python -m demo.evaluate --artifact DIR [--n 150]`` prints per-kind accuracy and ends with the line
``accuracy: 0.993 (149/150)`` for the fp32 demo artifact.  ``--show K`` prints K questions of each kind with the model's and the expected
answer (what ``make demo`` shows).  An answer is exact when the generated text, stop token excluded, equals it.
Works with any artifact of the demo model, whatever its precision.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import runtime
from demo.tasks import Example, examples, prompt_text

__all__ = ["answer", "evaluate"]

MAX_SOFT_TOKENS = 70
MAX_NEW_TOKENS = 40  # the longest answer ("continue": 37 tokens) and its stop token, with room to spare


def answer(model: runtime.LoadedModel, batch: list[Example], *, max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    prompts = [prompt_text(ex) for ex in batch]
    results = runtime.generate(
        model, prompts, images=[ex.images for ex in batch], audio=[ex.audio for ex in batch],
        max_new_tokens=max_new_tokens, max_soft_tokens=MAX_SOFT_TOKENS,
    )
    return [r.text.strip() for r in results]


def evaluate(artifact: str, *, n: int = 150, seed: int = 0, batch: int = 16, show: int = 0, log=print) -> tuple[int, int]:
    model = runtime.load(artifact)
    heldout = examples("heldout", n, seed=seed)
    right, per_kind, shown = 0, Counter(), Counter()
    totals = Counter(ex.kind for ex in heldout)
    for i in range(0, n, batch):
        chunk = heldout[i:i + batch]
        for ex, got in zip(chunk, answer(model, chunk)):
            ok = got == ex.answer
            right += ok
            per_kind[ex.kind] += ok
            if shown[ex.kind] < show:
                shown[ex.kind] += 1
                media = " [image]" if ex.images else " [audio]" if ex.audio else ""
                question = ex.question.replace("<|image|> ", "").replace("<|audio|> ", "")
                log(f"Q{media}: {question}\n   model: {got!r}   expected: {ex.answer!r}   {'ok' if ok else 'WRONG'}")
    for kind in sorted(totals):
        log(f"  {kind:8s} {per_kind[kind]}/{totals[kind]}")
    return right, n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=0, help="print this many questions of each kind")
    a = p.parse_args(argv)
    try:
        right, n = evaluate(a.artifact, n=a.n, seed=a.seed, show=a.show)
    except (runtime.ArtifactError, ValueError, FileNotFoundError) as e:
        print(f"eval: error: {e}", file=sys.stderr)
        return 2
    print(f"accuracy: {right / n:.3f} ({right}/{n})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
