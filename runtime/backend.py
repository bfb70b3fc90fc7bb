"""The contract every runtime backend fulfils: what `runtime.generate` and the in-flight batching engine
(`runtime.engine`) call, and nothing else.

Two implementations: `runtime.ort_backend.OrtBackend` (ONNX Runtime, CPU) and `runtime.trt_backend.TrtBackend`
(TensorRT, NVIDIA GPU).  A new backend implements this Protocol; ``tests/test_backend_contract.py`` runs the
backend-generic tests against every implementation available on the machine.

A cache is whatever `Backend.new_cache` returns (a list of device buffers, one per ``past_*`` input of the
manifest's decode graph, in that order, rows = sequences); the caller never looks inside it, it only hands it
back, or a `Backend.rows` view of it.  Steps update the cache in place (a backend may also replace a list entry,
but then `rows` views are refused).

Speculative decoding (`runtime.speculative.verify`) needs an artifact exported with ``--speculative K``: its
graphs return logits and hidden states at chosen new tokens, and its sliding rings hold window + K + 1 slots, so a
verify call's rejected tokens are taken back by the caller's lengths alone: the next call at a shorter
``past_lens`` overwrites them before anything reads them (full layers) or masks them by position (rings: a rejected
write only replaced positions outside every later window).  Nothing else is needed to roll back.

Deliberately absent: tokenization, sampling, stopping and scheduling (`runtime.generate`, `runtime.engine`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from runtime.prompt import PrefillInputs

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    name: str
    """``"onnxruntime"`` or ``"tensorrt"``: what `runtime.load` was asked for."""

    prefill_chunk: int | None
    """The most tokens per sequence one `prefill` call takes (the engine's profile), or None for no limit of the
    backend's own (`runtime.generate` then prefills at most ``PREFILL_CHUNK`` tokens per call)."""

    def new_cache(self, batch: int, max_len: int) -> Any:
        """Zeroed cache buffers for ``batch`` sequences of at most ``max_len`` tokens each, allocated once."""
        ...

    def prefill(self, inputs: PrefillInputs, cache: Any) -> np.ndarray:
        """Run ``inputs`` (right-padded token ids of each row at positions ``past_lens`` .. ``past_lens + seq_lens``,
        with the image patches and audio frames of those tokens) on ``cache``, writing their keys and values;
        returns (B, vocab) float32 logits after each row's last new token (rows with ``seq_lens`` 0: unspecified)."""
        ...

    def decode(self, input_ids: Any, past_lens: Any, cache: Any, *, copy: bool = True) -> np.ndarray:
        """One token per row (``input_ids``: B ints or a (B, 1) array) at positions ``past_lens`` (B ints) ->
        (B, vocab) logits.  ``copy=False`` allows a view of a buffer the next step overwrites."""
        ...

    max_draft_tokens: int
    """K of a speculative artifact (``manifest.speculative.max_draft_tokens``): `verify` takes up to K + 1 tokens per
    row; 0 for an artifact exported without ``--speculative`` (no `verify`)."""

    def verify(self, input_ids: Any, past_lens: Any, cache: Any, seq_lens: Any = None, *,
               copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """A verify call: ``input_ids`` (B, n) (the last accepted token, then the drafts) at positions ``past_lens``
        (B,) .. on ``cache``, row i's ``seq_lens[i]`` <= `verify_tokens` ([past_lens[i]]) (``seq_lens``: rows of
        fewer valid tokens, right-padded; the padding enters no cache a later call reads) ->
        logits (B, n, vocab) and the final-normed hidden states (B, n, hidden) after every new token (float32;
        transformers' ``hidden_states[-1]``, what the Gemma 4 assistant reads); their keys and values are written.
        Taking tokens back is the caller's: continue at a shorter ``past_lens``.  A backend may run rows one by one
        (ONNX Runtime's ring engines: GroupQueryAttention takes several tokens with past context at batch 1 only).
        ``copy=False`` allows views of buffers the next verify call overwrites."""
        ...

    batched_verify: bool
    """Whether one `verify` call runs all its rows in one pass (the window engine, TensorRT), so speculative rounds of
    several rows cost about one batched step (`runtime.speculative.batched`); false where rows run one per call
    (ONNX Runtime's ring engine), which then decodes plain batched steps while several rows run."""

    def verify_tokens(self, past_lens: Any) -> int:
        """The most tokens per row one `verify` call may take now (at least 1) such that any of them but the first
        can be taken back by the lengths alone: ``max_draft_tokens + 1``, or fewer where the cache layout needs it
        (ONNX Runtime's windowed sliding caches just before they compact)."""
        ...

    def rows(self, cache: Any, start: int, stop: int) -> Any:
        """A cache made of rows ``start:stop`` of ``cache`` (for `prefill` and `decode` on those sequences only),
        sharing memory with it: a step on the view updates ``cache`` in place and touches no other row.  The same
        arguments give the same view object, so per-cache state (bindings, captured graphs) is reused.  Raises
        ``ValueError`` where the engine cannot update every cache in place (in-flight batching needs that)."""
        ...

    def cache_arrays(self, cache: Any) -> list[np.ndarray]:
        """Host copies of the cache buffers (tests and debugging)."""
        ...
