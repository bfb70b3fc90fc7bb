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


def _empty_rings(seed: int, *, decode: bool):
    """rng, layer 0's attributes, (heads, kv heads, head dim), empty numpy rings and torch rings (batch 2, 8 slots)."""
    h, hkv, d = TEXT.num_heads, TEXT.num_kv_heads, TEXT.head_dim
    ref = np.zeros((2, hkv, 8, d), np.float32)
    return (np.random.default_rng(seed), fa.attributes(TEXT, 0, decode=decode), (h, hkv, d), (ref, ref.copy()),
            (torch.zeros(2, hkv, 8, d), torch.zeros(2, hkv, 8, d)))


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
    assert raw[1] is past_k and raw[2] is past_v  # every cache updated in place (sliding prefill: after reading it)


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding-w8", "full-hd512-1kv"])
def test_triton_one_token_prefill_is_the_decode_step(layer):
    """A prefill call of one token per sequence (how the one TensorRT engine decodes) runs the decode kernel and
    equals the reference's prefill at S = 1, including a row with seq_lens 0 (a sliding ring untouched) and ring
    slots that wrap."""
    from plugins.triton_attention import fused_attention

    rng = np.random.default_rng(21 + layer)
    attrs = fa.attributes(TEXT, layer, decode=False)
    h, hkv, d = TEXT.num_heads, TEXT.layer_kv_heads(layer), TEXT.layer_head_dim(layer)
    t = TEXT.sliding_window if TEXT.is_sliding(layer) else 40
    b = 3
    q, k, v = (rng.standard_normal((b, 1, n, d)).astype(np.float32) for n in (h, hkv, hkv))
    past_k, past_v = (rng.standard_normal((b, hkv, t, d)).astype(np.float32) for _ in range(2))
    past, seqs, block = np.array([3, 21, 9], np.int64), np.array([1, 1, 0], np.int64), np.full((b, 1), -1, np.int64)
    inputs = [q, k, v, past_k, past_v, past, seqs, block]
    want = fa.reference(*inputs, **attrs)
    tensors = [torch.from_numpy(x.copy()) for x in inputs]
    out, got_k, got_v = fused_attention(*tensors, **attrs)
    assert got_k is tensors[3] and got_v is tensors[4]
    np.testing.assert_allclose(got_k.numpy(), want[1], atol=1e-5)
    np.testing.assert_allclose(got_v.numpy(), want[2], atol=1e-5)
    if attrs["sliding"]:
        np.testing.assert_array_equal(got_k.numpy()[2], past_k[2])  # seq_lens 0: the row's ring is untouched
    scale = max(1.0, float(np.abs(want[0]).max()))
    np.testing.assert_allclose(out.numpy()[:2], want[0][:2], atol=2e-5 * scale)
    # and it is the decode step: the same numbers as mode 1 on the rows with a token
    dec = fa.reference(*inputs[:6], np.ones(b, np.int64), block, **{**attrs, "mode": 1})
    np.testing.assert_allclose(out.numpy()[:2], dec[0][:2], atol=2e-5 * scale)


def test_triton_prefill_chunks_then_one_token_prefills_track_the_reference():
    """The one-engine sequence on a sliding layer: a 5-token prefill, then 14 one-token prefills wrapping a ring of
    8, all in place on the same buffers: caches and outputs equal the reference's at every call."""
    from plugins.triton_attention import fused_attention

    rng, attrs, (h, hkv, d), (ref_k, ref_v), (tk, tv) = _empty_rings(3, decode=False)
    keep = (tk.data_ptr(), tv.data_ptr())
    lens = np.array([0, 2], np.int64)
    for call, s in enumerate([5] + [1] * 14):
        q = rng.standard_normal((2, s, h, d)).astype(np.float32)
        k, v = (rng.standard_normal((2, s, hkv, d)).astype(np.float32) for _ in range(2))
        seqs = np.array([s, max(1, s - 2)], np.int64)
        common = (lens.copy(), seqs, np.full((2, s), -1, np.int64))
        out, ref_k, ref_v = fa.reference(q, k, v, ref_k, ref_v, *common, **attrs)
        got, tk, tv = fused_attention(*[torch.from_numpy(x) for x in (q, k, v)], tk, tv,
                                      *[torch.from_numpy(x) for x in common], **attrs, block_m=4, block_n=4)
        assert (tk.data_ptr(), tv.data_ptr()) == keep, f"call {call}: cache not updated in place"
        valid = np.arange(s)[None, :] < seqs[:, None]
        np.testing.assert_allclose(got.numpy().reshape(out.shape)[valid], out[valid], atol=2e-5,
                                   err_msg=f"call {call}")
        np.testing.assert_allclose(tk.numpy(), ref_k, atol=1e-5, err_msg=f"call {call}")
        np.testing.assert_allclose(tv.numpy(), ref_v, atol=1e-5, err_msg=f"call {call}")
        lens += seqs


def test_triton_ring_wraps_over_many_decode_steps():
    """Decode 20 steps past a window of 8 from an empty ring: same caches and outputs as the reference."""
    from plugins.triton_attention import fused_attention

    rng, attrs, (h, hkv, d), (ref_k, ref_v), (tk, tv) = _empty_rings(7, decode=True)
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


def _guarded(shape, fill, guard=64, dtype=torch.float32):
    """A tensor of ``shape`` inside a larger buffer whose ``guard`` elements either side hold a sentinel."""
    n = int(np.prod(shape))
    buf = torch.full((n + 2 * guard,), 12345.0, dtype=dtype)
    view = buf[guard:guard + n].view(shape)
    view.copy_(fill)
    return buf, view


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
def test_triton_garbage_indices_stay_in_bounds(layer, decode):
    """TensorRT times tactics on garbage inputs: negative and huge past_lens / seq_lens must not make a kernel
    write outside its buffers (guard elements keep their sentinel) or loop past the buffer."""
    from plugins.triton_attention import fused_attention

    inputs = _case(layer, decode, seed=11)
    attrs = fa.attributes(TEXT, layer, decode=decode)
    b = inputs[0].shape[0]
    past = np.array([-7, 10**12, -(10**12)], np.int64)[:b]
    seqs = np.array([-3, 10**9, 0], np.int64)[:b] if not decode else np.ones(b, np.int64)
    bufs, views = [], []
    for x in inputs[:5]:
        buf, view = _guarded(x.shape, torch.from_numpy(x))
        bufs.append(buf)
        views.append(view)
    shape_out = (inputs[0].shape[0], inputs[0].shape[1], attrs["num_heads"], attrs["head_dim"])
    out_buf, out = _guarded(shape_out, torch.zeros(shape_out))
    pk_buf, pk = _guarded(inputs[3].shape, torch.zeros(inputs[3].shape))
    pv_buf, pv = _guarded(inputs[4].shape, torch.zeros(inputs[4].shape))
    # unaliased presents (a copy of the past is updated) so their guards are checked too
    fused_attention(*views, torch.from_numpy(past), torch.from_numpy(seqs), torch.from_numpy(inputs[7]), **attrs,
                    out=out, present_key=pk, present_value=pv, block_m=4, block_n=4)
    for name, buf in [("q", bufs[0]), ("k", bufs[1]), ("v", bufs[2]), ("past_key", bufs[3]),
                      ("past_value", bufs[4]), ("out", out_buf), ("present_key", pk_buf), ("present_value", pv_buf)]:
        assert (buf[:64] == 12345.0).all() and (buf[-64:] == 12345.0).all(), f"{name}: written out of bounds"
    np.testing.assert_array_equal(views[3].numpy(), inputs[3])  # the past is only read
    if not attrs["sliding"]:
        # a full layer's cache slots outside [0, T) are not written at all (rows 1 and 2: +-10^12 tokens cached)
        np.testing.assert_array_equal(pk.numpy()[1:], inputs[3][1:])


def test_triton_patch_embed_garbage_positions_stay_in_the_table():
    from exporter.config import PRESETS
    from plugins import patch_embed as pe
    from plugins.triton_patch_embed import patch_embed

    cfg = PRESETS["tiny"]
    rng = np.random.default_rng(3)
    e, hidden, p = cfg.vision.mm_embed_dim, cfg.text.hidden_size, cfg.vision.patch_dim
    rows = cfg.vision.mm_posemb_size
    shapes = {"ln1_weight": (p,), "ln1_bias": (p,), "dense_weight": (e, p), "dense_bias": (e,), "ln2_weight": (e,),
              "ln2_bias": (e,), "pos_table": (rows, 2, e), "pos_ln_weight": (e,), "pos_ln_bias": (e,),
              "proj_weight": (hidden, e)}
    weights = {k: torch.from_numpy((0.3 * rng.standard_normal(s)).astype(np.float32)) for k, s in shapes.items()}
    patches = torch.from_numpy(rng.random((4, p), dtype=np.float32))
    positions = torch.tensor([[rows, -5], [10**12, 2], [-1, -1], [1, 1]], dtype=torch.int64)
    out_buf, out = _guarded((4, hidden), torch.zeros(4, hidden))
    patch_embed(patches, positions, *[weights[n] for n in pe.INPUTS[2:]], **pe.attributes(cfg.vision), out=out)
    assert (out_buf[:64] == 12345.0).all() and (out_buf[-64:] == 12345.0).all()
    # an out-of-table position adds nothing, like padding: rows 0-2 equal the reference with (-1, -1) there
    want = pe.reference(patches.numpy(), np.array([[-1, -1], [-1, 2], [-1, -1], [1, 1]]),
                        *[weights[n].numpy() for n in pe.INPUTS[2:]], **pe.attributes(cfg.vision))
    np.testing.assert_allclose(out.numpy(), want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_triton_rope_angles_match_float64_at_long_positions():
    """RoPE frequencies come from the host (the exporter's float32 inv_freq), so the kernel's angle is one float32
    product pos * inv_freq and its cos/sin are exact for that angle; against the float64 angle the error is only
    that rounding, at positions up to 262143 (the 12B runs to 131072+)."""
    from plugins.triton_attention import _rope_kv

    for layer in (0, 5):  # the 12B's sliding (theta 1e4, all dims) and full (theta 1e6, 128 of 512) layers
        from exporter.config import PRESETS

        attrs = fa.attributes(PRESETS["gemma4-12b"].text, layer, decode=False)
        d, half = attrs["head_dim"], attrs["head_dim"] // 2
        inv32 = fa.inv_freq(d, attrs["rotary_dim"], attrs["rope_theta"])
        pos = np.array([131071, 131072, 262143], np.int64)
        k = torch.zeros(len(pos), 1, 1, d)
        k[..., :half] = 1.0  # x1 = 1, x2 = 0: the rotated halves are (cos, sin) of the angle
        k_out, v_out = torch.empty(len(pos), 1, 1, d), torch.empty(len(pos), 1, 1, d)
        _rope_kv[(1, len(pos), 1)](k, k.clone(), torch.from_numpy(pos), torch.from_numpy(inv32), k_out, v_out, 1,
                                   HKV=1, HEAD_DIM=d, HALF=half)
        cos, sin = k_out[:, 0, 0, :half].double().numpy(), k_out[:, 0, 0, half:].double().numpy()
        ang32 = (pos[:, None].astype(np.float32) * inv32[None, :]).astype(np.float64)  # one float32 product
        np.testing.assert_allclose(cos, np.cos(ang32), atol=2e-6)
        np.testing.assert_allclose(sin, np.sin(ang32), atol=2e-6)
        steps = np.arange(0, attrs["rotary_dim"], 2, dtype=np.float64) / d
        inv64 = np.concatenate([attrs["rope_theta"] ** -steps, np.zeros(half - len(steps))])
        exact = pos[:, None].astype(np.float64) * inv64[None, :]
        bound = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64) + pos[:, None] * np.abs(inv32 - inv64)
        assert (np.abs(ang32 - exact) <= bound + 1e-12).all()
        got = np.arctan2(sin, cos)
        err = np.abs(np.angle(np.exp(1j * (got - exact))))
        assert (err <= bound + 4e-6).all(), f"layer {layer}: max angle error {err.max():.3g} rad"


@pytest.mark.parametrize("layer,decode", [(0, True), (1, True), (0, False), (1, False)],
                         ids=["sliding-decode", "full-decode", "sliding-prefill", "full-prefill"])
def test_triton_unaliased_presents_get_the_update_and_the_past_is_only_read(layer, decode):
    """Where TensorRT hands the plugin present buffers other than the past ones (aliasing not in effect), the
    presents receive the updated caches and the past inputs stay as they were."""
    from plugins.triton_attention import fused_attention

    inputs = _case(layer, decode, seed=5)
    attrs = fa.attributes(TEXT, layer, decode=decode)
    want = fa.reference(*inputs, **attrs)
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    pk, pv = torch.full_like(tensors[3], 7.0), torch.full_like(tensors[4], 7.0)
    out, got_k, got_v = fused_attention(*tensors, **attrs, present_key=pk, present_value=pv)
    assert got_k is pk and got_v is pv
    np.testing.assert_array_equal(tensors[3].numpy(), inputs[3])
    np.testing.assert_array_equal(tensors[4].numpy(), inputs[4])
    np.testing.assert_allclose(pk.numpy(), want[1], atol=2e-5)
    np.testing.assert_allclose(pv.numpy(), want[2], atol=2e-5)
    valid = np.arange(out.shape[1])[None, :] < inputs[6][:, None]
    np.testing.assert_allclose(out.numpy()[valid], want[0][valid], atol=2e-5 * max(1.0, float(np.abs(want[0]).max())))
