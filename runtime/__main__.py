"""Command line: ``python -m runtime --artifact DIR --prompt TEXT [--image PATH ...] [--audio WAV ...]``.

Streams the answer to standard output.  Every expected failure (a bad argument, an unreadable or oversized image, a
malformed or untrusted artifact, a graph ONNX Runtime refuses, an output that cannot be written) prints one
``error: ...`` line naming the file or argument on standard error and exits 2, without a traceback.

A text prompt is wrapped in a Gemma 4 user turn (`runtime.chat_prompt`) when the artifact's tokenizer has the turn
tokens and the text has none of its own (``--chat``/``--no-chat`` force it either way).  ``--prompt-env NAME`` reads
the prompt from an environment variable, so that ``make generate`` passes it without a shell seeing it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from runtime.generate import generate, load
from runtime.images import SUPPORTED_SOFT_TOKEN_BUDGETS
from runtime.tokenizer import chat_prompt

_TURN_START, _TURN_END = "<|turn>", "<turn|>"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        _fail(f"{message} (see `python -m runtime --help`)")


class _OutputError(Exception):
    """Standard output cannot be written (a full disk, a closed pipe)."""


def _fail(message: str) -> None:
    print("error: " + " ".join(str(message).split()), file=sys.stderr)
    raise SystemExit(2)


def _emit(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as e:
        raise _OutputError(e) from None


def _parse_ids(text: str) -> list[int]:
    ids = []
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        if not re.fullmatch(r"[+-]?\d+", item):
            _fail(f"--ids: {item!r} is not an integer token id (expected comma-separated integers, e.g. 2,105,9)")
        if int(item) < 0:
            _fail(f"--ids: {item} is negative; token ids are >= 0")
        ids.append(int(item))
    if not ids:
        _fail("--ids: no token ids given")
    return ids


def _wants_chat(flag: bool | None, text: str, tokenizer) -> bool:
    if flag is not None:
        return flag
    has_turns = tokenizer.token_to_id(_TURN_START) is not None and tokenizer.token_to_id(_TURN_END) is not None
    return has_turns and _TURN_START not in text


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m runtime", description="Generate with an exported Gemma 4 artifact.")
    p.add_argument("--artifact", required=True, help="artifact directory (with manifest.json)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text; use <|image|> / <|audio|> where each image / clip goes")
    src.add_argument("--prompt-env", metavar="NAME", help="read the prompt text from environment variable NAME")
    src.add_argument("--ids", help="prompt as comma-separated token ids (for artifacts without a tokenizer)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in a Gemma 4 user turn (default: when the tokenizer has the turn tokens "
                        "and the prompt has no <|turn> of its own)")
    p.add_argument("--image", action="append", default=[], help="image file, once per <|image|>")
    p.add_argument("--audio", action="append", default=[], help="16 kHz mono WAV, once per <|audio|>")
    p.add_argument("--max-soft-tokens", type=int, default=280, choices=SUPPORTED_SOFT_TOKEN_BUDGETS,
                   help="soft tokens per image (default 280); smaller budgets leave room for more text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (default: the artifact's generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    text = a.prompt
    if a.prompt_env is not None:
        text = os.environ.get(a.prompt_env)
        if text is None:
            _fail(f"--prompt-env {a.prompt_env}: the environment variable {a.prompt_env} is not set")
    ids = _parse_ids(a.ids) if a.ids is not None else None
    if a.max_new_tokens < 1:
        _fail(f"--max-new-tokens {a.max_new_tokens}: expected at least 1")
    try:
        model = load(a.artifact, a.backend)
        if text is not None:
            if model.tokenizer is None:
                _fail(f"--artifact {a.artifact}: the artifact has no tokenizer; give the prompt with --ids")
            prompt = chat_prompt(text) if _wants_chat(a.chat, text, model.tokenizer) else text
        else:
            prompt = ids
        stream = generate(
            model, prompt, images=a.image, audio=a.audio, max_new_tokens=a.max_new_tokens,
            temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed, stream=True,
            max_soft_tokens=a.max_soft_tokens,
        )
        for piece in stream:
            _emit(piece.text if model.tokenizer else f"{piece.token} ")
        res = stream.results
        _emit(f"\n[{len(res.tokens)} tokens, prompt {res.prompt_tokens} tokens, finish: {res.finish_reason}]\n")
    except _OutputError as e:
        # Nothing more can reach stdout; point it at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        _fail(f"cannot write the output to standard output ({e})")
    except (ValueError, RuntimeError, OSError) as e:  # ArtifactError, InputError, FileNotFoundError, TensorRT
        _fail(str(e))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
