"""Triton kernels of FusedAttention under the interpreter (TRITON_INTERPRET=1, CPU) against the numpy reference:
ring wrap-around, windows, image blocks, head_dim 512 with one KV head, batches of different lengths, several
key/query blocks per program."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on the CPU

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from plugins import fused_attention as fa  # noqa: E402
from tests.test_plugins import TEXT, _case  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
torch = pytest.importorskip("torch")


def _run(layer: int, decode: bool, seed: int, **blocks):
    from plugins.triton_attention import fused_attention

    inputs = _case(layer, decode, seed)
    attrs = fa.attributes(TEXT, layer, decode=decode)
    want = fa.reference(*inputs, **attrs)
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    past_k, past_v = tensors[3], tensors[4]
    got = fused_attention(*tensors, **attrs, **blocks)
    return inputs, attrs, want, [g.numpy() for g in got], (past_k, past_v, got)


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding-w8", "full-hd512-1kv"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("blocks", [dict(block_m=16, block_n=16), dict(block_m=4, block_n=4)], ids=["b16", "b4"])
def test_triton_matches_the_reference(layer, decode, blocks):
    inputs, attrs, want, got, (past_k, past_v, raw) = _run(layer, decode, seed=layer + 2 * decode, **blocks)
    seq_lens = inputs[6]
    valid = np.arange(got[0].shape[1])[None, :] < seq_lens[:, None]  # rows beyond seq_lens are not read
    err = np.abs(got[0] - want[0])[valid]
    scale = max(1.0, float(np.abs(want[0]).max()))
    assert err.max() <= 2e-5 * scale, f"out: max err {err.max():.3g} mean {err.mean():.3g}"
    for name, g, w in zip(fa.OUTPUTS[1:], got[1:], want[1:]):
        e = np.abs(g - w)
        assert e.max() <= 2e-5 * max(1.0, float(np.abs(w).max())), f"{name}: max err {e.max():.3g}"
    in_place = decode or not attrs["sliding"]
    assert (raw[1] is past_k and raw[2] is past_v) == in_place  # caches updated in place where the contract says


def test_triton_ring_wraps_over_many_decode_steps():
    """Decode 20 steps past a window of 8 from an empty ring: same caches and outputs as the reference."""
    from plugins.triton_attention import fused_attention

    rng = np.random.default_rng(7)
    attrs = fa.attributes(TEXT, 0, decode=True)
    h, hkv, d = TEXT.num_heads, TEXT.num_kv_heads, TEXT.head_dim
    ref_k = np.zeros((2, hkv, 8, d), np.float32)
    ref_v = np.zeros_like(ref_k)
    tk, tv = torch.zeros(2, hkv, 8, d), torch.zeros(2, hkv, 8, d)
    for step in range(20):
        q = rng.standard_normal((2, 1, h, d)).astype(np.float32)
        k = rng.standard_normal((2, 1, hkv, d)).astype(np.float32)
        v = rng.standard_normal((2, 1, hkv, d)).astype(np.float32)
        past = np.array([step, step + 3], np.int64)
        common = (past, np.ones(2, np.int64), np.full((2, 1), -1, np.int64))
        out, ref_k, ref_v = fa.reference(q, k, v, ref_k, ref_v, *common, **attrs)
        got, tk, tv = fused_attention(*[torch.from_numpy(x) for x in (q, k, v)], tk, tv,
                                      *[torch.from_numpy(x) for x in common], **attrs)
        np.testing.assert_allclose(got.numpy(), out, atol=2e-5, err_msg=f"step {step}")
    np.testing.assert_allclose(tk.numpy(), ref_k, atol=1e-5)


def test_triton_patch_embed_matches_the_reference():
    from exporter.config import PRESETS
    from plugins import patch_embed as pe
    from plugins.triton_patch_embed import patch_embed

    cfg = PRESETS["tiny"]
    rng = np.random.default_rng(0)
    e, hidden, p = cfg.vision.mm_embed_dim, cfg.text.hidden_size, cfg.vision.patch_dim
    shapes = {"ln1_weight": (p,), "ln1_bias": (p,), "dense_weight": (e, p), "dense_bias": (e,), "ln2_weight": (e,),
              "ln2_bias": (e,), "pos_table": (cfg.vision.mm_posemb_size, 2, e), "pos_ln_weight": (e,),
              "pos_ln_bias": (e,), "proj_weight": (hidden, e)}
    weights = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    patches = rng.random((19, p), dtype=np.float32)  # more rows than one GEMM block
    positions = np.array([[i % 5, i // 5] for i in range(17)] + [[-1, -1]] * 2, np.int64)
    args = [patches, positions, *[weights[n] for n in pe.INPUTS[2:]]]
    want = pe.reference(*args, **pe.attributes(cfg.vision))
    got = patch_embed(*[torch.from_numpy(a) for a in args], **pe.attributes(cfg.vision)).numpy()
    err = np.abs(got - want)
    assert err.max() <= 1e-4 * max(1.0, float(np.abs(want).max())), f"max err {err.max():.3g} mean {err.mean():.3g}"
