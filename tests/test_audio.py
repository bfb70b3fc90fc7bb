"""runtime.audio against the transformers Gemma 4 Unified audio feature extractor, and its WAV reader."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from runtime.audio import SAMPLE_RATE, SAMPLES_PER_TOKEN, audio_frames, load_audio


def _write_wav(path: Path, samples: np.ndarray, *, rate: int = SAMPLE_RATE, channels: int = 1) -> None:
    """Write int16 samples ((n,) or (n, channels)) as a 16-bit PCM WAV with the stdlib `wave` module."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())


def _write_float_wav(path: Path, samples: np.ndarray, *, rate: int = SAMPLE_RATE) -> None:
    """Write a mono IEEE-float32 WAV by hand (the `wave` module only writes PCM)."""
    data = samples.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("length", [640, 1000, 16000, 1])
def test_frames_equal_reference_feature_extractor(length):
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    waveform = np.random.default_rng(length).uniform(-1, 1, length).astype(np.float32)
    expected = Gemma4UnifiedAudioFeatureExtractor()(waveform)["input_features"][0]
    frames = audio_frames(load_audio(waveform))
    assert frames.dtype == np.float32 and frames.shape == (-(-length // SAMPLES_PER_TOKEN), SAMPLES_PER_TOKEN)
    assert np.array_equal(frames, expected)


def test_frames_of_float64_input_are_float32():
    waveform = np.linspace(-1, 1, 700)  # float64
    frames = audio_frames(load_audio(waveform))
    assert frames.dtype == np.float32
    assert np.array_equal(frames.reshape(-1)[:700], waveform.astype(np.float32))
    assert not frames.reshape(-1)[700:].any()


def test_wav_round_trip(tmp_path):
    samples = np.random.default_rng(0).integers(-32768, 32768, 5000).astype(np.int16)
    _write_wav(tmp_path / "clip.wav", samples)
    waveform = load_audio(tmp_path / "clip.wav")
    assert waveform.dtype == np.float32 and waveform.shape == (5000,)
    assert np.abs(waveform - samples / 32768.0).max() <= 1 / 32768
    assert np.array_equal(waveform, load_audio(samples))  # int16 arrays are scaled the same way


def test_float_wav_round_trip(tmp_path):
    samples = np.random.default_rng(1).uniform(-1, 1, 3000).astype(np.float32)
    _write_float_wav(tmp_path / "float.wav", samples)
    assert np.array_equal(load_audio(tmp_path / "float.wav"), samples)


def test_wav_at_8khz_is_refused(tmp_path):
    _write_wav(tmp_path / "phone.wav", np.zeros(800, np.int16), rate=8000)
    with pytest.raises(ValueError, match=r"phone\.wav.*8000 Hz.*16000 Hz.*[Rr]esample"):
        load_audio(tmp_path / "phone.wav")


def test_stereo_wav_is_refused(tmp_path):
    _write_wav(tmp_path / "stereo.wav", np.zeros((800, 2), np.int16), channels=2)
    with pytest.raises(ValueError, match=r"stereo\.wav.*2 channels.*mono"):
        load_audio(tmp_path / "stereo.wav")


def test_not_a_wav_file(tmp_path):
    (tmp_path / "song.mp3").write_bytes(b"ID3\x03\x00 definitely not RIFF")
    with pytest.raises(ValueError, match=r"song\.mp3.*not a WAV file"):
        load_audio(tmp_path / "song.mp3")


def test_missing_wav_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.wav"):
        load_audio(tmp_path / "absent.wav")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((2, 100), np.float32), "expected a 1-D mono waveform"),
        (np.zeros(0, np.float32), "no samples"),
        (np.zeros(100, np.int32), "dtype int32"),
        (np.array([0.0, np.nan], np.float32), "NaN"),
    ],
    ids=["2-D", "empty", "int32", "nan"],
)
def test_bad_arrays(bad, message):
    with pytest.raises(ValueError, match=message):
        load_audio(bad)


def test_empty_wav_is_refused(tmp_path):
    _write_wav(tmp_path / "silent.wav", np.zeros(0, np.int16))
    with pytest.raises(ValueError, match=r"silent\.wav.*no samples"):
        load_audio(tmp_path / "silent.wav")


@pytest.mark.parametrize("width", [1, 3, 4])
def test_pcm_widths(tmp_path, width):
    bits = 8 * width
    rng = np.random.default_rng(width)
    ints = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), 999, dtype=np.int64)
    ints[:2] = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]  # the extremes
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()  # 8-bit WAV is unsigned
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints)
    with wave.open(str(tmp_path / "pcm.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(width)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(raw)
    waveform = load_audio(tmp_path / "pcm.wav")
    assert waveform.shape == (999,)
    assert np.abs(waveform - ints / 2.0 ** (bits - 1)).max() <= 2.0**-24
    assert waveform.min() >= -1.0 and waveform.max() <= 1.0


def test_audio_errors_are_typed(tmp_path):
    import runtime

    with pytest.raises(runtime.InputFileNotFoundError):
        load_audio(tmp_path / "absent.wav")
    for bad in (np.zeros(0, np.float32), np.zeros(10, np.uint8), np.zeros((2, 2), np.float32), [0.0, 0.1]):
        with pytest.raises(runtime.InputError):
            load_audio(bad)
    _write_wav(tmp_path / "phone.wav", np.zeros(10, np.int16), rate=8000)
    with pytest.raises(runtime.InputError, match="8000 Hz"):
        load_audio(tmp_path / "phone.wav")


@pytest.mark.parametrize("length", [1, 639, 641])
def test_one_frame_edges_equal_reference(length):
    from transformers.models.gemma4_unified.feature_extraction_gemma4_unified import (
        Gemma4UnifiedAudioFeatureExtractor,
    )

    waveform = np.full(length, 0.25, np.float32)
    frames = audio_frames(load_audio(waveform))
    assert frames.shape == (-(-length // SAMPLES_PER_TOKEN), SAMPLES_PER_TOKEN)
    assert np.array_equal(frames, Gemma4UnifiedAudioFeatureExtractor()(waveform)["input_features"][0])
