"""Triton kernels for ``gemma4::PatchEmbed`` (contract: `plugins.patch_embed`), all in fp32.

Four launches: a row LayerNorm over the 6912 pixel values, a tiled GEMM with bias into the embedding width, a
row kernel doing LayerNorm -> + 2-D position rows (none for padding) -> LayerNorm -> weightless RMSNorm, and the
projection GEMM.  Row kernels run one program per soft token and loop over the row in blocks (two passes: moments,
then normalise); the GEMM takes the weight in nn.Linear layout (out, in), as the checkpoint stores it.
Runs on the GPU, or on the CPU under ``TRITON_INTERPRET=1`` (CI tests it there against the numpy reference).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["LINEAR_BLOCKS", "patch_embed"]


@triton.jit
def _moments(x, base, N, eps, BLOCK: tl.constexpr):
    """Mean and 1/std of row ``x[base:base + N]`` (two passes over blocks)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x + base + offs, mask=offs < N, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / N
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        d = tl.load(x + base + offs, mask=offs < N, other=0.0).to(tl.float32) - mean
        acc += tl.where(offs < N, d * d, 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)


@triton.jit
def _row_layernorm(x, w, b, y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    mean, rstd = _moments(x, base, N, eps, BLOCK)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < N
        v = (tl.load(x + base + offs, mask=m, other=0.0).to(tl.float32) - mean) * rstd
        v = v * tl.load(w + offs, mask=m, other=1.0) + tl.load(b + offs, mask=m, other=0.0)
        tl.store(y + base + offs, v, mask=m)


@triton.jit
def _linear(a, w, bias, c, M, N, K, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """c (M, N) = a (M, K) @ w (N, K)^T (+ bias)."""
    pm, pn = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, K, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        a_blk = tl.load(a + offs_m[:, None] * K + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w_blk = tl.load(w + offs_n[:, None] * K + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0)
        acc += tl.dot(a_blk.to(tl.float32), tl.trans(w_blk.to(tl.float32)), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias + offs_n, mask=offs_n < N, other=0.0)[None, :]
    tl.store(c + offs_m[:, None] * N + offs_n[None, :], acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _position_norms(h, positions, table, w2, b2, wp, bp, y, E, M, ln_eps, rms_eps, BLOCK: tl.constexpr):
    """Per row: LN(h) (w2, b2) -> + table[x, 0] + table[y, 1] (skipped for -1) -> LN (wp, bp) -> RMSNorm.
    A position outside [0, M) (M table rows; -1 is padding, anything else garbage) adds nothing: no read outside
    the table whatever the input holds."""
    row = tl.program_id(0).to(tl.int64)
    base = row * E
    px = tl.load(positions + 2 * row)
    py = tl.load(positions + 2 * row + 1)
    mean, rstd = _moments(h, base, E, ln_eps, BLOCK)
    # write LN1 + positions into y
    for start in range(0, E, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < E
        v = (tl.load(h + base + offs, mask=m, other=0.0) - mean) * rstd * tl.load(w2 + offs, mask=m, other=1.0)
        v += tl.load(b2 + offs, mask=m, other=0.0)
        zero = tl.zeros([BLOCK], tl.int64)
        x_ok = m & (zero + px >= 0) & (zero + px < M)
        y_ok = m & (zero + py >= 0) & (zero + py < M)
        xi, yi = tl.minimum(tl.maximum(px, 0), M - 1), tl.minimum(tl.maximum(py, 0), M - 1)
        v += tl.load(table + (xi * 2) * E + offs, mask=x_ok, other=0.0)
        v += tl.load(table + (yi * 2 + 1) * E + offs, mask=y_ok, other=0.0)
        tl.store(y + base + offs, v, mask=m)
    mean2, rstd2 = _moments(y, base, E, ln_eps, BLOCK)
    # LN2, then the RMS of the result
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, E, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < E
        v = (tl.load(y + base + offs, mask=m, other=0.0) - mean2) * rstd2 * tl.load(wp + offs, mask=m, other=1.0)
        v += tl.load(bp + offs, mask=m, other=0.0)
        tl.store(y + base + offs, v, mask=m)
        acc += tl.where(m, v * v, 0.0)
    rrms = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / E + rms_eps)
    for start in range(0, E, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < E
        tl.store(y + base + offs, tl.load(y + base + offs, mask=m, other=0.0) * rrms, mask=m)


LINEAR_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def patch_embed(patches, positions, ln1_weight, ln1_bias, dense_weight, dense_bias, ln2_weight, ln2_bias, pos_table,
                pos_ln_weight, pos_ln_bias, proj_weight, *, ln_eps, rms_eps, block=256, out=None, **_):
    """Torch tensors in (fp32, contiguous), (N, hidden) embeddings out (into ``out`` when given)."""
    import torch

    n, p = patches.shape
    e, hidden = dense_weight.shape[0], proj_weight.shape[0]
    dev = patches.device
    x = torch.empty((n, p), dtype=torch.float32, device=dev)
    if n == 0:
        return torch.empty((0, hidden), dtype=torch.float32, device=dev) if out is None else out
    _row_layernorm[(n,)](patches, ln1_weight, ln1_bias, x, p, ln_eps, BLOCK=block)
    h = torch.empty((n, e), dtype=torch.float32, device=dev)
    bm, bn = LINEAR_BLOCKS["BLOCK_M"], LINEAR_BLOCKS["BLOCK_N"]
    grid = lambda m, k: (triton.cdiv(m, bm), triton.cdiv(k, bn))  # noqa: E731
    _linear[grid(n, e)](x, dense_weight, dense_bias, h, n, e, p, HAS_BIAS=True, **LINEAR_BLOCKS)
    y = torch.empty_like(h)
    _position_norms[(n,)](h, positions, pos_table, ln2_weight, ln2_bias, pos_ln_weight, pos_ln_bias, y, e,
                          pos_table.shape[0], ln_eps, rms_eps, BLOCK=min(block, triton.next_power_of_2(e)))
    if out is None:
        out = torch.empty((n, hidden), dtype=torch.float32, device=dev)
    _linear[grid(n, hidden)](y, proj_weight, proj_weight, out, n, hidden, e, HAS_BIAS=False, **LINEAR_BLOCKS)
    return out
