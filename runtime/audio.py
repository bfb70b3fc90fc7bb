"""Turn audio into Gemma 4 Unified audio soft tokens, with numpy and the standard library only.

The model has no audio tower: each soft token is a raw 40 ms frame (640 samples at 16 kHz, mono, in [-1, 1]).
This module loads a waveform (from an array or a WAV file) and cuts it into those frames, matching the transformers
feature extractor (`Gemma4UnifiedAudioFeatureExtractor`) value for value.

It deliberately does not resample, downmix channels, or decode compressed formats (MP3, FLAC, ...): doing any of these
silently would hide a quality decision from the user, so such input is refused (`InputError`) with a message that says what to do
(for example `ffmpeg -i in.mp3 -ac 1 -ar 16000 out.wav`). WAV files are parsed here (RIFF header plus numpy), not with
the `wave` module, because `wave` cannot read IEEE-float or WAVE_FORMAT_EXTENSIBLE files on Python 3.11.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Union

import numpy as np

from runtime.errors import InputError, InputFileNotFoundError

__all__ = ["SAMPLES_PER_TOKEN", "SAMPLE_RATE", "AudioInput", "audio_frames", "load_audio"]

SAMPLE_RATE = 16000
SAMPLES_PER_TOKEN = 640

AudioInput = Union[str, "os.PathLike[str]", bytes, np.ndarray]

_PCM, _IEEE_FLOAT, _EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_HOW_TO_CONVERT = "Convert it to 16 kHz mono, e.g. `ffmpeg -i IN -ac 1 -ar 16000 -c:a pcm_s16le OUT.wav`."


def _riff_chunks(data: bytes, label: str) -> dict[bytes, bytes]:
    """The chunks of a RIFF/WAVE file by id (the first of each id wins)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError(f"{label} is not a WAV file (no RIFF/WAVE header). {_HOW_TO_CONVERT}")
    chunks: dict[bytes, bytes] = {}
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = data[offset + 8 : offset + 8 + size]  # streaming writers may leave size too large: take what is there
        chunks.setdefault(chunk_id, body)
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    for needed in (b"fmt ", b"data"):
        if needed not in chunks:
            name = needed.decode().strip()
            raise InputError(f"{label} has no {name!r} chunk; it is truncated or broken.")
    return chunks


def _read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """Samples of a mono PCM (8/16/24/32-bit) or IEEE-float (32/64-bit) WAV file, as float32 in [-1, 1]."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"WAV file {str(path)!r} cannot be read ({err}).") from None
    return _decode_wav(data, f"WAV file {str(path)!r}", sample_rate)


def _decode_wav(data: bytes, label: str, sample_rate: int) -> np.ndarray:
    """`_read_wav` of the file's bytes; messages name the source as ``label``."""
    chunks = _riff_chunks(data, label)
    fmt = chunks[b"fmt "]
    if len(fmt) < 16:
        raise InputError(f"{label} has a 'fmt' chunk of {len(fmt)} bytes; expected at least 16.")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        (tag,) = struct.unpack_from("<H", fmt, 24)  # first two bytes of the SubFormat GUID
    if channels != 1:
        raise InputError(
            f"{label} has {channels} channels; expected mono (1 channel). It is not downmixed "
            f"automatically. {_HOW_TO_CONVERT}"
        )
    if rate != sample_rate:
        raise InputError(
            f"{label} is sampled at {rate} Hz; expected {sample_rate} Hz. "
            f"Resample it to 16 kHz mono, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`."
        )
    width = bits // 8
    if tag == _PCM and bits in (8, 16, 24, 32):
        pass
    elif tag == _IEEE_FLOAT and bits in (32, 64):
        pass
    else:
        raise InputError(
            f"{label} has sample format {tag:#06x} with {bits} bits; expected PCM 8/16/24/32-bit or "
            f"IEEE float 32/64-bit. {_HOW_TO_CONVERT}"
        )
    if block_align != width:
        raise InputError(f"{label} has block align {block_align}; expected {width} for mono {bits}-bit.")
    raw = chunks[b"data"]
    raw = raw[: len(raw) - len(raw) % width]  # drop a trailing partial sample of a truncated file
    if tag == _IEEE_FLOAT:
        return np.frombuffer(raw, dtype=f"<f{width}").astype(np.float32)
    if bits == 8:  # unsigned, centred on 128
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if bits == 24:
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)  # (n, 3) little-endian bytes
        values = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)  # sign-extend
        return (values / float(1 << 23)).astype(np.float32)
    ints = np.frombuffer(raw, dtype=f"<i{width}")
    return (ints / float(1 << (bits - 1))).astype(np.float32)


def load_audio(audio: AudioInput, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return `audio` as a 1-D float32 waveform.

    Accepts a path to a mono WAV file sampled at `sample_rate` (PCM 8/16/24/32-bit, scaled to [-1, 1], or IEEE float,
    taken as is) or the bytes of one, a 1-D float array (any float dtype, cast to float32, values not clipped), or a 1-D int16 array
    (scaled by 1/32768). An array is assumed to be sampled at `sample_rate` already: nothing here can check that.
    """
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.exists():
            raise InputFileNotFoundError(f"Audio file {str(path)!r} does not exist.")
        if path.is_dir():
            raise InputError(f"{str(path)!r} is a directory; expected a WAV file.")
        waveform = _read_wav(path, sample_rate)
        source = f"WAV file {str(path)!r}"
    elif isinstance(audio, (bytes, bytearray, memoryview)):
        waveform = _decode_wav(bytes(audio), "the WAV bytes", sample_rate)
        source = "WAV bytes"
    elif isinstance(audio, np.ndarray):
        if audio.ndim != 1:
            raise InputError(
                f"Got an audio array of shape {audio.shape}; expected a 1-D mono waveform. Multi-channel audio is not "
                "downmixed automatically: average the channels yourself if that is what you want."
            )
        if audio.dtype == np.int16:
            waveform = audio.astype(np.float32) / np.float32(32768)
        elif np.issubdtype(audio.dtype, np.floating):
            waveform = audio.astype(np.float32)
        else:
            raise InputError(
                f"Got an audio array of dtype {audio.dtype}; expected a float array in [-1, 1] or int16 PCM samples."
            )
        source = "audio array"
    else:
        raise InputError(f"Got audio of type {type(audio).__name__}; expected a WAV file path, WAV bytes or a 1-D numpy "
                         "array.")
    if waveform.size == 0:
        raise InputError(f"The {source} holds no samples; expected at least one.")
    if not np.all(np.isfinite(waveform)):
        raise InputError(f"The {source} contains NaN or infinite samples.")
    return waveform


def audio_frames(waveform: np.ndarray, *, samples_per_token: int = SAMPLES_PER_TOKEN) -> np.ndarray:
    """Cut a 1-D waveform into (n, samples_per_token) float32 frames, one per soft token.

    The waveform is zero-padded at the end to a whole number of frames, so n = ceil(len / samples_per_token).
    """
    waveform = np.asarray(waveform)
    if waveform.ndim != 1 or waveform.size == 0:
        raise InputError(f"Got a waveform of shape {waveform.shape}; expected a non-empty 1-D array (see load_audio).")
    if samples_per_token <= 0:
        raise InputError(f"samples_per_token={samples_per_token}; expected a positive number of samples.")
    n = -(-waveform.size // samples_per_token)  # ceil
    frames = np.zeros(n * samples_per_token, dtype=np.float32)
    frames[: waveform.size] = waveform
    return frames.reshape(n, samples_per_token)  # (n, samples_per_token)
