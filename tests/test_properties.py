"""Property-based tests (hypothesis) of the runtime's preprocessing: every input gives the reference's result or a
typed `runtime.InputError`.

Oracles: transformers' pure functions (`get_aspect_ratio_preserving_size`, `convert_image_to_patches`,
`patches_merge`, `convert_to_rgb`, `Gemma4UnifiedAudioFeatureExtractor`), torchvision's documented 16-bit -> 8-bit
rule (drop the low byte), and Pillow's own conversions.  Examples are derandomized (the same on every run, CI
included) and no example database is written (hypothesis' other caches go to pytest's temporary directory, see
conftest.py); sizes stay small so the module takes about half a minute on 2 cores.
"""

from __future__ import annotations

import itertools
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import runtime
from runtime.audio import SAMPLES_PER_TOKEN, audio_frames, load_audio
from runtime.images import SUPPORTED_SOFT_TOKEN_BUDGETS, aspect_preserving_size, load_image, preprocess_image
from runtime.prompt import expand_prompt
from tests.test_images import _reference_soft_tokens, ref  # noqa: F401  (ref is a fixture)

pytest.importorskip("torch")

_SETTINGS = dict(deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Sides from one pixel to extreme strips; hypothesis shrinks towards the small end.
_side = st.one_of(st.integers(1, 64), st.integers(1, 5000), st.sampled_from([1, 47, 48, 49, 20000, 100000]))


# ------------------------------------------------------------------ image sizes and soft tokens
@settings(max_examples=400, **_SETTINGS)
@given(height=_side, width=_side, budget=st.sampled_from(SUPPORTED_SOFT_TOKEN_BUDGETS))
def test_size_equals_reference_or_input_error(ref, height, width, budget):
    try:
        expected = ref.get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
    except ValueError:
        with pytest.raises(runtime.InputError):
            aspect_preserving_size(height, width, max_soft_tokens=budget)
        return
    got = aspect_preserving_size(height, width, max_soft_tokens=budget)
    assert got == expected
    assert got[0] % 48 == 0 and got[1] % 48 == 0 and (got[0] // 48) * (got[1] // 48) <= budget


@settings(max_examples=25, **_SETTINGS)
@given(height=st.integers(1, 300), width=st.integers(1, 300), budget=st.sampled_from((70, 140, 280)),
       table=st.sampled_from((None, 8, 16, 64)), seed=st.integers(0, 2**16))
def test_soft_tokens_equal_reference_or_input_error(ref, height, width, budget, table, seed):
    """Ours == the reference's patch functions on the (Pillow-)resized image, or InputError exactly when the grid
    does not fit the position table."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    target_h, target_w = ref.get_aspect_ratio_preserving_size(height, width, 16, budget * 9, 3)
    rows, cols = target_h // 48, target_w // 48
    if table is not None and max(rows, cols) > table:
        with pytest.raises(runtime.InputError, match=rf"grid of {rows}x{cols} .* at most {table} per row"):
            preprocess_image(pixels, max_soft_tokens=budget, max_positions=table)
        return
    ours = preprocess_image(pixels, max_soft_tokens=budget, max_positions=table)
    resized = pixels
    if (target_h, target_w) != (height, width):
        resized = np.asarray(Image.fromarray(pixels).resize((target_w, target_h), Image.Resampling.BICUBIC))
    patches, positions = _reference_soft_tokens(ref, resized)
    assert len(ours) == rows * cols
    assert np.array_equal(ours.patches, patches) and np.array_equal(ours.positions, positions)
    assert ours.positions[:, 0].max() < (table or 10**9) and ours.positions[:, 1].max() < (table or 10**9)


# ------------------------------------------------------------------ modes and bit depths
_EIGHT_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La", "CMYK", "YCbCr", "HSV")


@st.composite
def _pil_images(draw):
    mode = draw(st.sampled_from(_EIGHT_BIT_MODES + ("I;16", "I", "F")))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if mode == "I;16":
        return mode, Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        high = draw(st.sampled_from((65536, 70000)))
        low = draw(st.sampled_from((0, -3)))
        return mode, Image.fromarray(rng.integers(low, high, (h, w)).astype(np.int32))
    if mode == "F":
        scale = draw(st.sampled_from((1.0, 255.0, 300.0)))
        values = (rng.random((h, w)) * scale).astype(np.float32)
        if draw(st.booleans()):
            values.flat[0] = draw(st.sampled_from((np.nan, -1.0, 255.0, 0.0)))
        return mode, Image.fromarray(values)
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), mode="RGBA")
    return mode, rgba.convert("LA").convert("La") if mode == "La" else rgba.convert(mode)


@settings(max_examples=80, **_SETTINGS)
@given(case=_pil_images())
def test_any_mode_converts_like_the_reference_or_input_error(case):
    from transformers.image_transforms import convert_to_rgb

    mode, image = case
    if mode in ("I;16", "I"):
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0 or values.max() > 65535:
            with pytest.raises(runtime.InputError, match="mode I"):
                load_image(image)
            return
        expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1)  # torchvision to_dtype(scale=True)
    elif mode == "F":
        values = np.asarray(image)
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 255):
            with pytest.raises(runtime.InputError, match="mode F"):
                load_image(image)
            return
        expected = convert_to_rgb(image, return_numpy=True)  # Pillow's 0..255 scale, as the reference
    elif mode == "La":  # the reference cannot convert it; ours un-premultiplies to LA first
        expected = convert_to_rgb(image.convert("LA"), return_numpy=True)
    elif mode == "RGBa" or (mode == "P" and image.palette.mode == "RGBA"):  # alpha the reference does not see
        expected = convert_to_rgb(image.convert("RGBA"), return_numpy=True)
    else:
        expected = convert_to_rgb(image, return_numpy=True)
    got = load_image(image)
    assert got.dtype == np.uint8 and got.shape == (image.height, image.width, 3)
    assert np.array_equal(got, expected)


# ------------------------------------------------------------------ audio
_AUDIO_DTYPES = (np.float16, np.float32, np.float64, np.int16, np.int32, np.uint8, np.bool_, np.complex64)


@pytest.fixture(scope="module")
def extractor():
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    return Gemma4UnifiedAudioFeatureExtractor()


@settings(max_examples=40, **_SETTINGS)
@given(length=st.one_of(st.sampled_from([0, 1, 639, 640, 641]), st.integers(0, 3000)),
       dtype=st.sampled_from(_AUDIO_DTYPES), nan=st.booleans(), seed=st.integers(0, 2**16))
def test_audio_array_frames_equal_reference_or_input_error(extractor, length, dtype, nan, seed):
    rng = np.random.default_rng(seed)
    if dtype in (np.int16, np.int32):
        info = np.iinfo(dtype)
        samples = rng.integers(info.min, info.max, length, dtype=np.int64, endpoint=True).astype(dtype)
    elif dtype in (np.uint8, np.bool_):
        samples = rng.integers(0, 2, length).astype(dtype)
    else:
        samples = rng.uniform(-1, 1, length).astype(dtype)
        if nan and length and dtype != np.complex64:
            samples[rng.integers(length)] = np.nan
    supported = dtype in (np.float16, np.float32, np.float64, np.int16)
    if not supported or length == 0 or (nan and dtype in (np.float16, np.float32, np.float64) and length):
        with pytest.raises(runtime.InputError):
            audio_frames(load_audio(samples))
        return
    waveform = samples.astype(np.float32) / np.float32(32768) if dtype == np.int16 else samples.astype(np.float32)
    frames = audio_frames(load_audio(samples))
    assert frames.shape == (math.ceil(length / SAMPLES_PER_TOKEN), SAMPLES_PER_TOKEN)
    assert np.array_equal(frames, extractor(waveform)["input_features"][0])


def _wav(samples: np.ndarray, rate: int) -> bytes:
    data = samples.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


_wav_names = itertools.count()


@settings(max_examples=25, **_SETTINGS)
@given(length=st.one_of(st.sampled_from([0, 1]), st.integers(0, 2000)),
       rate=st.sampled_from([8000, 16000, 22050, 44100, 48000]), seed=st.integers(0, 2**16))
def test_wav_sample_rates_and_lengths(extractor, tmp_path_factory, length, rate, seed):
    samples = np.random.default_rng(seed).integers(-32768, 32768, length).astype(np.int16)
    path = tmp_path_factory.getbasetemp() / f"clip-{next(_wav_names)}.wav"
    path.write_bytes(_wav(samples, rate))
    if rate != 16000:
        with pytest.raises(runtime.InputError, match=rf"{rate} Hz; expected 16000 Hz"):
            load_audio(path)
        return
    if length == 0:
        with pytest.raises(runtime.InputError, match="no samples"):
            load_audio(path)
        return
    frames = audio_frames(load_audio(path))
    assert np.array_equal(frames, extractor(samples.astype(np.float32) / np.float32(32768))["input_features"][0])


# ------------------------------------------------------------------ prompt expansion
_CFG = {
    "tokens": {"pad": 0, "eos": 1, "bos": 2, "boi": 6, "eoi": 8, "image": 7, "boa": 9, "eoa": 11, "audio": 10},
    "vision": {"patch_size": 16, "pooling_kernel_size": 3, "mm_posemb_size": 1120},
    "audio": {"samples_per_token": 640},
}
IMAGE, AUDIO = _CFG["tokens"]["image"], _CFG["tokens"]["audio"]


@settings(max_examples=30, **_SETTINGS)
@given(ids=st.lists(st.sampled_from([2, 3, 20, 21, IMAGE, AUDIO]), min_size=1, max_size=10),
       image_sizes=st.lists(st.tuples(st.integers(1, 150), st.integers(1, 150)), max_size=3),
       clip_lengths=st.lists(st.integers(1, 2000), max_size=3), budget=st.sampled_from((70, 140)))
def test_expansion_matches_placeholders_or_input_error(ref, ids, image_sizes, clip_lengths, budget):
    images = [np.zeros((h, w, 3), np.uint8) for h, w in image_sizes]
    clips = [np.zeros(n, np.float32) for n in clip_lengths]
    n_img, n_aud = ids.count(IMAGE), ids.count(AUDIO)
    if n_img != len(images) or n_aud != len(clips):
        wrong = "image" if n_img != len(images) else "audio"
        with pytest.raises(runtime.InputError, match=rf"{n_img if wrong == 'image' else n_aud} {wrong} placeholder"):
            expand_prompt(ids, images, clips, _CFG, max_soft_tokens=budget)
        return
    out = expand_prompt(ids, images, clips, _CFG, max_soft_tokens=budget)
    expected, sizes, lengths = [], iter(image_sizes), iter(clip_lengths)
    for t in ids:
        if t == IMAGE:
            th, tw = ref.get_aspect_ratio_preserving_size(*next(sizes), 16, budget * 9, 3)
            expected += [6, *[IMAGE] * ((th // 48) * (tw // 48)), 8]
        elif t == AUDIO:
            expected += [9, *[AUDIO] * math.ceil(next(lengths) / 640), 11]
        else:
            expected.append(t)
    assert out.ids == expected
    assert sum(map(len, out.image_patches)) == out.ids.count(IMAGE)
    assert sum(map(len, out.audio_frames)) == out.ids.count(AUDIO)
