"""The prompts every numeric test runs, per preset: text, two images of different sizes, audio, longer than the
sliding window, and a batch of three prompts of different lengths.  Cases a config cannot take (images for a
text-only config) are not generated, so nothing is skipped.

Image sizes need no resize under a 70-token budget (288x528 -> 6x11 = 66 soft tokens, 336x480 -> 7x10 = 70), so
the soft tokens equal the reference processor's exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from exporter.config import PRESETS, TEST_PRESETS, ModelConfig

MAX_SOFT_TOKENS = 70


@dataclass
class Case:
    ids: list[list[int]]  # one or more prompts (a batch when more than one)
    images: list[list] = field(default_factory=list)
    audio: list[list] = field(default_factory=list)

    def __post_init__(self):
        self.images = self.images or [[] for _ in self.ids]
        self.audio = self.audio or [[] for _ in self.ids]


def _ids(seed: int, n: int) -> list[int]:
    return [2] + [int(t) for t in np.random.default_rng(seed).integers(3, 290, n - 1)]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _wave(n: int, seed: int) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)


def cases(cfg: ModelConfig) -> dict[str, Case]:
    tk = cfg.tokens
    window = cfg.text.sliding_window
    out = {
        "text": Case([_ids(1, 12)]),
        "long": Case([_ids(2, 3 * window + 5)]),
        "batch": Case([_ids(3, 5), _ids(4, 2 * window + 1), _ids(5, 11)]),
    }
    if cfg.vision is not None:
        ids = _ids(6, 4) + [tk.image] + _ids(7, 3)[1:] + [tk.image] + _ids(8, 3)[1:]
        out["two_images"] = Case([ids], images=[[_image(288, 528, 1), _image(336, 480, 2)]])
    if cfg.audio is not None:
        ids = _ids(9, 5) + [tk.audio] + _ids(10, 4)[1:]
        out["audio"] = Case([ids], audio=[[_wave(3000, 3)]])
        batch = out["batch"]
        batch.ids[2] = batch.ids[2][:6] + [tk.audio] + batch.ids[2][6:]
        batch.audio[2] = [_wave(1500, 4)]
    return out


ALL_CASES = [(p, name) for p in TEST_PRESETS for name in cases(PRESETS[p])]
