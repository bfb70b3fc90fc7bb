"""Triton kernels for ``gemma4::FusedAttention`` (contract: `plugins.fused_attention`).

* decode (one new token per sequence; memory-bound): one program per (sequence, KV head) serves all the query
  heads of that KV head, so every cache byte is read once.  The new token's K/V are RoPE'd and written into their
  slot (ring slot ``pos % window`` or ``pos``) in place; its score is taken from registers, the cache loop skips that
  slot (no read-after-write on the same program's store).  Online softmax over blocks of slots.
* prefill: ``_rope_kv`` RoPE's the new keys (and lays out K/V as (B, Hkv, S, D)); ``_write_full`` scatters them
  into a full layer's buffer in place, or ``_ring_rebuild`` writes a sliding layer's new ring (out of place: a
  prefill may bring more tokens than the ring holds); ``_prefill_attn`` (one program per sequence, query head and
  block of queries) attends over the full buffer up to the block's last position, or over [old ring, new tokens]
  with the window, validity and image-block masks of the contract.
RoPE frequencies are computed in-kernel from the attributes.  fp32 accumulation; inputs fp32/fp16/bf16.
Runs on the GPU, or on the CPU under ``TRITON_INTERPRET=1`` (how CI tests it against the numpy reference).
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

__all__ = ["fused_attention"]

NEG = -1.0e30


@triton.jit
def _inv_freq(offs_half, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, LOG2_THETA: tl.constexpr):
    inv = tl.exp2(-(2.0 * offs_half.to(tl.float32) / HEAD_DIM) * LOG2_THETA)
    return tl.where(2 * offs_half < ROTARY_DIM, inv, 0.0)


@triton.jit
def _mod(x, n):
    """Python's (non-negative) modulo; Triton's % keeps the dividend's sign."""
    r = x % n
    return tl.where(r < 0, r + n, r)


@triton.jit
def _qk(a, b, USE_DOT: tl.constexpr):
    """a (M, K) @ b (N, K)^T; tl.dot needs M, N, K >= 16 on GPUs, small GQA groups use a reduction."""
    if USE_DOT:
        return tl.dot(a, tl.trans(b))
    else:
        return tl.sum(a[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _pv(p, v, USE_DOT: tl.constexpr):
    """p (M, N) @ v (N, K)."""
    if USE_DOT:
        return tl.dot(p, v)
    else:
        return tl.sum(p[:, :, None] * v[None, :, :], axis=1)


@triton.jit
def _rope_halves(x1, x2, pos, inv):
    """x1, x2 (..., D/2) halves; pos broadcastable to (..., 1); returns the rotated halves."""
    ang = pos.to(tl.float32) * inv
    c, s = tl.cos(ang), tl.sin(ang)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _decode_kernel(
    q, k, v, kc, vc, past_lens, out,
    T, WINDOW, scale,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    ROTARY_DIM: tl.constexpr, LOG2_THETA: tl.constexpr, SLIDING: tl.constexpr, BLOCK_T: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    b, h = tl.program_id(0), tl.program_id(1)
    pos = tl.load(past_lens + b)
    offs_g = tl.arange(0, G)
    offs_h = tl.arange(0, HALF)
    inv = _inv_freq(offs_h, HEAD_DIM, ROTARY_DIM, LOG2_THETA)
    # q (B, 1, H, D): the G heads of KV head h
    q_base = q + (b * H + h * G + offs_g[:, None]) * HEAD_DIM
    q1, q2 = _rope_halves(tl.load(q_base + offs_h[None, :]).to(tl.float32),
                          tl.load(q_base + HALF + offs_h[None, :]).to(tl.float32), pos, inv[None, :])
    kv_base = (b * HKV + h) * HEAD_DIM
    k1, k2 = _rope_halves(tl.load(k + kv_base + offs_h).to(tl.float32),
                          tl.load(k + kv_base + HALF + offs_h).to(tl.float32), pos, inv)
    v1 = tl.load(v + kv_base + offs_h).to(tl.float32)
    v2 = tl.load(v + kv_base + HALF + offs_h).to(tl.float32)
    slot = pos % T if SLIDING else pos
    cache_row = ((b * HKV + h) * T + slot) * HEAD_DIM
    tl.store(kc + cache_row + offs_h, k1.to(kc.dtype.element_ty))
    tl.store(kc + cache_row + HALF + offs_h, k2.to(kc.dtype.element_ty))
    tl.store(vc + cache_row + offs_h, v1.to(vc.dtype.element_ty))
    tl.store(vc + cache_row + HALF + offs_h, v2.to(vc.dtype.element_ty))
    # the new token first (from registers), then the cache without its slot
    m = tl.sum(q1 * k1[None, :] + q2 * k2[None, :], axis=1) * scale  # (G,)
    l_sum = tl.full([G], 1.0, tl.float32)
    acc1 = tl.broadcast_to(v1[None, :], [G, HALF])
    acc2 = tl.broadcast_to(v2[None, :], [G, HALF])
    lo = 0
    if not SLIDING:
        hi = pos  # slots [0, pos) hold positions [0, pos)
    else:
        hi = T
    for start in range(lo, hi, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        if SLIDING:
            kpos = pos - _mod(pos - offs_t, T)  # the position each ring slot holds after the write
            ok = (offs_t < T) & (kpos >= 0) & (kpos > pos - WINDOW) & (kpos < pos)
        else:
            ok = offs_t < hi
        rows = ((b * HKV + h) * T + offs_t[:, None]) * HEAD_DIM
        acc1, acc2, m, l_sum = _attend_block(acc1, acc2, m, l_sum, q1, q2, kc, vc, rows, ok, ok[None, :], offs_h,
                                             scale, HALF, USE_DOT)  # all G query heads of this KV head
    o_base = out + (b * H + h * G + offs_g[:, None]) * HEAD_DIM
    tl.store(o_base + offs_h[None, :], (acc1 / l_sum[:, None]).to(out.dtype.element_ty))
    tl.store(o_base + HALF + offs_h[None, :], (acc2 / l_sum[:, None]).to(out.dtype.element_ty))


@triton.jit
def _rope_kv(k, v, past_lens, k_out, v_out, S, HKV: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
             ROTARY_DIM: tl.constexpr, LOG2_THETA: tl.constexpr):
    """k, v (B, S, Hkv, D) -> RoPE'd k and v as (B, Hkv, S, D).  One program per (b, token, kv head)."""
    b, i, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_h = tl.arange(0, HALF)
    pos = tl.load(past_lens + b) + i
    src = ((b * S + i) * HKV + h) * HEAD_DIM
    dst = ((b * HKV + h) * S + i) * HEAD_DIM
    inv = _inv_freq(offs_h, HEAD_DIM, ROTARY_DIM, LOG2_THETA)
    k1, k2 = _rope_halves(tl.load(k + src + offs_h).to(tl.float32), tl.load(k + src + HALF + offs_h).to(tl.float32),
                          pos, inv)
    tl.store(k_out + dst + offs_h, k1.to(k_out.dtype.element_ty))
    tl.store(k_out + dst + HALF + offs_h, k2.to(k_out.dtype.element_ty))
    tl.store(v_out + dst + offs_h, tl.load(v + src + offs_h))
    tl.store(v_out + dst + HALF + offs_h, tl.load(v + src + HALF + offs_h))


@triton.jit
def _write_full(k_new, v_new, kc, vc, past_lens, S, T, HKV: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Scatter (B, Hkv, S, D) new tokens into a full layer's (B, Hkv, T, D) buffer at past_lens, in place."""
    b, i, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = tl.arange(0, HEAD_DIM)
    slot = tl.load(past_lens + b) + i
    src = ((b * HKV + h) * S + i) * HEAD_DIM
    dst = ((b * HKV + h) * T + slot) * HEAD_DIM
    ok = (tl.zeros([HEAD_DIM], tl.int64) + slot) < T
    tl.store(kc + dst + offs, tl.load(k_new + src + offs), mask=ok)
    tl.store(vc + dst + offs, tl.load(v_new + src + offs), mask=ok)


@triton.jit
def _ring_rebuild(k_new, v_new, kc, vc, k_out, v_out, past_lens, seq_lens, S, T, HKV: tl.constexpr,
                  HEAD_DIM: tl.constexpr):
    """New ring (B, Hkv, T, D): each slot takes the newest valid new token that maps to it, else its old value."""
    b, j, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = tl.arange(0, HEAD_DIM)
    past = tl.load(past_lens + b)
    last = past + tl.load(seq_lens + b) - 1
    newest = last - _mod(last - j, T)
    idx = newest - past
    dst = ((b * HKV + h) * T + j) * HEAD_DIM
    if idx >= 0:
        src = ((b * HKV + h) * S + idx) * HEAD_DIM
        tl.store(k_out + dst + offs, tl.load(k_new + src + offs))
        tl.store(v_out + dst + offs, tl.load(v_new + src + offs))
    else:
        tl.store(k_out + dst + offs, tl.load(kc + dst + offs))
        tl.store(v_out + dst + offs, tl.load(vc + dst + offs))


@triton.jit
def _attend_block(acc1, acc2, m, l_sum, q1, q2, k_ptr, v_ptr, rows, row_ok, ok, offs_h, scale, HALF: tl.constexpr,
                  USE_DOT: tl.constexpr):
    """One online-softmax step over a block of keys; ``row_ok`` (N,) which key rows exist, ``ok`` (M, N) the mask."""
    kb1 = tl.load(k_ptr + rows + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    kb2 = tl.load(k_ptr + rows + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    s = (_qk(q1, kb1, USE_DOT) + _qk(q2, kb2, USE_DOT)) * scale  # (M, N)
    s = tl.where(ok, s, NEG)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
    vb1 = tl.load(v_ptr + rows + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    vb2 = tl.load(v_ptr + rows + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    acc1 = acc1 * alpha[:, None] + _pv(p, vb1, USE_DOT)
    acc2 = acc2 * alpha[:, None] + _pv(p, vb2, USE_DOT)
    return acc1, acc2, m_new, l_sum


@triton.jit
def _prefill_attn(
    q, k_new, v_new, kc, vc, past_lens, seq_lens, block, out,
    S, T, WINDOW, scale,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    ROTARY_DIM: tl.constexpr, LOG2_THETA: tl.constexpr, SLIDING: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
):
    """q (B, S, H, D) raw; k_new/v_new (B, Hkv, S, D) RoPE'd; kc/vc: the full buffer after the write, or the ring
    before it.  One program per (b, query head, block of queries)."""
    b, hq, mb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    h = hq // G
    past = tl.load(past_lens + b)
    n_valid = tl.load(seq_lens + b)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    m_ok = offs_m < S
    qpos = past + offs_m
    inv = _inv_freq(offs_h, HEAD_DIM, ROTARY_DIM, LOG2_THETA)
    q_rows = ((b * S + offs_m[:, None]) * H + hq) * HEAD_DIM
    q1, q2 = _rope_halves(tl.load(q + q_rows + offs_h[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32),
                          tl.load(q + q_rows + HALF + offs_h[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32),
                          qpos[:, None], inv[None, :])
    m = tl.full([BLOCK_M], NEG, tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, HALF], tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF], tl.float32)
    if not SLIDING:  # the buffer after the write: slots [0, last query position]
        hi = tl.minimum(past + tl.minimum((mb + 1) * BLOCK_M, S), T)
        for start in range(0, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            row_ok = offs_n < T
            ok = (offs_n[None, :] <= qpos[:, None]) & row_ok[None, :] & m_ok[:, None]
            rows = ((b * HKV + h) * T + offs_n[:, None]) * HEAD_DIM
            acc1, acc2, m, l_sum = _attend_block(acc1, acc2, m, l_sum, q1, q2, kc, vc, rows, row_ok, ok, offs_h,
                                                 scale, HALF, USE_DOT)
    else:
        qblk = tl.load(block + b * S + offs_m, mask=m_ok, other=-1)
        for start in range(0, T, BLOCK_N):  # the ring before this prefill
            offs_n = start + tl.arange(0, BLOCK_N)
            kpos = (past - 1) - _mod(past - 1 - offs_n, T)
            row_ok = (offs_n < T) & (kpos >= 0)
            ok = row_ok[None, :] & (kpos[None, :] > qpos[:, None] - WINDOW) & m_ok[:, None]
            rows = ((b * HKV + h) * T + offs_n[:, None]) * HEAD_DIM
            acc1, acc2, m, l_sum = _attend_block(acc1, acc2, m, l_sum, q1, q2, kc, vc, rows, row_ok, ok, offs_h,
                                                 scale, HALF, USE_DOT)
        for start in range(0, S, BLOCK_N):  # the new tokens (image blocks may look ahead)
            offs_n = start + tl.arange(0, BLOCK_N)
            kpos = past + offs_n
            kblk = tl.load(block + b * S + offs_n, mask=offs_n < S, other=-1)
            same = (qblk[:, None] == kblk[None, :]) & (qblk[:, None] >= 0)
            row_ok = offs_n < n_valid
            ok = row_ok[None, :] & (kpos[None, :] > qpos[:, None] - WINDOW) & m_ok[:, None]
            ok = ok & ((kpos[None, :] <= qpos[:, None]) | same)
            rows = ((b * HKV + h) * S + offs_n[:, None]) * HEAD_DIM
            acc1, acc2, m, l_sum = _attend_block(acc1, acc2, m, l_sum, q1, q2, k_new, v_new, rows, row_ok, ok,
                                                 offs_h, scale, HALF, USE_DOT)
    l_sum = tl.where(l_sum > 0, l_sum, 1.0)
    o_rows = ((b * S + offs_m[:, None]) * H + hq) * HEAD_DIM
    tl.store(out + o_rows + offs_h[None, :], (acc1 / l_sum[:, None]).to(out.dtype.element_ty), mask=m_ok[:, None])
    tl.store(out + o_rows + HALF + offs_h[None, :], (acc2 / l_sum[:, None]).to(out.dtype.element_ty),
             mask=m_ok[:, None])


def fused_attention(q, k, v, past_key, past_value, past_lens, seq_lens, image_block, *, mode, sliding, window,
                    num_heads, num_kv_heads, head_dim, rotary_dim, rope_theta, scale=1.0, block_m=16, block_n=16,
                    **_):
    """Torch tensors in (contiguous; on the GPU, or CPU under TRITON_INTERPRET=1), (out, present_k, present_v) out.
    Full layers and decode update ``past_key``/``past_value`` in place and return them as the presents."""
    import torch

    b, s = q.shape[:2]
    t = past_key.shape[2]
    g = num_heads // num_kv_heads
    half = head_dim // 2
    consts = dict(HEAD_DIM=head_dim, HALF=half, ROTARY_DIM=rotary_dim, LOG2_THETA=math.log2(rope_theta))
    out = torch.empty((b, s, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if mode == 1:
        _decode_kernel[(b, num_kv_heads)](
            q, k, v, past_key, past_value, past_lens, out, t, window, scale, H=num_heads, HKV=num_kv_heads, G=g,
            SLIDING=bool(sliding), BLOCK_T=block_n, USE_DOT=g >= 16 and half >= 16 and block_n >= 16, **consts,
        )
        return out.reshape(b, s, num_heads * head_dim), past_key, past_value
    k_rot = torch.empty((b, num_kv_heads, s, head_dim), dtype=past_key.dtype, device=q.device)
    v_t = torch.empty_like(k_rot)
    _rope_kv[(b, s, num_kv_heads)](k, v, past_lens, k_rot, v_t, s, HKV=num_kv_heads, **consts)
    if sliding:
        present_k, present_v = torch.empty_like(past_key), torch.empty_like(past_value)
        _ring_rebuild[(b, t, num_kv_heads)](k_rot, v_t, past_key, past_value, present_k, present_v, past_lens,
                                           seq_lens, s, t, HKV=num_kv_heads, HEAD_DIM=head_dim)
        keys, values = past_key, past_value  # attention reads the ring before the write
    else:
        _write_full[(b, s, num_kv_heads)](k_rot, v_t, past_key, past_value, past_lens, s, t, HKV=num_kv_heads,
                                         HEAD_DIM=head_dim)
        present_k, present_v = keys, values = past_key, past_value
    grid = (b, num_heads, triton.cdiv(s, block_m))
    _prefill_attn[grid](
        q, k_rot, v_t, keys, values, past_lens, seq_lens, image_block, out, s, t, window, scale, H=num_heads,
        HKV=num_kv_heads, G=g, SLIDING=bool(sliding), BLOCK_M=block_m, BLOCK_N=block_n,
        USE_DOT=half >= 16 and block_m >= 16 and block_n >= 16, **consts,
    )
    return out.reshape(b, s, num_heads * head_dim), present_k, present_v
