"""TensorRT parts: what can be checked without a GPU everywhere, the rest on a GPU machine with TensorRT
(skipped here with the reason)."""

from __future__ import annotations

import importlib.util

import pytest

import runtime
from graphs.build import build_engine, tensorrt_unavailable_reason
from graphs.build_tensorrt import profiles_for
from runtime.manifest import read_manifest

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_profiles_cover_prefill_and_decode(artifact_store):
    manifest = read_manifest(artifact_store("tiny"))
    max_len = manifest["max_len"]
    pre = profiles_for(manifest, "prefill", max_batch=4, opt_seq=64, max_soft_tokens=140)
    assert pre["input_ids"] == ((1, 1), (1, 64), (4, max_len))
    assert pre["image_patches"] == ((0, 6912), (140, 6912), (140, 6912))
    assert pre["past_key_5"][2] == (4, 1, max_len, 32) and pre["past_key_0"][0] == (1, 2, 8, 16)
    dec = profiles_for(manifest, "decode", max_batch=4, opt_seq=64, max_soft_tokens=140)
    assert dec["input_ids"] == ((1, 1), (1, 1), (4, 1))
    assert set(dec) == {i["name"] for i in manifest["graphs"]["decode"]["inputs"]}


@pytest.mark.skipif(HAS_TRT and _gpu(), reason="this machine can build TensorRT engines")
def test_without_tensorrt_build_and_load_say_why_and_fall_back(artifact_store):
    art = artifact_store("tiny-text")
    assert tensorrt_unavailable_reason()
    with pytest.raises(RuntimeError, match="cannot build a TensorRT engine"):
        build_engine(art, "tensorrt", log=lambda *_: None)
    assert "tensorrt" not in read_manifest(art)["engines"]
    assert runtime.load(art).backend.name == "onnxruntime"  # auto falls back


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed (it needs an NVIDIA GPU machine)")
def test_plugins_register_with_tensorrt():
    import tensorrt.plugin  # noqa: F401

    import plugins.tensorrt_plugins as tp

    assert tp.FUSED_ATTENTION_ID == "gemma4::FusedAttention" and tp.PATCH_EMBED_ID == "gemma4::PatchEmbed"


@pytest.mark.skipif(not (HAS_TRT and _gpu()), reason="needs tensorrt and a CUDA GPU")
def test_tensorrt_engine_generates_like_onnxruntime(artifact_store):
    art = artifact_store("tiny")
    build_engine(art, "tensorrt", log=lambda *_: None)
    trt_model, ort_model = runtime.load(art, backend="tensorrt"), runtime.load(art, backend="onnxruntime")
    for prompt in ([2, 40, 41, 42, 43], [2, 7, 9]):
        assert runtime.generate(trt_model, prompt, max_new_tokens=24).tokens == \
            runtime.generate(ort_model, prompt, max_new_tokens=24).tokens
