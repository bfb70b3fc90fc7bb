"""`runtime.generate` on ONNX Runtime against transformers `generate`, greedy, token for token (32 new tokens),
on artifacts exported from the reference checkpoints; plus sampling, stopping and streaming behaviour."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import runtime
from exporter.config import PRESETS
from runtime.prompt import expand_prompt
from tests.cases import ALL_CASES, MAX_SOFT_TOKENS, cases
from tests.reference import reference_generate, reference_inputs

NEW_TOKENS = 32


@pytest.mark.parametrize("preset,case_name", ALL_CASES)
def test_greedy_matches_transformers_generate(preset, case_name, reference_store, artifact_store):
    ref, _ = reference_store(preset)
    model = runtime.load(artifact_store(preset))
    cfg = PRESETS[preset]
    case = cases(cfg)[case_name]
    tokens = cfg.to_json_dict()["tokens"]
    stop = [tokens["eos"], tokens["turn_end"]]
    batched = len(case.ids) > 1
    ours = runtime.generate(
        model,
        case.ids if batched else case.ids[0],
        images=case.images if batched else case.images[0],
        audio=case.audio if batched else case.audio[0],
        max_new_tokens=NEW_TOKENS,
        max_soft_tokens=MAX_SOFT_TOKENS,
    )
    ours = ours if batched else [ours]
    for i, (ids, im, au) in enumerate(zip(case.ids, case.images, case.audio)):
        prepared = expand_prompt(ids, im, au, cfg.to_json_dict(), max_soft_tokens=MAX_SOFT_TOKENS)
        expected = reference_generate(ref, reference_inputs(prepared, tokens), NEW_TOKENS, stop)
        assert ours[i].prompt_tokens == len(prepared.ids)
        assert ours[i].tokens == expected, f"{preset}/{case_name} prompt {i}: ours {ours[i].tokens} != {expected}"
        assert len(expected) == NEW_TOKENS or expected[-1] in stop


def test_runtime_does_not_import_torch(artifact_store):
    import subprocess

    code = (
        "import sys, runtime; m = runtime.load(sys.argv[1]); runtime.generate(m, [2, 5, 6], max_new_tokens=2); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code, str(artifact_store("tiny"))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_sampling_is_reproducible_with_a_seed(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    kw = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95)
    a = runtime.generate(model, [2, 7, 8, 9], seed=3, **kw).tokens
    b = runtime.generate(model, [2, 7, 8, 9], seed=3, **kw).tokens
    draws = {tuple(runtime.generate(model, [2, 7, 8, 9], seed=s, **kw).tokens) for s in range(4, 8)}
    assert a == b
    assert len(draws) > 1, "different seeds gave identical samples"


def test_top_k_one_equals_greedy(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    greedy = runtime.generate(model, [2, 40, 41], max_new_tokens=12).tokens
    assert runtime.generate(model, [2, 40, 41], max_new_tokens=12, temperature=0.7, top_k=1, seed=0).tokens == greedy


def test_stop_ids_end_generation(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    greedy = runtime.generate(model, [2, 40, 41], max_new_tokens=12).tokens
    stop_at = greedy[4]
    first = greedy.index(stop_at)
    res = runtime.generate(model, [2, 40, 41], max_new_tokens=12, stop=[stop_at])
    assert res.tokens == greedy[: first + 1]
    assert res.finish_reason == "stop"


def test_stream_yields_the_same_tokens(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    greedy = runtime.generate(model, [[2, 40, 41], [2, 9]], max_new_tokens=10)
    stream = runtime.generate(model, [[2, 40, 41], [2, 9]], max_new_tokens=10, stream=True)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for piece in stream:
        seen[piece.index].append(piece.token)
    assert [seen[0], seen[1]] == [g.tokens for g in greedy]
    assert [r.tokens for r in stream.results] == [g.tokens for g in greedy]


def test_generation_stops_when_the_cache_is_full(artifact_store):
    model = runtime.load(artifact_store("tiny"))
    prompt = [2] + [5] * (model.max_len - 4)
    res = runtime.generate(model, prompt, max_new_tokens=50, stop=[])
    assert res.finish_reason in ("length", "stop")
    assert res.prompt_tokens + len(res.tokens) <= model.max_len


def test_text_prompt_with_tokenizer(tmp_path, reference_store):
    """A string prompt is tokenized with the checkpoint's tokenizer.json, copied into the artifact."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from exporter.export import export_artifact
    from exporter.weights import load_model

    _, ckpt = reference_store("tiny-text")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<|turn>": 105, "<turn|>": 106}
    vocab |= {f"w{i}": i for i in range(4, 100)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>"])
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    out = tmp_path / "art"
    export_artifact(load_model(ckpt), out, max_len=64, tokenizer_dir=tok_dir, log=lambda *_: None)
    model = runtime.load(out)
    by_text = runtime.generate(model, runtime.chat_prompt("w5 w6 w7"), max_new_tokens=6)
    encoded = model.tokenizer.encode(runtime.chat_prompt("w5 w6 w7"))
    # bos, <|turn>, "user" (unknown here), w5 w6 w7, <turn|>, <|turn>, "model" (unknown)
    assert encoded == [2, 105, 3, 5, 6, 7, 106, 105, 3]
    by_ids = runtime.generate(model, encoded, max_new_tokens=6)
    assert by_text.tokens == by_ids.tokens
    assert isinstance(by_text.text, str)
    assert by_text.text == model.tokenizer.decode([t for t in by_text.tokens if t not in (1, 106)])
    # detokenize=False: the same tokens, no text anywhere
    ids_only = runtime.generate(model, encoded, max_new_tokens=6, stream=True, detokenize=False)
    assert {p.text for p in ids_only} == {""}
    assert ids_only.results.tokens == by_ids.tokens and ids_only.results.text is None


def test_batch_logits_do_not_depend_on_padding(artifact_store):
    """A prompt's first greedy tokens are the same alone and inside a batch with longer prompts."""
    model = runtime.load(artifact_store("tiny-deep"))
    rng = np.random.default_rng(5)
    short = [2] + [int(t) for t in rng.integers(3, 290, 6)]
    long = [2] + [int(t) for t in rng.integers(3, 290, 40)]
    alone = runtime.generate(model, short, max_new_tokens=20).tokens
    together = runtime.generate(model, [long, short, long[:20]], max_new_tokens=20)
    assert together[1].tokens == alone
