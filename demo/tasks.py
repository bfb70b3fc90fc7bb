"""Synthetic image, audio and text questions, deterministic from a seed.

* image: a 384 x 384 scene (8 x 8 = 64 soft tokens at the 70-token budget, no resize) of one to three shapes of
  one kind and colour; asked for the colour, the shape (one large shape), or how many there are;
* audio: a 0.48 s tone (12 soft tokens) at a low, middle or high pitch, random phase and level; asked for the pitch;
* text: the sum of two digits;
* a long, predictable answer (what speculative decoding is shown on): ``continue`` a sequence of the numbers 0-18
  that counts up by 1-4 and wraps around at 19; the prompt gives its first 3-18 terms, the answer is the next
  terms up to and including the prompt's last term again (one lap: 19 terms joined by ``,``, 37 tokens).  Its
  last terms repeat the prompt's (as many as the prompt gives: prompt lookup can copy them), the first ones are
  arithmetic (what a drafting model can learn).

Prompts use Gemma 4's chat turns and one ``<|image|>`` / ``<|audio|>`` placeholder per item, like the real model.
Train and held-out examples come from disjoint seed streams.  The ``calibration`` and ``report`` splits (the
committed ``calib/default_data``) draw the first five kinds only, from the same streams as before the long kinds.
Numpy and Pillow only; no model code here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["COLOURS", "KINDS", "MODULUS", "Example", "PITCHES", "SHAPES", "examples", "prompt_text",
           "vocabulary"]

SIZE = 384
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
PITCHES = {"low": 220.0, "middle": 880.0, "high": 3000.0}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SAMPLE_RATE = 16000
TONE_SAMPLES = 12 * 640

QUESTIONS = {
    "colour": "<|image|> What colour is the shape ?",
    "shape": "<|image|> What shape is in the picture ?",
    "count": "<|image|> How many shapes are there ?",
    "pitch": "<|audio|> Is this tone low , middle or high ?",
    "sum": "What is {a} plus {b} ?",
    "continue": "Continue this sequence : {terms}",
}
KINDS = ("colour", "shape", "count", "pitch", "sum", "continue")
SHORT_KINDS = KINDS[:5]
MODULUS = 19  # "continue" counts in the numbers 0..18, wrapping around


@dataclass
class Example:
    kind: str
    question: str  # user text, placeholders included
    answer: str
    images: list = field(default_factory=list)  # HxWx3 uint8 arrays
    audio: list = field(default_factory=list)  # 1-D float32 waveforms at 16 kHz


def prompt_text(ex: Example) -> str:
    """The user turn in Gemma 4's chat format (the model's answer follows it)."""
    return f"<|turn>user\n{ex.question}<turn|>\n<|turn>model\n"


def _draw(draw, shape: str, x: int, y: int, r: int, fill) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


def _scene(rng: np.random.Generator, shape: str, colour: str, count: int, *, large: bool = False) -> np.ndarray:
    """``count`` shapes in cells of a 3 x 3 grid, or one large shape (radius 76-84 px) anywhere when ``large``."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    if large:
        r = int(rng.integers(76, 85))
        _draw(draw, shape, int(rng.integers(r, SIZE - r)), int(rng.integers(r, SIZE - r)), r, fill)
        return np.asarray(img, dtype=np.uint8)
    for cell in rng.permutation(9)[:count]:
        cy, cx = divmod(int(cell), 3)
        x = cx * 128 + 64 + int(rng.integers(-12, 13))
        y = cy * 128 + 64 + int(rng.integers(-12, 13))
        _draw(draw, shape, x, y, int(rng.integers(28, 46)), fill)
    return np.asarray(img, dtype=np.uint8)


def _tone(rng: np.random.Generator, pitch: str) -> np.ndarray:
    t = np.arange(TONE_SAMPLES) / SAMPLE_RATE
    f = PITCHES[pitch] * (1 + rng.uniform(-0.05, 0.05))
    wave = rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    wave += 0.02 * rng.standard_normal(TONE_SAMPLES)
    return wave.astype(np.float32)


def _example(rng: np.random.Generator, kinds: tuple[str, ...]) -> Example:
    kind = kinds[int(rng.integers(0, len(kinds)))]
    if kind == "continue":
        start, step, given = int(rng.integers(0, MODULUS)), int(rng.integers(1, 5)), int(rng.integers(3, 19))
        terms = [str((start + k * step) % MODULUS) for k in range(given + MODULUS)]
        return Example(kind, QUESTIONS[kind].format(terms=" , ".join(terms[:given])), " , ".join(terms[given:]))
    if kind == "pitch":
        pitch = str(rng.choice(list(PITCHES)))
        return Example(kind, QUESTIONS[kind], pitch, audio=[_tone(rng, pitch)])
    if kind == "sum":
        a, b = int(rng.integers(0, 10)), int(rng.integers(0, 10))
        return Example(kind, QUESTIONS[kind].format(a=a, b=b), str(a + b))
    shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    count = int(rng.integers(1, 4)) if kind == "count" else 1
    answer = {"colour": colour, "shape": shape, "count": NUMBERS[count]}[kind]
    image = _scene(rng, shape, colour, count, large=kind == "shape")
    return Example(kind, QUESTIONS[kind], answer, images=[image])


# "calibration" and "report" feed calib/default_data (quantization statistics and its held-out accuracy report).
SPLITS = {"train": 0, "heldout": 1, "validation": 3, "calibration": 5, "report": 6}


def examples(split: str, n: int, seed: int = 0, kinds: tuple[str, ...] | None = None) -> list[Example]:
    """``n`` examples of a split: ``train``, ``validation`` (watched while training) or ``heldout`` (only for
    evaluation); splits never share a random stream.  ``kinds`` draws only those kinds (default: every kind; the
    first five for ``calibration`` and ``report``)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {', '.join(SPLITS)}")
    if kinds is not None and (not kinds or set(kinds) - set(KINDS)):
        raise ValueError(f"kinds={kinds!r}; expected a non-empty subset of {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, SPLITS[split]])
    if kinds is None:
        kinds = SHORT_KINDS if split in ("calibration", "report") else KINDS
    return [_example(rng, kinds) for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word the prompts and answers use (the tokenizer's vocabulary besides special tokens)."""
    words = set("user model".split())
    for q in QUESTIONS.values():
        words |= set(q.replace("<|image|>", " ").replace("<|audio|>", " ").split())
    words |= set(COLOURS) | set(SHAPES) | set(PITCHES) | set(NUMBERS) | {str(i) for i in range(MODULUS)}
    words -= {"{a}", "{b}", "{terms}"}
    return sorted(words)
