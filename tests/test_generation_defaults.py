"""The checkpoint's ``generation_config.json`` carried in the artifact gives `runtime.generate` and the engine
their defaults where the caller sets none: its eos ids stop generation, ``do_sample`` with its temperature and
top-k is what an unset temperature means; an explicit argument still wins."""

from __future__ import annotations

import json
import shutil

import pytest

import runtime
from runtime.engine import Engine, SamplingParams
from runtime.manifest import read_manifest, write_manifest
from tests.cases import _ids

PROMPT = _ids(4, 12)  # its greedy answer changes token twice in 12 (the tiny model often repeats one)


@pytest.fixture(scope="module")
def plain(artifact_store):
    return runtime.load(artifact_store("tiny"))


def _with_config(plain, tmp_path, config: dict):
    art = tmp_path / "art"
    shutil.copytree(plain.root, art)
    (art / "generation_config.json").write_text(json.dumps(config))
    manifest = read_manifest(art)
    manifest["generation_config"] = "generation_config.json"
    write_manifest(art, {k: v for k, v in manifest.items() if k != "files"})
    return runtime.load(art)


def test_eos_ids_of_the_config_stop_generation(plain, tmp_path):
    greedy = runtime.generate(plain, PROMPT, max_new_tokens=10).tokens
    stop_at = next(t for k, t in enumerate(greedy) if k and t not in greedy[:k])  # a new token after the first
    model = _with_config(plain, tmp_path, {"eos_token_id": [1, stop_at]})
    got = runtime.generate(model, PROMPT, max_new_tokens=10)
    assert got.tokens == greedy[:greedy.index(stop_at) + 1] and got.finish_reason == "stop"
    with Engine(model, max_batch=1) as engine:
        res = engine.submit(PROMPT, params=SamplingParams(max_tokens=10)).result(timeout=60)
    assert res.tokens == got.tokens and res.finish_reason == "stop"


def test_do_sample_config_is_the_default_sampling(plain, tmp_path):
    model = _with_config(plain, tmp_path, {"do_sample": True, "temperature": 3.0, "top_k": 20})
    want = runtime.generate(plain, PROMPT, max_new_tokens=12, temperature=3.0, top_k=20, seed=5).tokens
    assert runtime.generate(model, PROMPT, max_new_tokens=12, seed=5).tokens == want
    assert runtime.generate(model, PROMPT, max_new_tokens=12, temperature=0.0).tokens == \
        runtime.generate(plain, PROMPT, max_new_tokens=12).tokens  # an explicit greedy wins
    assert want != runtime.generate(plain, PROMPT, max_new_tokens=12).tokens  # sampling did change the answer
