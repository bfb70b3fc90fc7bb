"""Config reading: transformers' config.json round trip, the 12B numbers, refusals, and the test registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.config import PRESETS, TEST_PRESETS, ModelConfig, load_config

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("preset", TEST_PRESETS)
def test_transformers_config_json_reads_back_as_the_preset(preset, reference_store):
    _, ckpt = reference_store(preset)
    assert load_config(ckpt) == PRESETS[preset]


def test_12b_numbers():
    c = PRESETS["gemma4-12b"]
    t = c.text
    assert (t.hidden_size, t.intermediate_size, t.num_layers, t.vocab_size) == (3840, 15360, 48, 262144)
    assert (t.num_heads, t.num_kv_heads, t.head_dim, t.sliding_window) == (16, 8, 256, 1024)
    assert (t.global_head_dim, t.num_global_kv_heads, t.attention_k_eq_v) == (512, 1, True)
    assert t.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",) and t.layer_types[-1] == "full_attention"
    assert int(t.full_partial_rotary_factor * t.global_head_dim // 2) == 64
    assert c.vision.patch_dim == 6912 and c.vision.mm_posemb_size == 1120 and c.audio.samples_per_token == 640
    k = c.tokens
    assert (k.boi, k.image, k.eoi, k.boa, k.audio, k.eoa, k.video) == (255999, 258880, 258882, 256000, 258881, 258883, 258884)
    assert (k.pad, k.eos, k.bos, k.turn_start, k.turn_end) == (0, 1, 2, 105, 106)
    # the 12B structure written as a transformers config reads back identically
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c


def test_transformers_builds_the_12b_structure_from_our_config():
    from transformers import Gemma4UnifiedConfig

    hf = Gemma4UnifiedConfig(**PRESETS["gemma4-12b"].to_hf_dict())
    assert hf.text_config.per_layer_config[5].head_dim == 512
    assert hf.text_config.per_layer_config[5].num_key_value_heads == 1
    assert hf.text_config.per_layer_config[0].head_dim == 256


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"model_type": "gemma3"}, "expected 'gemma4_unified'"),
        ({"text_config": {"num_kv_shared_layers": 4}}, "KV sharing"),
        ({"text_config": {"use_bidirectional_attention": "all"}}, "use_bidirectional_attention"),
        ({"text_config": {"layer_types": ["full_attention", "sliding_attention"], "num_hidden_layers": 2}},
         "last layer"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, patch, message):
    d = PRESETS["tiny"].to_hf_dict()
    for k, v in patch.items():
        d[k] = d[k] | v if isinstance(v, dict) else v
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path)


def test_every_test_preset_is_covered():
    """A tiny preset added to exporter.config without a test case fails here."""
    from tests.cases import ALL_CASES

    covered = {p for p, _ in ALL_CASES}
    assert covered == set(TEST_PRESETS)
    for p in TEST_PRESETS:
        names = {c for q, c in ALL_CASES if q == p}
        assert {"text", "long", "batch"} <= names, f"{p} lacks a core case"
        if PRESETS[p].vision is not None:
            assert "two_images" in names
        if PRESETS[p].audio is not None:
            assert "audio" in names


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("text_config", "hidden_size", "x", "text_config.hidden_size must be a non-negative integer"),
        ("text_config", "num_attention_heads", 2.5, "text_config.num_attention_heads must be a non-negative"),
        ("text_config", "rms_norm_eps", "1e-6", "text_config.rms_norm_eps must be a number"),
        ("text_config", "layer_types", "full_attention", "text_config.layer_types must be a list of strings"),
        ("vision_config", "mm_posemb_size", None, "vision_config.mm_posemb_size must be a non-negative integer"),
        ("vision_config", "patch_size", True, "vision_config.patch_size must be a non-negative integer"),
        ("", "image_token_id", "258880", "image_token_id must be a non-negative integer"),
    ],
)
def test_wrongly_typed_config_values_are_named(tmp_path, section, key, value, message):
    """A config.json that is valid JSON but has a value of the wrong type is refused naming the key, and the
    export CLI prints one `error:` line (no traceback) and exits 2."""
    import subprocess
    import sys

    d = PRESETS["tiny"].to_hf_dict()
    target = d if section == "" else d[section]
    target[key] = value
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=message):
        load_config(ckpt)
    r = subprocess.run(
        [sys.executable, "-m", "exporter.export", "--model", str(ckpt), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=TESTS.parent, timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "error:" in r.stderr and key in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
