"""`load` an artifact and `generate` from it: prompt preparation, prefill, the decode loop, sampling, stopping.

One prefill runs the whole (right-padded) batch, then one decode step per new token for all sequences; a finished
sequence keeps stepping with the pad token and its outputs are ignored.  Generation stops per sequence on eos,
end of turn (``<turn|>``) or a ``stop`` id (the stop token is included in ``tokens``, as transformers does, and left
out of ``text``), or when its cache is full (``finish_reason == "length"``).  Prompts longer than the backend's
prefill chunk are prefilled in several calls on the growing cache (`_prefill`).

Torch-free on the ONNX Runtime path.  Does not build engines or export (see `exporter`, `graphs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import InputError
from runtime.generation_config import read_generation_config
from runtime.images import SUPPORTED_SOFT_TOKEN_BUDGETS
from runtime.manifest import MANIFEST_NAME, ArtifactError, read_manifest
from runtime.prompt import Prepared, PrefillInputs, RowMedia, chunk_end, expand_prompt, is_batch, pack_batch
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
    _assistant: Any = field(default=None, repr=False, compare=False)

    def assistant_runner(self):
        """The artifact's assistant (`runtime.assistant.AssistantRunner`), loaded on first use and kept: its session
        costs tens of ms to create, and one per request left extra ONNX Runtime thread pools competing with the
        target's on the same cores.  It takes the target backend's thread count.  On the TensorRT backend: the
        assistant's TensorRT engine on the backend's stream and caches (`runtime.trt_assistant`)."""
        if self._assistant is None and getattr(self.backend, "name", None) == "tensorrt":
            from runtime.trt_assistant import TrtAssistantRunner

            self._assistant = TrtAssistantRunner(self.root, self.manifest, self.backend)
        if self._assistant is None:
            from runtime.assistant import AssistantRunner

            self._assistant = AssistantRunner(self.root, self.manifest, threads=getattr(self.backend, "threads", None))
        return self._assistant

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


def _tokenizer(root: Path, manifest: dict) -> Tokenizer | None:
    """The tokenizer file the manifest lists (tokenizer.json first, else tokenizer.model), or None."""
    names = manifest.get("tokenizer") or []
    for wanted in ("tokenizer.json", "tokenizer.model"):
        for rel in names:
            if rel.rsplit("/", 1)[-1] == wanted:
                try:
                    return Tokenizer.from_file(root / rel)
                except (ValueError, OSError) as e:
                    raise ArtifactError(f"{root / rel}: {e}") from None
    if names:
        raise ArtifactError(f"{root / MANIFEST_NAME}: tokenizer lists {names} but neither a tokenizer.json nor a "
                            "tokenizer.model")
    return None


def load(artifact_dir: str | Path, backend: str = "auto", *, verify: bool = True, threads: int | None = None) -> LoadedModel:
    """Open an artifact directory (its files are checked against the manifest) with the chosen backend.

    ``auto`` takes TensorRT when the artifact has engines and this machine can run them, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise InputError(f"backend={backend!r}; expected one of {BACKENDS}")
    root = Path(artifact_dir)
    manifest = read_manifest(root, verify=verify)
    tokenizer = _tokenizer(root, manifest)
    if backend in ("tensorrt", "auto"):
        reason = _tensorrt_unavailable(manifest)
        if reason is None:
            from runtime.trt_backend import TrtBackend

            return LoadedModel(root, manifest, TrtBackend(root, manifest), tokenizer)
        if backend == "tensorrt":
            raise RuntimeError(f"{root}: cannot run with TensorRT: {reason}")
    from runtime.ort_backend import OrtBackend

    return LoadedModel(root, manifest, OrtBackend(root, manifest, threads=threads), tokenizer)


def _token_ids(prompt: Any, index: int) -> list[int]:
    """A prompt given as token ids, as Python ints: floats, bools, strings and negative ids are refused."""
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1:
            raise InputError(f"prompt {index}: a token-id array of shape {prompt.shape}; expected 1-D (a batch is a "
                             "list of prompts)")
        if not np.issubdtype(prompt.dtype, np.integer):
            raise InputError(f"prompt {index}: token ids of dtype {prompt.dtype}; expected integers")
    ids = []
    for pos, t in enumerate(prompt):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise InputError(f"prompt {index}: token {pos} is {t!r} ({type(t).__name__}); token ids are integers "
                             "(a float is not truncated)")
        if t < 0:
            raise InputError(f"prompt {index}: token {pos} is {int(t)}; token ids are >= 0")
        ids.append(int(t))
    return ids


def _prompt_ids(model: LoadedModel, prompt: str | Sequence[int], index: int) -> list[int]:
    vocab = model.config["text"]["vocab_size"]
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError(f"{model.root}: the artifact has no tokenizer; pass the prompt as a list of token ids")
        ids = model.tokenizer.encode(prompt)
        if bad := [(pos, t) for pos, t in enumerate(ids) if t >= vocab]:
            pos, t = bad[0]
            raise InputError(
                f"prompt {index}: the tokenizer ({model.tokenizer.source.name}) gave id {t} for "
                f"{model.tokenizer.decode([t], skip_special_tokens=False)!r} (token {pos}), but the model's vocabulary "
                f"has {vocab} ids (model_config.text.vocab_size); the tokenizer does not belong to this model"
            )
        return ids
    ids = _token_ids(prompt, index)
    if not ids:
        raise InputError(f"prompt {index} is empty")
    if bad := [t for t in ids if t >= vocab]:
        raise InputError(f"prompt {index} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    return ids


def _too_long(i: int, p: Prepared, max_len: int, max_soft_tokens: int) -> InputError:
    """The error for a prompt that does not fit the cache, saying how much the images and audio take."""
    parts = []
    if p.image_patches:
        counts = sorted({len(a) for a in p.image_patches})
        each = f"{counts[0]} soft tokens each" if len(counts) == 1 else f"{sum(map(len, p.image_patches))} soft tokens"
        parts.append(f"{len(p.image_patches)} image(s) at {each}, max_soft_tokens={max_soft_tokens}")
    if p.audio_frames:
        parts.append(f"{len(p.audio_frames)} audio clip(s), {sum(map(len, p.audio_frames))} soft tokens")
    media = f" ({'; '.join(parts)})" if parts else ""
    smallest = SUPPORTED_SOFT_TOKEN_BUDGETS[0]
    hint = f"use max_soft_tokens={smallest} (--max-soft-tokens {smallest}), " if (
        p.image_patches and max_soft_tokens > smallest) else ""
    return InputError(
        f"prompt {i} has {len(p.ids)} tokens{media} with images and audio expanded, but this artifact holds at most "
        f"{max_len} tokens per sequence (max_len) including at least one new token; {hint}shorten the prompt, or "
        f"re-export with a larger max_len (--max-len, MAX_LEN)"
    )


PREFILL_CHUNK = 2048  # tokens per sequence per prefill call, unless the backend says (`prefill_chunk`)


def _prefill(model: LoadedModel, prepared: list[Prepared], batch: PrefillInputs, cache: list) -> np.ndarray:
    """Prefill ``batch`` in one call, or in calls of at most the backend's ``prefill_chunk`` (default
    `PREFILL_CHUNK`) tokens per sequence on the growing cache (the graphs prefill on a non-empty cache); bounds
    activation memory, and TensorRT engines accept no more per call.  A call never ends inside an image's soft
    tokens: sliding layers attend both ways inside an image and the graphs number image blocks per call.  A row
    already complete waits at its length with no valid tokens (``seq_lens`` 0), and calls are short enough that
    every row's padded writes stay inside the cache.  Returns each row's logits after its last prompt token."""
    chunk = int(getattr(model.backend, "prefill_chunk", None) or PREFILL_CHUNK)
    lens = batch.seq_lens.astype(np.int64)
    if int(lens.max()) <= chunk:
        return model.backend.prefill(batch, cache)
    tk, max_len = model.config["tokens"], model.max_len
    ids = [np.asarray(p.ids, np.int64) for p in prepared]
    media = [RowMedia(p, tk) for p in prepared]
    done = np.zeros_like(lens)
    logits: np.ndarray | None = None
    while (done < lens).any():
        room = int(min(chunk, (max_len - done).min()))
        ends = done.copy()
        for i, row in enumerate(ids):
            if done[i] < lens[i]:
                ends[i] = chunk_end(row, int(done[i]), room, tk["image"], index=i, chunk=chunk)
        width = int((ends - done).max())
        call_ids = np.full((len(ids), width), tk["pad"], np.int64)
        parts: list[list[np.ndarray]] = [[], [], []]
        for i, row in enumerate(ids):
            a, b = int(done[i]), int(ends[i])
            call_ids[i, : b - a] = row[a:b]
            for part, x in zip(parts, media[i].between(a, b)):
                if x is not None:
                    part.append(x)
        patches, positions, frames = (np.concatenate(x) if x and sum(map(len, x)) else None for x in parts)
        out = model.backend.prefill(PrefillInputs(call_ids, done.copy(), ends - done, patches, positions, frames),
                                    cache)
        finished = (ends == lens) & (done < lens)
        logits = out.copy() if logits is None else logits
        logits[finished] = out[finished]
        done = ends
    return logits


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
    detokenize: bool = True,
    draft: str | None = None,
    num_draft_tokens: int | str = 4,
    spec_stats=None,
) -> Iterator[Piece]:
    cfg, tk = model.config, model.config["tokens"]
    prepared = [
        expand_prompt(_prompt_ids(model, p, i), im, au, cfg, max_soft_tokens=max_soft_tokens, index=i)
        for i, (p, im, au) in enumerate(zip(prompts, images, audio))
    ]
    max_len = model.max_len
    for i, p in enumerate(prepared):
        if len(p.ids) >= max_len:
            raise _too_long(i, p, max_len, max_soft_tokens)
    batch = pack_batch(prepared, tk["pad"])
    results[:] = [GenerationResult([], None, "length", len(p.ids)) for p in prepared]
    decoders = [IncrementalDecoder(model.tokenizer) if model.tokenizer and detokenize else None for _ in prepared]
    cache = model.backend.new_cache(len(prepared), max_len)
    logits = _prefill(model, prepared, batch, cache)
    if draft is not None:  # speculative decoding: the same tokens (greedy) or distribution, several per target pass
        from runtime.speculative.verify import ASSISTANT, speculative

        helper = model.assistant_runner() if draft == ASSISTANT else None
        for i, tok, finish in speculative(
                model.backend, cache, logits, [p.ids for p in prepared], num_draft_tokens=num_draft_tokens,
                max_new_tokens=max_new_tokens, max_len=max_len, stop_ids=stop_ids, draft=draft, sampler=sampler,
                rng=rng, assistant=helper, stats=spec_stats):
            results[i].tokens.append(tok)
            yield Piece(i, tok, decoders[i].feed(tok) if decoders[i] and finish is None else "")
            if finish:
                results[i].finish_reason = finish
        yield from _finish(results, decoders)
        return
    # The loop between two decode steps runs while the CPU caches hold the weights ONNX Runtime just streamed, not
    # the interpreter's data: it works on Python ints and lists, and makes one numpy call (the sampler's argmax).
    lens = batch.seq_lens.tolist()
    done = [False] * len(prepared)
    left, pad, last = len(prepared), tk["pad"], max_len - 1
    decode = model.backend.decode
    for _ in range(max_new_tokens):
        chosen = sampler.choose(logits, rng).tolist()
        for i, tok in enumerate(chosen):
            if done[i]:
                continue
            res = results[i]
            res.tokens.append(tok)
            stopped = tok in stop_ids
            piece = decoders[i].feed(tok) if decoders[i] and not stopped else ""
            yield Piece(i, tok, piece)
            if stopped:
                res.finish_reason, done[i] = "stop", True
                left -= 1
            elif lens[i] + 1 >= max_len:
                done[i] = True
                left -= 1
        if not left:
            break
        feed = [pad if d else t for t, d in zip(chosen, done)]
        logits = decode(feed, lens, cache, copy=False)  # lists of ints; the logits are consumed before the next step
        lens = [min(n + 1, last) for n in lens]
    yield from _finish(results, decoders)


def _finish(results: list[GenerationResult], decoders: list) -> Iterator[Piece]:
    """Each row's detokenizer tail as a last piece, and its text."""
    for i, res in enumerate(results):
        if decoders[i]:
            tail = decoders[i].finish()
            if tail:
                yield Piece(i, -1, tail)
            res.text = decoders[i].text



def _stop_ids(stop: Sequence[int] | None) -> list[int]:
    """``stop`` as a list of non-negative integer ids; floats, bools and strings are refused, not truncated."""
    if stop is None:
        return []
    if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
        raise InputError(f"stop={stop!r}; expected a list of token ids")
    out = []
    for pos, s in enumerate(stop):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or s < 0:
            raise InputError(f"stop[{pos}] is {s!r} ({type(s).__name__}); stop ids are non-negative integers")
        out.append(int(s))
    return out


def generate(
    model_or_dir: LoadedModel | str | Path,
    prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
    *,
    images: Any = None,
    audio: Any = None,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[int] | None = None,
    stream: bool = False,
    max_soft_tokens: int = 280,
    detokenize: bool = True,
    draft: str | None = None,
    num_draft_tokens: int | str = 4,
    spec_stats=None,
):
    """Generate from one prompt (returns a `GenerationResult`) or a batch (returns a list of them).

    A prompt is text (tokenized with the artifact's tokenizer; use `runtime.chat_prompt` for a chat turn) or a
    list of token ids; a batch is a list of those.  ``images``/``audio``: for one prompt, a list in placeholder
    order; for a batch, one such list per prompt.  With ``stream=True`` an iterator of `Piece` is returned
    instead; the final results are then in the iterator's ``results`` attribute once it is exhausted.
    ``temperature``/``top_k``/``top_p`` left at None take the artifact's ``generation_config.json``
    (`runtime.generation_config`: greedy unless it says ``do_sample``), and its eos ids stop generation besides
    ``<turn|>``, eos and ``stop``.  ``detokenize=False``: token ids only (each `Piece`'s text is empty, the results' ``text`` None), no tokenizer
    work per step, for callers that detokenize themselves (and for speed comparisons with stacks that return ids).
    ``draft="prompt_lookup"`` or ``"assistant"`` (the artifact's assistant, `make export-assistant`): speculative
    decoding (`runtime.speculative.verify`) with up to ``num_draft_tokens`` drafts per target pass (``"auto"``: chosen
    per round by `runtime.speculative.adapt.AdaptiveK` up to the artifact's K); greedy gives the same tokens as
    without it, sampling the same distribution (speculative sampling, seeded by ``seed``); needs an artifact exported
    with ``--speculative K`` (K >= num_draft_tokens).  ``spec_stats``: a `runtime.speculative.verify.SpecStats`.
    """
    model = model_or_dir if isinstance(model_or_dir, LoadedModel) else load(model_or_dir)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}; expected an integer >= 1")
    if max_soft_tokens not in SUPPORTED_SOFT_TOKEN_BUDGETS:
        raise InputError(f"max_soft_tokens={max_soft_tokens!r}; expected one of {SUPPORTED_SOFT_TOKEN_BUDGETS}")
    batched = is_batch(prompt)
    prompts = list(prompt) if batched else [prompt]
    if batched:
        images = list(images) if images is not None else [None] * len(prompts)
        audio = list(audio) if audio is not None else [None] * len(prompts)
        if len(images) != len(prompts) or len(audio) != len(prompts):
            raise InputError(
                f"a batch of {len(prompts)} prompts needs one images list and one audio list per prompt "
                f"(got {len(images)} and {len(audio)})"
            )
    else:
        images, audio = [images], [audio]
    defaults = read_generation_config(model)
    temperature = defaults["temperature"] if temperature is None else temperature
    top_k = defaults["top_k"] if top_k is None else top_k
    top_p = defaults["top_p"] if top_p is None else top_p
    stop_ids = {*defaults["eos_token_ids"], *_stop_ids(stop)}
    if draft is not None:
        from runtime.speculative.verify import check_draft

        check_draft(model.backend, draft, num_draft_tokens, model.manifest)
    results: list[GenerationResult] = []
    pieces = _stream(
        model, prompts, images, audio, max_new_tokens=max_new_tokens, sampler=make_sampler(temperature, top_k, top_p),
        rng=np.random.default_rng(seed), stop_ids=stop_ids, max_soft_tokens=max_soft_tokens, results=results,
        detokenize=bool(detokenize), draft=draft, num_draft_tokens=num_draft_tokens, spec_stats=spec_stats,
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
