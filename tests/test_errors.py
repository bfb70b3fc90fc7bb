"""Checkpoint layouts we accept, and bad input: a clear error naming what is wrong, and no partial artifact."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from exporter.weights import CheckpointError, load_model
from runtime.manifest import ArtifactError

ROOT = Path(__file__).resolve().parents[1]


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rewrite(ckpt: Path, fn) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file(fn(tensors), str(ckpt / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------ layouts we accept
def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, reference_store):
    ref, ckpt = reference_store("tiny")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="400KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a, b = _state(load_model(ckpt)), _state(load_model(tmp_path / "sharded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_embed_vision_naming_variant_and_bf16(tmp_path, reference_store):
    _, ckpt = reference_store("tiny")
    variant = _copy_ckpt(ckpt, tmp_path / "variant")

    def rename(t):
        out = {}
        for k, v in t.items():
            k = k.replace("model.vision_embedder.", "model.embed_vision.")
            k = k.replace("embed_vision.embedding_projection", "embed_vision.multimodal_embedder.embedding_projection")
            out[k] = v.to(torch.bfloat16)
        return out

    _rewrite(variant, rename)
    base, got = _state(load_model(ckpt)), _state(load_model(variant))
    assert got.keys() == base.keys()
    for k in base:
        assert got[k].dtype == torch.float32
        assert torch.equal(got[k], base[k].to(torch.bfloat16).float()), k


# ------------------------------------------------------------------ bad checkpoints
@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda t: {k: v for k, v in t.items() if not k.endswith("layers.2.mlp.up_proj.weight")},
         "missing tensor 'model.language_model.layers.2.mlp.up_proj.weight'"),
        (lambda t: t | {"model.language_model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)},
         "'model.language_model.layers.0.self_attn.q_proj.weight' in model.safetensors has shape (3, 3), expected (64, 64)"),
        (lambda t: t | {"model.language_model.layers.9.mlp.up_proj.weight": torch.zeros(3)},
         "unexpected tensor 'model.language_model.layers.9.mlp.up_proj.weight'"),
    ],
    ids=["missing", "wrong-shape", "unexpected"],
)
def test_checkpoint_mismatch_names_the_tensor(tmp_path, reference_store, change, expected):
    _, ckpt = reference_store("tiny")
    bad = _copy_ckpt(ckpt, tmp_path / "bad")
    _rewrite(bad, change)
    with pytest.raises(CheckpointError) as e:
        load_model(bad)
    assert expected in str(e.value)


def test_missing_shard_is_named(tmp_path, reference_store):
    ref, _ = reference_store("tiny")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="400KB")
    victim = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_model(tmp_path / "sharded")


def _export_cli(model: Path | str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "exporter.export", "--model", str(model), "--out", str(out), "--max-len", "32"],
        cwd=ROOT, capture_output=True, text=True,
    )


def test_truncated_checkpoint_fails_without_a_partial_artifact(tmp_path, reference_store):
    _, ckpt = reference_store("tiny-text")
    bad = _copy_ckpt(ckpt, tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "out"
    done = _export_cli(bad, out)
    assert done.returncode != 0
    assert "model.safetensors" in done.stderr and "truncated" in done.stderr
    assert not out.exists()
    assert list(tmp_path.glob(".out*")) == [], "a staging directory was left behind"


def test_missing_checkpoint_file_fails_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "gemma4_unified", "text_config": {}}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(tmp_path / "empty")


def test_failed_export_keeps_the_previous_artifact(tmp_path, artifact_store, reference_store):
    out = tmp_path / "art"
    shutil.copytree(artifact_store("tiny-text"), out)
    before = (out / "manifest.json").read_text()
    _, ckpt = reference_store("tiny-text")
    bad = _copy_ckpt(ckpt, tmp_path / "bad")
    _rewrite(bad, lambda t: {k: v for k, v in t.items() if "norm" not in k})
    done = _export_cli(bad, out)
    assert done.returncode != 0 and "missing tensor" in done.stderr
    assert (out / "manifest.json").read_text() == before
    runtime.load(out)  # still whole


# ------------------------------------------------------------------ bad runtime input
def test_prompt_longer_than_max_len(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    with pytest.raises(ValueError, match=rf"{model.max_len + 5} tokens .* at most {model.max_len}"):
        runtime.generate(model, [2] * (model.max_len + 5), max_new_tokens=1)


def test_image_placeholder_expansion_counts_toward_max_len(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    image = np.zeros((672, 960, 3), np.uint8)  # 280 soft tokens > max_len
    with pytest.raises(ValueError, match="images and audio expanded"):
        runtime.generate(model, [2, model.config["tokens"]["image"]], images=[image], max_new_tokens=1)


def test_file_that_is_not_an_image(tmp_path, artifact_store):
    model = runtime.load(artifact_store("tiny"))
    fake = tmp_path / "cat.png"
    fake.write_text("not a picture")
    with pytest.raises(ValueError, match="cat.png"):
        runtime.generate(model, [2, model.config["tokens"]["image"]], images=[fake], max_new_tokens=1)


def test_audio_at_another_sample_rate(tmp_path, artifact_store):
    model = runtime.load(artifact_store("tiny"))
    path = tmp_path / "clip.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(800, np.int16).tobytes())
    with pytest.raises(ValueError, match="8000"):
        runtime.generate(model, [2, model.config["tokens"]["audio"]], audio=[path], max_new_tokens=1)


def test_placeholder_count_must_match_images(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    with pytest.raises(ValueError, match="2 image placeholder"):
        tk = model.config["tokens"]
        runtime.generate(model, [2, tk["image"], 5, tk["image"]], images=[np.zeros((48, 48, 3), np.uint8)])


def test_text_only_model_refuses_images(artifact_store):
    model = runtime.load(artifact_store("tiny-text"))
    with pytest.raises(ValueError, match="no vision embedder"):
        runtime.generate(model, [2, model.config["tokens"]["image"]], images=[np.zeros((48, 48, 3), np.uint8)])


def test_modified_artifact_file_is_refused(tmp_path, artifact_store):
    art = shutil.copytree(artifact_store("tiny-text"), tmp_path / "art")
    data = art / "weights.data"
    original = data.read_bytes()
    raw = bytearray(original)
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"weights\.data: sha256 differs"):
        runtime.load(art)
    data.write_bytes(original)
    runtime.load(art)
    (art / "prefill.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"prefill\.onnx: listed in the manifest but missing"):
        runtime.load(art, verify=True)


def test_tensorrt_backend_says_why(artifact_store):
    with pytest.raises(RuntimeError, match="cannot run with TensorRT"):
        runtime.load(artifact_store("tiny-text"), backend="tensorrt")
    done = subprocess.run(
        [sys.executable, "-m", "graphs.build", "--artifact", str(artifact_store("tiny-text")), "--backend", "tensorrt"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 2 and "cannot build a TensorRT engine" in done.stderr
