"""Write ``calib/default_data``: the built-in calibration set and its separate held-out set.

``python -m demo.make_default_data`` regenerates them (deterministic): 32 calibration prompts from the demo task
generator's ``calibration`` split and 24 held-out prompts from its ``report`` split, each a chat-formatted
``.txt`` with its ``.png`` image or 16 kHz 16-bit ``.wav`` clip, and ``assistant/``: 16 ``continue`` prompts
from the ``calibration`` stream (`calib.assistant_int8`: a drafting assistant is calibrated on drafting rounds,
and the short kinds answer in one or two tokens, before any round).  None is used for training or ``make eval``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import wave
from pathlib import Path

import numpy as np

from calib.data import DEFAULT_DATA
from demo.tasks import SAMPLE_RATE, examples, prompt_text

__all__ = ["write_split"]

SPLITS = {"calibration": ("calibration", 32, None), "heldout": ("report", 24, None),
          "assistant": ("calibration", 16, ("continue",))}
# what write_split writes: a directory holding anything else is not replaced
_WRITTEN = re.compile(r"\d{3}_[a-z_]+(\.\d+)?\.(txt|png|wav)|dataset\.json")


def _write_wav(path: Path, wave_f32: np.ndarray) -> None:
    pcm = np.clip(np.round(wave_f32 * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def write_split(out: Path, split: str, n: int, kinds: tuple[str, ...] | None = None) -> None:
    from PIL import Image

    if out.is_dir() and (foreign := sorted(p.name for p in out.iterdir() if not _WRITTEN.fullmatch(p.name))):
        raise ValueError(f"{out} holds files this tool did not write ({', '.join(foreign[:3])}); it would replace "
                         "the directory. Choose another --out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for i, ex in enumerate(examples(split, n, seed=0, kinds=kinds)):
        stem = f"{i:03d}_{ex.kind}"
        (out / f"{stem}.txt").write_text(prompt_text(ex))
        for j, image in enumerate(ex.images):
            Image.fromarray(image).save(out / (f"{stem}.png" if len(ex.images) == 1 else f"{stem}.{j}.png"), optimize=True)
        for j, clip in enumerate(ex.audio):
            _write_wav(out / (f"{stem}.wav" if len(ex.audio) == 1 else f"{stem}.{j}.wav"), clip)
    # the demo model sees 384 x 384 images at a 70-token budget (64 soft tokens, no resize)
    (out / "dataset.json").write_text(json.dumps({"max_soft_tokens": 70}) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo.make_default_data", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_DATA))
    a = p.parse_args(argv)
    for name, (split, n, kinds) in SPLITS.items():
        try:
            write_split(Path(a.out) / name, split, n, kinds)
        except ValueError as e:
            print(f"make_default_data: error: {e}", file=sys.stderr)
            return 2
        print(f"[calib] wrote {n} {name} prompts to {Path(a.out) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
