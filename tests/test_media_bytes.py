"""Images and audio given as the bytes of their files (what the HTTP server decodes from ``data:`` URLs) load
exactly as the files do; bad bytes raise `InputError` naming the bytes."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from runtime.audio import load_audio
from runtime.errors import InputError
from runtime.images import load_image


def test_image_bytes_load_as_the_file(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(load_image(path.read_bytes()), load_image(path))
    np.testing.assert_array_equal(load_image(path.read_bytes()), pixels)
    with pytest.raises(InputError, match="the image bytes"):
        load_image(b"not an image")
    with pytest.raises(InputError, match="empty image bytes"):
        load_image(b"")


def test_wav_bytes_load_as_the_file(tmp_path):
    samples = (np.sin(np.arange(1600) / 5) * 12000).astype(np.int16)
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.tobytes())
    np.testing.assert_array_equal(load_audio(path.read_bytes()), load_audio(path))
    np.testing.assert_allclose(load_audio(path.read_bytes()), samples / 32768, atol=1e-7)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.zeros(20, np.int16).tobytes())
    with pytest.raises(InputError, match="the WAV bytes has 2 channels"):
        load_audio(buf.getvalue())
    with pytest.raises(InputError, match="the WAV bytes is not a WAV file"):
        load_audio(b"RIFFxxxxJUNK")
