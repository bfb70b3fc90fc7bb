"""Triton kernels for ``gemma4::FusedAttention`` (contract: `plugins.fused_attention`).

* decode (one new token per sequence; memory-bound): one program per (sequence, KV head) serves all the query
  heads of that KV head, so every cache byte is read once.  The new token's K/V are RoPE'd and written into their
  slot (ring slot ``pos % window`` or ``pos``) in place; its score is taken from registers, the cache loop skips that
  slot (no read-after-write on the same program's store).  Online softmax over blocks of slots.  A prefill call
  of one token per sequence runs this kernel too (a sliding row with seq_lens 0 writes nothing, as in prefill).
* prefill: ``_rope_kv`` RoPE's the new keys (and lays out K/V as (B, Hkv, S, D)); ``_write_full`` scatters them
  into a full layer's buffer in place before the attention; ``_prefill_attn`` (one program per block of queries,
  query head and sequence) attends over the full buffer up to the block's last position, or over [ring as it was,
  new tokens] with the window, validity and image-block masks of the contract; then ``_ring_write`` writes a
  sliding layer's newest tokens into its ring in place (each slot once, even when a prefill brings more tokens
  than the ring holds).  Every cache is updated in place, so one TensorRT engine serves prefill and decode (every
  present_* aliases its past_*).

Robustness (TensorRT times tactics on garbage inputs): every index read from a tensor (past_lens, seq_lens,
positions) is clamped or masked, so no value makes a kernel read or write outside its buffers or loop longer than
the buffer it walks.  Token counts sit on grid axis 0 (2^31 - 1; axes 1 and 2 stop at 65535) and row offsets are
64-bit.  RoPE frequencies come from the host (``inv_freq``, the exporter's float32 values): no in-kernel ``exp2``
(an approximate instruction on GPUs).  ``precision="ieee"`` (default) makes ``tl.dot`` exact fp32 (what the
token-exact tests need); ``"tf32"`` is for speed runs.  fp32 accumulation; inputs fp32/fp16/bf16.
Runs on the GPU, or on the CPU under ``TRITON_INTERPRET=1`` (how CI tests it against the numpy reference).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["PRECISIONS", "decode_launch", "fused_attention", "prefill_launch"]

NEG = tl.constexpr(-1.0e30)
PRECISIONS = ("ieee", "tf32")


@triton.jit
def _mod(x, n):
    """Python's (non-negative) modulo; Triton's % keeps the dividend's sign."""
    r = x % n
    return tl.where(r < 0, r + n, r)


@triton.jit
def _qk(a, b, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """a (M, K) @ b (N, K)^T; tl.dot needs M, N, K >= 16 on GPUs, small GQA groups use a reduction."""
    if USE_DOT:
        if IEEE:
            return tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            return tl.dot(a, tl.trans(b), input_precision="tf32")
    else:
        return tl.sum(a[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _pv(p, v, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """p (M, N) @ v (N, K)."""
    if USE_DOT:
        if IEEE:
            return tl.dot(p, v, input_precision="ieee")
        else:
            return tl.dot(p, v, input_precision="tf32")
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
    q, k, v, kc, vc, past_lens, seq_lens, inv_freq, out,
    T, WINDOW, scale,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    SLIDING: tl.constexpr, BLOCK_T: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    pos = tl.load(past_lens + b)
    offs_g = tl.arange(0, G)
    offs_h = tl.arange(0, HALF)
    inv = tl.load(inv_freq + offs_h)
    # q (B, 1, H, D): the G heads of KV head h
    q_base = q + (b * H + h * G + offs_g[:, None]) * HEAD_DIM
    q1, q2 = _rope_halves(tl.load(q_base + offs_h[None, :]).to(tl.float32),
                          tl.load(q_base + HALF + offs_h[None, :]).to(tl.float32), pos, inv[None, :])
    kv_base = (b * HKV + h) * HEAD_DIM
    k1, k2 = _rope_halves(tl.load(k + kv_base + offs_h).to(tl.float32),
                          tl.load(k + kv_base + HALF + offs_h).to(tl.float32), pos, inv)
    v1 = tl.load(v + kv_base + offs_h).to(tl.float32)
    v2 = tl.load(v + kv_base + HALF + offs_h).to(tl.float32)
    if SLIDING:  # a row without a valid new token (seq_lens 0, in a one-token prefill) keeps its ring, as in prefill
        slot = _mod(pos, T)
        hi = T
        w_ok = (tl.zeros([HALF], tl.int64) + tl.load(seq_lens + b)) > 0  # a tensor: the interpreter's & needs it
    else:  # a position outside the buffer writes nothing; slots [0, pos) hold positions [0, pos)
        slot = tl.minimum(tl.maximum(pos, 0), T - 1)  # (prefill writes padding rows' keys too: slots past the end)
        hi = tl.minimum(tl.maximum(pos, 0), T)
        pos_h = tl.zeros([HALF], tl.int64) + pos  # a tensor, not a scalar: the interpreter's & needs it
        w_ok = (pos_h >= 0) & (pos_h < T)
    cache_row = ((b * HKV + h) * T + slot) * HEAD_DIM
    tl.store(kc + cache_row + offs_h, k1.to(kc.dtype.element_ty), mask=w_ok)
    tl.store(kc + cache_row + HALF + offs_h, k2.to(kc.dtype.element_ty), mask=w_ok)
    tl.store(vc + cache_row + offs_h, v1.to(vc.dtype.element_ty), mask=w_ok)
    tl.store(vc + cache_row + HALF + offs_h, v2.to(vc.dtype.element_ty), mask=w_ok)
    # the new token first (from registers), then the cache without its slot
    m = tl.sum(q1 * k1[None, :] + q2 * k2[None, :], axis=1) * scale  # (G,)
    l_sum = tl.full([G], 1.0, tl.float32)
    acc1 = tl.broadcast_to(v1[None, :], [G, HALF])
    acc2 = tl.broadcast_to(v2[None, :], [G, HALF])
    for start in range(0, hi, BLOCK_T):
        offs_t = start + tl.arange(0, BLOCK_T)
        if SLIDING:
            kpos = pos - _mod(pos - offs_t, T)  # the position each ring slot holds after the write
            ok = (offs_t < T) & (kpos >= 0) & (kpos > pos - WINDOW) & (kpos < pos)
        else:
            ok = offs_t < hi
        rows = ((b * HKV + h) * T + offs_t[:, None]) * HEAD_DIM
        acc1, acc2, m, l_sum = _attend_block(acc1, acc2, m, l_sum, q1, q2, kc, vc, rows, ok, ok[None, :], offs_h,
                                             scale, HALF, USE_DOT, IEEE)  # all G query heads of this KV head
    o_base = out + (b * H + h * G + offs_g[:, None]) * HEAD_DIM
    tl.store(o_base + offs_h[None, :], (acc1 / l_sum[:, None]).to(out.dtype.element_ty))
    tl.store(o_base + HALF + offs_h[None, :], (acc2 / l_sum[:, None]).to(out.dtype.element_ty))


@triton.jit
def _rope_kv(k, v, past_lens, inv_freq, k_out, v_out, S, HKV: tl.constexpr, HEAD_DIM: tl.constexpr,
             HALF: tl.constexpr):
    """k, v (B, S, Hkv, D) -> RoPE'd k and v as (B, Hkv, S, D).  One program per (token, b, kv head)."""
    i, b, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs_h = tl.arange(0, HALF)
    pos = tl.load(past_lens + b) + i
    src = ((b * S + i) * HKV + h) * HEAD_DIM
    dst = ((b * HKV + h) * S + i) * HEAD_DIM
    inv = tl.load(inv_freq + offs_h)
    k1, k2 = _rope_halves(tl.load(k + src + offs_h).to(tl.float32), tl.load(k + src + HALF + offs_h).to(tl.float32),
                          pos, inv)
    tl.store(k_out + dst + offs_h, k1.to(k_out.dtype.element_ty))
    tl.store(k_out + dst + HALF + offs_h, k2.to(k_out.dtype.element_ty))
    tl.store(v_out + dst + offs_h, tl.load(v + src + offs_h))
    tl.store(v_out + dst + HALF + offs_h, tl.load(v + src + HALF + offs_h))


@triton.jit
def _write_full(k_new, v_new, kc, vc, past_lens, S, T, HKV: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Scatter (B, Hkv, S, D) new tokens into a full layer's (B, Hkv, T, D) buffer at past_lens, in place; a slot
    outside [0, T) is not written."""
    i, b, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs = tl.arange(0, HEAD_DIM)
    slot = tl.load(past_lens + b) + i
    slot_d = tl.zeros([HEAD_DIM], tl.int64) + slot  # a tensor, not a scalar: the interpreter's & needs it
    ok = (slot_d >= 0) & (slot_d < T)
    slot = tl.minimum(tl.maximum(slot, 0), T - 1)
    src = ((b * HKV + h) * S + i) * HEAD_DIM
    dst = ((b * HKV + h) * T + slot) * HEAD_DIM
    tl.store(kc + dst + offs, tl.load(k_new + src + offs), mask=ok)
    tl.store(vc + dst + offs, tl.load(v_new + src + offs), mask=ok)


@triton.jit
def _ring_write(k_new, v_new, kc, vc, past_lens, seq_lens, S, T, HKV: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Write a sliding layer's new tokens into its (B, Hkv, T, D) ring in place, after the attention has read the
    ring as it was: each slot whose newest position after this call is a new token takes it, the others are left.
    One program per (slot, b, kv head), so a prefill longer than the ring writes each slot once (its newest token).
    A token index outside [0, S) (garbage lengths) writes nothing."""
    j, b, h = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs = tl.arange(0, HEAD_DIM)
    past = tl.load(past_lens + b)
    last = past + tl.load(seq_lens + b) - 1
    newest = last - _mod(last - j, T)
    idx = newest - past
    dst = ((b * HKV + h) * T + j) * HEAD_DIM
    src = ((b * HKV + h) * S + tl.minimum(tl.maximum(idx, 0), S - 1)) * HEAD_DIM
    idx_d = tl.zeros([HEAD_DIM], tl.int64) + idx  # a tensor, not a scalar: the interpreter's & needs it
    new = (idx_d >= 0) & (idx_d < S)
    tl.store(kc + dst + offs, tl.load(k_new + src + offs, mask=new, other=0.0), mask=new)
    tl.store(vc + dst + offs, tl.load(v_new + src + offs, mask=new, other=0.0), mask=new)


@triton.jit
def _attend_block(acc1, acc2, m, l_sum, q1, q2, k_ptr, v_ptr, rows, row_ok, ok, offs_h, scale, HALF: tl.constexpr,
                  USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over a block of keys; ``row_ok`` (N,) which key rows exist, ``ok`` (M, N) the mask."""
    kb1 = tl.load(k_ptr + rows + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    kb2 = tl.load(k_ptr + rows + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    s = (_qk(q1, kb1, USE_DOT, IEEE) + _qk(q2, kb2, USE_DOT, IEEE)) * scale  # (M, N)
    s = tl.where(ok, s, NEG)
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.0)
    vb1 = tl.load(v_ptr + rows + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    vb2 = tl.load(v_ptr + rows + HALF + offs_h[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    acc1 = acc1 * alpha[:, None] + _pv(p, vb1, USE_DOT, IEEE)
    acc2 = acc2 * alpha[:, None] + _pv(p, vb2, USE_DOT, IEEE)
    return acc1, acc2, m_new, l_sum


@triton.jit
def _prefill_attn(
    q, k_new, v_new, kc, vc, past_lens, seq_lens, block, inv_freq, out,
    S, T, WINDOW, scale,
    H: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    SLIDING: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    """q (B, S, H, D) raw; k_new/v_new (B, Hkv, S, D) RoPE'd; kc/vc: the full buffer after the write, or the ring
    before it.  One program per (block of queries, query head, b)."""
    mb, hq, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    h = hq // G
    past = tl.load(past_lens + b)
    n_valid = tl.minimum(tl.load(seq_lens + b), S)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    m_ok = offs_m < S
    qpos = past + offs_m
    inv = tl.load(inv_freq + offs_h)
    q_rows = ((b * S + offs_m[:, None]) * H + hq) * HEAD_DIM  # int64 (b is): S * H * D passes 2^31 at 12B shapes
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
                                                 scale, HALF, USE_DOT, IEEE)
    else:
        qblk = tl.load(block + b * S + offs_m, mask=m_ok, other=-1)
        for start in range(0, T, BLOCK_N):  # the ring before this prefill
            offs_n = start + tl.arange(0, BLOCK_N)
            kpos = (past - 1) - _mod(past - 1 - offs_n, T)
            row_ok = (offs_n < T) & (kpos >= 0)
            ok = row_ok[None, :] & (kpos[None, :] > qpos[:, None] - WINDOW) & m_ok[:, None]
            rows = ((b * HKV + h) * T + offs_n[:, None]) * HEAD_DIM
            acc1, acc2, m, l_sum = _attend_block(acc1, acc2, m, l_sum, q1, q2, kc, vc, rows, row_ok, ok, offs_h,
                                                 scale, HALF, USE_DOT, IEEE)
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
                                                 offs_h, scale, HALF, USE_DOT, IEEE)
    l_sum = tl.where(l_sum > 0, l_sum, 1.0)
    o_rows = ((b * S + offs_m[:, None]) * H + hq) * HEAD_DIM
    tl.store(out + o_rows + offs_h[None, :], (acc1 / l_sum[:, None]).to(out.dtype.element_ty), mask=m_ok[:, None])
    tl.store(out + o_rows + HALF + offs_h[None, :], (acc2 / l_sum[:, None]).to(out.dtype.element_ty),
             mask=m_ok[:, None])


def decode_launch(num_heads: int, num_kv_heads: int, head_dim: int, block_n: int | None = None) -> dict:
    """Block size, warps and whether ``tl.dot`` is used, for the decode kernel at these head sizes (what
    `fused_attention` launches and `bench/triton_resources.py` compiles)."""
    g, half = num_heads // num_kv_heads, head_dim // 2
    block_t = block_n or (16 if g * half <= 2048 else 16)
    warps = 4 if g * half <= 1024 else 8
    return {"BLOCK_T": block_t, "USE_DOT": g >= 16 and half >= 16 and block_t >= 16, "num_warps": warps}


def prefill_launch(head_dim: int, block_m: int | None = None, block_n: int | None = None) -> dict:
    """Query/key block sizes, warps and ``tl.dot`` use of the prefill attention kernel at this head size."""
    half = head_dim // 2
    bm, bn = block_m or 16, block_n or 16
    return {"BLOCK_M": bm, "BLOCK_N": bn, "USE_DOT": half >= 16 and bm >= 16 and bn >= 16,
            "num_warps": 4 if half <= 64 else 8}


def fused_attention(q, k, v, past_key, past_value, past_lens, seq_lens, image_block, *, mode, sliding, window,
                    num_heads, num_kv_heads, head_dim, rotary_dim, rope_theta, scale=1.0, inv_freq=None, out=None,
                    present_key=None, present_value=None, precision="ieee", block_m=None, block_n=None, **_):
    """Torch tensors in (contiguous; on the GPU, or CPU under TRITON_INTERPRET=1), (out, present_k, present_v) out.

    ``inv_freq`` (head_dim / 2,) float32 on the device: the RoPE frequencies (`plugins.fused_attention.inv_freq`,
    computed here when not given).  ``out``/``present_*``: buffers to write (TensorRT's outputs); by default ``out`` is
    new and the presents are ``past_*`` updated in place, in every mode (a sliding prefill writes its ring after
    the attention has read it).  A ``present_*`` that is not ``past_*`` (TensorRT did not alias them) receives a
    copy of the past and is updated instead: the past buffers are then only read.

    One new token per sequence (decode, or a prefill call of one token: how one engine serves both) runs the decode
    kernel; its result is the prefill's at S = 1 (the sliding ring after the write holds the same window of keys;
    a sliding row with ``seq_lens`` 0 keeps its ring, a full layer writes the padding token past the end, as in
    prefill)."""
    import torch

    from plugins.fused_attention import inv_freq as host_inv_freq

    if precision not in PRECISIONS:
        raise ValueError(f"FusedAttention: precision {precision!r}, expected one of {PRECISIONS}")
    ieee = precision == "ieee"
    b, s = q.shape[:2]
    t = past_key.shape[2]
    g = num_heads // num_kv_heads
    half = head_dim // 2
    if inv_freq is None:
        inv_freq = torch.from_numpy(host_inv_freq(head_dim, rotary_dim, rope_theta)).to(q.device)
    if out is None:
        out = torch.empty((b, s, num_heads, head_dim), dtype=q.dtype, device=q.device)
    caches = []
    for past, present in ((past_key, present_key), (past_value, present_value)):
        if present is not None and present.data_ptr() != past.data_ptr():
            present.copy_(past)
            past = present
        caches.append(past)
    past_key, past_value = caches
    if mode == 1 or s == 1:
        launch = decode_launch(num_heads, num_kv_heads, head_dim, block_n)
        _decode_kernel[(b, num_kv_heads)](
            q, k, v, past_key, past_value, past_lens, seq_lens, inv_freq, out, t, window, scale, H=num_heads,
            HKV=num_kv_heads, G=g, HEAD_DIM=head_dim, HALF=half, SLIDING=bool(sliding), IEEE=ieee, **launch,
        )
        return out.reshape(b, s, num_heads * head_dim), past_key, past_value
    k_rot = torch.empty((b, num_kv_heads, s, head_dim), dtype=past_key.dtype, device=q.device)
    v_t = torch.empty_like(k_rot)
    _rope_kv[(s, b, num_kv_heads)](k, v, past_lens, inv_freq, k_rot, v_t, s, HKV=num_kv_heads, HEAD_DIM=head_dim,
                                  HALF=half)
    if not sliding:  # the attention reads the buffer after the write
        _write_full[(s, b, num_kv_heads)](k_rot, v_t, past_key, past_value, past_lens, s, t, HKV=num_kv_heads,
                                         HEAD_DIM=head_dim)
    launch = prefill_launch(head_dim, block_m, block_n)
    grid = (triton.cdiv(s, launch["BLOCK_M"]), num_heads, b)
    _prefill_attn[grid](
        q, k_rot, v_t, past_key, past_value, past_lens, seq_lens, image_block, inv_freq, out, s, t, window, scale,
        H=num_heads, HKV=num_kv_heads, G=g, HEAD_DIM=head_dim, HALF=half, SLIDING=bool(sliding), IEEE=ieee, **launch,
    )
    if sliding:  # the attention read the ring before the write; the same stream orders this after it
        _ring_write[(t, b, num_kv_heads)](k_rot, v_t, past_key, past_value, past_lens, seq_lens, s, t,
                                         HKV=num_kv_heads, HEAD_DIM=head_dim)
    return out.reshape(b, s, num_heads * head_dim), past_key, past_value
