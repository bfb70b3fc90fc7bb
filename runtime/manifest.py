"""The artifact manifest: what an artifact directory holds, and the check that its files are the ones written.

An artifact is a directory with ``manifest.json`` naming the model config, the graphs and their inputs/outputs,
the KV-cache layout, precision, backends built, tool versions, and the sha256 of every file.  `read_manifest`
refuses an artifact whose files are missing or differ from the manifest, naming the file, and a manifest that
does not match its schema or names a path outside the artifact or not listed in ``files``, naming the key;
`check_external_data` does the same for the external-data files a graph refers to.  The manifest is the only
way into an artifact: nothing reads a file it does not list.  Writing a whole new
artifact (staged, checked, swapped in atomically) is `runtime.staging`.

Torch-free; the exporter and the engine builders use it to write, the runtime to read.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from pathlib import Path
from typing import Any

from runtime._manifest_schema import SchemaError, is_relative_inside, validate
from runtime._onnx_refs import OnnxParseError, external_data_locations

__all__ = [
    "MANIFEST_NAME",
    "ArtifactError",
    "check_external_data",
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
    """The artifact's manifest, validated (`runtime._manifest_schema`), its files inside the artifact and, with
    ``verify``, each of them checked against its sha256.  Raises `ArtifactError` naming the file and the key."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"{root}: artifact directory does not exist (run `make export` first)")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; {root} is not an artifact directory (run `make export OUT={root}`)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot be read ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}; re-export the artifact"
        )
    try:
        validate(manifest)
    except SchemaError as e:
        raise ArtifactError(f"{path}: {e}") from None
    real_root = os.path.realpath(root)
    for rel, digest in manifest["files"].items():
        f = root / rel
        real = os.path.realpath(f)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ArtifactError(
                f"{f}: listed in {MANIFEST_NAME} as {rel!r} but it resolves to {real}, outside the artifact "
                f"(a symlink out of it); refused"
            )
        if not verify:
            continue
        if not f.exists():
            raise ArtifactError(f"{f}: listed in the manifest but missing; the artifact is incomplete")
        if not f.is_file():
            raise ArtifactError(f"{f}: listed in the manifest but not a regular file")
        if sha256_file(f) != digest:
            raise ArtifactError(
                f"{f}: sha256 differs from {MANIFEST_NAME}; the file was modified or corrupted after it was "
                f"written. Re-run `make export`/`make build-engine` to regenerate the artifact."
            )
    return manifest


def check_external_data(root: str | Path, manifest: dict[str, Any], rel: str) -> Path:
    """The path of graph ``rel`` once every external-data file it refers to is checked to be inside the artifact
    and listed in ``files`` (resolved, as ONNX Runtime does, relative to the graph's directory).

    Reads the graph's protobuf without loading any weights (`runtime._onnx_refs`).  ``rel`` itself must be
    listed: `read_manifest` has checked that for every path the manifest names."""
    root = Path(root)
    graph = root / rel
    if rel not in manifest["files"]:
        raise ArtifactError(f"{graph}: not listed in {MANIFEST_NAME} `files`; refused")
    try:
        refs = external_data_locations(graph.read_bytes())
    except OnnxParseError as e:
        raise ArtifactError(f"{graph}: not a valid ONNX model ({e})") from None
    except OSError as e:
        raise ArtifactError(f"{graph}: cannot be read ({e})") from None
    for tensor, location in refs:
        if location is None:
            raise ArtifactError(f"{graph}: tensor {tensor!r} is marked as external data but names no file")
        target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), location))
        if not is_relative_inside(target):
            raise ArtifactError(
                f"{graph}: tensor {tensor!r} keeps its data in {location!r}, outside the artifact; refused"
            )
        if target not in manifest["files"]:
            raise ArtifactError(
                f"{graph}: tensor {tensor!r} keeps its data in {location!r} ({target}), which {MANIFEST_NAME} does "
                f"not list in `files`; refused"
            )
    return graph
