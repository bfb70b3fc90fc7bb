"""The sampling defaults an artifact carries: its checkpoint's ``generation_config.json``, read as transformers does.

`read_generation_config(model)` returns a plain dict of defaults for callers that take sampling settings from a
request and need something when the request sets none (the HTTP server; `generate` may reuse it):

- ``eos_token_ids``: tuple of ids that end generation: the file's ``eos_token_id`` (an int or a list) plus the
  model's own eos and end-of-turn ids (``model_config.tokens``), so a chat reply always stops at ``<turn|>``;
- ``temperature``, ``top_k``, ``top_p``: what transformers' ``generate`` would use.  Sampling happens only when the
  file says ``do_sample: true``; otherwise (the transformers default) the answer is greedy: temperature 0.0, no
  top-k/top-p.  Fields the file leaves out take transformers' defaults (temperature 1.0, top_k 50, top_p 1.0);
  ``top_k`` 0 and ``top_p`` 1.0 mean "off" and come back as None;
- ``max_new_tokens``: the file's value, or None when it has none (its ``max_length`` counts the prompt too and is
  ignored).

The file is the one the manifest names under ``generation_config`` (written by the exporter, listed and hashed like
every other file).  An artifact without one gets the greedy defaults above.  A file that is not a JSON object, or
holds values of the wrong type, raises `runtime.ArtifactError` naming the file and the key.  This module does not
apply the defaults to anything.
"""

from __future__ import annotations

import json
from typing import Any

from runtime.manifest import ArtifactError

__all__ = ["GENERATION_CONFIG_NAME", "read_generation_config"]

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers' GenerationConfig._get_default_generation_params for the fields we use.
_HF_TEMPERATURE, _HF_TOP_K, _HF_TOP_P = 1.0, 50, 1.0


def _number(raw: dict, key: str, where: str, kind: type, default):
    value = raw.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ArtifactError(f"{where}: {key}={value!r}; expected {'an integer' if kind is int else 'a number'}")
    if value < 0:
        raise ArtifactError(f"{where}: {key}={value!r}; expected a value >= 0")
    return kind(value)


def _eos_ids(raw: dict, where: str) -> list[int]:
    value = raw.get("eos_token_id")
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ArtifactError(f"{where}: eos_token_id={value!r}; expected a token id or a list of token ids")
    return list(items)


def read_generation_config(model: Any) -> dict[str, Any]:
    """Sampling defaults of a `runtime.LoadedModel` (anything with ``root``, ``manifest`` and ``config``)."""
    tokens = model.config["tokens"]
    raw: dict = {}
    rel = model.manifest.get("generation_config")
    where = str(model.root / rel) if rel else ""
    if rel:
        try:
            raw = json.loads((model.root / rel).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{where}: cannot be read as JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ArtifactError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    eos = [*_eos_ids(raw, where), tokens["eos"], tokens["turn_end"]]
    out: dict[str, Any] = {
        "eos_token_ids": tuple(dict.fromkeys(eos)),  # in order, without repeats
        "temperature": 0.0,
        "top_k": None,
        "top_p": None,
        "max_new_tokens": _number(raw, "max_new_tokens", where, int, None),
    }
    if raw.get("do_sample") is True:
        top_k = _number(raw, "top_k", where, int, _HF_TOP_K)
        top_p = _number(raw, "top_p", where, float, _HF_TOP_P)
        out |= {
            "temperature": _number(raw, "temperature", where, float, _HF_TEMPERATURE),
            "top_k": top_k or None,
            "top_p": top_p if top_p < 1.0 else None,
        }
    return out
