"""The schema of ``manifest.json`` and the rules that make the manifest the only way into an artifact.

`validate` checks the structure and types of every key the toolchain reads (extra keys are allowed: writers add
reports and versions), then the rules that tie keys together: every path is relative and stays inside the
artifact, every file the runtime opens is listed in ``files``, token ids are inside the vocabulary, the cache
inputs match the layer types.  A failure names the key, e.g. ``engines.onnxruntime.prefill: expected a relative
path inside the artifact, got '/etc/x'``.

It is a small explicit validator rather than JSON Schema: the runtime's base dependencies stay as they are, and
the messages say what to do.  It does not touch the file system (see `runtime.manifest` for that).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["SchemaError", "is_relative_inside", "opened_paths", "validate"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN_KEYS = ("pad", "eos", "bos", "boi", "eoi", "image", "boa", "eoa", "audio", "turn_start", "turn_end")
_LAYER_TYPES = ("sliding_attention", "full_attention")


class SchemaError(ValueError):
    """A manifest key that does not have the expected form: ``where`` is its dotted path."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = where


Check = Callable[[Any, str], None]


def _fail(where: str, expected: str, got: Any) -> None:
    shown = repr(got)
    if not isinstance(got, str) and len(shown) > 120:  # a whole object or list: its start is enough
        shown = shown[:117] + "..."
    raise SchemaError(where, f"expected {expected}, got {shown}")


def is_relative_inside(rel: Any) -> bool:
    """A POSIX relative path without '.', '..' or empty parts, backslashes or NUL: it cannot leave its directory."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    if re.match(r"^[A-Za-z]:", rel):  # a Windows drive
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def _relpath(value: Any, where: str) -> None:
    if not is_relative_inside(value):
        _fail(where, "a relative path inside the artifact", value)


def _int(minimum: int) -> Check:
    def check(value: Any, where: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            _fail(where, f"an integer >= {minimum}", value)

    return check


def _str(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value:
        _fail(where, "a non-empty string", value)


def _one_of(*allowed: Any) -> Check:
    def check(value: Any, where: str) -> None:
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            _fail(where, " or ".join(repr(a) for a in allowed), value)

    return check


def _list(item: Check, *, min_len: int = 0) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, list) or len(value) < min_len:
            _fail(where, f"a list of at least {min_len} item(s)" if min_len else "a list", value)
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")

    return check


def _obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    def check(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            _fail(where, "an object", value)
        for key, sub in required.items():
            if key not in value:
                raise SchemaError(f"{where}.{key}" if where else key, "missing")
            sub(value[key], f"{where}.{key}" if where else key)
        for key, sub in (optional or {}).items():
            if key in value:
                sub(value[key], f"{where}.{key}" if where else key)

    return check


def _nullable(inner: Check) -> Check:
    def check(value: Any, where: str) -> None:
        if value is not None:
            inner(value, where)

    return check


def _dim(value: Any, where: str) -> None:
    if isinstance(value, str):
        _str(value, where)
    else:
        _int(0)(value, where)


def _files(value: Any, where: str) -> None:
    if not isinstance(value, dict) or not value:
        _fail(where, "an object mapping relative paths to sha256 digests", value)
    for rel, digest in value.items():
        if not is_relative_inside(rel):
            raise SchemaError(f"{where}[{rel!r}]", f"expected a relative path inside the artifact, got {rel!r}")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            _fail(f"{where}[{rel!r}]", "a sha256 digest (64 lowercase hex digits)", digest)


_POSITIVE = _int(1)
_IO = _list(_obj({"name": _str, "dtype": _str, "shape": _list(_dim)}), min_len=1)
_GRAPH = _obj({"file": _relpath, "inputs": _IO, "outputs": _IO})
_ENGINE = _obj({"prefill": _relpath, "decode": _relpath})
_ASSISTANT_CACHES = ("full_key", "full_value", "ring_key", "ring_value")
_ASSISTANT = _obj({"file": _relpath, "inputs": _IO, "outputs": _IO,
                   "target_caches": _obj({k: _str for k in _ASSISTANT_CACHES})},
                  {"engines": _obj({}, {"onnxruntime": _obj({"file": _relpath}),
                                        "tensorrt": _obj({"file": _relpath, "from": _relpath, "from_sha256": _str})}),
                   "loop": _obj({"file": _relpath, "from": _relpath, "from_sha256": _str})})
_MODEL_CONFIG = _obj(
    {
        "text": _obj({
            "vocab_size": _POSITIVE,
            "layer_types": _list(_one_of(*_LAYER_TYPES), min_len=1),
            "sliding_window": _POSITIVE,
        }),
        "tokens": _obj({k: _int(0) for k in _TOKEN_KEYS}, {"video": _int(0)}),
    },
    {
        "vision": _nullable(_obj({"patch_size": _POSITIVE, "pooling_kernel_size": _POSITIVE, "mm_posemb_size": _POSITIVE})),
        "audio": _nullable(_obj({"samples_per_token": _POSITIVE})),
    },
)
_MANIFEST = _obj(
    {
        "model_config": _MODEL_CONFIG,
        "max_len": _int(2),
        "graphs": _obj({"prefill": _GRAPH, "decode": _GRAPH}),
        "files": _files,
    },
    {
        "tokenizer": _list(_relpath),
        "generation_config": _relpath,
        "engines": _obj({}, {"onnxruntime": _ENGINE, "tensorrt": _ENGINE}),
        "plugin_graphs": _obj({}, {"prefill": _obj({"file": _relpath}), "decode": _obj({"file": _relpath})}),
        "quantization": _obj({}, {"scales": _relpath, "stats": _relpath}),
        "assistant": _ASSISTANT,
    },
)


def opened_paths(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file a reader of the artifact may open, by the key that names it (after `validate`)."""
    out = {f"graphs.{g}.file": manifest["graphs"][g]["file"] for g in ("prefill", "decode")}
    for g, spec in manifest.get("plugin_graphs", {}).items():
        if g in ("prefill", "decode"):
            out[f"plugin_graphs.{g}.file"] = spec["file"]
    for backend in ("onnxruntime", "tensorrt"):
        for g in ("prefill", "decode"):
            if backend in manifest.get("engines", {}):
                out[f"engines.{backend}.{g}"] = manifest["engines"][backend][g]
    for i, name in enumerate(manifest.get("tokenizer", [])):
        out[f"tokenizer[{i}]"] = name
    if "generation_config" in manifest:
        out["generation_config"] = manifest["generation_config"]
    for key in ("scales", "stats"):
        if key in manifest.get("quantization", {}):
            out[f"quantization.{key}"] = manifest["quantization"][key]
    if "assistant" in manifest:
        out["assistant.file"] = manifest["assistant"]["file"]
        if "onnxruntime" in manifest["assistant"].get("engines", {}):
            out["assistant.engines.onnxruntime.file"] = manifest["assistant"]["engines"]["onnxruntime"]["file"]
        if "tensorrt" in manifest["assistant"].get("engines", {}):
            out["assistant.engines.tensorrt.file"] = manifest["assistant"]["engines"]["tensorrt"]["file"]
        if "loop" in manifest["assistant"]:
            out["assistant.loop.file"] = manifest["assistant"]["loop"]["file"]
    return out


def validate(manifest: Any) -> None:
    """Raise `SchemaError` naming the first key that is missing, of the wrong form, or inconsistent."""
    _MANIFEST(manifest, "")
    files = manifest["files"]
    for where, rel in opened_paths(manifest).items():
        if rel not in files:
            raise SchemaError(where, f"{rel!r} is not listed in `files`, so nothing vouches for its contents")
    cfg = manifest["model_config"]
    vocab = cfg["text"]["vocab_size"]
    for key, value in cfg["tokens"].items():
        if isinstance(value, int) and value >= vocab:
            raise SchemaError(f"model_config.tokens.{key}", f"id {value} is not below model_config.text.vocab_size "
                                                            f"({vocab})")
    layers = len(cfg["text"]["layer_types"])
    for g in ("prefill", "decode"):
        names = [spec["name"] for spec in manifest["graphs"][g]["inputs"]]
        for needed in ("input_ids", "past_lens"):
            if needed not in names:
                raise SchemaError(f"graphs.{g}.inputs", f"no input named {needed!r}")
        if g == "decode" and "assistant" in manifest:
            for key, name in manifest["assistant"]["target_caches"].items():
                if name not in names:
                    raise SchemaError(f"assistant.target_caches.{key}", f"{name!r} is not an input of graphs.decode")
        caches = sum(n.startswith(("past_key_", "past_value_")) for n in names)
        if caches != 2 * layers:
            raise SchemaError(f"graphs.{g}.inputs", f"{caches} past_key_*/past_value_* inputs, expected 2 per layer "
                                                   f"of model_config.text.layer_types ({2 * layers})")
