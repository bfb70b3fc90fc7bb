"""Verify calls on a one-graph ONNX Runtime engine, on IOBindings kept between calls.

`Backend.verify` through `OrtBackend._run` binds every input and cache anew and wraps every output per call: on
the demo model that Python costs about as much as the graph (~0.25 ms of a ~0.65 ms pass over 7 tokens).  Here,
as the decode step does (`OrtBackend._decode_bound`), one binding per batch and number of tokens (B, n) is kept:
the caches stay bound in place (a one-graph engine writes every cache in place; another request's cache is bound
anew into every kept binding of its batch size and the rest kept, ~0.04 ms each against ~0.15 ms for a whole binding
on the demo; bindings of other batch sizes, row views of the previous request's cache, are dropped: no binding holds
an earlier request's cache; a binding meeting another view of the same cache is bound to it alone), the call writes its token ids, past lengths and row lengths into arrays
the binding already reads, the attention geometry (`runtime.ort_attention.attention_inputs`) into the bound arrays
of the same shape (bound anew where the shape changed: the ring bias grows while the rings fill), and the logits and
hidden states land in the buffers the first call of that (B, n) allocated.

Text calls only (what `runtime.speculative` makes: one row, or several right-padded rows on engines that verify
them in one pass, `OrtBackend.batched_verify`); other calls take `OrtBackend._run`.  The results are views of
buffers the next call with the same (B, n) overwrites (`copy=False`).
"""

from __future__ import annotations

import operator
from array import array

import numpy as np

from runtime.ort_attention import INPUTS as ATTENTION_INPUTS
from runtime.ort_attention import attention_inputs, bind_gqa
from runtime.prompt import PrefillInputs

__all__ = ["BoundVerify", "words"]


def words(arr: np.ndarray, code: str) -> memoryview:
    """A flat memoryview of the C-contiguous array ``arr`` as ``code`` ("q" int64, "i" int32) items: writes go
    straight into its memory, with no numpy call (the bound decode step's and verify call's integer inputs)."""
    if not arr.flags.c_contiguous or np.dtype(code) != arr.dtype:
        raise ValueError(f"a bound input of dtype {arr.dtype} (contiguous: {arr.flags.c_contiguous}); "
                         f"expected a contiguous {np.dtype(code)} array")
    return memoryview(arr.reshape(-1)).cast("B").cast(code)


class BoundVerify:
    """Per backend: ``call(ids, past, lens, cache)`` -> (logits (B, n, V), hidden (B, n, H)) views; ``ids`` (B, n)
    int64, ``past`` and ``lens`` lists of B ints (each row's valid tokens)."""

    def __init__(self, backend, prefill_feeds, is_cache) -> None:
        """``prefill_feeds`` and ``is_cache``: `runtime.ort_backend`'s (passed in: that module imports this one)."""
        self.backend, self.feeds = backend, prefill_feeds
        names_in, names_out = backend.io["prefill"]
        self.past = [x for x in names_in if is_cache(x)]
        self.present = [x for x in names_out if is_cache(x)]
        self.bound: dict[tuple[int, int], dict] = {}  # (B, n) -> binding state
        self.root = None  # id of the memory every binding's cache lies in (a row view's base): one request's

    def call(self, ids: np.ndarray, past: list[int], lens: list[int],
             cache: list) -> tuple[np.ndarray, np.ndarray | None]:
        b, n = ids.shape
        state = self.bound.get((b, n))
        if (state is None or state["cache"] is not cache or len(cache) != len(state["values"])
                or not all(map(operator.is_, state["values"], cache))):
            root = _root(cache)
            if root != self.root:  # another request's cache: no binding may keep the previous one alive; those of
                self.root = root  # this call's batch size are bound to it, the others (row views) dropped
                self.bound = {key: st for key, st in self.bound.items() if key[0] == b}
                for st in self.bound.values():
                    self._bind_cache(st, cache)
                state = self.bound.get((b, n))
            if state is None:
                state = self.bound[(b, n)] = self._bind(b, n)
                self._bind_cache(state, cache)
            elif state["cache"] is not cache:  # another view of the same cache (rows finished): this binding only
                self._bind_cache(state, cache)
        state["ids"][:] = array("q", ids.tobytes())
        state["past"][:] = array("q", past)
        state["lens"][:] = lens
        state["seq_lens"][:] = array("q", lens)
        b = self.backend
        record = b.engine.get("attention_inputs") or {}
        if state["attention"]:
            values = attention_inputs(np.array(past, np.int64), state["lens"], n, window=record.get("window"),
                                      want=state["attention"], slots=record.get("ring_slots"))
            arrays, binding = state["arrays"], state["binding"]
            for key, value in values.items():
                arr = arrays.get(key)
                if arr is not None and arr.shape == value.shape:
                    arr[...] = value
                    continue
                arr = arrays[key] = np.ascontiguousarray(value)
                binding.bind_ortvalue_input(ATTENTION_INPUTS[key], b._ort.OrtValue.ortvalue_from_numpy(arr))
        b.sessions["prefill"].run_with_iobinding(state["binding"])
        if state["logits"] is None:  # first call of this (B, n): keep ORT's output buffers and write later calls there
            outs = state["binding"].get_outputs()
            state["binding"].bind_ortvalue_output("logits", outs[0])
            state["logits"] = outs[0].numpy()
            if state["has_hidden"]:
                state["binding"].bind_ortvalue_output("hidden", outs[1])
                state["hidden"] = outs[1].numpy()
        return state["logits"], state["hidden"]

    def _bind_cache(self, state: dict, cache: list) -> None:
        past, present, names_out = self.past, self.present, self.backend.io["prefill"][1]
        if len(past) != len(cache) or len(present) != len(cache):
            raise ValueError(f"verify: the engine has {len(past)} cache inputs and {len(present)} cache outputs, "
                             f"the cache {len(cache)} buffers")
        binding = state["binding"]
        state["cache"], state["values"] = cache, list(cache)
        for p_in, p_out, value in zip(past, present, cache):
            binding.bind_ortvalue_input(p_in, value)
            binding.bind_ortvalue_output(p_out, value)
        bind_gqa(binding, present, names_out, cache, [True] * len(cache))

    def _bind(self, rows: int, n: int) -> dict:
        b = self.backend
        ort = b._ort
        names_in, names_out = b.io["prefill"]
        lens = np.full(rows, n, np.int64)
        index = np.broadcast_to(np.arange(n, dtype=np.int64), (rows, n))
        feeds = self.feeds(PrefillInputs(np.zeros((rows, n), np.int64), np.zeros(rows, np.int64), lens,
                                         logits_index=index), b.manifest)
        binding = b.sessions["prefill"].io_binding()
        arrays = {}
        for name in names_in:
            if name in feeds:
                arrays[name] = np.ascontiguousarray(feeds[name])
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arrays[name]))
        binding.bind_output("logits", "cpu")  # first: get_outputs()[0]
        has_hidden = "hidden" in names_out
        if has_hidden:
            binding.bind_output("hidden", "cpu")
        attention = [k for k, v in ATTENTION_INPUTS.items() if v in names_in]
        return {"binding": binding, "arrays": arrays, "lens": lens, "attention": attention,
                "ids": words(arrays["input_ids"], "q"), "past": words(arrays["past_lens"], "q"),
                "seq_lens": words(arrays["seq_lens"], "q"),
                "logits": None, "hidden": None, "has_hidden": has_hidden}


def _root(cache: list) -> int:
    """id of the memory ``cache`` lies in: the base arrays of `OrtBackend.rows` views, else the cache itself."""
    arrays = getattr(cache, "arrays", None)
    if not arrays:
        return id(cache)
    first = arrays[0]
    return id(first if first.base is None else first.base)
