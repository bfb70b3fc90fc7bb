"""Command line: ``python -m runtime --artifact DIR --prompt TEXT [--image PATH ...] [--audio WAV ...]``."""

from __future__ import annotations

import argparse
import sys

from runtime.generate import generate, load
from runtime.manifest import ArtifactError
from runtime.tokenizer import chat_prompt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime", description="Generate with an exported Gemma 4 artifact.")
    p.add_argument("--artifact", required=True)
    p.add_argument("--prompt", help="prompt text; use <|image|> / <|audio|> where each image / clip goes")
    p.add_argument("--ids", help="prompt as comma-separated token ids (for artifacts without a tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in a Gemma 4 user turn")
    p.add_argument("--image", action="append", default=[], help="image file, once per <|image|>")
    p.add_argument("--audio", action="append", default=[], help="16 kHz mono WAV, once per <|audio|>")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    a = p.parse_args(argv)
    if (a.prompt is None) == (a.ids is None):
        p.error("give exactly one of --prompt or --ids")
    try:
        model = load(a.artifact, a.backend)
        if a.prompt is not None:
            prompt = chat_prompt(a.prompt) if a.chat else a.prompt
        else:
            prompt = [int(t) for t in a.ids.split(",") if t.strip()]
        stream = generate(
            model, prompt, images=a.image, audio=a.audio, max_new_tokens=a.max_new_tokens,
            temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stream=True,
        )
        for piece in stream:
            sys.stdout.write(piece.text if model.tokenizer else f"{piece.token} ")
            sys.stdout.flush()
        res = stream.results
        print(f"\n[{len(res.tokens)} tokens, prompt {res.prompt_tokens} tokens, finish: {res.finish_reason}]")
    except (ArtifactError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
