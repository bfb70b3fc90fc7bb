"""TensorRT registration of the plugins with ``tensorrt.plugin`` (TensorRT >= 10.6; targets 10.8+ and 11.x).

Importing this module registers ``gemma4::FusedAttention`` and ``gemma4::PatchEmbed`` in TensorRT's plugin registry;
the ONNX parser then maps the plugin graphs' nodes (which carry ``plugin_namespace``/``plugin_version``) to them
instead of inlining their function bodies.

* ``@register`` describes the outputs: FusedAttention's ``out`` is (B, S, H * D); ``present_*`` are *aliased* to
  ``past_*`` (updated in place) on full layers and in decode, and new ring buffers for sliding layers in prefill,
  exactly as the contract (`plugins.fused_attention`) says.
* ``@impl`` (JIT) runs the Triton kernels (`plugins.triton_attention`, `plugins.triton_patch_embed`) on TensorRT's
  stream through torch views of the buffers (``__cuda_array_interface__``); Python runs at enqueue time.  An AOT
  implementation (``@aot_impl``, PTX stored in the engine) is not provided yet: the kernels launch several grids
  per call, which one AOT launch description cannot express without merging them first.

Needs a GPU, ``tensorrt``, ``torch`` with CUDA and ``triton``; nothing here runs on a CPU-only machine (the tests
skip it there with the reason).  INT attributes arrive as ints (TensorRT passes them as int32).
"""

from __future__ import annotations

from typing import Tuple

import tensorrt.plugin as trtp

from plugins import fused_attention as fa
from plugins import patch_embed as pe

__all__ = ["FUSED_ATTENTION_ID", "PATCH_EMBED_ID"]

FUSED_ATTENTION_ID = f"{fa.DOMAIN}::{fa.OP}"
PATCH_EMBED_ID = f"{pe.DOMAIN}::{pe.OP}"


def _torch(t, dtype=None):
    import torch

    x = torch.as_tensor(t, device="cuda")
    return x if dtype is None else x.view(dtype)


@trtp.register(FUSED_ATTENTION_ID)
def _fused_attention_desc(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, past_lens: trtp.TensorDesc, seq_lens: trtp.TensorDesc, image_block: trtp.TensorDesc,
    mode: int, sliding: int, window: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
    rope_theta: float, scale: float,
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    out = trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], num_heads * head_dim), dtype=q.dtype)
    if mode == 1 or not sliding:
        return out, past_key.aliased(), past_value.aliased()
    return out, past_key.like(), past_value.like()


@trtp.impl(FUSED_ATTENTION_ID)
def _fused_attention_impl(
    q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, past_key: trtp.Tensor, past_value: trtp.Tensor,
    past_lens: trtp.Tensor, seq_lens: trtp.Tensor, image_block: trtp.Tensor, mode: int, sliding: int, window: int,
    num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, rope_theta: float, scale: float,
    outputs: Tuple[trtp.Tensor], stream: int,
) -> None:
    import torch

    from plugins.triton_attention import fused_attention

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        args = [_torch(t) for t in (q, k, v, past_key, past_value, past_lens, seq_lens, image_block)]
        out, pk, pv = fused_attention(
            *args, mode=int(mode), sliding=int(sliding), window=int(window), num_heads=int(num_heads),
            num_kv_heads=int(num_kv_heads), head_dim=int(head_dim), rotary_dim=int(rotary_dim),
            rope_theta=float(rope_theta), scale=float(scale),
        )
        _torch(outputs[0]).copy_(out.reshape(_torch(outputs[0]).shape))
        if not (mode == 1 or not sliding):  # sliding prefill: the rebuilt rings go to the new output buffers
            _torch(outputs[1]).copy_(pk)
            _torch(outputs[2]).copy_(pv)


@trtp.register(PATCH_EMBED_ID)
def _patch_embed_desc(
    patches: trtp.TensorDesc, positions: trtp.TensorDesc, ln1_weight: trtp.TensorDesc, ln1_bias: trtp.TensorDesc,
    dense_weight: trtp.TensorDesc, dense_bias: trtp.TensorDesc, ln2_weight: trtp.TensorDesc,
    ln2_bias: trtp.TensorDesc, pos_table: trtp.TensorDesc, pos_ln_weight: trtp.TensorDesc,
    pos_ln_bias: trtp.TensorDesc, proj_weight: trtp.TensorDesc, ln_eps: float, rms_eps: float,
) -> trtp.TensorDesc:
    return trtp.from_shape_expr((patches.shape_expr[0], proj_weight.shape_expr[0]), dtype=patches.dtype)


@trtp.impl(PATCH_EMBED_ID)
def _patch_embed_impl(
    patches: trtp.Tensor, positions: trtp.Tensor, ln1_weight: trtp.Tensor, ln1_bias: trtp.Tensor,
    dense_weight: trtp.Tensor, dense_bias: trtp.Tensor, ln2_weight: trtp.Tensor, ln2_bias: trtp.Tensor,
    pos_table: trtp.Tensor, pos_ln_weight: trtp.Tensor, pos_ln_bias: trtp.Tensor, proj_weight: trtp.Tensor,
    ln_eps: float, rms_eps: float, outputs: Tuple[trtp.Tensor], stream: int,
) -> None:
    import torch

    from plugins.triton_patch_embed import patch_embed

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        args = [_torch(t) for t in (patches, positions, ln1_weight, ln1_bias, dense_weight, dense_bias, ln2_weight,
                                    ln2_bias, pos_table, pos_ln_weight, pos_ln_bias, proj_weight)]
        _torch(outputs[0]).copy_(patch_embed(*args, ln_eps=float(ln_eps), rms_eps=float(rms_eps)))
