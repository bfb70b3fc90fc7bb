"""The artifact manifest: what an artifact directory holds, and the check that its files are the ones written.

An artifact is a directory with ``manifest.json`` naming the model config, the graphs and their inputs/outputs,
the KV-cache layout, precision, backends built, tool versions, and the sha256 of every file.  `read_manifest`
refuses an artifact whose files are missing or differ from the manifest, naming the file.  `staged_artifact`
writes a new artifact into a temporary sibling directory and moves it into place only when complete, so a failed
export or build never leaves a half-written artifact behind.

Torch-free; the exporter and the engine builders use it to write, the runtime to read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_NAME",
    "ArtifactError",
    "hash_files",
    "read_manifest",
    "sha256_file",
    "staged_artifact",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "gemma4-deploy-artifact"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact directory that cannot be used; the message names the file and what is wrong."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest, keyed by POSIX relative path."""
    root = Path(root)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def write_manifest(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash the directory's files into ``manifest['files']`` and write it (atomically) as manifest.json."""
    root = Path(root)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, files=hash_files(root))
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)
    return manifest


def read_manifest(root: str | Path, *, verify: bool = True) -> dict[str, Any]:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root}: artifact directory does not exist (run `make export` first)")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {root} is not an artifact directory (run `make export OUT={root}`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}; re-export the artifact"
        )
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            f = root / rel
            if not f.is_file():
                raise ArtifactError(f"{f}: listed in the manifest but missing; the artifact is incomplete")
            if sha256_file(f) != digest:
                raise ArtifactError(
                    f"{f}: sha256 differs from {MANIFEST_NAME}; the file was modified or corrupted after it was "
                    f"written. Re-run `make export`/`make build-engine` to regenerate the artifact."
                )
    return manifest


@contextlib.contextmanager
def staged_artifact(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``out``; on success it replaces ``out``, on error it is removed."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
