"""Which parts of the model a quantization covers: the Linear groups (`exporter.linears.group_of`) and what each
precision quantizes by default.  Shared by `calib.calibrate` (from an fp32 artifact) and `calib.sequential` (from a
checkpoint); `calib.calibrate`'s docstring says why FP8 keeps its LM head fp32.
"""

from __future__ import annotations

__all__ = ["DEFAULT_QUANTIZE", "GROUPS"]

GROUPS = ("decoder", "lm_head", "vision", "audio")
# what ``--quantize`` defaults to, per precision
DEFAULT_QUANTIZE = {"int8": ("decoder", "lm_head"), "int4": ("decoder", "lm_head"), "fp8": ("decoder",)}
