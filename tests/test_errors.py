"""Checkpoint layouts we accept, and bad input: a clear error naming what is wrong, and no partial artifact."""

from __future__ import annotations

import json
import os
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


# ------------------------------------------------------------------ typed errors, token ids, the image budget
def test_float_negative_and_bool_token_ids_are_refused(tmp_path):
    from tests.test_manifest_trust import make_fake_artifact

    model = runtime.load(make_fake_artifact(tmp_path / "art"))
    for prompt, message in [([2, 1.5, 3], r"token 1 is 1\.5 \(float\); token ids are integers"),
                            ([2, 3.0], r"token 1 is 3\.0 \(float\)"),
                            (np.array([2.0, 3.0]), "dtype float64"),
                            ([2, -1], r"token 1 is -1; token ids are >= 0"),
                            ([2, True], r"token 1 is True \(bool\)"),
                            ([2, 16], r"outside the vocabulary \[0, 16\): \[16\]")]:
        with pytest.raises(runtime.InputError, match=message):
            runtime.generate(model, prompt, max_new_tokens=1)
    assert runtime.generate(model, np.array([2, 3], np.int32), max_new_tokens=1).tokens == [12]
    for stop, message in [([1.5], r"stop\[0\] is 1\.5 \(float\)"), ([True], r"stop\[0\] is True"),
                          ([-3], r"stop\[0\] is -3"), ("7", "expected a list of token ids")]:
        with pytest.raises(runtime.InputError, match=message):
            runtime.generate(model, [2, 3], max_new_tokens=1, stop=stop)
    assert runtime.generate(model, [2, 3], max_new_tokens=4, stop=[np.int64(12)]).tokens == [12]


def test_too_long_message_names_the_image_budget(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    image = np.zeros((672, 960, 3), np.uint8)  # 280 soft tokens at the default budget; 70 at budget 70
    prompt = [2, model.config["tokens"]["image"], 5]
    with pytest.raises(runtime.InputError) as e:
        runtime.generate(model, prompt, images=[image], max_new_tokens=1)
    msg = str(e.value)
    assert "prompt 0 has 284 tokens (1 image(s) at 280 soft tokens each, max_soft_tokens=280)" in msg
    assert f"at most {model.max_len} tokens" in msg and "use max_soft_tokens=70 (--max-soft-tokens 70)" in msg
    assert runtime.generate(model, prompt, images=[image], max_new_tokens=1, max_soft_tokens=70).prompt_tokens == 74


def test_position_table_is_checked_before_onnxruntime(tmp_path):
    from tests.test_manifest_trust import make_fake_artifact

    model = runtime.load(make_fake_artifact(tmp_path / "art", mm_posemb_size=4))
    wide = np.zeros((48, 48 * 6, 3), np.uint8)
    with pytest.raises(runtime.InputError, match=r"image 1 of 1: .*grid of 3x20 soft tokens.*at most 4 per row"):
        runtime.generate(model, [2, 7], images=[wide], max_new_tokens=1, max_soft_tokens=70)


# ------------------------------------------------------------------ the command line: one error line, exit 2
def _cli(*args: str, env: dict | None = None, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                          text=True, env=None if env is None else {**os.environ, **env})


def _one_error_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    from PIL import Image

    from tests.test_manifest_trust import make_fake_artifact

    root = tmp_path_factory.mktemp("cli")
    art = make_fake_artifact(root / "art", mm_posemb_size=16)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(root / "whole.png")
    Image.fromarray(np.zeros((48, 960, 3), np.uint8)).save(root / "wide.png")  # 1x37 soft tokens at budget 70
    data = (root / "whole.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("1", (20000, 9000)).save(root / "bomb.png")  # 180 M pixels: above Pillow's hard limit, 25 kB on disk
    return root, art


def test_cli_generates_with_ids(cli_inputs):
    _, art = cli_inputs
    done = _cli("--artifact", str(art), "--ids", "2,3", "--max-new-tokens", "2")
    assert done.returncode == 0 and done.stdout.startswith("12 12 ") and done.stderr == "", done.stderr


@pytest.mark.parametrize("case", ["truncated", "bomb", "grid", "ids-float", "ids-negative", "ids-vocab", "budget",
                                  "missing-image", "not-an-artifact", "max-new-tokens", "prompt-env-unset"])
def test_cli_input_errors(cli_inputs, case):
    root, art = cli_inputs
    a = ["--artifact", str(art)]
    image = ["--ids", "2,7", "--max-soft-tokens", "70"]
    runs = {
        "truncated": (a + image + ["--image", str(root / "cut.png")], ["cut.png", "truncated or corrupt"]),
        "bomb": (a + image + ["--image", str(root / "bomb.png")], ["bomb.png", "decompression bomb"]),
        "grid": (a + image + ["--image", str(root / "wide.png")], ["grid of 1x37", "position table", "16 per row"]),
        "ids-float": (a + ["--ids", "2,1.5"], ["--ids: '1.5' is not an integer token id"]),
        "ids-negative": (a + ["--ids=-3,4"], ["--ids: -3 is negative"]),
        "ids-vocab": (a + ["--ids", "2,99"], ["outside the vocabulary [0, 16)"]),
        "budget": (a + ["--ids", "2", "--max-soft-tokens", "100"], ["--max-soft-tokens", "invalid choice: 100"]),
        "missing-image": (a + image + ["--image", str(root / "nope.png")], ["nope.png", "does not exist"]),
        "not-an-artifact": (["--artifact", str(root), "--ids", "2"], [str(root / "manifest.json"), "missing"]),
        "max-new-tokens": (a + ["--ids", "2", "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
        "prompt-env-unset": (a + ["--prompt-env", "GEMMA4_TEST_UNSET_VARIABLE"], ["GEMMA4_TEST_UNSET_VARIABLE"]),
    }
    args, expected = runs[case]
    _one_error_line(_cli(*args), *expected)


def test_cli_artifact_errors(tmp_path):
    from tests.test_manifest_trust import _edit, make_fake_artifact, write_graph

    art = make_fake_artifact(tmp_path / "art")
    (art / "manifest.json").write_text("{broken")
    _one_error_line(_cli("--artifact", str(art), "--ids", "2"), "manifest.json: not valid JSON")

    art = make_fake_artifact(tmp_path / "schema")
    _edit(art, lambda m: m["engines"].update(onnxruntime={"prefill": "/etc/x", "decode": "decode.onnx"}))
    _one_error_line(_cli("--artifact", str(art), "--ids", "2"),
                    "engines.onnxruntime.prefill: expected a relative path inside the artifact, got '/etc/x'")

    art = make_fake_artifact(tmp_path / "ort")  # external data ONNX Runtime refuses: too short for the tensor
    (art / "weights.data").write_bytes(b"\0" * 8)
    _edit(art, lambda m: m["files"].update({"weights.data": __import__("hashlib").sha256(b"\0" * 8).hexdigest()}))
    _one_error_line(_cli("--artifact", str(art), "--ids", "2"), "prefill.onnx: ONNX Runtime", "cannot load this graph")

    art = make_fake_artifact(tmp_path / "outside")
    write_graph(art / "prefill.onnx", "prefill", "../stolen.data", data_path=tmp_path / "stolen.data")
    _edit(art, lambda m: m["files"].update({"prefill.onnx": runtime.manifest.sha256_file(art / "prefill.onnx")}))
    _one_error_line(_cli("--artifact", str(art), "--ids", "2"), "'../stolen.data', outside the artifact")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_cli_full_disk(cli_inputs):
    _, art = cli_inputs
    with open("/dev/full", "w") as full:
        done = _cli("--artifact", str(art), "--ids", "2,3", stdout=full)
    _one_error_line(done, "cannot write the output to standard output", "No space left on device")


# ------------------------------------------------------------------ make generate
def test_make_generate_passes_the_prompt_verbatim(tmp_path):
    """PROMPT with backticks, $5 and a double quote reaches the CLI unchanged (through the environment), and the
    other variables become their flags; PY is replaced by a script that records what it was given."""
    record = tmp_path / "record.json"
    spy = tmp_path / "spy.py"
    spy.write_text("import json, os, sys\n"
                   f"json.dump({{'argv': sys.argv[1:], 'prompt': os.environ.get('PROMPT')}}, open({str(record)!r}, 'w'))\n")
    prompt = 'What is `touch pwned` and $5 and $(HOME) or "quoted" \\ it\'s ?'
    done = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "generate", f"PY={sys.executable} {spy}", f"OUT={tmp_path}/my art",
         f"PROMPT={prompt}", "CHAT=1", f"IMAGE={tmp_path}/a.png {tmp_path}/b.png", f"AUDIO={tmp_path}/c.wav",
         "MAX_SOFT_TOKENS=70", "TEMPERATURE=0.7", "TOP_K=5", "TOP_P=0.9", "SEED=3", "MAX_NEW_TOKENS=4"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(record.read_text())
    assert got["prompt"] == prompt
    assert not (ROOT / "pwned").exists() and not (tmp_path / "pwned").exists()
    assert got["argv"] == [
        "-m", "runtime", "--artifact", f"{tmp_path}/my art", "--max-new-tokens", "4", "--prompt-env", "PROMPT",
        "--chat", "--image", f"{tmp_path}/a.png", "--image", f"{tmp_path}/b.png", "--audio", f"{tmp_path}/c.wav",
        "--max-soft-tokens", "70", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3",
    ]


def test_make_generate_on_the_demo_answers_in_chat_format(demo_artifact):
    """`make generate PROMPT='What is 3 plus 4 ?'` answered nothing before (no chat turn); the CLI now wraps a text
    prompt in a user turn when the tokenizer has the turn tokens, and the prompt travels through the environment."""
    def make(*extra):
        return subprocess.run(["make", "-s", "-o", ".venv/.installed", "generate", f"PY={sys.executable}",
                               f"OUT={demo_artifact}", "PROMPT=What is 3 plus 4 ?", *extra],
                              cwd=ROOT, capture_output=True, text=True)

    done = make()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "7" and "finish: stop" in done.stdout
    raw = make("CHAT=0")  # the bare text, as before: the model needs its turn format
    assert raw.returncode == 0 and raw.stdout.splitlines()[0] != "7"
