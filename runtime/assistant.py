"""Draft tokens with the artifact's assistant graph (`exporter.export_assistant`) on ONNX Runtime, reading the
target's caches in place.

`AssistantRunner.draft` runs K steps of the assistant for every row: step 1 takes the target's input embedding of
the row's last token and the target's last hidden state (its final norm's output, the LM head's input) at that
token's predecessor; step i + 1 takes the embedding of draft i and the hidden state step i returned.  All steps of a
round query at the same ``position`` (the last token's) and read the same target entries:

* full layer: slots ``[0, full_len)``;
* sliding layer: ring slots (position p in slot p % R) holding positions ``[sliding_start, sliding_end)``; on the
  ONNX Runtime window engine (``--ort-sliding window``, the engine record's ``sliding_slots``), GroupQueryAttention's
  compacting cache of C slots, which after T tokens holds positions ``[E(T), T)`` from slot 0
  (`runtime.ort_attention.window_offset`): the graph's ``sliding_offset`` input is then E(``written``), R = C.

By default (`clean_ranges`) a row reads what the target has *accepted* before its last token, ``[0, position)``,
and on the sliding layer the last ``window + 1`` of those positions (the reference's ``|q - k| <= window``), as far
as the ring still holds them: a ring of R slots into which the target wrote up to position ``written - 1``
(rejected drafts included) holds ``[written - R, written)``: all of them in a speculative export's rings of
window + K + 1 slots (`exporter.model.ring_slots`) whatever was accepted, one fewer in a plain ring of window slots.
transformers' candidate generator reads the same in the first round after a prefill; after a verify that rejected
drafts it reads their keys and values too (it cuts the shared tensors to the sequence length by index: full
``[0, position + 1)``, sliding the last ``window + 1`` positions written, ``[written - window - 1, written)``):
pass ``ranges`` to reproduce it (tests/assistant_ref.py `reference_ranges`).  A windowed cache holds the last
``window`` positions only right after it compacts: the round after the compacting call, if it accepted no draft,
reads one position the compaction dropped, which `AssistantRunner.evicting` copies before that call (the caller
passes it to `draft` as ``evicted``; that round then reads a copy of the sliding cache with it in front).

The target cache buffers are bound with IOBinding (OrtValues of `runtime.ort_backend.OrtBackend.new_cache`, or
numpy arrays wrapped without a copy); the graph only reads them.  The target's embedding rows come from its own
table, memory-mapped from the decode graph's external data (`TargetEmbedding`): no second copy of it in memory.
Where the artifact has the assistant's ONNX Runtime loop form (`graphs.ort.assistant`, written by ``make
build-engine`` and ``make export-assistant``; recorded as ``assistant.loop`` with the file and hash of the step graph
it came from), `AssistantRunner.draft` makes all K drafts in one call of it, the embedding table bound by its
address; else (an older artifact, a re-exported assistant, or a loop built from a step form this CPU does not run)
it calls the step graph K times.  Same drafts (tests/test_assistant_runtime.py runs every drafting test on both).
An INT8 assistant (`calib.assistant_int8`) also has an 8-bit MatMulNBits form of its Q/DQ graph: `ort_graph` says
which one the session loads.
Not here: verification, acceptance and the generate loop; the TensorRT backend's caches (device tensors: its own
engine, `runtime.trt_assistant`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime._int8_probe import int8_dot_products_exact
from runtime._onnx_refs import OnnxParseError, initializer_record
from runtime.errors import InputError
from runtime.manifest import ArtifactError, check_external_data
from runtime.ort_attention import window_offset
from runtime.ort_backend import sliding_slots

__all__ = ["OFFSET", "AssistantRunner", "Drafts", "Evicted", "TargetEmbedding", "clean_ranges", "ort_graph"]

OFFSET = "sliding_offset"  # the step graph's optional input: position p in ring slot (p - offset) mod R (default 0)

_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "embed_tokens.weight_fp16")  # fp32, or calib.embedding's fp16
_NUMPY_DTYPES = {1: np.float32, 10: np.float16}  # ONNX TensorProto data types
# an assistant whose largest matrix (hidden x max(intermediate, vocab)) has at most this many values runs on one
# thread: the demo's (128 x 256) drafted 1.5x faster on one thread than on two (2 cores, ONNX Runtime 1.32)
SMALL_MATRIX = 1 << 20


class TargetEmbedding:
    """The target's scaled input embedding of token ids: rows of its table times sqrt(hidden) in fp32, as the
    target graph computes them.  The table is memory-mapped (only the rows read are paged in)."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        rel = manifest["graphs"]["decode"]["file"]
        graph = check_external_data(root, manifest, rel)
        try:
            rec = initializer_record(graph.read_bytes(), _EMBEDDING_SUFFIXES)
        except OnnxParseError as e:
            raise ArtifactError(f"{graph}: not a valid ONNX model ({e})") from None
        if rec is None:
            raise ArtifactError(f"{graph}: no embedding table initializer (*{_EMBEDDING_SUFFIXES[0]}) stored as raw "
                                "bytes; the assistant needs the target's token embedding rows")
        dtype = _NUMPY_DTYPES.get(rec["data_type"])
        if dtype is None or len(rec["dims"]) != 2:
            raise ArtifactError(f"{graph}: embedding table {rec['name']!r} has data type {rec['data_type']} and dims "
                                f"{rec['dims']}; expected a 2-D float32 or float16 table")
        nbytes = math.prod(rec["dims"]) * np.dtype(dtype).itemsize
        path = graph if rec["location"] is None else graph.parent / rec["location"]
        if rec["length"] not in (None, nbytes) or path.stat().st_size < rec["offset"] + nbytes:
            raise ArtifactError(f"{path}: embedding table {rec['name']!r} ({rec['dims']}) does not fit its recorded "
                                f"bytes (offset {rec['offset']}, length {rec['length']}); the artifact is damaged")
        self.table = np.memmap(path, dtype=dtype, mode="r", offset=rec["offset"], shape=tuple(rec["dims"]))
        self.scale = np.float32(math.sqrt(manifest["model_config"]["text"]["hidden_size"]))

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """(B,) token ids -> (B, hidden) float32."""
        return np.asarray(self.table[np.asarray(ids, dtype=np.int64)], dtype=np.float32) * self.scale


def ort_graph(record: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The assistant graph ONNX Runtime runs and its session config entries: the record's ``engines.onnxruntime``
    (an INT8 assistant's 8-bit MatMulNBits form, `calib.assistant_int8`) where 8-bit MatMulNBits is exact on this
    CPU (`runtime._int8_probe`), else the artifact's graph (INT8: its Q/DQ form, ORT's exact u8 x u8 kernels)."""
    engine = record.get("engines", {}).get("onnxruntime")
    if engine is None:
        return record["file"], {}
    if engine.get("int8_kernel") != "MatMulNBits" or int8_dot_products_exact():
        return engine["file"], {}
    return record["file"], {"session.x64quantprecision": "1"}


def draft_inputs(tokens, hidden, position, num_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A `draft` call's per-row inputs as arrays (int64 tokens and positions, contiguous float32 hidden) and the
    batch size, checked: at least one draft, one token, hidden row and position per row."""
    if num_tokens < 1:
        raise InputError(f"num_tokens={num_tokens}: expected at least 1 draft")
    position = np.asarray(position, np.int64).reshape(-1)
    tokens = np.asarray(tokens, np.int64).reshape(-1)
    hidden = np.ascontiguousarray(hidden, dtype=np.float32)
    b = position.shape[0]
    if tokens.shape[0] != b or hidden.shape[0] != b:
        raise InputError(f"assistant: {tokens.shape[0]} tokens, {hidden.shape[0]} hidden rows and {b} positions; "
                         "expected one of each per row")
    return tokens, hidden, position, b


def clean_ranges(position: np.ndarray, written: np.ndarray, window: int, ring: int,
                 offset=0) -> dict[str, np.ndarray]:
    """The default target entries of a round (see the module docstring), (B,) int64 each; ``offset``: the oldest
    position a windowed cache holds (E(T), its row 0), 0 on a ring."""
    position = np.asarray(position, np.int64)
    start = np.maximum(np.maximum(position - window - 1, np.asarray(written, np.int64) - ring), offset)
    return {"full_len": position, "sliding_start": np.maximum(start, 0), "sliding_end": position}


@dataclass(frozen=True)
class Evicted:
    """The last sliding layer's entry at ``position`` (B,) (-1: none for that row), copied before a target call
    that made a windowed cache drop it (`AssistantRunner.evicting`)."""

    position: np.ndarray  # (B,) int64
    key: np.ndarray  # (B, Hkv, 1, D) float32
    value: np.ndarray


@dataclass(frozen=True)
class Drafts:
    tokens: np.ndarray  # (B, K) int64
    logits: np.ndarray  # (B, K, vocab) float32: the assistant's (for speculative sampling)
    hidden: np.ndarray  # (B, hidden) float32: the last step's next hidden state


class AssistantRunner:
    """The assistant graph of an artifact, run with ONNX Runtime on the target's cache buffers."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], *, threads: int | None = None,
                 embedding: TargetEmbedding | None = None):
        import onnxruntime as ort

        root = Path(root)
        record = manifest.get("assistant")
        if record is None:
            raise ArtifactError(f"{root}: the artifact has no assistant; add one with "
                                f"`make export-assistant ASSISTANT=<checkpoint dir> OUT={root}`")
        rel, config = ort_graph(record)
        graph = check_external_data(root, manifest, rel)
        opts = ort.SessionOptions()
        # 3: errors only (as the target's sessions; 2 would warn that the optional input's default is no constant)
        opts.log_severity_level = int(os.environ.get("GEMMA4_ORT_LOG", "3"))
        text = record["config"]["text"]
        if text["hidden_size"] * max(text["intermediate_size"], text["vocab_size"]) <= SMALL_MATRIX:
            threads = 1  # matrices too small to split: a second thread only adds a hand-off per kernel
        if threads:
            opts.intra_op_num_threads = threads
        self.threads = threads
        for key, value in config.items():
            opts.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT's own exception types; reported with the file
            raise ArtifactError(f"{graph}: ONNX Runtime cannot load the assistant graph ({e})") from None
        self._ort = ort
        self.window = int(record["config"]["text"]["sliding_window"])
        names = [s["name"] for s in manifest["graphs"]["decode"]["inputs"]
                 if s["name"].startswith(("past_key_", "past_value_"))]
        self.cache_index = {k: names.index(v) for k, v in record["target_caches"].items()}
        # the target engine's sliding cache: None, rings (position p in slot p % R); else the slot count C of
        # GroupQueryAttention's windowed cache (--ort-sliding window: position p in slot p - E(T), no wrap)
        self.sliding_slots = sliding_slots(manifest)
        self.target_window = int(manifest["model_config"]["text"]["sliding_window"])
        self._takes_offset = OFFSET in _input_names(self.session)
        if self.sliding_slots is not None and not self._takes_offset:
            raise ArtifactError(f"{graph}: this assistant graph reads the target's sliding cache in the ring layout "
                                "only (it was exported before the sliding_offset input), and this artifact's ONNX "
                                "Runtime engine keeps GroupQueryAttention's windowed cache (--ort-sliding window); "
                                f"re-export the assistant with `make export-assistant ASSISTANT=<checkpoint dir> "
                                f"OUT={root}` (or rebuild the engine in the ring form: `make build-engine "
                                f"OUT={root}`)")
        self.embedding = embedding or TargetEmbedding(root, manifest)
        self.loop = None  # the K-step form (graphs.ort.assistant), when the artifact has a current one
        form = record.get("loop")
        if form is not None and form.get("from") == rel and form.get("from_sha256") == manifest["files"].get(rel):
            path = check_external_data(root, manifest, form["file"])
            try:
                self.loop = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT's own exception types; reported with the file
                raise ArtifactError(f"{path}: ONNX Runtime cannot load the assistant's loop graph ({e})") from None
            want = {"float16": np.float16, "float32": np.float32}.get(form.get("embed_table_dtype"))
            if want is not None and self.embedding.table.dtype != want:
                raise ArtifactError(f"{path}: built for a {form['embed_table_dtype']} embedding table; the target's is "
                                    f"{self.embedding.table.dtype} (rebuild with `make build-engine`)")
            if self._takes_offset and OFFSET not in _input_names(self.loop):
                self.loop = None  # built from the step graph, so never seen; the step graph then drafts alone

    def _value(self, buf):
        if isinstance(buf, np.ndarray):
            if buf.dtype != np.float32 or not buf.flags.c_contiguous:
                raise InputError("assistant: target cache arrays must be C-contiguous float32")
            return self._ort.OrtValue.ortvalue_from_numpy(buf)
        return buf

    def _bind(self, binding, name: str, arr: np.ndarray) -> None:
        if name == OFFSET:  # an input with a default: ONNX Runtime binds it as an OrtValue only
            binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(arr))
        else:
            binding.bind_cpu_input(name, arr)

    def evicting(self, cache: Sequence[Any], past_lens) -> Evicted | None:
        """Call before a target call whose first token goes at ``past_lens`` (B,).  On a windowed cache, where
        that token makes GroupQueryAttention compact (E(past + 1) > E(past)), the compaction keeps positions from
        past + 1 - W on, and the next round (its query at past + 1 if no draft is accepted) reads one more, past - W:
        a copy of that entry, to pass to `draft` as ``evicted``.  None where no row compacts, and on rings."""
        if self.sliding_slots is None:
            return None
        past = np.asarray(past_lens, np.int64).reshape(-1)
        w, c = self.target_window, self.sliding_slots
        before = window_offset(past, w, c)
        drops = window_offset(past + 1, w, c) > before
        if not drops.any():
            return None
        slot = np.where(drops, past - w - before, 0)  # C - W: the cache is full when it compacts
        rows = np.arange(len(past))
        key, value = (_host(cache, self.cache_index[k])[rows, :, slot][:, :, None].copy()
                      for k in ("ring_key", "ring_value"))  # (B, Hkv, 1, D)
        return Evicted(np.where(drops, past - w, -1), key, value)

    def draft(self, cache: Sequence[Any], tokens, hidden, position, num_tokens: int, *, written=None,
              ranges: dict[str, Any] | None = None, evicted: Evicted | None = None) -> Drafts:
        """``num_tokens`` drafts per row.  ``cache``: the target cache list (decode graph ``past_*`` order; OrtValues
        or float32 arrays); ``tokens`` (B,) each row's last token, at ``position`` (B,); ``hidden`` (B, hidden) the
        target's last hidden state before it; ``written`` (B,) positions the target has written (default
        ``position``); ``ranges``: explicit ``full_len``/``sliding_start``/``sliding_end`` (B,) instead;
        ``evicted``: what `evicting` kept before the target's last call (windowed caches)."""
        tokens, hidden, position, b = draft_inputs(tokens, hidden, position, num_tokens)
        values = {k: self._value(cache[i]) for k, i in self.cache_index.items()}
        ring = int(values["ring_key"].shape()[2])
        written = position if written is None else np.asarray(written, np.int64).reshape(b)
        offset = np.zeros(b, np.int64)
        if self.sliding_slots is not None:
            if ring != self.sliding_slots:
                raise InputError(f"assistant: the sliding cache has {ring} slots; the engine's windowed cache "
                                 f"{self.sliding_slots}")
            offset = window_offset(written, self.target_window, ring)
            if evicted is not None and np.any(evicted.position == offset - 1):
                arrays, offset = _with_evicted(cache, self.cache_index, offset, evicted)
                self._evicted_arrays = arrays  # the bound copies stay alive while bound
                values.update((k, self._value(a)) for k, a in arrays.items())
                ring += 1
        if ranges is None:
            ranges = clean_ranges(position, written, self.window, ring, offset)
        ranges = {k: np.asarray(ranges[k], np.int64).reshape(b) for k in ("full_len", "sliding_start", "sliding_end")}
        if np.any(ranges["sliding_end"] - ranges["sliding_start"] > ring):
            raise InputError(f"assistant: a sliding range is longer than the ring ({ring} slots)")
        if np.any((ranges["sliding_start"] < offset) & (ranges["sliding_start"] < ranges["sliding_end"])):
            raise InputError(f"assistant: a sliding range starts at {ranges['sliding_start'].tolist()}, before the "
                             f"oldest position the windowed cache holds ({offset.tolist()})")
        fixed = {"position": position, "full_slots": np.arange(max(1, int(ranges["full_len"].max())), dtype=np.int64),
                 **ranges}
        if self._takes_offset:
            fixed[OFFSET] = offset
        if self.loop is not None:
            return self._draft_loop(values, fixed, tokens, hidden, num_tokens)
        binding = self.session.io_binding()
        for key, value in values.items():
            binding.bind_ortvalue_input(key, value)
        for key, arr in fixed.items():
            self._bind(binding, key, arr)
        out_tokens, out_logits = [], []
        token = tokens
        for _ in range(num_tokens):
            embeds = np.ascontiguousarray(self.embedding(token))  # kept alive until the run (bound, not copied)
            binding.bind_cpu_input("token_embeds", embeds)
            binding.bind_cpu_input("hidden", hidden)
            for name in ("logits", "next_hidden", "token"):
                binding.bind_output(name)
            self.session.run_with_iobinding(binding)
            logits, hidden, token = binding.copy_outputs_to_cpu()
            out_tokens.append(token)
            out_logits.append(logits)
        return Drafts(np.stack(out_tokens, 1), np.stack(out_logits, 1), hidden)

    def _draft_loop(self, values, fixed, tokens, hidden, num_tokens: int) -> Drafts:
        """All ``num_tokens`` steps in one call of the loop graph.  One binding is kept: the embedding table bound
        once by its address, the target caches rebound only when other buffers come (a new request's cache)."""
        binding, bound = getattr(self, "_loop_binding", (None, None))
        if binding is None:
            binding = self.loop.io_binding()
            table = self.embedding.table
            binding.bind_input("embed_table", "cpu", 0, table.dtype, list(table.shape), table.ctypes.data)
        key = tuple((name, id(value)) for name, value in values.items())
        if key != bound:
            for name, value in values.items():
                binding.bind_ortvalue_input(name, value)
        self._loop_binding = (binding, key)
        self._loop_values = values  # the bound buffers stay alive while bound
        for name, arr in {**fixed, "token": tokens, "hidden": hidden,
                          "num_tokens": np.array(num_tokens, np.int64)}.items():
            self._bind(binding, name, arr)
        for name in ("tokens", "logits", "next_hidden"):  # fresh outputs: their shapes change with B and K
            binding.bind_output(name)
        self.loop.run_with_iobinding(binding)
        out_tokens, logits, next_hidden = binding.copy_outputs_to_cpu()
        return Drafts(out_tokens, logits, next_hidden)


def _input_names(session) -> set[str]:
    """A session's inputs, those backed by a default (an initializer of the same name) included."""
    return {i.name for i in session.get_inputs()} | {i.name for i in session.get_overridable_initializers()}


def _host(cache: Sequence[Any], index: int) -> np.ndarray:
    """A target cache buffer as a numpy array: the array itself, the one `OrtBackend.new_cache` wraps (same
    memory), else a copy of the OrtValue."""
    buf = cache[index]
    if isinstance(buf, np.ndarray):
        return buf
    arrays = getattr(cache, "arrays", None)
    if arrays is not None and len(arrays) == len(cache) and arrays[index].ctypes.data == buf.data_ptr():
        return arrays[index]
    return buf.numpy()


def _with_evicted(cache, cache_index, offset: np.ndarray, evicted: Evicted):
    """The sliding entries as a buffer of one more slot, the evicted entry first in the rows it belongs to (their
    offset one lower): a copy, made in the round after a compaction only."""
    arrays = {}
    take = evicted.position == offset - 1  # (B,)
    for name, entry in (("ring_key", evicted.key), ("ring_value", evicted.value)):
        src = _host(cache, cache_index[name])
        out = np.zeros((src.shape[0], src.shape[1], src.shape[2] + 1, src.shape[3]), np.float32)
        out[take, :, 1:] = src[take]
        out[take, :, :1] = entry[take]
        out[~take, :, :-1] = src[~take]
        arrays[name] = out
    return arrays, np.where(take, offset - 1, offset)
