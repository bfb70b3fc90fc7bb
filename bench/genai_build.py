"""Run onnxruntime-genai's model builder on a ``gemma4_unified`` checkpoint saved by transformers 5.24.

onnxruntime-genai 0.18's ``Gemma4Model`` builder reads the full-attention layers' geometry from the flat text-config
fields ``global_head_dim`` and ``num_global_key_value_heads``.  transformers 5.24 stores that geometry as a
heterogeneous ``per_layer_config`` (``{"05": {"head_dim": 256, "num_key_value_heads": 1}, ...}``) and raises
``AmbiguousGlobalPerLayerAttributeError`` when ``head_dim`` / ``num_key_value_heads`` are read from the text config
without a layer.  This wrapper runs the unmodified builder (``python -m onnxruntime_genai.models.builder``, same
arguments) with one change to the config object it loads: the text config allows global reads of the per-layer
attributes (they then give the sliding layers' values, which is what the builder treats as its base profile) and
gains ``global_head_dim`` / ``num_global_key_value_heads`` from the first full-attention layer.  Nothing on disk
changes; the weights are read by the builder's own loader.

Usage: ``python bench/genai_build.py -i <checkpoint> -o <out> -p fp32|int8|int4 -e cpu [builder options]``.
"""

from __future__ import annotations

import runpy
import sys


def present_for_genai(config):
    """The loaded Gemma4UnifiedConfig with the flat full-layer fields the 0.18 builder expects."""
    text = getattr(config, "text_config", None)
    if text is None or not getattr(text, "is_heterogeneous", False):
        return config
    text.allow_global_per_layer_attribute_access = True
    # The builder copies every text-config key onto the top-level config, per_layer_config included, which makes
    # the top-level config heterogeneous too.
    config.allow_global_per_layer_attribute_access = True
    full = [i for i, kind in enumerate(text.layer_types) if kind == "full_attention"]
    if not full:
        raise ValueError("text_config.layer_types has no full_attention layer; not a Gemma 4 Unified config")
    layer = text.per_layer_config[full[0]]
    if not hasattr(text, "global_head_dim"):
        text.global_head_dim = layer.head_dim
    if not hasattr(text, "num_global_key_value_heads"):
        text.num_global_key_value_heads = layer.num_key_value_heads
    return config


def main() -> None:
    import transformers

    original = transformers.AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        return present_for_genai(original(cls, *args, **kwargs))

    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
