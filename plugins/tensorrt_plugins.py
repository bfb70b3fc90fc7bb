"""TensorRT registration of the plugins with ``tensorrt.plugin`` (TensorRT >= 10.6; targets 10.8+ and 11.x).

Importing this module registers ``gemma4::FusedAttention`` and ``gemma4::PatchEmbed`` in TensorRT's plugin registry;
the ONNX parser then maps the plugin graphs' nodes (which carry ``plugin_namespace``/``plugin_version``) to them
instead of inlining their function bodies.  `check_registered` says which creators a graph needs and are missing
(`graphs.build_tensorrt` refuses to parse then: the parser would fall back to the local functions, keyed by name,
collapsing every layer's overload into layer 0's body).

* ``@register`` describes the outputs: FusedAttention's ``out`` is (B, S, H * D); ``present_*`` are *aliased* to
  ``past_*`` (updated in place) for every layer kind and mode, as the contract (`plugins.fused_attention`) says: a
  sliding prefill writes its ring after its attention has read it.  That is what lets one engine (the prefill
  graph with a prefill and a one-token decode profile, `graphs.build_tensorrt`) hold the weights once and run
  both steps on the same cache buffers.  Aliasing takes effect only in engines built with
  ``PreviewFeature.ALIASED_PLUGIN_IO_10_03``; where TensorRT hands the impl a ``present_*`` buffer other than
  ``past_*``, the kernels copy the past into it and update that instead (the past input is then only read).
* ``@impl`` (JIT) runs the Triton kernels (`plugins.triton_attention`, `plugins.triton_patch_embed`) on TensorRT's
  stream through torch views of the buffers; outputs are written in place, RoPE frequencies are the exporter's
  float32 values (uploaded once per layer kind), ``tl.dot`` runs in IEEE fp32.  Python runs at enqueue time.  An
  AOT implementation (``@aot_impl``, PTX stored in the engine) is not provided yet: the kernels launch several grids
  per call, which one AOT launch description cannot express without merging them first.

The annotations below are real objects, not strings: ``tensorrt.plugin`` reads them with ``inspect.signature``
(so this module must not use ``from __future__ import annotations``).  INT attributes arrive as Python ints,
FLOAT ones as floats.  Registration needs only ``tensorrt`` (CI checks it with the lean runtime); the impls need a
GPU, ``torch`` with CUDA and ``triton``.
"""

from typing import Tuple

import numpy as np
import tensorrt.plugin as trtp

from plugins import fused_attention as fa
from plugins import patch_embed as pe

__all__ = ["FUSED_ATTENTION_ID", "PATCH_EMBED_ID", "PLUGINS", "OUTPUT_ALIASES", "check_registered"]

FUSED_ATTENTION_ID = f"{fa.DOMAIN}::{fa.OP}"
PATCH_EMBED_ID = f"{pe.DOMAIN}::{pe.OP}"
# (name, version, namespace) of every creator this module registers
PLUGINS = ((fa.OP, fa.VERSION, fa.DOMAIN), (pe.OP, pe.VERSION, pe.DOMAIN))


def check_registered(needed=PLUGINS, registry=None) -> list[str]:
    """The ``namespace::name (version)`` of each needed creator that TensorRT's registry does not have."""
    import tensorrt as trt

    registry = registry or trt.get_plugin_registry()
    return [f"{ns}::{name} (version {version})" for name, version, ns in needed
            if registry.get_creator(name, version, ns) is None]


# which input each FusedAttention output aliases (-1: none), as ``@register`` declares it, for every mode and layer
# kind: present_key -> past_key (input 3), present_value -> past_value (input 4)
OUTPUT_ALIASES = (-1, 3, 4)


class _CudaView:
    """``__cuda_array_interface__`` of a TensorRT tensor, with bf16 passed as int16 (the interface has no bf16)."""

    def __init__(self, t: trtp.Tensor, typestr: str, itemsize: int):
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape), "typestr": typestr, "data": (t.data_ptr, False), "version": 3,
            "strides": tuple(int(s) * itemsize for s in t.strides), "stream": None,
        }


def _torch(t: trtp.Tensor):
    """A torch view (no copy) of a TensorRT tensor on the current (TensorRT's) stream."""
    import tensorrt as trt
    import torch

    if t.dtype == trt.DataType.BF16:
        return torch.as_tensor(_CudaView(t, "<i2", 2), device="cuda").view(torch.bfloat16)
    dtype = np.dtype(trt.nptype(t.dtype))
    return torch.as_tensor(_CudaView(t, dtype.str, dtype.itemsize), device="cuda")


_INV_FREQ: dict = {}


def _inv_freq(head_dim: int, rotary_dim: int, theta: float):
    """The layer kind's RoPE frequencies on the device; uploaded on the first (eager) call, so CUDA-graph captures
    of later calls only read them."""
    import torch

    key = (head_dim, rotary_dim, theta, torch.cuda.current_device())
    if key not in _INV_FREQ:
        _INV_FREQ[key] = torch.from_numpy(fa.inv_freq(head_dim, rotary_dim, theta)).to("cuda")
        torch.cuda.current_stream().synchronize()
    return _INV_FREQ[key]


@trtp.register(FUSED_ATTENTION_ID)
def _fused_attention_desc(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, past_key: trtp.TensorDesc,
    past_value: trtp.TensorDesc, past_lens: trtp.TensorDesc, seq_lens: trtp.TensorDesc, image_block: trtp.TensorDesc,
    mode: int, sliding: int, window: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
    rope_theta: float, scale: float,
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    out = trtp.from_shape_expr((q.shape_expr[0], q.shape_expr[1], num_heads * head_dim), dtype=q.dtype)
    return out, past_key.aliased(), past_value.aliased()  # OUTPUT_ALIASES


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
        out, present_k, present_v = (_torch(t) for t in outputs)
        b, s = args[0].shape[:2]
        fused_attention(
            *args, mode=int(mode), sliding=int(sliding), window=int(window), num_heads=int(num_heads),
            num_kv_heads=int(num_kv_heads), head_dim=int(head_dim), rotary_dim=int(rotary_dim),
            rope_theta=float(rope_theta), scale=float(scale),
            inv_freq=_inv_freq(int(head_dim), int(rotary_dim), float(rope_theta)),
            out=out.view(b, s, int(num_heads), int(head_dim)), present_key=present_k, present_value=present_v,
            precision="ieee",
        )


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
        patch_embed(*args, ln_eps=float(ln_eps), rms_eps=float(rms_eps), out=_torch(outputs[0]))
