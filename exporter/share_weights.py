"""Make the prefill and decode graphs share one external weights file instead of two copies.

Both graphs hold the same decoder weights; written separately the artifact would carry them twice (96 GB instead
of 48 GB for the 12B in fp32).  Tensors are matched by content (sha256 of their bytes), so the check is exact and
works whatever names the exporter gave them.  The few decode tensors the prefill file lacks (tables only the
lowered decode graph uses) are appended to it, page-aligned; when most are missing the files stay separate.
Tensors are read one at a time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["share_external_data"]

SHARED = "weights.data"


def _external(tensor) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _digest(path: Path, info: dict[str, str], chunk: int = 64 << 20) -> str:
    """sha256 of one tensor's bytes in an external data file, read in chunks."""
    h = hashlib.sha256()
    left = int(info["length"])
    with open(path, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        while left > 0:
            block = f.read(min(chunk, left))
            if not block:
                raise ValueError(f"{path}: shorter than its graph's external data entries (truncated?)")
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _set_location(tensor, location: str, offset: int | None = None, length: int | None = None) -> None:
    entries = {e.key: e for e in tensor.external_data}
    entries["location"].value = location
    if offset is not None:
        entries["offset"].value = str(offset)
        entries["length"].value = str(length)


def _ext_tensors(proto) -> list:
    import onnx

    return [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def share_external_data(root: Path, primary: str = "prefill.onnx", secondary: str = "decode.onnx", log=print) -> bool:
    """Point ``secondary``'s weights into ``primary``'s data file, renamed ``weights.data``.  True if shared."""
    import onnx

    root = Path(root)
    p_proto = onnx.load(str(root / primary), load_external_data=False)
    s_proto = onnx.load(str(root / secondary), load_external_data=False)
    p_files = {_external(t)["location"] for t in _ext_tensors(p_proto)}
    # tensors the exporter already pointed into the primary's file need no matching; the others are matched by
    # content, hashing only primary tensors of a length some of them have
    lengths = {int(_external(t)["length"]) for t in _ext_tensors(s_proto) if _external(t)["location"] not in p_files}
    by_hash: dict[str, tuple[int, int]] = {}
    for t in _ext_tensors(p_proto):
        info = _external(t)
        if int(info["length"]) in lengths:
            by_hash[_digest(root / info["location"], info)] = (int(info.get("offset", 0)), int(info["length"]))
    moves, extra = [], []
    for t in _ext_tensors(s_proto):
        info = _external(t)
        if info["location"] in p_files:  # already in the primary's file (the exporter shared it): same place
            moves.append((t, (int(info.get("offset", 0)), int(info["length"]))))
            continue
        found = by_hash.get(_digest(root / info["location"], info))
        if found is None:
            extra.append(t)  # e.g. tables only one graph uses: appended to the shared file below
            continue
        moves.append((t, found))
    if len(p_files) != 1:
        return False
    if len(extra) * 4 > len(moves):
        log(f"[export] {secondary}: {len(extra)} tensors not in {primary}; keeping separate weight files")
        return False
    with open(root / next(iter(p_files)), "ab") as out:  # secondary-only tensors, page-aligned (mmap-able)
        for t in extra:
            info = _external(t)
            out.write(b"\0" * (-out.tell() % 4096))
            offset = out.tell()
            with open(root / info["location"], "rb") as f:
                f.seek(int(info.get("offset", 0)))
                out.write(f.read(int(info["length"])))
            moves.append((t, (offset, int(info["length"]))))
    s_files = {_external(t)["location"] for t in _ext_tensors(s_proto)}
    for t in _ext_tensors(p_proto):
        _set_location(t, SHARED)
    for t, (offset, length) in moves:
        _set_location(t, SHARED, offset, length)
    os.replace(root / p_files.pop(), root / SHARED)
    for name in s_files - {SHARED}:
        (root / name).unlink(missing_ok=True)  # the primary's own file was renamed to SHARED above
    onnx.save(p_proto, str(root / primary))
    onnx.save(s_proto, str(root / secondary))
    return True
