"""The committed demo checkpoint: its layout, its tasks, transformers agreeing with our runtime, held-out accuracy;
the committed demo assistant: it fits the target, its training rounds are transformers' drafting rounds, and greedy
decoding with it equals plain greedy decoding in transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

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
    assert {e.kind for e in examples("train", 200)} == {"colour", "shape", "count", "pitch", "sum", "continue"}


def test_continue_task_follows_its_rule():
    """``continue``: numbers 0-18 with a constant step 1-4 (mod 19) from the prompt's 3-18 terms, one lap on, up to
    the prompt's last term again (so the answer ends with the prompt's terms).  Checked from the text alone."""
    data = examples("train", 400, seed=3)
    again = examples("train", 400, seed=3)
    assert [(e.question, e.answer) for e in data] == [(e.question, e.answer) for e in again]
    cont = [e for e in data if e.kind == "continue"]
    assert len(cont) > 40
    steps, given = set(), set()
    for e in cont:
        head, shown = e.question.split(" : ")
        assert head == "Continue this sequence" and not e.images and not e.audio
        terms = [int(x) for x in shown.split(" , ")]
        answer = [int(x) for x in e.answer.split(" , ")]
        assert 3 <= len(terms) <= 18 and len(answer) == 19 and e.answer.count(",") == 18
        step = (terms[1] - terms[0]) % 19
        steps.add(step)
        given.add(len(terms))
        seq = terms + answer
        assert all((b - a) % 19 == step for a, b in zip(seq, seq[1:])) and all(0 <= x <= 18 for x in seq)
        assert sorted(answer) == list(range(19)) and answer[-len(terms):] == terms
        assert len(build_tokenizer().encode(e.answer).ids) == 37
    assert steps == {1, 2, 3, 4} and min(given) == 3 and max(given) == 18


def test_calibration_splits_keep_the_committed_default_data():
    """The calibration and report splits draw the five short kinds from their former streams, so
    ``python -m demo.make_default_data`` still writes the committed calib/default_data (and its assistant set of
    ``continue`` questions from the calibration stream)."""
    from calib.data import DEFAULT_DATA
    from demo.make_default_data import SPLITS

    assert set(SPLITS) == {"calibration", "heldout", "assistant"}
    for folder, (split, n, kinds) in SPLITS.items():
        data = examples(split, n, seed=0, kinds=kinds)
        files = sorted((DEFAULT_DATA / folder).glob("*.txt"))
        assert [f.name for f in files] == [f"{i:03d}_{e.kind}.txt" for i, e in enumerate(data)]
        assert [f.read_text() for f in files] == [prompt_text(e) for e in data]
    # the assistant's calibration questions are none of the held-out ones its acceptance is measured on
    held = {prompt_text(e) for e in examples("heldout", 400, seed=0)}
    assert not held & {f.read_text() for f in (DEFAULT_DATA / "assistant").glob("*.txt")}


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
    kinds = ("colour", "pitch", "sum", "continue")
    batch = [next(e for e in examples("heldout", 60, seed=1) if e.kind == k) for k in kinds]
    assert answer(model, batch) == [e.answer for e in batch]


# The demo assistant (demo/assistant): transformers' Gemma4UnifiedAssistantForCausalLM distilled from the target.
ASSISTANT = CKPT.parent / "assistant"


@pytest.fixture(scope="module")
def demo_pair():
    from transformers import Gemma4UnifiedAssistantForCausalLM

    from demo.assistant import load_target

    assistant = Gemma4UnifiedAssistantForCausalLM.from_pretrained(ASSISTANT).eval()
    assistant.set_attn_implementation("eager")
    return load_target(CKPT), assistant


def test_shipped_assistant_fits_the_target(demo_pair):
    target, assistant = demo_pair
    ours = json.loads((ASSISTANT / "config.json").read_text())
    theirs = json.loads((CKPT / "config.json").read_text())["text_config"]
    assert ours["model_type"] == "gemma4_unified_assistant"
    assert ours["backbone_hidden_size"] == theirs["hidden_size"] == target.config.get_text_config().hidden_size
    text = ours["text_config"]
    for key in ("vocab_size", "attention_k_eq_v", "sliding_window", "rope_parameters"):
        assert text[key] == theirs[key], key
    # it reads the keys and values of the target's last layer of each type: their geometry, every layer sharing them
    assert text["num_kv_shared_layers"] == text["num_hidden_layers"] and text["layer_types"][-1] == "full_attention"
    per_layer = assistant.config.get_text_config().per_layer_config
    for i, layer in enumerate(assistant.model.layers):
        source = [t.self_attn for t in target.model.language_model.layers
                  if t.self_attn.layer_type == text["layer_types"][i]][-1]
        assert layer.self_attn.head_dim == source.head_dim, i
        assert per_layer[i].num_key_value_heads == source.k_proj.out_features // source.head_dim, i
    assert assistant.lm_head.weight.shape[0] == theirs["vocab_size"]
    assert assistant.pre_projection.weight.shape[1] == 2 * theirs["hidden_size"]
    info = json.loads((ASSISTANT / "training.json").read_text())
    assert info["steps"] > 0 and info["data"]["train_prompts"] > 0 and info["history"]
    assert assistant.generation_config.num_assistant_tokens >= 2


def _hf_inputs(ex):
    from demo.assistant import hf_inputs

    return hf_inputs(ex, build_tokenizer(), PRESETS["demo"].to_json_dict()["tokens"], PRESETS["demo"].to_json_dict())


def test_round_formulation_matches_transformers_candidate_generator(demo_pair):
    """demo.assistant trains every round start at once with its own masks; its first round's drafts and logits equal
    what transformers' SinglePositionMultiTokenCandidateGenerator drafts right after the prefill."""
    import torch
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator as Generator

    from demo.assistant import round_logits, target_trace

    target, assistant = demo_pair
    cfg = PRESETS["demo"].to_json_dict()
    heldout = examples("heldout", 60, seed=2)
    for kind in ("continue", "colour", "sum"):  # the image prompt is longer than the sliding window
        ex = next(e for e in heldout if e.kind == kind)
        seen, original = [], Generator.get_candidates

        def spy(self, input_ids, **kwargs):
            out = original(self, input_ids, **kwargs)
            if out[1] is not None and not seen:
                seen.append((input_ids.shape[1], out[0][0, input_ids.shape[1]:].tolist(), out[1][0]))
            return out

        Generator.get_candidates = spy
        try:
            target.generate(**_hf_inputs(ex), assistant_model=assistant, do_sample=False, max_new_tokens=6,
                            eos_token_id=[1, 5], pad_token_id=0)
        finally:
            Generator.get_candidates = original
        length, drafts, logits = seen[0]
        trace = target_trace(target, ex, build_tokenizer(), cfg["tokens"], cfg)
        assert length - 1 == trace.start
        with torch.no_grad():
            mine = round_logits(assistant, target.get_input_embeddings(), trace, trace.start, len(drafts))
        assert mine.argmax(-1).tolist() == drafts, kind
        np.testing.assert_allclose(mine.numpy(), logits.numpy(), atol=1e-4)


def test_shipped_pair_greedy_with_assistant_equals_plain_greedy(demo_pair):
    target, assistant = demo_pair
    passes = [0]
    hook = target.register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    heldout = examples("heldout", 60, seed=4)
    try:
        for kind in ("continue", "sum", "pitch"):
            ex = next(e for e in heldout if e.kind == kind)
            inputs = _hf_inputs(ex)
            runs = {}
            for name, kw in (("plain", {}), ("assistant", {"assistant_model": assistant})):
                passes[0] = 0
                out = target.generate(**inputs, **kw, do_sample=False, max_new_tokens=40, eos_token_id=[1, 5],
                                      pad_token_id=0)
                runs[name] = (out[0, inputs["input_ids"].shape[1]:].tolist(), passes[0])
            assert runs["assistant"][0] == runs["plain"][0], kind
            if kind == "continue":  # a trained assistant saves most of the long answer's target passes
                assert runs["assistant"][1] <= runs["plain"][1] / 2, (kind, runs)
    finally:
        hook.remove()
