"""Media in requests -> the bytes the engine decodes, without any network access.

Images come as ``data:image/png;base64,...`` or ``data:image/jpeg;base64,...`` URLs; audio as base64 WAV
(``input_audio``).  Every other URL scheme (http, https, ftp, file, ...) is refused with a 400 before anything is
opened; ``file://`` URLs are accepted only with ``allow_dir`` (``--allow-media-dir``), and only for files whose
resolved path (symlinks followed) lies inside it.  The bytes are checked for the declared format's signature
(PNG, JPEG, RIFF/WAVE), not decoded: decoding, size and content checks are the runtime's (`runtime.images`,
`runtime.audio`), whose `InputError` the server turns into a 400 as well.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from runtime.serve.errors import APIError

__all__ = ["audio_bytes", "image_bytes"]

_IMAGE_TYPES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/jpg": b"\xff\xd8\xff"}
_FILE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def _bad(where: str, message: str, code: str = "invalid_media") -> APIError:
    return APIError(400, f"{where}: {message}", param=where, code=code)


def _b64(payload: str, where: str) -> bytes:
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(where, "the base64 payload is malformed") from None
    if not data:
        raise _bad(where, "the base64 payload is empty")
    return data


def _data_url(url: str, where: str) -> tuple[str, bytes]:
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise _bad(where, "a data: URL needs a ',' before its payload (data:image/png;base64,...)")
    mime, *params = header.split(";")
    if "base64" not in params:
        raise _bad(where, "only base64 data: URLs are accepted (data:image/png;base64,...)")
    mime = mime.strip().lower()
    if mime not in _IMAGE_TYPES:
        raise _bad(where, f"media type {mime or '(none)'!r}; expected image/png or image/jpeg")
    return mime, _b64(payload, where)


def _file_url(url: str, allow_dir: Path, where: str, max_bytes: int) -> tuple[str, bytes]:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise _bad(where, f"file URL host {parts.netloc!r}; only local files (file:///path) are accepted", "invalid_url")
    root = allow_dir.resolve()
    try:
        path = Path(unquote(parts.path)).resolve(strict=True)
    except (OSError, RuntimeError):
        raise _bad(where, "no such file inside the allowed media directory", "invalid_url") from None
    if not path.is_relative_to(root) or not path.is_file():
        raise _bad(where, "the file is not inside the allowed media directory (--allow-media-dir)", "invalid_url")
    mime = _FILE_SUFFIXES.get(path.suffix.lower())
    if mime is None:
        raise _bad(where, f"file type {path.suffix!r}; expected .png, .jpg or .jpeg")
    if os.path.getsize(path) > max_bytes:
        raise _bad(where, f"the file is larger than {max_bytes} bytes")
    return mime, path.read_bytes()


def image_bytes(url: str, where: str, *, allow_dir: Path | None, max_bytes: int) -> bytes:
    """The bytes of the PNG/JPEG image at ``url``; ``where`` is the field path used in errors."""
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        mime, data = _data_url(url, where)
    elif scheme == "file" and allow_dir is not None:
        mime, data = _file_url(url, allow_dir, where, max_bytes)
    else:
        allowed = "data: URLs" + (" and file:// URLs inside the allowed media directory" if allow_dir else "")
        shown = f"{scheme}:" if scheme else "a URL without a scheme"
        raise _bad(where, f"{shown} is not accepted; this server takes only {allowed} (image/png, image/jpeg) and "
                          "never fetches from the network", "invalid_url")
    if not data.startswith(_IMAGE_TYPES[mime]):
        raise _bad(where, f"the data is not a {mime.split('/')[1].upper()} image (wrong file signature)")
    return data


def audio_bytes(data: str, where: str) -> bytes:
    """The bytes of a base64 WAV file; ``where`` is the field path used in errors."""
    raw = _b64(data, where)
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise _bad(where, "the data is not a WAV file (no RIFF/WAVE header); send 16 kHz mono WAV")
    return raw
