"""``gemma4::PatchEmbed``: the whole encoder-free vision embedder as one node (DESIGN.md section 1).

Contract (version "1", namespace "gemma4"):

inputs   patches        (N, P) float   N soft tokens of P = 48 * 48 * 3 = 6912 pixel values in [0, 1]
         positions      (N, 2) int64   (x, y) of each soft token; (-1, -1) marks padding (adds no position)
         ln1_weight, ln1_bias (P,) · dense_weight (E, P) · dense_bias (E,) · ln2_weight, ln2_bias (E,) ·
         pos_table (M, 2, E) · pos_ln_weight, pos_ln_bias (E,) · proj_weight (hidden, E)       float, constants
outputs  embeddings     (N, hidden)
attributes  ln_eps (FLOAT, the LayerNorms'), rms_eps (FLOAT, the weightless RMSNorm before the projection),
            plugin_namespace "gemma4", plugin_version "1".

Semantics: LayerNorm -> Linear(+bias) -> LayerNorm -> + pos_table[x, 0] + pos_table[y, 1] (zero where -1) ->
LayerNorm -> RMSNorm without weight -> Linear (no bias), all in fp32 (activations here exceed fp16's range).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DOMAIN", "INPUTS", "OP", "OUTPUTS", "VERSION", "WEIGHTS", "attributes", "reference"]

DOMAIN = "gemma4"
OP = "PatchEmbed"
VERSION = "1"
# contract input -> the exported initializer it is (module path under model.)
WEIGHTS = {
    "ln1_weight": "vision_embedder.patch_ln1.weight",
    "ln1_bias": "vision_embedder.patch_ln1.bias",
    "dense_weight": "vision_embedder.patch_dense.weight",
    "dense_bias": "vision_embedder.patch_dense.bias",
    "ln2_weight": "vision_embedder.patch_ln2.weight",
    "ln2_bias": "vision_embedder.patch_ln2.bias",
    "pos_table": "vision_embedder.pos_embedding",
    "pos_ln_weight": "vision_embedder.pos_norm.weight",
    "pos_ln_bias": "vision_embedder.pos_norm.bias",
    "proj_weight": "embed_vision.embedding_projection.weight",
}
INPUTS = ("patches", "positions", *WEIGHTS)
OUTPUTS = ("embeddings",)


def attributes(vision_cfg, ln_eps: float = 1e-5) -> dict:
    return {"ln_eps": float(ln_eps), "rms_eps": float(vision_cfg.rms_norm_eps), "plugin_namespace": DOMAIN,
            "plugin_version": VERSION}


def _layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def reference(patches, positions, ln1_weight, ln1_bias, dense_weight, dense_bias, ln2_weight, ln2_bias, pos_table,
              pos_ln_weight, pos_ln_bias, proj_weight, *, ln_eps, rms_eps, **_):
    x = np.asarray(patches, np.float64)  # float64 inside: the reference is the exact math, rounded once
    positions = np.asarray(positions, np.int64)
    h = _layer_norm(x, ln1_weight, ln1_bias, ln_eps) @ np.asarray(dense_weight, np.float64).T + dense_bias
    h = _layer_norm(h, ln2_weight, ln2_bias, ln_eps)
    valid = (positions != -1).astype(np.float64)
    clamped = np.maximum(positions, 0)
    table = np.asarray(pos_table, np.float64)
    h = h + table[clamped[:, 0], 0] * valid[:, :1] + table[clamped[:, 1], 1] * valid[:, 1:2]
    h = _layer_norm(h, pos_ln_weight, pos_ln_bias, ln_eps)
    h = h / np.sqrt((h * h).mean(-1, keepdims=True) + rms_eps)
    return (h @ np.asarray(proj_weight, np.float64).T).astype(np.float32)
