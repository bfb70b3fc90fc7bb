"""The demo's word-level tokenizer (``tokenizers``), with Gemma 4's special tokens at fixed small ids.

Saved as ``tokenizer.json`` in the checkpoint directory, the way real checkpoints ship theirs; the runtime reads it
with `runtime.tokenizer.Tokenizer`.  Built from `demo.tasks.vocabulary`, so it is regenerated, never trained.
"""

from __future__ import annotations

from demo.tasks import vocabulary
__all__ = ["SPECIALS", "build_tokenizer"]

SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<|image|>", "<image|>",
    "<|audio>", "<|audio|>", "<audio|>", "<|video|>",
)
# Their ids are those of PRESETS["demo"].tokens (tests/test_demo.py checks it).


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in vocabulary():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(list(SPECIALS))
    return tok
