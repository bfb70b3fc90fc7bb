"""Text <-> token ids for Gemma 4, and the chat prompt format, without transformers.

`Tokenizer.from_dir` reads `tokenizer.json` with the `tokenizers` library, or failing that `tokenizer.model` with
`sentencepiece`; `Tokenizer.from_file` reads one named file (the runtime opens only the file its manifest lists). Special tokens written in the text (`<|turn>`, `<|image|>`, ...) become their single ids.
`IncrementalDecoder` turns a stream of generated ids into text pieces without splitting multi-byte characters.
`chat_prompt` writes one user turn in Gemma 4's turn format.

It deliberately does not expand media placeholders (one `<|image|>` per image becomes `<|image>` + n soft tokens +
`<image|>` elsewhere, once the number of soft tokens is known), render multi-turn chat templates (no Jinja), or
truncate/pad batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "AUDIO_PLACEHOLDER",
    "IMAGE_PLACEHOLDER",
    "SPECIAL_TOKENS",
    "IncrementalDecoder",
    "Tokenizer",
    "chat_prompt",
]

IMAGE_PLACEHOLDER = "<|image|>"
AUDIO_PLACEHOLDER = "<|audio|>"

# Gemma 4's special tokens. The tokenizer.json marks its own; for a sentencepiece model, which cannot say which
# user-defined pieces are special, these (when present) are skipped by `decode(skip_special_tokens=True)`.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<|image|>",
    "<image|>",
    "<|audio>",
    "<|audio|>",
    "<audio|>",
    "<|video|>",
)

_DEFAULT_BOS_ID = 2
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A Gemma 4 tokenizer backed by `tokenizers` (tokenizer.json) or `sentencepiece` (tokenizer.model)."""

    def __init__(self, backend: Any, *, kind: str, source: Path) -> None:
        if kind not in ("tokenizers", "sentencepiece"):
            raise ValueError(f"Unknown tokenizer kind {kind!r}; expected 'tokenizers' or 'sentencepiece'.")
        self._backend = backend
        self._kind = kind
        self.source = source
        self._sp_special_ids: frozenset[int] = frozenset()
        if kind == "sentencepiece":
            controls = {i for i in range(backend.get_piece_size()) if backend.is_control(i) or backend.is_unknown(i)}
            named = {i for i in (self.token_to_id(t) for t in SPECIAL_TOKENS) if i is not None}
            self._sp_special_ids = frozenset(controls | named)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` from directory `path` if present, else `tokenizer.model`."""
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"Tokenizer directory {str(directory)!r} does not exist or is not a directory.")
        for name in ("tokenizer.json", "tokenizer.model"):
            if (directory / name).is_file():
                return cls.from_file(directory / name)
        raise FileNotFoundError(
            f"No tokenizer in {str(directory)!r}: expected 'tokenizer.json' (read with `tokenizers`) or "
            "'tokenizer.model' (read with `sentencepiece`). Copy one from the checkpoint directory."
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load one tokenizer file: a `*.json` with `tokenizers`, anything else as a `sentencepiece` model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer file {str(path)!r} does not exist.")
        if path.suffix == ".json":
            import tokenizers

            try:
                backend = tokenizers.Tokenizer.from_file(str(path))
            except Exception as err:  # the Rust library raises a bare Exception for malformed files
                raise ValueError(f"{str(path)!r} is not a tokenizer file the `tokenizers` library can read: {err}") from err
            return cls(backend, kind="tokenizers", source=path)
        import sentencepiece

        backend = sentencepiece.SentencePieceProcessor()
        try:
            backend.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{str(path)!r} is not a sentencepiece model: {err}") from err
        return cls(backend, kind="sentencepiece", source=path)

    @property
    def vocab_size(self) -> int:
        if self._kind == "tokenizers":
            return int(self._backend.get_vocab_size(with_added_tokens=True))
        return int(self._backend.get_piece_size())

    @property
    def bos_id(self) -> int:
        """Id of `<bos>`, or 2 (Gemma's) when the vocabulary has no such token."""
        found = self.token_to_id("<bos>")
        return _DEFAULT_BOS_ID if found is None else found

    def token_to_id(self, token: str) -> int | None:
        """Id of the single token `token`, or None when it is not in the vocabulary."""
        if self._kind == "tokenizers":
            return self._backend.token_to_id(token)
        found = int(self._backend.piece_to_id(token))
        if self._backend.is_unknown(found) and self._backend.id_to_piece(found) != token:
            return None  # sentencepiece answers the unknown id for pieces it does not have
        return found

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, special tokens in the text included, with `<bos>` first when `add_bos`."""
        if self._kind == "tokenizers":
            ids = list(self._backend.encode(text, add_special_tokens=False).ids)
        else:
            ids = [int(i) for i in self._backend.encode(text)]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are left out when `skip_special_tokens`, written as text otherwise."""
        ids = [int(i) for i in ids]
        if self._kind == "tokenizers":
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            return self._backend.decode([i for i in ids if i not in self._sp_special_ids])
        # sentencepiece always drops control pieces (<bos>, <eos>) when decoding: write them between decoded runs.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if self._backend.is_control(i):
                parts.append(self._backend.decode(run))
                parts.append(self._backend.id_to_piece(i))
                run = []
            else:
                run.append(i)
        parts.append(self._backend.decode(run))
        return "".join(parts)


class IncrementalDecoder:
    """Turns generated ids, fed one at a time, into the text each one adds.

    Every call decodes all ids so far and returns what goes beyond the text already returned. A piece ending in the
    replacement character U+FFFD (an incomplete multi-byte character) is held back until the next id completes it;
    `finish()` returns whatever is still held back.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = ""

    def _new_text(self) -> str:
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        return text[len(self._emitted) :]

    def feed(self, token_id: int) -> str:
        """Add one id; return the new text it completes ("" when there is none yet)."""
        self._ids.append(int(token_id))
        piece = self._new_text()
        if piece.endswith(_REPLACEMENT_CHAR):
            return ""
        self._emitted += piece
        return piece

    def finish(self) -> str:
        """Return the text still held back (a trailing incomplete character comes out as U+FFFD)."""
        piece = self._new_text()
        self._emitted += piece
        return piece

    @property
    def text(self) -> str:
        """All the text returned so far."""
        return self._emitted


def chat_prompt(user: str, *, system: str | None = None) -> str:
    """One user turn in Gemma 4's format, ending where the model's reply starts.

    Reference images and audio clips inside `user` with one IMAGE_PLACEHOLDER / AUDIO_PLACEHOLDER each. The `<bos>`
    token is not included: `Tokenizer.encode` adds it.
    """
    prompt = f"<|turn>system\n{system}<turn|>\n" if system is not None else ""
    return f"{prompt}<|turn>user\n{user}<turn|>\n<|turn>model\n"
