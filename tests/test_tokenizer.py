"""runtime.tokenizer on tiny tokenizers built here: a byte-level BPE (tokenizer.json) and a sentencepiece model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from runtime.tokenizer import (
    AUDIO_PLACEHOLDER,
    IMAGE_PLACEHOLDER,
    IncrementalDecoder,
    Tokenizer,
    chat_prompt,
)

SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<|image|>", "<image|>", "<|audio>", "<|audio|>",
    "<audio|>",
]  # fmt: skip
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a user asks the model a question and the model answers",
    "describe this image in one sentence please",
    "what is said in this audio clip",
    "hello world, hello model, hello user",
] * 4
MULTIBYTE = "héllo wörld 世界 🙂 done"


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",  # as Gemma's
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=[s for s in SPECIALS if s not in ("<pad>", "<eos>", "<bos>")],
        minloglevel=2,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("sp")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


@pytest.fixture(params=["tokenizer.json", "tokenizer.model"])
def tokenizer(request, bpe_dir, sp_dir) -> Tokenizer:
    directory = bpe_dir if request.param == "tokenizer.json" else sp_dir
    tok = Tokenizer.from_dir(directory)
    assert tok.source.name == request.param
    return tok


def test_special_tokens_in_text_become_single_ids(tokenizer):
    text = f"<|turn>user\ndescribe <|image>{IMAGE_PLACEHOLDER}<image|> and {AUDIO_PLACEHOLDER}<turn|>"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id == tokenizer.token_to_id("<bos>")
    for special in ("<|turn>", "<turn|>", "<|image>", "<|image|>", "<image|>", "<|audio|>"):
        special_id = tokenizer.token_to_id(special)
        assert special_id is not None and ids.count(special_id) == 1, special
        assert tokenizer.encode(special, add_bos=False) == [special_id]
    assert tokenizer.encode(text, add_bos=False) == ids[1:]


def test_decode_round_trip(tokenizer):
    for text in SENTENCES[:5] + [MULTIBYTE]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    ids = tokenizer.encode("<|turn>hello world<turn|>")
    assert tokenizer.decode(ids) == "hello world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<bos><|turn>hello world<turn|>"


def test_unknown_token_is_none(tokenizer):
    assert tokenizer.token_to_id("<definitely-not-a-token>") is None


def test_incremental_decoder_streams_whole_characters(tokenizer):
    ids = tokenizer.encode(f"<|turn>{MULTIBYTE}<turn|>")
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.feed(i) for i in ids]
    pieces.append(decoder.finish())
    assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE
    assert all("\ufffd" not in piece for piece in pieces)
    held_back = pieces[:-1].count("") - 3  # beyond the 3 special tokens (<bos>, <|turn>, <turn|>), which add no text
    assert held_back > 0  # bytes of multi-byte characters waiting for the rest of their character
    assert decoder.text == MULTIBYTE


def test_chat_prompt_encodes_turns(tokenizer):
    prompt = chat_prompt(f"what is in {IMAGE_PLACEHOLDER}?", system="be brief")
    assert prompt == (
        "<|turn>system\nbe brief<turn|>\n<|turn>user\nwhat is in <|image|>?<turn|>\n<|turn>model\n"
    )
    assert chat_prompt("hi") == "<|turn>user\nhi<turn|>\n<|turn>model\n"
    ids = tokenizer.encode(prompt)
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id
    assert ids.count(tokenizer.token_to_id("<|turn>")) == 3
    assert ids.count(tokenizer.token_to_id("<turn|>")) == 2
    assert ids.count(tokenizer.token_to_id(IMAGE_PLACEHOLDER)) == 1


def test_tokenizer_json_preferred_over_model(tmp_path, bpe_dir, sp_dir):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer.model").write_bytes((sp_dir / "tokenizer.model").read_bytes())
    assert Tokenizer.from_dir(tmp_path).source.name == "tokenizer.json"


def test_bos_falls_back_to_2(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.token_to_id("<bos>") is None
    assert loaded.bos_id == 2
    assert loaded.encode("hello") == [2, 1]


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer\.json.*tokenizer\.model"):
        (tmp_path / "empty").mkdir()
        Tokenizer.from_dir(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        Tokenizer.from_dir(tmp_path / "no-such-dir")


def test_broken_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)


def test_broken_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"tokenizer\.model.*not a sentencepiece model"):
        Tokenizer.from_dir(tmp_path)
