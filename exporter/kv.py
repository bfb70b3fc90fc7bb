"""KV-cache writes and cache-slot positions, as explicit tensor functions.

Two cache kinds exist per layer type:

* full layers keep every position: slot ``j`` holds position ``j``; new K/V are written at ``past_len`` with
  ONNX ``TensorScatter`` (mode ``linear``), which ONNX Runtime and TensorRT update in place;
* sliding layers keep a ring buffer of ``R`` slots (``R`` = the window, or the window + K + 1 for speculative
  decoding of K draft tokens, so rejected writes can be taken back): position ``p`` lives in slot ``p % R``.
  Decode writes one token with ``TensorScatter`` (mode ``circular``), in place. Prefill may bring more new tokens
  than the ring holds, and padded rows in a batch must not overwrite live entries, so prefill rebuilds the ring
  with a gather/where (each slot takes the newest valid token that maps to it, or keeps its old value).

This module does not compute attention or masks; see `exporter.model`.
"""

from __future__ import annotations

import torch

__all__ = ["ring_positions", "ring_write_prefill", "tensor_scatter"]


def tensor_scatter(cache: torch.Tensor, update: torch.Tensor, write_pos: torch.Tensor, *, circular: bool) -> torch.Tensor:
    """ONNX ``TensorScatter`` along axis 2: ``cache`` (B, H, L, D), ``update`` (B, H, S, D), ``write_pos`` (B,)."""
    if torch.onnx.is_in_onnx_export():
        return torch.onnx.ops.symbolic(
            "TensorScatter",
            (cache, update, write_pos),
            {"mode": "circular" if circular else "linear", "axis": 2},
            dtype=cache.dtype,
            shape=cache.shape,
            version=24,
        )
    b, h, length, d = cache.shape
    s = update.shape[2]
    idx = write_pos.long()[:, None] + torch.arange(s, device=cache.device)  # (B, S)
    if circular:
        idx = idx % length
    elif s and int(idx.max()) >= length:
        raise IndexError(f"cache write at position {int(idx.max())} past the cache length {length}")
    index = idx[:, None, :, None].expand(b, h, s, d)
    return cache.scatter(2, index, update)


def ring_positions(last_pos: torch.Tensor, ring: int) -> torch.Tensor:
    """Position held by each ring slot when ``last_pos`` (B,) is the newest written; negative means empty.

    Slot ``j`` holds the largest ``p <= last_pos`` with ``p % ring == j``.  Returns (B, ring) int64.
    """
    slots = torch.arange(ring, device=last_pos.device)
    last = last_pos[:, None]
    return last - torch.remainder(last - slots, ring)


def ring_write_prefill(
    ring_cache: torch.Tensor, new: torch.Tensor, past_lens: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """Write the valid new tokens of each sequence into its ring buffer.

    ``ring_cache`` (B, H, R, D) holds positions < past_lens; ``new`` (B, H, S, D) holds positions
    ``past_lens + i`` of which the first ``seq_lens`` are valid.
    """
    b, h, r, d = ring_cache.shape
    s = new.shape[2]
    newest = ring_positions(past_lens + seq_lens - 1, r)  # (B, R)
    idx = newest - past_lens[:, None]  # index into new tokens; < 0 means the slot keeps its old value
    take_new = idx >= 0
    gather_idx = idx.clamp(0, max(s - 1, 0))
    picked = torch.gather(new, 2, gather_idx[:, None, :, None].expand(b, h, r, d))  # (B, H, R, D)
    return torch.where(take_new[:, None, :, None], picked, ring_cache)
