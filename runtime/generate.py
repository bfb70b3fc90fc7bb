"""`load` an artifact and `generate` from it: prompt preparation, prefill, the decode loop, sampling, stopping.

One prefill runs the whole (right-padded) batch, then one decode step per new token for all sequences; a finished
sequence keeps stepping with the pad token and its outputs are ignored.  Generation stops per sequence on eos,
end of turn (``<turn|>``) or a ``stop`` id (the stop token is included in ``tokens``, as transformers does, and left
out of ``text``), or when its cache is full (``finish_reason == "length"``).

Torch-free on the ONNX Runtime path.  Does not build engines or export (see `exporter`, `graphs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import read_manifest
from runtime.prompt import expand_prompt, is_batch, pack_batch
from runtime.sampling import make_sampler
from runtime.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["GenerationResult", "LoadedModel", "Piece", "generate", "load"]

BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass
class LoadedModel:
    root: Path
    manifest: dict[str, Any]
    backend: Any
    tokenizer: Tokenizer | None

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["model_config"]

    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])


@dataclass
class GenerationResult:
    tokens: list[int]  # new ids, the stop token included
    text: str | None  # None when the artifact has no tokenizer
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int  # after expanding images and audio


@dataclass(frozen=True)
class Piece:
    """One streamed step of one sequence: the new token and the text it completes ("" if none yet)."""

    index: int
    token: int
    text: str


def _tensorrt_unavailable(manifest: dict) -> str | None:
    if "tensorrt" not in manifest.get("engines", {}):
        return "the artifact has no TensorRT engines (run `make build-engine BACKEND=tensorrt` on a GPU machine)"
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError as e:
        return f"tensorrt and torch (CUDA) must be importable ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def load(artifact_dir: str | Path, backend: str = "auto", *, verify: bool = True, threads: int | None = None) -> LoadedModel:
    """Open an artifact directory (its files are checked against the manifest) with the chosen backend.

    ``auto`` takes TensorRT when the artifact has engines and this machine can run them, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; expected one of {BACKENDS}")
    root = Path(artifact_dir)
    manifest = read_manifest(root, verify=verify)
    tokenizer = Tokenizer.from_dir(root) if manifest.get("tokenizer") else None
    if backend in ("tensorrt", "auto"):
        reason = _tensorrt_unavailable(manifest)
        if reason is None:
            from runtime.trt_backend import TrtBackend

            return LoadedModel(root, manifest, TrtBackend(root, manifest), tokenizer)
        if backend == "tensorrt":
            raise RuntimeError(f"{root}: cannot run with TensorRT: {reason}")
    from runtime.ort_backend import OrtBackend

    return LoadedModel(root, manifest, OrtBackend(root, manifest, threads=threads), tokenizer)


def _prompt_ids(model: LoadedModel, prompt: str | Sequence[int], index: int) -> list[int]:
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ValueError(f"{model.root}: the artifact has no tokenizer; pass the prompt as a list of token ids")
        return model.tokenizer.encode(prompt)
    ids = [int(t) for t in prompt]
    vocab = model.config["text"]["vocab_size"]
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    if bad := [t for t in ids if not 0 <= t < vocab]:
        raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return ids


def _stream(
    model: LoadedModel,
    prompts: list,
    images: list,
    audio: list,
    *,
    max_new_tokens: int,
    sampler,
    rng: np.random.Generator,
    stop_ids: set[int],
    max_soft_tokens: int,
    results: list[GenerationResult],
) -> Iterator[Piece]:
    cfg, tk = model.config, model.config["tokens"]
    prepared = [
        expand_prompt(_prompt_ids(model, p, i), im, au, cfg, max_soft_tokens=max_soft_tokens, index=i)
        for i, (p, im, au) in enumerate(zip(prompts, images, audio))
    ]
    max_len = model.max_len
    for i, p in enumerate(prepared):
        if len(p.ids) >= max_len:
            raise ValueError(
                f"prompt {i} has {len(p.ids)} tokens (images and audio expanded) but this artifact holds at most "
                f"{max_len} tokens per sequence (max_len) including at least one new token; shorten the prompt or "
                f"re-export with a larger --max-len"
            )
    batch = pack_batch(prepared, tk["pad"])
    results[:] = [GenerationResult([], None, "length", len(p.ids)) for p in prepared]
    decoders = [IncrementalDecoder(model.tokenizer) if model.tokenizer else None for _ in prepared]
    cache = model.backend.new_cache(len(prepared), max_len)
    logits = model.backend.prefill(batch, cache)
    lens = batch.seq_lens.copy()
    done = np.zeros(len(prepared), dtype=bool)
    for _ in range(max_new_tokens):
        chosen = sampler.choose(logits, rng)
        for i, tok in enumerate(chosen.tolist()):
            if done[i]:
                continue
            res = results[i]
            res.tokens.append(tok)
            stopped = tok in stop_ids
            piece = decoders[i].feed(tok) if decoders[i] and not stopped else ""
            yield Piece(i, tok, piece)
            if stopped:
                res.finish_reason, done[i] = "stop", True
            elif lens[i] + 1 >= max_len:
                done[i] = True
        if done.all():
            break
        feed = np.where(done, tk["pad"], chosen).astype(np.int64)
        logits = model.backend.decode(feed[:, None], lens, cache)
        lens = np.minimum(lens + 1, max_len - 1)
    for i, res in enumerate(results):
        if decoders[i]:
            tail = decoders[i].finish()
            if tail:
                yield Piece(i, -1, tail)
            res.text = decoders[i].text


def generate(
    model_or_dir: LoadedModel | str | Path,
    prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    images: Any = None,
    audio: Any = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[int] | None = None,
    stream: bool = False,
    max_soft_tokens: int = 280,
):
    """Generate from one prompt (returns a `GenerationResult`) or a batch (returns a list of them).

    A prompt is text (tokenized with the artifact's tokenizer; use `runtime.chat_prompt` for a chat turn) or a
    list of token ids; a batch is a list of those.  ``images``/``audio``: for one prompt, a list in placeholder
    order; for a batch, one such list per prompt.  With ``stream=True`` an iterator of `Piece` is returned
    instead; the final results are then in the iterator's ``results`` attribute once it is exhausted.
    """
    model = model_or_dir if isinstance(model_or_dir, LoadedModel) else load(model_or_dir)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected at least 1")
    batched = is_batch(prompt)
    prompts = list(prompt) if batched else [prompt]
    if batched:
        images = list(images) if images is not None else [None] * len(prompts)
        audio = list(audio) if audio is not None else [None] * len(prompts)
        if len(images) != len(prompts) or len(audio) != len(prompts):
            raise ValueError(
                f"a batch of {len(prompts)} prompts needs one images list and one audio list per prompt "
                f"(got {len(images)} and {len(audio)})"
            )
    else:
        images, audio = [images], [audio]
    tk = model.config["tokens"]
    stop_ids = {tk["eos"], tk["turn_end"], *(int(s) for s in (stop or ()))}
    results: list[GenerationResult] = []
    pieces = _stream(
        model, prompts, images, audio, max_new_tokens=max_new_tokens, sampler=make_sampler(temperature, top_k, top_p),
        rng=np.random.default_rng(seed), stop_ids=stop_ids, max_soft_tokens=max_soft_tokens, results=results,
    )
    if stream:
        return _Streamer(pieces, results, batched)
    for _ in pieces:
        pass
    return results if batched else results[0]


class _Streamer:
    """Iterator over `Piece`s; ``results`` holds the final `GenerationResult`(s) once exhausted."""

    def __init__(self, pieces: Iterator[Piece], results: list[GenerationResult], batched: bool):
        self._pieces, self._results, self._batched = pieces, results, batched

    def __iter__(self) -> Iterator[Piece]:
        return self._pieces

    @property
    def results(self):
        return self._results if self._batched else (self._results[0] if self._results else None)
