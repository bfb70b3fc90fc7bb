"""Custom ops of the plugin graphs: each op's contract, CPU reference, Triton kernels and TensorRT registration.

`REFERENCES` maps ``(domain, op_type)`` to the numpy reference that computes the op from its inputs and node
attributes; `plugins.runner` executes a whole plugin graph with them (no GPU, no function bodies).
"""

from plugins import fused_attention, patch_embed

__all__ = ["REFERENCES", "fused_attention", "patch_embed"]

REFERENCES = {
    (fused_attention.DOMAIN, fused_attention.OP): fused_attention.reference,
    (patch_embed.DOMAIN, patch_embed.OP): patch_embed.reference,
}
