"""Calibration and held-out prompts: from a user directory, from the built-in default set, or synthetic ids.

A data directory holds prompts as files:

* ``NAME.txt``: the prompt text, used verbatim (write the chat turn yourself, e.g. ``<|turn>user\\n...``), with one
  ``<|image|>`` / ``<|audio|>`` placeholder per image / clip;
* ``NAME.ids``: the prompt as whitespace-separated token ids (for artifacts without a tokenizer);
* ``NAME.png`` / ``.jpg`` / ``.jpeg`` / ``.webp`` / ``.bmp`` and ``NAME.wav`` (16 kHz mono), or ``NAME.1.png``,
  ``NAME.2.png``, ...: the images and clips of prompt NAME, in name order;
* an image or WAV file with no prompt file of its stem becomes a prompt of its own ("Describe this image." /
  "What do you hear?" in a chat turn);
* optional ``dataset.json``: ``{"max_soft_tokens": 70}`` (the image budget, default 280 as in `runtime.generate`).

The default set (``calib/default_data``: ``calibration/``, a separate ``heldout/`` and ``assistant/``) was made offline by
``python -m demo.make_default_data`` from the demo task generator: chat-formatted English questions with images
and 16 kHz tones.  Artifacts without a tokenizer (the tiny test presets) get synthetic id prompts instead, with the
default set's images and clips.  Nothing here runs a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.tokenizer import chat_prompt

__all__ = ["DEFAULT_DATA", "Prompt", "PromptSet", "PromptTooLong", "default_set", "load_dir", "prefill_inputs", "prompts_for"]

DEFAULT_DATA = Path(__file__).parent / "default_data"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav",)
_LOOSE_QUESTION = {"image": "<|image|> Describe this image.", "audio": "<|audio|> What do you hear?"}


class PromptTooLong(ValueError):
    """A prompt that does not fit in the artifact's max_len once images and audio are expanded."""


@dataclass
class Prompt:
    name: str  # the file it came from (for error messages)
    text: str | None = None
    ids: list[int] | None = None
    images: list = field(default_factory=list)  # paths or arrays
    audio: list = field(default_factory=list)


@dataclass
class PromptSet:
    prompts: list[Prompt]
    max_soft_tokens: int = 280
    source: str = ""


def load_dir(path: str | Path) -> PromptSet:
    """The prompts of a data directory (see the module docstring for the layout)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"calibration data directory {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.is_file())
    media = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES + AUDIO_SUFFIXES]
    prompts, used = [], set()
    for p in files:
        if p.suffix not in (".txt", ".ids"):
            continue
        own = [m for m in media if m.stem == p.stem or m.stem.startswith(p.stem + ".")]
        used.update(own)
        prompt = Prompt(name=str(p))
        if p.suffix == ".txt":
            prompt.text = p.read_text()
        else:
            try:
                prompt.ids = [int(t) for t in p.read_text().split()]
            except ValueError as e:
                raise ValueError(f"{p}: expected whitespace-separated integer token ids ({e})") from None
        prompt.images = [m for m in own if m.suffix.lower() in IMAGE_SUFFIXES]
        prompt.audio = [m for m in own if m.suffix.lower() in AUDIO_SUFFIXES]
        prompts.append(prompt)
    for m in media:
        if m not in used:
            kind = "image" if m.suffix.lower() in IMAGE_SUFFIXES else "audio"
            prompts.append(Prompt(name=str(m), text=chat_prompt(_LOOSE_QUESTION[kind]), **{
                "images" if kind == "image" else "audio": [m]}))
    if not prompts:
        raise ValueError(
            f"{root}: no prompts found (expected .txt or .ids prompt files, images or .wav files)"
        )
    settings = {}
    if (root / "dataset.json").is_file():
        settings = json.loads((root / "dataset.json").read_text())
    return PromptSet(prompts, int(settings.get("max_soft_tokens", 280)), str(root))


def _synthetic(split: str, config: dict, seed: int) -> PromptSet:
    """Random-id prompts for artifacts without a tokenizer, with the default set's images and clips."""
    real = load_dir(DEFAULT_DATA / split)
    tk, vocab = config["tokens"], config["text"]["vocab_size"]
    special = {v for v in tk.values() if isinstance(v, int)}
    ordinary = np.array([t for t in range(vocab) if t not in special])
    rng = np.random.default_rng([seed, {"calibration": 0, "heldout": 1}.get(split, 2)])  # splits share no stream
    prompts = []
    for i, src in enumerate(real.prompts):
        ids = [tk["bos"], *rng.choice(ordinary, size=int(rng.integers(6, 24))).tolist()]
        images = src.images if config.get("vision") else []
        audio = src.audio if config.get("audio") else []
        ids[1:1] = [tk["image"]] * len(images) + [tk["audio"]] * len(audio)
        prompts.append(Prompt(name=f"synthetic {split} {i}", ids=ids, images=images, audio=audio))
    return PromptSet(prompts, real.max_soft_tokens, f"synthetic ids + {DEFAULT_DATA / split}")


def default_set(split: str, config: dict, *, has_tokenizer: bool, seed: int = 0) -> PromptSet:
    """The built-in ``calibration``, ``heldout`` or ``assistant`` (long answers: `calib.assistant_int8`) set for a
    model (synthetic ids when it has no tokenizer)."""
    if split not in ("calibration", "heldout", "assistant"):
        raise ValueError(f"split={split!r}; expected calibration, heldout or assistant")
    return load_dir(DEFAULT_DATA / split) if has_tokenizer else _synthetic(split, config, seed)


def prompts_for(data_dir: str | Path | None, split: str, config: dict, *, has_tokenizer: bool) -> PromptSet:
    return load_dir(data_dir) if data_dir else default_set(split, config, has_tokenizer=has_tokenizer)


def prefill_inputs(prompt: Prompt, config: dict, tokenizer, *, max_soft_tokens: int, max_len: int):
    """One prompt as a batch-1 `runtime.prompt.PrefillInputs` (placeholders expanded)."""
    from runtime.prompt import expand_prompt, pack_batch

    if prompt.ids is not None:
        ids = prompt.ids
    elif tokenizer is None:
        raise ValueError(f"{prompt.name}: a text prompt needs an artifact with a tokenizer; use a .ids file")
    else:
        ids = tokenizer.encode(prompt.text)
    try:
        prepared = expand_prompt(ids, prompt.images, prompt.audio, config, max_soft_tokens=max_soft_tokens)
    except (ValueError, OSError) as e:
        raise ValueError(f"{prompt.name}: {e}") from None
    if len(prepared.ids) >= max_len:
        raise PromptTooLong(
            f"{prompt.name}: {len(prepared.ids)} tokens with images and audio expanded; the artifact holds "
            f"{max_len} (max_len)"
        )
    return pack_batch([prepared], config["tokens"]["pad"])
