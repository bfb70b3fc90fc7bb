"""The committed demo checkpoint: its layout, transformers agreeing with our runtime, and held-out accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import runtime
from demo.evaluate import answer
from demo.tasks import examples, prompt_text
from demo.tokenizer import SPECIALS, build_tokenizer
from exporter.config import PRESETS, load_config
from runtime.prompt import expand_prompt
from tests.reference import reference_generate, reference_inputs

CKPT = Path(__file__).resolve().parents[1] / "demo" / "checkpoint"


def test_checkpoint_layout():
    assert load_config(CKPT) == PRESETS["demo"]
    assert json.loads((CKPT / "config.json").read_text())["model_type"] == "gemma4_unified"
    size = sum(f.stat().st_size for f in CKPT.iterdir())
    assert size < 30 * 2**20, f"demo checkpoint is {size / 2**20:.1f} MiB"
    tok = runtime.tokenizer.Tokenizer.from_dir(CKPT)
    ids = PRESETS["demo"].tokens
    for name, tid in [("<pad>", ids.pad), ("<eos>", ids.eos), ("<bos>", ids.bos), ("<|turn>", ids.turn_start),
                      ("<turn|>", ids.turn_end), ("<|image>", ids.boi), ("<|image|>", ids.image),
                      ("<image|>", ids.eoi), ("<|audio>", ids.boa), ("<|audio|>", ids.audio), ("<audio|>", ids.eoa)]:
        assert tok.token_to_id(name) == tid, name
    assert build_tokenizer().get_vocab() == json.loads((CKPT / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(SPECIALS) <= set(build_tokenizer().get_vocab())


def test_task_generator_is_deterministic_and_splits_differ():
    a, b = examples("heldout", 20, seed=0), examples("heldout", 20, seed=0)
    assert [e.answer for e in a] == [e.answer for e in b]
    assert all(np.array_equal(x, y) for e, f in zip(a, b) for x, y in zip(e.images + e.audio, f.images + f.audio))
    train = examples("train", 20, seed=0)
    assert [e.question for e in train] != [e.question for e in a] or [e.answer for e in train] != [e.answer for e in a]
    assert {e.kind for e in examples("train", 200)} == {"colour", "shape", "count", "pitch", "sum"}


def test_transformers_and_runtime_give_the_same_answers(demo_artifact):
    from transformers import Gemma4UnifiedForConditionalGeneration

    ref = Gemma4UnifiedForConditionalGeneration.from_pretrained(CKPT).eval()
    ref.set_attn_implementation("eager")
    model = runtime.load(demo_artifact)
    cfg = PRESETS["demo"].to_json_dict()
    tokens = cfg["tokens"]
    batch = examples("heldout", 15, seed=0)
    ours = runtime.generate(
        model, [prompt_text(e) for e in batch], images=[e.images for e in batch], audio=[e.audio for e in batch],
        max_new_tokens=4, max_soft_tokens=70,
    )
    for ex, got in zip(batch, ours):
        ids = model.tokenizer.encode(prompt_text(ex))
        prepared = expand_prompt(ids, ex.images, ex.audio, cfg, max_soft_tokens=70)
        expected = reference_generate(ref, reference_inputs(prepared, tokens), 4, [tokens["eos"], tokens["turn_end"]])
        assert got.tokens == expected, f"{ex.question}: runtime {got.tokens} != transformers {expected}"


def test_heldout_accuracy_of_the_exported_demo(demo_accuracy):
    assert demo_accuracy >= 0.95, f"held-out accuracy {demo_accuracy:.3f}"


def test_demo_answers_every_kind(demo_artifact):
    model = runtime.load(demo_artifact)
    batch = [next(e for e in examples("heldout", 60, seed=1) if e.kind == k) for k in ("colour", "pitch", "sum")]
    assert answer(model, batch) == [e.answer for e in batch]
