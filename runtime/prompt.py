"""Turn user prompts (text or token ids, with images and audio) into the prefill inputs of a batch.

Each image in a prompt stands as one ``image`` token id (``<|image|>`` in text) and each audio clip as one
``audio`` token id (``<|audio|>``); they are expanded to ``boi, n x image, eoi`` and ``boa, n x audio, eoa`` as
the reference processor does, and their soft tokens are gathered in prompt order.  Batches are right-padded.
Bad input raises `runtime.errors.InputError` naming the prompt, the image or clip, and what was expected.

Does not run the model or choose tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.audio import audio_frames, load_audio
from runtime.errors import InputError
from runtime.images import preprocess_image

__all__ = ["PrefillInputs", "Prepared", "RowMedia", "chunk_end", "expand_prompt", "is_batch", "pack_batch"]


@dataclass
class PrefillInputs:
    input_ids: np.ndarray  # (B, S) int64, right-padded
    past_lens: np.ndarray  # (B,) int64
    seq_lens: np.ndarray  # (B,) int64
    image_patches: np.ndarray | None = None  # (N, patch_dim) float32, all images in prompt order
    image_positions: np.ndarray | None = None  # (N, 2) int64
    audio_frames: np.ndarray | None = None  # (M, 640) float32
    # (B, N) int64, speculative graphs only: the new tokens whose logits and hidden states to return (default: each
    # row's last valid token, N = 1)
    logits_index: np.ndarray | None = None


@dataclass
class Prepared:
    """One prompt after expansion: token ids plus the soft tokens of its images and audio, in prompt order."""

    ids: list[int]
    image_patches: list[np.ndarray] = field(default_factory=list)
    image_positions: list[np.ndarray] = field(default_factory=list)
    audio_frames: list[np.ndarray] = field(default_factory=list)


def is_batch(prompt: Any) -> bool:
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, (str, list, tuple)) for p in prompt):
        return True
    return False


def _as_list(items: Any) -> list:
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def expand_prompt(
    ids: list[int], images: Any, audio: Any, config: dict, *, max_soft_tokens: int, index: int = 0
) -> Prepared:
    """Expand one prompt's placeholders; ``config`` is the manifest's model_config."""
    tk = config["tokens"]
    images, audio = _as_list(images), _as_list(audio)
    where = f"prompt {index}: " if index else ""
    n_img = sum(1 for t in ids if t == tk["image"])
    n_aud = sum(1 for t in ids if t == tk["audio"])
    if n_img != len(images):
        raise InputError(
            f"{where}{n_img} image placeholder(s) (<|image|>, id {tk['image']}) in the prompt but {len(images)} "
            f"image(s) given; put one placeholder where each image goes"
        )
    if n_aud != len(audio):
        raise InputError(
            f"{where}{n_aud} audio placeholder(s) (<|audio|>, id {tk['audio']}) in the prompt but {len(audio)} "
            f"audio clip(s) given; put one placeholder where each clip goes"
        )
    if images and not config.get("vision"):
        raise InputError("this model has no vision embedder (no vision_config); it cannot take images")
    if audio and not config.get("audio"):
        raise InputError("this model has no audio embedder (no audio_config); it cannot take audio")
    out = Prepared(ids=[])
    img_iter, aud_iter = iter(images), iter(audio)
    for t in ids:
        if t == tk["image"]:
            v = config["vision"]
            k = len(out.image_patches)
            soft = _labelled(f"{where}image {k + 1} of {len(images)}", preprocess_image, next(img_iter),
                             max_soft_tokens=max_soft_tokens, patch_size=v["patch_size"],
                             pooling_kernel_size=v["pooling_kernel_size"], max_positions=v.get("mm_posemb_size"))
            out.ids += [tk["boi"], *[tk["image"]] * len(soft), tk["eoi"]]
            out.image_patches.append(soft.patches)
            out.image_positions.append(soft.positions)
        elif t == tk["audio"]:
            k = len(out.audio_frames)
            wave = _labelled(f"{where}audio clip {k + 1} of {len(audio)}", load_audio, next(aud_iter))
            frames = audio_frames(wave, samples_per_token=config["audio"]["samples_per_token"])
            out.ids += [tk["boa"], *[tk["audio"]] * len(frames), tk["eoa"]]
            out.audio_frames.append(frames)
        else:
            out.ids.append(int(t))
    return out


def _labelled(label: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its `InputError` (same type) prefixed with which prompt/image/clip it is about."""
    try:
        return fn(*args, **kwargs)
    except InputError as err:
        raise type(err)(f"{label}: {err}") from None


def pack_batch(prepared: list[Prepared], pad_id: int):
    """Right-padded (B, S) ids, lengths, and the concatenated soft tokens of the whole batch."""
    lens = np.array([len(p.ids) for p in prepared], dtype=np.int64)
    ids = np.full((len(prepared), int(lens.max())), pad_id, dtype=np.int64)
    for i, p in enumerate(prepared):
        ids[i, : len(p.ids)] = p.ids
    patches = [a for p in prepared for a in p.image_patches]
    positions = [a for p in prepared for a in p.image_positions]
    frames = [a for p in prepared for a in p.audio_frames]
    return PrefillInputs(
        input_ids=ids,
        past_lens=np.zeros(len(prepared), dtype=np.int64),
        seq_lens=lens,
        image_patches=np.concatenate(patches) if patches else None,
        image_positions=np.concatenate(positions) if positions else None,
        audio_frames=np.concatenate(frames) if frames else None,
    )


def chunk_end(row, done: int, room: int, image_id: int, *, index: int = 0, chunk: int | None = None,
              stretch: int | None = None) -> int:
    """Where the next prefill call of the prompt ``row`` (token ids) that starts at ``done`` ends: at most ``room``
    tokens on, never inside an image's soft tokens (sliding layers attend both ways inside an image and the graphs
    number image blocks per call), so a cut inside an image moves back to the image's start.  An image that starts
    the call and is longer than ``room`` makes the call end with it when it fits ``stretch`` tokens (the most one
    call may take); otherwise `InputError`."""
    end = min(done + room, len(row))
    if end < len(row) and row[end - 1] == image_id and row[end] == image_id:
        start = end - 1
        while start > done and row[start - 1] == image_id:
            start -= 1
        if start == done:
            while end < len(row) and row[end] == image_id:
                end += 1
            if stretch is None or end - done > stretch:
                raise InputError(f"prompt {index}: an image's soft tokens do not fit one prefill call of "
                                 f"{stretch or room} tokens (prefill_chunk {chunk or room}); use a smaller "
                                 "max_soft_tokens")
            return end
        end = start
    return end


class RowMedia:
    """One prompt's soft tokens, sliceable by token range: `between(a, b)` gives the image patches, positions and
    audio frames of the prompt's tokens ``a:b`` (for a prefill call over that range)."""

    def __init__(self, prepared: Prepared, tokens: dict):
        row = np.asarray(prepared.ids, np.int64)
        self.patches = np.concatenate(prepared.image_patches) if prepared.image_patches else None
        self.positions = np.concatenate(prepared.image_positions) if prepared.image_positions else None
        self.frames = np.concatenate(prepared.audio_frames) if prepared.audio_frames else None
        self._img = np.concatenate([[0], np.cumsum(row == tokens["image"])]) if "image" in tokens else None
        self._aud = np.concatenate([[0], np.cumsum(row == tokens["audio"])]) if "audio" in tokens else None

    def between(self, a: int, b: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        img = None if self.patches is None else slice(self._img[a], self._img[b])
        aud = None if self.frames is None else slice(self._aud[a], self._aud[b])
        return (None if img is None else self.patches[img], None if img is None else self.positions[img],
                None if aud is None else self.frames[aud])
