"""The artifact manifest: what an artifact directory holds, and the check that its files are the ones written.

An artifact is a directory with ``manifest.json`` naming the model config, the graphs and their inputs/outputs,
the KV-cache layout, precision, backends built, tool versions, and the sha256 of every file.  `read_manifest`
refuses an artifact whose files are missing or differ from the manifest, naming the file.  Writing a whole new
artifact (staged, checked, swapped in atomically) is `runtime.staging`.

Torch-free; the exporter and the engine builders use it to write, the runtime to read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "MANIFEST_NAME",
    "ArtifactError",
    "hash_files",
    "read_manifest",
    "sha256_file",
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


def staged_artifact(out: str | Path, **kwargs):
    """Moved to `runtime.staging.staged_artifact` (which checks OUT before replacing it); kept as a redirect."""
    from runtime.staging import staged_artifact as staged

    return staged(out, **kwargs)
