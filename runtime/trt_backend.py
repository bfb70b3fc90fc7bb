"""TensorRT backend: runs an artifact's TensorRT engine on a GPU with the KV cache updated in place.

Same interface as `runtime.ort_backend.OrtBackend` (``new_cache``, ``prefill``, ``decode``), so `runtime.generate`
drives either.  The plugins are registered first (`plugins.tensorrt_plugins`).

* One engine, two optimization profiles (``engines.tensorrt.one_engine``, `graphs.build_tensorrt`): the engine file
  is deserialized once, so the device holds the weights once; two execution contexts on it, one per profile
  (prefill: profile 0; decode: profile 1, a prefill of one token per sequence), share one scratch allocation
  (``ExecutionContextAllocationStrategy.USER_MANAGED``, sized for the larger profile: they run one after the other
  on one stream) and the same cache buffers.  Artifacts with a prefill and a decode engine (an older layout) load
  too, each engine with its profile 0.
* One CUDA stream (``self.stream``) carries everything: cache allocation, host-to-device copies, the profile
  switch, ``execute_async_v3`` and the device-to-host copies of the logits, so nothing runs unordered with TensorRT.
* Tensors are bound by name: each cache tensor is the one the manifest's decode graph names (``past_key_3`` is
  ``cache[i]`` where the manifest lists it at i), whatever order the engine lists its I/O in.
* In place where the engine says so: ``present_X`` is bound to ``past_X``'s buffer when
  ``engine.get_aliased_input_tensor(present_X) == past_X`` (the plugin aliases them, the engine was built with
  ``ALIASED_PLUGIN_IO_10_03``); otherwise a new buffer receives it and replaces the cache entry.
* An image/audio input with zero rows is bound to a 1-element buffer (TensorRT refuses a null address).
* Every ``set_input_shape``, ``set_tensor_address``, ``set_optimization_profile_async`` and ``execute_async_v3``
  result is checked; a failure raises with the tensor's name.
* Decode replays a CUDA graph captured on first use for the current batch size and cache (when the decode step
  updates every cache in place); binding the decode context for another batch size or another cache (or row
  view of one: `rows`) drops it.

The engine's prefill profile takes at most ``prefill_chunk`` tokens per sequence (manifest), which
`runtime.generate` respects by prefilling longer prompts in chunks.  Needs torch with CUDA and tensorrt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import ArtifactError
from runtime.errors import InputError
from runtime.ort_backend import cache_shape, is_cache, prefill_feeds, speculative_record
from runtime.prompt import PrefillInputs

__all__ = ["STEPS", "TrtBackend", "engine_layout"]

STEPS = ("prefill", "decode")


def engine_layout(root: Path, record: dict[str, Any]) -> tuple[bool, dict[str, int]]:
    """(one engine for both steps?, step -> optimization profile index) from the manifest's ``engines.tensorrt``."""
    one = bool(record.get("one_engine"))
    if one != (record["prefill"] == record["decode"]):
        raise ArtifactError(f"{root}: engines.tensorrt has one_engine={record.get('one_engine')!r} but its prefill "
                            f"and decode engines are {record['prefill']!r} and {record['decode']!r}")
    index = record.get("profile_index", {}) if one else {}
    if one and (not isinstance(index, dict) or sorted(index) != sorted(STEPS)
                or not all(type(v) is int for v in index.values()) or index["prefill"] == index["decode"]):
        raise ArtifactError(f"{root}: engines.tensorrt.profile_index: expected distinct integer profiles for "
                            f"{' and '.join(STEPS)}, got {index!r}")
    return one, {step: int(index.get(step, 0)) for step in STEPS}


class _Cache(list):
    """The cache's device tensors, with the row views made of it (`TrtBackend.rows`)."""

    def __init__(self, tensors: list):
        super().__init__(tensors)
        self.views: dict[tuple[int, int], _Cache] = {}


class TrtBackend:
    name = "tensorrt"
    batched_verify = True  # `Backend.batched_verify`: the plugin takes several rows with past context in one call

    def __init__(self, root: Path, manifest: dict[str, Any]):
        import tensorrt as trt
        import torch

        import plugins.tensorrt_plugins as tp  # the engines reference the plugins

        self.torch, self.trt = torch, trt
        self.root, self.manifest = Path(root), manifest
        record = manifest["engines"]["tensorrt"]
        _, profile_index = engine_layout(self.root, record)
        if missing := tp.check_registered():
            raise RuntimeError(f"TensorRT has no plugin creator for {', '.join(missing)} (tensorrt.plugin)")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.stream, self.device = torch.cuda.Stream(), "cuda"
        loaded: dict[str, Any] = {}
        self.engines, self.contexts = {}, {}
        for graph in STEPS:
            rel = record[graph]
            if rel not in loaded:  # one file for both steps: deserialized once, the weights once on the device
                engine = runtime.deserialize_cuda_engine((self.root / rel).read_bytes())
                if engine is None:
                    raise RuntimeError(f"{self.root / rel}: TensorRT could not deserialize this engine (built with "
                                       f"TensorRT {record.get('tensorrt')}, this is {trt.__version__})")
                loaded[rel] = engine
            self.engines[graph] = loaded[rel]
        self.scratch = None
        self._make_contexts(profile_index)
        self._setup(manifest)

    def _make_contexts(self, profile_index: dict[str, int]) -> None:
        """One context per step on its profile, all on one scratch allocation (they never run at the same time)."""
        trt, torch = self.trt, self.torch
        sizes = {}
        for graph in STEPS:
            engine, index = self.engines[graph], profile_index[graph]
            if not 0 <= index < engine.num_optimization_profiles:
                raise RuntimeError(f"{self.root / self.manifest['engines']['tensorrt'][graph]}: the manifest puts "
                                   f"{graph} on optimization profile {index}, the engine has "
                                   f"{engine.num_optimization_profiles}; rebuild it (make build-engine)")
            ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise RuntimeError(f"{self.root}: TensorRT could not create the {graph} execution context")
            self._check(ctx.set_optimization_profile_async(index, self.stream.cuda_stream),
                        f"optimization profile {index} for the {graph} context")
            self.contexts[graph] = ctx
            sizes[graph] = int(engine.get_device_memory_size_for_profile_v2(index))
        size = max(sizes.values())
        with self._on_stream():
            self.scratch = torch.empty(max(size, 256), dtype=torch.uint8, device=self.device)
        for graph in STEPS:
            self.contexts[graph].set_device_memory(self.scratch.data_ptr(), size)
        self.stream.synchronize()

    def _setup(self, manifest: dict[str, Any]) -> None:
        """Everything that does not need TensorRT or a GPU (tests construct a backend around fakes with it)."""
        record = manifest["engines"]["tensorrt"]
        self.one_engine, self.profile_index = engine_layout(self.root, record)
        self.cache_specs = [i for i in manifest["graphs"]["decode"]["inputs"] if is_cache(i["name"])]
        self.cache_index = {spec["name"]: i for i, spec in enumerate(self.cache_specs)}
        self.prefill_chunk = record.get("prefill_chunk")
        self.vocab = int(manifest["model_config"]["text"]["vocab_size"])
        self.hidden_size = int(manifest["model_config"]["text"]["hidden_size"])
        self.max_draft_tokens = speculative_record(self.root, manifest)  # verify: the prefill profile, N <= K + 1
        self.aliased = {g: self._aliases(g) for g in self.engines}
        self._graph: tuple | None = None  # (batch, CUDAGraph, device inputs by name, logits, cache)

    # ------------------------------------------------------------------ engine facts
    def _io(self, graph: str) -> tuple[list[str], list[str]]:
        engine = self.engines[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        return inputs, [n for n in names if n not in inputs]

    def _aliases(self, graph: str) -> dict[str, bool]:
        """past name -> whether the engine aliases its present output to it (in-place update)."""
        engine = self.engines[graph]
        inputs, _ = self._io(graph)
        out = {}
        for name in inputs:
            if is_cache(name):
                if name not in self.cache_index:
                    raise RuntimeError(f"{self.root}: the {graph} engine has cache input {name!r}, which the "
                                       f"manifest's decode graph does not list")
                present = name.replace("past_", "present_", 1)
                out[name] = engine.get_aliased_input_tensor(present) == name
        return out

    # ------------------------------------------------------------------ device helpers (one stream)
    def _on_stream(self):
        return self.torch.cuda.stream(self.stream)

    def _to_device(self, array: np.ndarray):
        """A device copy of ``array`` ordered on ``self.stream`` (call inside `_on_stream`); an empty array gets a
        1-element buffer instead (torch gives an empty tensor a null address, which TensorRT refuses)."""
        torch = self.torch
        host = torch.from_numpy(np.ascontiguousarray(array))
        if host.numel() == 0:
            return torch.zeros(1, dtype=host.dtype, device=self.device)
        if self.device == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _empty(self, shape, like=None):
        torch = self.torch
        if like is not None:
            return torch.empty_like(like)
        return torch.empty(tuple(shape), dtype=torch.float32, device=self.device)

    @staticmethod
    def _check(ok, what: str) -> None:
        if not ok:
            raise RuntimeError(f"TensorRT refused {what}")

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch: int, max_len: int) -> list:
        torch = self.torch
        with self._on_stream():
            cache = [torch.zeros(cache_shape(spec, batch, max_len), dtype=torch.float32, device=self.device)
                     for spec in self.cache_specs]
        self.stream.synchronize()
        self._graph = None  # a captured decode graph points at the previous cache
        return _Cache(cache)

    def rows(self, cache: list, start: int, stop: int) -> list:
        """Rows ``start:stop`` of ``cache`` as a cache of device views of the same buffers (rows are the leading
        dimension, so each view is contiguous; the same view object for the same rows).  Needs every present
        aliased to its past in both steps (the one-engine build): a step on the view must land in ``cache``."""
        if not all(all(a.values()) for a in self.aliased.values()):
            raise ValueError(f"{self.root}: this TensorRT engine does not update every cache in place, so a step "
                             "cannot run on some rows of a cache; rebuild it (make build-engine BACKEND=tensorrt)")
        views = getattr(cache, "views", None)
        batch = int(cache[0].shape[0]) if len(cache) else 0
        if views is None:
            raise ValueError("rows(): the cache must be one made by new_cache()")
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= batch):
            raise ValueError(f"rows({start!r}, {stop!r}): expected 0 <= start < stop <= {batch} (the cache's rows)")
        if start == 0 and stop == batch:
            return cache
        if (start, stop) not in views:
            views[(start, stop)] = _Cache([c[start:stop] for c in cache])
        return views[(start, stop)]

    # ------------------------------------------------------------------ steps
    def _bind(self, graph: str, feeds: dict, cache: list):
        """Bind inputs, caches and logits of ``graph``'s context by name (on ``self.stream``); returns the logits
        buffer, the cache after the step and the device inputs (kept alive until the step is done)."""
        ctx = self.contexts[graph]
        inputs, outputs = self._io(graph)
        keep, new_cache = {}, list(cache)
        for name in inputs:
            if is_cache(name):
                buf = cache[self.cache_index[name]]
                shape = tuple(buf.shape)
            else:
                if name not in feeds:
                    raise RuntimeError(f"{self.root}: the {graph} engine wants input {name!r}, which the runtime does "
                                       f"not provide (has {sorted(feeds)})")
                shape = tuple(feeds[name].shape)
                buf = keep[name] = self._to_device(feeds[name])
            self._check(ctx.set_input_shape(name, shape),
                        f"shape {shape} for {graph} input {name!r} (outside the engine's profile?)")
            self._check(ctx.set_tensor_address(name, buf.data_ptr()), f"the address of {graph} input {name!r}")
        batch = int(feeds["input_ids"].shape[0])
        heads = (batch, *feeds["logits_index"].shape[1:]) if "logits_index" in feeds else (batch,)
        for name in outputs:
            if name == "logits":  # (B, V), or (B, N, V) from a speculative graph
                buf = keep["logits"] = self._empty((*heads, self.vocab))
            elif name == "hidden":  # a speculative graph's final-normed hidden states (B, N, hidden)
                buf = keep["hidden"] = self._empty((*heads, self.hidden_size))
            elif is_cache(name):
                past = name.replace("present_", "past_", 1)
                i = self.cache_index[past]
                if not self.aliased[graph][past]:
                    new_cache[i] = self._empty(None, like=cache[i])
                buf = new_cache[i]
            else:
                raise RuntimeError(f"{self.root}: the {graph} engine has an unexpected output {name!r}")
            self._check(ctx.set_tensor_address(name, buf.data_ptr()), f"the address of {graph} output {name!r}")
        return keep["logits"], new_cache, keep

    def _execute(self, graph: str) -> None:
        self._check(self.contexts[graph].execute_async_v3(self.stream.cuda_stream),
                    f"to run the {graph} engine (execute_async_v3 returned False; see TensorRT's log above)")

    def prefill(self, inputs: PrefillInputs, cache: list) -> np.ndarray:
        return self._prefill(inputs, cache)[0].reshape(len(inputs.input_ids), -1)  # a speculative graph's N is 1

    def _prefill(self, inputs: PrefillInputs, cache: list):
        feeds = prefill_feeds(inputs, self.manifest)
        with self._on_stream():
            logits, new_cache, keep = self._bind("prefill", feeds, cache)
            self._execute("prefill")
            out = logits.to("cpu", non_blocking=False)
            hidden = keep["hidden"].to("cpu", non_blocking=False) if "hidden" in keep else None
        self.stream.synchronize()
        if any(n is not c for n, c in zip(new_cache, cache)):
            self._graph = None  # the prefill replaced cache buffers the captured decode graph points at
        cache[:] = new_cache
        return out.numpy(), None if hidden is None else hidden.numpy()

    def verify(self, input_ids, past_lens, cache: list, seq_lens=None, *, copy: bool = True):
        """`runtime.backend.Backend.verify` on the prefill profile (the plugin takes any batch with past context):
        (B, n) tokens -> logits (B, n, V) and final-normed hidden states (B, n, hidden); ``copy`` has no effect
        (the host arrays are new each call)."""
        ids = np.asarray(input_ids, np.int64)
        if ids.ndim != 2 or not ids.shape[1]:
            raise InputError(f"verify: input_ids of shape {ids.shape}; expected (batch, n >= 1)")
        b, n = ids.shape
        if n > self.verify_tokens(past_lens):
            raise InputError(f"verify: {n} tokens per row; this artifact verifies at most {self.verify_tokens(past_lens)}"
                             " (exported with --speculative K: K + 1; without it none)")
        lens = np.full(b, n, np.int64) if seq_lens is None else np.asarray(seq_lens, np.int64).reshape(-1)
        index = np.broadcast_to(np.arange(n, dtype=np.int64), (b, n))
        return self._prefill(PrefillInputs(ids, np.asarray(past_lens, np.int64).reshape(-1), lens,
                                           logits_index=index), cache)

    def verify_tokens(self, past_lens) -> int:
        """`runtime.backend.Backend.verify_tokens`: max_draft_tokens + 1 (rings of window + K + 1 slots), 1 without."""
        return self.max_draft_tokens + 1 if self.max_draft_tokens else 1

    def _decode_feeds(self, ids: np.ndarray, lens: np.ndarray) -> dict[str, np.ndarray]:
        """The decode context's inputs: the decode graph's, or (one engine) a prefill of one token per sequence."""
        if not self.one_engine:
            return {"input_ids": ids, "past_lens": lens}
        return prefill_feeds(PrefillInputs(input_ids=ids, past_lens=lens, seq_lens=np.ones(len(ids), np.int64)),
                             self.manifest)

    def decode(self, input_ids, past_lens, cache: list, *, copy: bool = True) -> np.ndarray:
        """One step: (B, 1) token ids (or a list of B ints) at positions ``past_lens`` (B,) -> (B, V) logits
        (``copy`` is accepted for the ORT backend's signature: the logits are always a new host array).  When every
        cache is updated in place, the first call for a batch size runs eagerly and captures a CUDA graph; later
        calls with that batch size (and the same cache) replay it."""
        torch = self.torch
        ids = np.asarray(input_ids, np.int64).reshape(-1, 1)
        batch = len(ids)
        lens = np.asarray(past_lens, np.int64).reshape(-1)
        if len(lens) != batch:
            raise ValueError(f"decode: {batch} token ids but {len(lens)} past lengths")
        in_place = all(self.aliased["decode"].values())
        if self._graph is not None and self._graph[0] == batch and self._graph[4] is cache and in_place:
            _, graph, bufs, logits, _ = self._graph
            with self._on_stream():
                bufs["input_ids"].copy_(torch.from_numpy(ids), non_blocking=False)
                bufs["past_lens"].copy_(torch.from_numpy(lens), non_blocking=False)
                graph.replay()
                out = logits.to("cpu")
            self.stream.synchronize()
            return out.numpy()
        self._graph = None  # re-binding the context invalidates a graph captured for another batch size
        with self._on_stream():
            logits, new_cache, keep = self._bind("decode", self._decode_feeds(ids, lens), cache)
            logits = logits.view(batch, self.vocab)  # (B, V), also from a speculative graph's (B, 1, V)
            self._execute("decode")  # eager step (also warms up)
            out = logits.to("cpu")
        self.stream.synchronize()
        cache[:] = new_cache
        if in_place:  # the graph reads every bound input buffer: keep them all alive with it
            self._graph = (batch, self._capture(), keep, logits, cache)
        return out.numpy()

    def _capture(self):
        """A CUDA graph of the decode step as bound now (capturing records the launches without running them)."""
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream):
            self._execute("decode")
        return graph

    @staticmethod
    def cache_arrays(cache: list) -> list[np.ndarray]:
        return [c.cpu().numpy() for c in cache]
