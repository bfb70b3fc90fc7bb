"""ONNX Runtime backend: runs an artifact's prefill and decode graphs with the KV cache bound in place.

The cache is a list of OrtValues allocated once per generation (`new_cache`).  Each step binds them with
IOBinding as both the ``past_*`` inputs and the ``present_*`` outputs, so ``TensorScatter`` updates them in place
instead of copying the cache.  In the exported graphs (and artifacts built before the one-graph lowering) the
sliding-layer rings are rebuilt in prefill (a prefill may bring more tokens than a ring holds): their outputs are
new buffers that replace the old.

Uses the optimised graphs from ``make build-engine`` when the manifest lists them, else the exported graphs.  When
``engines.onnxruntime`` names one file for both (``one_graph``: every attention lowered, every cache written in
place), one session serves prefill and decode, so the weights are held once: a decode step is a prefill of one
token (``seq_lens`` 1, no image or audio rows).  Where the engine record says ``prefill_with_past:
per_sequence`` (GroupQueryAttention refuses a prompt with past context at batch > 1), such a prefill runs one
sequence per call, each bound to zero-copy views of its cache rows.
Torch-free.  Does not tokenize, sample or loop: see `runtime.generate`.
"""

from __future__ import annotations

import operator
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from runtime._int8_probe import cpu_has_vnni, int8_dot_products_exact  # noqa: F401  (used by graphs.ort.qdq, tests)
from runtime.errors import InputError
from runtime.manifest import ArtifactError, check_external_data
from runtime.ort_attention import INPUTS as ATTENTION_INPUTS
from runtime.ort_attention import (attention_feeds, bind_gqa, check_engine_inputs, decode_inputs,
                                   window_verify_tokens)
from runtime.ort_verify import BoundVerify
from runtime.ort_verify import words as _words
from runtime.prompt import PrefillInputs

__all__ = ["OrtBackend", "cache_shape", "engine_feeds", "is_cache", "logits_index", "prefill_feeds", "sliding_slots",
           "speculative_record", "zero_cache"]


def is_cache(name: str) -> bool:
    return name.startswith(("past_key_", "past_value_", "present_key_", "present_value_"))


def cache_shape(spec: dict[str, Any], batch: int, max_len: int, sliding_slots: int | None = None) -> list[int]:
    """A cache input's shape from its manifest spec (dims ``batch``, ``max_len`` or numbers); ``sliding_slots``
    replaces a sliding ring's window (its static slot count) by an engine's own (`sliding_slots`)."""
    shape = [batch if d == "batch" else max_len if d == "max_len" else int(d) for d in spec["shape"]]
    if sliding_slots is not None and len(shape) == 4 and spec["shape"][2] not in ("batch", "max_len"):
        shape[2] = int(sliding_slots)
    return shape


def sliding_slots(manifest: dict[str, Any]) -> int | None:
    """Slots of the sliding caches of the artifact's ONNX Runtime engine when they are not the exported ring's
    (``--ort-sliding window``: GroupQueryAttention's windowed cache), else None."""
    record = (manifest.get("engines", {}).get("onnxruntime", {}).get("attention_inputs") or {})
    if record.get("sliding") != "window":
        return None
    slots = record.get("sliding_slots")
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < int(record.get("window") or 1):
        raise ArtifactError(f"manifest.json: engines.onnxruntime.attention_inputs.sliding_slots is {slots!r}; "
                            f"expected an integer >= the window {record.get('window')!r}; rebuild the engine")
    return slots


def _spec_dim(manifest: dict[str, Any], name: str, axis: int) -> int | str | None:
    for spec in manifest["graphs"]["prefill"]["inputs"]:
        if spec["name"] == name:
            dim = spec["shape"][axis]
            return dim if isinstance(dim, str) else int(dim)
    return None


def speculative_record(root, manifest: dict[str, Any]) -> int:
    """The draft tokens one verify call may check (the artifact's ``speculative.max_draft_tokens``; 0 for an
    artifact exported without ``--speculative``), checked against its graphs."""
    record = manifest.get("speculative")
    if record is None:
        return 0
    k = record.get("max_draft_tokens") if isinstance(record, dict) else None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or _spec_dim(manifest, "logits_index", 1) is None:
        raise ArtifactError(f"{root}: manifest.json: speculative is {record!r}; expected max_draft_tokens >= 1 with a "
                            "prefill graph taking logits_index (re-export with --speculative K)")
    return k


def prefill_feeds(inputs: PrefillInputs, manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """The prefill graph's non-cache inputs for ``inputs`` (empty image/audio tensors where there are none)."""
    feeds = {
        "input_ids": inputs.input_ids.astype(np.int64),
        "past_lens": inputs.past_lens.astype(np.int64),
        "seq_lens": inputs.seq_lens.astype(np.int64),
    }
    patch_dim = _spec_dim(manifest, "image_patches", 1)
    if patch_dim is not None:
        n_img = 0 if inputs.image_patches is None else len(inputs.image_patches)
        feeds["image_patches"] = (
            inputs.image_patches.astype(np.float32) if n_img else np.zeros((0, patch_dim), np.float32)
        )
        feeds["image_positions"] = inputs.image_positions.astype(np.int64) if n_img else np.zeros((0, 2), np.int64)
    elif inputs.image_patches is not None and len(inputs.image_patches):
        raise ValueError("this model has no vision embedder (no vision_config); it cannot take images")
    frame_dim = _spec_dim(manifest, "audio_frames", 1)
    if frame_dim is not None:
        n_aud = 0 if inputs.audio_frames is None else len(inputs.audio_frames)
        feeds["audio_frames"] = inputs.audio_frames.astype(np.float32) if n_aud else np.zeros((0, frame_dim), np.float32)
    elif inputs.audio_frames is not None and len(inputs.audio_frames):
        raise ValueError("this model has no audio embedder (no audio_config); it cannot take audio")
    if _spec_dim(manifest, "logits_index", 0) is not None or inputs.logits_index is not None:
        feeds["logits_index"] = logits_index(inputs, manifest)
    return feeds


def logits_index(inputs: PrefillInputs, manifest: dict[str, Any]) -> np.ndarray:
    """The ``logits_index`` input of a speculative prefill graph (`exporter.export.graph_io`): the call's own, else
    each row's last valid token (B, 1)."""
    if not any(spec["name"] == "logits_index" for spec in manifest["graphs"]["prefill"]["inputs"]):
        raise InputError("logits at chosen positions need an artifact exported with --speculative K (its prefill graph "
                         "takes logits_index); this one was exported without it")
    if inputs.logits_index is not None:
        index = np.asarray(inputs.logits_index, np.int64)
        if index.ndim != 2 or len(index) != len(inputs.input_ids):
            raise InputError(f"logits_index of shape {index.shape}; expected (batch {len(inputs.input_ids)}, N)")
        if index.size and (index.min() < 0 or index.max() >= inputs.input_ids.shape[1]):
            raise InputError(f"logits_index holds {int(index.min())}..{int(index.max())}; expected indices into the "
                             f"call's {inputs.input_ids.shape[1]} new tokens")
        return index
    return np.maximum(np.asarray(inputs.seq_lens, np.int64) - 1, 0).reshape(-1, 1)


def engine_feeds(session, feeds: dict[str, np.ndarray], manifest: dict[str, Any]) -> dict[str, np.ndarray]:
    """``feeds`` (`prefill_feeds` and caches) for a plain ``session.run`` of any graph of the artifact: restricted to
    the session's inputs, plus the attention geometry a built ONNX Runtime engine takes (`runtime.ort_attention`)."""
    names = [i.name for i in session.get_inputs()]
    out = {k: v for k, v in feeds.items() if k in names}
    if "seq_lens" in feeds:
        out.update(attention_feeds(names, feeds, manifest.get("engines", {}).get("onnxruntime", {}),
                                   manifest["model_config"].get("tokens", {})))
    return out


def zero_cache(manifest: dict[str, Any], graph: str, batch: int, max_len: int, *,
               engine: bool = False) -> dict[str, np.ndarray]:
    """Zeroed ``past_*`` inputs of ``graph`` as numpy arrays (for plain ``session.run`` callers); ``engine``: shaped
    for the ONNX Runtime engine (its sliding caches may differ: `sliding_slots`)."""
    out = {}
    slots = sliding_slots(manifest) if engine else None
    for spec in manifest["graphs"][graph]["inputs"]:
        if is_cache(spec["name"]):
            out[spec["name"]] = np.zeros(cache_shape(spec, batch, max_len, slots), dtype=np.float32)
    return out


def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types ONNX Runtime raises when it cannot load a model (none of them is a RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotImplemented",
             "RuntimeException")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type))


class _Cache(list):
    """The cache OrtValues, with the numpy arrays they wrap (same memory), and the row views made of it
    (`OrtBackend.rows`: the same view object for the same rows, so the decode binding stays while it is decoded)."""

    def __init__(self, values: list, arrays: list[np.ndarray]):
        super().__init__(values)
        self.arrays = arrays
        self.views: dict[tuple[int, int], _Cache] = {}


class _Writer:
    """The decode step's bound integer inputs as flat memoryviews (`_words`): token ids and past lengths, and on
    GroupQueryAttention-only engines seqlens_k and the total length."""

    def __init__(self, ids: np.ndarray, past: np.ndarray, seqlens_k: np.ndarray | None, total: np.ndarray | None):
        self.ids, self.past = _words(ids, "q"), _words(past, "q")
        self.seqlens_k = None if seqlens_k is None else _words(seqlens_k, "i")
        self.total = None if total is None else _words(total, "i")


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, root: Path, manifest: dict[str, Any], *, threads: int | None = None):
        import onnxruntime as ort

        if manifest.get("precision") == "bf16":
            raise ValueError(
                f"{root}: a bf16 artifact (--weight-dtype bf16) runs on TensorRT only; ONNX Runtime's CPU has no bf16 "
                "MatMul. Export with --weight-dtype fp32 (or quantize: make calibrate) for the CPU")
        self._ort = ort
        self.root = Path(root)
        self.manifest, self.threads = manifest, threads  # threads: also the artifact's assistant's (LoadedModel)
        engine = manifest.get("engines", {}).get("onnxruntime", {})
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = int(__import__("os").environ.get("GEMMA4_ORT_LOG", "3"))
        # Graphs saved by build-engine are already optimised; re-running the basic passes is cheap and safe.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        self.sessions = {}
        self._bound = None  # the decode step's IOBinding, kept while the same cache is decoded (`_decode_bound`)
        self.prefill_chunk = None  # no limit of ONNX Runtime's own (see runtime.backend.Backend.prefill_chunk)
        self.io: dict[str, tuple[list[str], list[str]]] = {}
        rels = {graph: engine.get(graph, manifest["graphs"][graph]["file"]) for graph in ("prefill", "decode")}
        # one graph for both steps only when build-engine says so (all caches in place); a manifest merely naming
        # one file twice without it is refused rather than run with a wrong in-place assumption
        self.one_graph = bool(engine.get("one_graph"))
        if engine.get("int8_kernel") in ("MatMulNBits", "mixed") and not int8_dot_products_exact():
            raise ArtifactError(
                f"{self.root}: this ONNX Runtime engine runs INT8 Linears as 8-bit MatMulNBits, whose int8 dot products "
                "saturate on this CPU (checked on worst-case inputs: `int8_dot_products_exact`); rebuild the engine "
                "here with `make build-engine BACKEND=onnxruntime` (it then takes ORT's exact u8 x u8 kernels)")
        self.per_sequence_continuation = engine.get("prefill_with_past") == "per_sequence"
        self.batched_verify = not self.per_sequence_continuation  # Backend.batched_verify: the ring engine runs rows
        if self.one_graph != (rels["prefill"] == rels["decode"]):
            raise ArtifactError(f"{self.root}: engines.onnxruntime has one_graph={engine.get('one_graph')!r} but "
                                f"prefill {rels['prefill']!r} and decode {rels['decode']!r}; refused")
        for graph in ("prefill",) if self.one_graph else ("prefill", "decode"):
            path = check_external_data(self.root, manifest, rels[graph])  # inside the artifact, listed, external data
            try:
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except (RuntimeError, *_ort_errors()) as e:
                raise ArtifactError(f"{path}: ONNX Runtime {ort.__version__} cannot load this graph: {e}") from None
            self.sessions[graph] = sess
            self.io[graph] = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
        if self.one_graph:  # the one session holds the weights once
            self.sessions["decode"], self.io["decode"] = self.sessions["prefill"], self.io["prefill"]
        self.engine = engine
        self.tokens = manifest["model_config"].get("tokens", {})
        self.window = (engine.get("attention_inputs") or {}).get("window")
        self.ring_slots = (engine.get("attention_inputs") or {}).get("ring_slots")  # rings with slack: speculative
        self.max_draft_tokens = speculative_record(self.root, manifest)
        self._verify_bound = BoundVerify(self, prefill_feeds, is_cache)
        check_engine_inputs(self.root, [n for ins, _ in self.io.values() for n in ins], self.window)
        self.cache_specs = [i for i in manifest["graphs"]["decode"]["inputs"] if is_cache(i["name"])]
        # --ort-sliding window engines: GroupQueryAttention's windowed sliding caches, no image rows
        self.sliding_slots = sliding_slots(manifest) if engine else None
        self.takes_images = engine.get("images", True) is not False
        self.layer_types = manifest["model_config"]["text"]["layer_types"]

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch: int, max_len: int) -> list:
        """Zeroed cache buffers for ``batch`` sequences of at most ``max_len`` tokens, as OrtValues (wrapping numpy
        arrays without a copy; the arrays stay reachable as ``.arrays`` for per-sequence views)."""
        zeros = [np.zeros(cache_shape(spec, batch, max_len, self.sliding_slots), dtype=np.float32)
                 for spec in self.cache_specs]
        return _Cache([self._ort.OrtValue.ortvalue_from_numpy(z) for z in zeros], zeros)

    def rows(self, cache: list, start: int, stop: int) -> list:
        """Rows ``start:stop`` of ``cache`` as a cache of OrtValues viewing the same arrays (zero copy; the same
        view object for the same rows).  Needs a one-graph engine: every cache written in place, so a step on the
        view lands in ``cache``."""
        if not self.one_graph:
            raise ValueError(f"{self.root}: this ONNX Runtime engine does not write every cache in place (sliding "
                             "rings are rebuilt in prefill), so a step cannot run on some rows of a cache; rebuild "
                             "it with `make build-engine BACKEND=onnxruntime`")
        arrays = getattr(cache, "arrays", None)
        if arrays is None or len(arrays) != len(cache) or any(
                c.data_ptr() != a.ctypes.data for c, a in zip(cache, arrays)):
            raise ValueError("rows(): the cache must be one made by new_cache() and still hold its own buffers")
        batch = len(arrays[0]) if arrays else 0
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= batch):
            raise ValueError(f"rows({start!r}, {stop!r}): expected 0 <= start < stop <= {batch} (the cache's rows)")
        if start == 0 and stop == batch:
            return cache
        view = cache.views.get((start, stop))
        if view is None:
            parts = [a[start:stop] for a in arrays]
            view = cache.views[(start, stop)] = _Cache([self._ort.OrtValue.ortvalue_from_numpy(a) for a in parts],
                                                       parts)
        return view

    def _is_sliding(self, cache_index: int) -> bool:
        return self.layer_types[cache_index // 2] == "sliding_attention"

    # ------------------------------------------------------------------ steps
    def _run(self, graph: str, feeds: dict[str, np.ndarray], cache: list, in_place: list[bool]):
        """One call -> (logits, hidden or None): (B, V) logits, or (B, N, V) and the hidden states (B, N, hidden)
        from a speculative prefill graph."""
        if graph == "decode" and self.one_graph and "seq_lens" not in feeds:  # a prefill of one token per sequence
            ids = np.asarray(feeds["input_ids"], np.int64).reshape(-1, 1)
            feeds = prefill_feeds(PrefillInputs(input_ids=ids, past_lens=np.asarray(feeds["past_lens"], np.int64),
                                                seq_lens=np.ones(len(ids), np.int64)), self.manifest)
        sess = self.sessions[graph]
        names_in, names_out = self.io[graph]
        feeds = {**feeds, **attention_feeds(names_in, feeds, self.engine, self.tokens)}
        binding = sess.io_binding()
        for name in names_in:
            if name in feeds:
                binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        past = [n for n in names_in if is_cache(n)]
        present = [n for n in names_out if is_cache(n)]
        heads = [n for n in ("logits", "hidden") if n in names_out]
        for name in heads:
            binding.bind_output(name, "cpu")
        for i, (p_in, p_out) in enumerate(zip(past, present)):
            binding.bind_ortvalue_input(p_in, cache[i])
            if in_place[i]:
                binding.bind_ortvalue_output(p_out, cache[i])
            else:
                binding.bind_output(p_out, "cpu")
        bind_gqa(binding, present, names_out, cache, in_place)  # after the caches: get_outputs' order above
        sess.run_with_iobinding(binding)
        outs = dict(zip([*heads, *present], binding.get_outputs()))  # get_outputs follows binding order
        for i, p_out in enumerate(present):
            if not in_place[i]:
                cache[i] = outs[p_out]
        return outs["logits"].numpy(), outs["hidden"].numpy() if "hidden" in outs else None

    def prefill(self, inputs: PrefillInputs, cache: list) -> np.ndarray:
        if not self.takes_images and inputs.image_patches is not None and len(inputs.image_patches):
            raise InputError(
                f"{self.root}: this ONNX Runtime engine was built with --ort-sliding window (text and audio only: its "
                "sliding layers cannot attend both ways inside an image); rebuild it with `make build-engine "
                "BACKEND=onnxruntime` (the default ring form) to give it images")
        ids = inputs.input_ids
        return self._prefill(inputs, cache)[0].reshape(len(ids), -1)  # (B, V): a speculative graph's N is 1 here

    def _prefill(self, inputs: PrefillInputs, cache: list):
        ids = inputs.input_ids
        if (self.per_sequence_continuation and len(ids) > 1 and ids.shape[1] > 1
                and (np.asarray(inputs.past_lens) > 0).any()):
            return self._prefill_per_sequence(inputs, cache)
        feeds = prefill_feeds(inputs, self.manifest)
        in_place = [self.one_graph or not self._is_sliding(i) for i in range(len(cache))]
        return self._run("prefill", feeds, cache, in_place)

    def verify(self, input_ids, past_lens, cache: list, seq_lens=None, *, copy: bool = True):
        """`runtime.backend.Backend.verify`: (B, n) tokens -> logits (B, n, V), final-normed hidden (B, n, H).  One
        row of one-graph engines runs on kept bindings (`runtime.ort_verify`); ``copy=False``: views of their
        buffers, which the next call of as many tokens overwrites."""
        ids = np.asarray(input_ids, np.int64)
        if ids.ndim != 2 or not ids.shape[1]:
            raise InputError(f"verify: input_ids of shape {ids.shape}; expected (batch, n >= 1)")
        b, n = ids.shape
        if not self.max_draft_tokens:
            raise InputError(f"{self.root}: verify needs an artifact exported with --speculative K (logits at every "
                             "new token, rings with slack); this one was exported without it")
        lens = np.full(b, n, np.int64) if seq_lens is None else np.asarray(seq_lens, np.int64).reshape(-1)
        past = np.asarray(past_lens, np.int64).reshape(-1)  # each row's valid tokens count (padding enters no cache)
        most = [self.verify_tokens([p]) for p in past] if self.sliding_slots is not None else [self.verify_tokens(0)]
        if (lens > np.array(most)).any() or n > self.max_draft_tokens + 1:
            raise InputError(f"verify: {lens.tolist()} tokens per row; this engine verifies at most "
                             f"{', '.join(map(str, most))} here (the artifact's speculative.max_draft_tokens "
                             f"{self.max_draft_tokens} + 1, less where the cache cannot take them back)")
        if self.one_graph and (b == 1 or self.batched_verify) and (lens >= 1).all():
            out = self._verify_bound.call(ids, past.tolist(), lens.tolist(), cache)
            return (out[0].copy(), None if out[1] is None else out[1].copy()) if copy else out
        index = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n))
        return self._prefill(PrefillInputs(ids, past, lens, logits_index=index), cache)

    def verify_tokens(self, past_lens) -> int:
        """`runtime.backend.Backend.verify_tokens`: max_draft_tokens + 1, on windowed engines (--ort-sliding window)
        fewer just before GroupQueryAttention compacts its cache (`runtime.ort_attention.window_verify_tokens`)."""
        if not self.max_draft_tokens:
            return 1
        n = self.max_draft_tokens + 1
        if self.sliding_slots is not None:
            n = min(n, *(window_verify_tokens(int(p), self.window, self.sliding_slots)
                         for p in np.asarray(past_lens).reshape(-1)))
        return n

    def _prefill_per_sequence(self, inputs: PrefillInputs, cache: list):
        """The prefill of ``inputs`` one sequence per call (batch 1: GroupQueryAttention takes past context), each
        on OrtValues viewing its rows of the cache arrays in place; rows with no new tokens are not run (their
        logits are zeros: nothing was computed for them).  Returns (logits, hidden or None) as `_run`."""
        if not self.one_graph:  # rings rebuilt out of place: row views cannot take them
            raise ArtifactError(f"{self.root}: this ONNX Runtime engine takes no prefill with past context at batch > 1 "
                                "(GroupQueryAttention) and does not write every cache in place; rebuild it with "
                                "`make build-engine BACKEND=onnxruntime`, or prefill one sequence at a time")
        tk = self.manifest["model_config"]["tokens"]
        ids, past, lens = inputs.input_ids, np.asarray(inputs.past_lens), np.asarray(inputs.seq_lens)
        img = (ids == tk["image"]) & (np.arange(ids.shape[1])[None] < lens[:, None]) if "image" in tk else None
        aud = (ids == tk["audio"]) & (np.arange(ids.shape[1])[None] < lens[:, None]) if "audio" in tk else None
        n_img = np.concatenate([[0], np.cumsum(img.sum(1))]) if img is not None else None
        n_aud = np.concatenate([[0], np.cumsum(aud.sum(1))]) if aud is not None else None
        out = hidden = None
        index = inputs.logits_index
        for b in range(len(ids)):
            n = int(lens[b])
            if n == 0:
                continue
            take = lambda x, counts: None if x is None or counts is None else x[counts[b]:counts[b + 1]]  # noqa: E731
            # the full padded width, as a batched call would have it (its padded writes to full layers included)
            row = PrefillInputs(ids[b:b + 1], past[b:b + 1], lens[b:b + 1],
                                take(inputs.image_patches, n_img), take(inputs.image_positions, n_img),
                                take(inputs.audio_frames, n_aud), None if index is None else index[b:b + 1])
            views = self.rows(cache, b, b + 1)
            logits, h = self._run("prefill", prefill_feeds(row, self.manifest), views, [True] * len(views))
            if out is None:
                out = np.zeros((len(ids), *logits.shape[1:]), logits.dtype)
                hidden = None if h is None else np.zeros((len(ids), *h.shape[1:]), h.dtype)
            out[b] = logits[0]
            if h is not None:
                hidden[b] = h[0]
        if out is None:
            raise ValueError("a prefill call with no new tokens in any sequence")
        return out, hidden

    def decode(self, input_ids, past_lens, cache: list, *, copy: bool = True) -> np.ndarray:
        """One step: (B, 1) token ids at positions ``past_lens`` -> (B, V) logits.  The ids and lengths may also be
        lists of B ints (what `runtime.generate` passes).  ``copy=False`` (one-graph engines) returns a view of a
        buffer the next step overwrites: for a caller that is done with the logits before it decodes again
        (`runtime.generate`), it saves a copy of B x vocab floats per step."""
        if self.one_graph:
            return self._decode_bound(input_ids, past_lens, cache, copy)
        feeds = {"input_ids": np.asarray(input_ids, np.int64).reshape(-1, 1),
                 "past_lens": np.asarray(past_lens, np.int64).reshape(-1)}
        return self._run("decode", feeds, cache, [True] * len(cache))[0]  # (logits, hidden or None)

    def _decode_bound(self, input_ids, past_lens, cache: list, copy: bool) -> np.ndarray:
        """A one-graph decode step on an IOBinding kept from the previous step of the same cache: every cache is
        written in place, so its bindings stay valid; the step's token ids and past lengths are written into the
        arrays the binding already reads (OrtValues wrapping them, no copy), and the logits land in the buffer the
        first step allocated.  Rebinding ~50 tensors and wrapping ~25 outputs each step cost ~0.4 ms of Python
        per step (4-5 % of an INT4 bench-model step).

        The step runs right after ONNX Runtime has streamed every weight through the CPU caches, so the
        interpreter's and numpy's code and data are cold there: each numpy call costs tens of microseconds.  The
        ids and lengths are therefore handled as Python ints and written through memoryviews of the bound arrays
        (`_Writer`); only a ring engine's attention geometry still takes numpy (`decode_inputs`)."""
        ids = input_ids if type(input_ids) is list else np.asarray(input_ids).reshape(-1).tolist()
        lens = past_lens if type(past_lens) is list else np.asarray(past_lens).reshape(-1).tolist()
        if len(lens) != len(ids):
            raise ValueError(f"decode: {len(ids)} token ids but {len(lens)} past lengths")
        bound = self._bound
        if (bound is None or bound["cache"] is not cache or bound["batch"] != len(ids)
                or len(cache) != len(bound["values"]) or not all(map(operator.is_, bound["values"], cache))):
            bound = self._bound = self._bind_decode(cache, len(ids))
        write = bound["write"]
        write.ids[:] = array("q", ids)
        write.past[:] = array("q", lens)
        if write.seqlens_k is not None:  # GroupQueryAttention only (--ort-sliding window): two writes in place
            write.seqlens_k[:] = array("i", lens)  # past_lens: one new token per row
            write.total[0] = max(lens) + 1
        elif bound["attention"]:  # this step's geometry: written into the bound arrays, bound anew where the shape
            # changed (the ring mask grows while the rings fill)
            for key, value in decode_inputs(np.array(lens, np.int64), window=self.window,
                                            want=bound["attention"], slots=self.ring_slots).items():
                arr = bound["arrays"].get(key)
                if arr is not None and arr.shape == value.shape:
                    arr[...] = value
                    continue
                arr = bound["arrays"][key] = np.ascontiguousarray(value)
                bound["binding"].bind_ortvalue_input(ATTENTION_INPUTS[key], self._ort.OrtValue.ortvalue_from_numpy(arr))
        self.sessions["decode"].run_with_iobinding(bound["binding"])
        if bound["logits"] is None:  # first step: keep ORT's logits buffer and write every later step into it
            values = bound["binding"].get_outputs()
            bound["binding"].bind_ortvalue_output("logits", values[0])
            if "hidden" in self.io["decode"][1]:
                bound["binding"].bind_ortvalue_output("hidden", values[1])
            bound["logits"] = values[0].numpy().reshape(len(ids), -1)  # a view of that buffer, (B, V)
        return bound["logits"].copy() if copy else bound["logits"]

    def _bind_decode(self, cache: list, batch: int) -> dict:
        ort = self._ort
        sess = self.sessions["decode"]
        names_in, names_out = self.io["decode"]
        feeds = prefill_feeds(PrefillInputs(input_ids=np.zeros((batch, 1), np.int64),
                                            past_lens=np.zeros(batch, np.int64),
                                            seq_lens=np.ones(batch, np.int64)), self.manifest)
        binding = sess.io_binding()
        arrays = {}  # the arrays the bound OrtValues read: alive as long as the binding
        for name in names_in:
            if name in feeds:
                arrays[name] = np.ascontiguousarray(feeds[name])
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arrays[name]))
        past = [n for n in names_in if is_cache(n)]
        present = [n for n in names_out if is_cache(n)]
        if len(past) != len(cache) or len(present) != len(cache):
            raise ValueError(f"decode: the engine has {len(past)} cache inputs and {len(present)} cache outputs, "
                             f"the cache {len(cache)} buffers")
        binding.bind_output("logits", "cpu")  # first in the binding: get_outputs()[0]
        if "hidden" in names_out:  # a speculative graph: second (kept like the logits after the first step)
            binding.bind_output("hidden", "cpu")
        for p_in, p_out, value in zip(past, present, cache):
            binding.bind_ortvalue_input(p_in, value)
            binding.bind_ortvalue_output(p_out, value)
        bind_gqa(binding, present, names_out, cache, [True] * len(cache))
        attention = [k for k, v in ATTENTION_INPUTS.items() if v in names_in]
        lengths = None
        if {"seqlens_k", "total_len"} <= set(attention) <= {"seqlens_k", "total_len", "query_seqlens"}:
            # only GroupQueryAttention's lengths, all of fixed shape at decode: bound once here (query_seqlens is 1
            # for every row at every step), the step writes seqlens_k and the total in place
            for key, value in decode_inputs(np.zeros(batch, np.int64), window=self.window, want=attention).items():
                arrays[key] = np.ascontiguousarray(value)
                binding.bind_ortvalue_input(ATTENTION_INPUTS[key], ort.OrtValue.ortvalue_from_numpy(arrays[key]))
            lengths = (arrays["seqlens_k"], arrays["total_len"])
        return {"binding": binding, "cache": cache, "values": list(cache), "batch": batch, "arrays": arrays,
                "write": _Writer(arrays["input_ids"], arrays["past_lens"], *(lengths or (None, None))),
                "logits": None, "attention": attention}

    @staticmethod
    def cache_arrays(cache: list) -> list[np.ndarray]:
        """Copies of the cache buffers as numpy arrays (for tests and debugging)."""
        return [np.array(c.numpy()) for c in cache]
