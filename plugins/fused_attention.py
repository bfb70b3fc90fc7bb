"""``gemma4::FusedAttention``: one node per decoder layer, from the normed q/k/v to the attention output.

Contract (version "1", namespace "gemma4"):

inputs   q            (B, S, H, D)    float  normed (q_norm), before RoPE
         k            (B, S, Hkv, D)  float  normed (k_norm), before RoPE
         v            (B, S, Hkv, D)  float  normed (v_norm; on full layers with k_eq_v it is the raw k_proj output)
         past_key     (B, Hkv, T, D)  float  sliding: a ring of T = window slots (position p in slot p % T);
         past_value   (B, Hkv, T, D)  float  full: T = max_len slots (position p in slot p)
         past_lens    (B,)  int64  tokens already cached per sequence
         seq_lens     (B,)  int64  valid new tokens per sequence (right padding beyond)
         image_block  (B, S) int64 index of the contiguous image run a token belongs to, -1 elsewhere
outputs  out          (B, S, H * D)   attention output (o_proj is outside)
         present_key, present_value    the caches with the new tokens written, in place: they alias past_* in
                                       every mode (a sliding prefill writes its ring after the attention has read
                                       it), so one engine can run prefill and decode on the same buffers
attributes (all INT unless noted; TensorRT passes INT as int32)
         mode 0 prefill / 1 decode; sliding 1/0; window; num_heads; num_kv_heads; head_dim; rotary_dim (rotated
         dims, = head_dim on sliding layers, 2 * int(fraction * head_dim / 2) on full layers); rope_theta (FLOAT);
         scale (FLOAT, 1.0 for Gemma 4); plugin_namespace "gemma4" and plugin_version "1" (STRING) route the
         TensorRT parser to the plugin; the node's model-local function (the exported decomposition) runs elsewhere.

Semantics (what `reference` computes in numpy and `exporter.model.AttentionCore` in torch): positions
``past_lens + i``; rotate-half RoPE with ``inv_freq[j] = theta ** (-2j / head_dim)`` for ``2j < rotary_dim``,
else 0; GQA with ``H / Hkv`` query heads per KV head; softmax(scale * q k^T) over allowed keys:
full layers: key slot <= query position (causal over the written buffer);
sliding, prefill: keys are [the ring before this call, the S new tokens]; a key at position kp is allowed when it
is valid (ring slot non-empty / new token within seq_lens), kp > qp - window, and (kp <= qp or both tokens are in
the same image block);
sliding, decode: the ring after the write, slots with positions in (qp - window, qp].
Rows beyond seq_lens produce values that nobody reads.  Does not project, normalise or apply o_proj.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DOMAIN", "INPUTS", "OP", "OUTPUTS", "VERSION", "attributes", "inv_freq", "reference"]

DOMAIN = "gemma4"
OP = "FusedAttention"
VERSION = "1"
INPUTS = ("q", "k", "v", "past_key", "past_value", "past_lens", "seq_lens", "image_block")
OUTPUTS = ("out", "present_key", "present_value")


def attributes(text_cfg, layer: int, *, decode: bool) -> dict:
    """The node attributes for ``layer`` of a `exporter.config.TextConfig`."""
    sliding = text_cfg.is_sliding(layer)
    d = text_cfg.layer_head_dim(layer)
    fraction = 1.0 if sliding else text_cfg.full_partial_rotary_factor
    return {
        "mode": int(decode),
        "sliding": int(sliding),
        "window": int(text_cfg.sliding_window),
        "num_heads": int(text_cfg.num_heads),
        "num_kv_heads": int(text_cfg.layer_kv_heads(layer)),
        "head_dim": int(d),
        "rotary_dim": 2 * int(fraction * d // 2),
        "rope_theta": float(text_cfg.sliding_rope_theta if sliding else text_cfg.full_rope_theta),
        "scale": 1.0,
        "plugin_namespace": DOMAIN,
        "plugin_version": VERSION,
    }


def inv_freq(head_dim: int, rotary_dim: int, theta: float) -> np.ndarray:
    """(head_dim / 2,) float32, as the reference computes it (float32 pow of int64 steps / head_dim)."""
    steps = np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(theta), steps)).astype(np.float32)
    return np.concatenate([inv, np.zeros(head_dim // 2 - rotary_dim // 2, np.float32)])


def _rope(x: np.ndarray, pos: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """x (B, S, H, D), pos (B, S)."""
    ang = pos[..., None].astype(np.float32) * freqs  # (B, S, D/2)
    emb = np.concatenate([ang, ang], -1)
    cos, sin = np.cos(emb)[:, :, None], np.sin(emb)[:, :, None]
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def _ring_positions(last: np.ndarray, ring: int) -> np.ndarray:
    slots = np.arange(ring)
    return last[:, None] - np.mod(last[:, None] - slots, ring)


def reference(q, k, v, past_key, past_value, past_lens, seq_lens, image_block, *, mode, sliding, window, num_heads,
              num_kv_heads, head_dim, rotary_dim, rope_theta, scale=1.0, **_):
    """The contract in numpy (float32 in, float32 out): returns (out, present_key, present_value)."""
    q, k, v = (np.asarray(a, np.float32) for a in (q, k, v))
    past_key, past_value = np.asarray(past_key, np.float32), np.asarray(past_value, np.float32)
    past_lens, seq_lens = np.asarray(past_lens, np.int64), np.asarray(seq_lens, np.int64)
    b, s = q.shape[:2]
    t = past_key.shape[2]
    pos = past_lens[:, None] + np.arange(s)  # (B, S)
    freqs = inv_freq(head_dim, rotary_dim, rope_theta)
    q = _rope(q, pos, freqs).transpose(0, 2, 1, 3)  # (B, H, S, D)
    k = _rope(k, pos, freqs).transpose(0, 2, 1, 3)  # (B, Hkv, S, D)
    v = v.transpose(0, 2, 1, 3)
    qp = pos[:, :, None]
    if mode == 1 or not sliding:  # scatter the new tokens at their slots
        slots = pos % t if sliding else pos
        if not sliding and slots.max(initial=0) >= t:
            raise IndexError(f"FusedAttention: write at position {int(slots.max())} past the cache length {t}")
        present_k, present_v = past_key.copy(), past_value.copy()
        for bi in range(b):
            present_k[bi][:, slots[bi]] = k[bi]
            present_v[bi][:, slots[bi]] = v[bi]
        k_all, v_all = present_k, present_v
        if sliding:
            kp = _ring_positions(past_lens, t)[:, None, :]  # (B, 1, T)
            allowed = (kp >= 0) & (kp > qp - window) & (kp <= qp)
        else:
            allowed = np.arange(t)[None, None, :] <= qp
    else:  # sliding prefill: [ring before, new tokens]; rebuild the ring
        ring_pos = _ring_positions(past_lens - 1, t)  # (B, T)
        valid = np.arange(s)[None] < seq_lens[:, None]
        k_pos = np.concatenate([ring_pos, pos], 1)[:, None, :]
        k_ok = np.concatenate([ring_pos >= 0, valid], 1)[:, None, :]
        blk = np.asarray(image_block, np.int64)
        k_blk = np.concatenate([np.full_like(ring_pos, -1), blk], 1)[:, None, :]
        same = (blk[:, :, None] == k_blk) & (blk[:, :, None] >= 0)
        allowed = k_ok & (k_pos > qp - window) & ((k_pos <= qp) | same)
        k_all, v_all = np.concatenate([past_key, k], 2), np.concatenate([past_value, v], 2)
        newest = _ring_positions(past_lens + seq_lens - 1, t)
        idx = newest - past_lens[:, None]  # index into the new tokens, < 0: keep the old slot
        present_k, present_v = past_key.copy(), past_value.copy()
        for bi in range(b):
            take = idx[bi] >= 0
            present_k[bi][:, take] = k[bi][:, idx[bi][take]]
            present_v[bi][:, take] = v[bi][:, idx[bi][take]]
    groups = num_heads // num_kv_heads
    qg = q.reshape(b, num_kv_heads, groups, s, head_dim)
    scores = scale * np.einsum("bhgsd,bhtd->bhgst", qg, k_all)
    scores = np.where(allowed[:, None, None], scores, np.finfo(np.float32).min)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhgst,bhtd->bhgsd", probs, v_all).reshape(b, num_heads, s, head_dim)
    out = out.transpose(0, 2, 1, 3).reshape(b, s, num_heads * head_dim).astype(np.float32)
    return out, present_k.astype(np.float32), present_v.astype(np.float32)
