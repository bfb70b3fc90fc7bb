"""Draft tokens with the assistant's TensorRT engine (`graphs.trt_assistant`) on the TensorRT backend's caches.

`TrtAssistantRunner.draft` is `runtime.assistant.AssistantRunner.draft` (same arguments, same `Drafts`, the same
default entries `clean_ranges`) on `runtime.trt_backend.TrtBackend`:

* the target's last full and last sliding layer caches are the backend's own device tensors (or the row views
  `TrtBackend.rows` makes of them), bound to the engine's cache inputs **by address**: read in place, no copy;
* the target's embedding row of each step's input token is gathered on the host from the target's table,
  memory-mapped from the decode graph's external data (`runtime.assistant.TargetEmbedding`, as on ONNX Runtime),
  and uploaded (B x hidden floats per step); the table is not put on the device a second time;
* the hidden state stays on the device: each step's ``next_hidden`` output buffer is the next step's ``hidden``
  input (two buffers in turn, neither of them the uploaded first state); the logits of the K steps land in one (K, B, V) device buffer, copied once;
* everything runs on the backend's stream (``backend.stream``) between its target steps; the engine's context
  uses the backend's scratch allocation when it is large enough (the target's contexts and this one never run at
  the same time on one stream), else its own.

Each step's argmax token comes back to the host (a synchronisation per draft) for the next embedding row: drafting
K tokens is K engine calls.  Not here: a K-step loop inside one engine (it would need the target's table on the
device), CUDA graphs of the step, verification and acceptance (`runtime.speculative.verify`).
Needs tensorrt and torch with CUDA (the backend's); `trt_engine_problem` (why the artifact cannot draft on
TensorRT) needs neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.assistant import (
    OFFSET,
    Drafts,
    TargetEmbedding,
    clean_ranges,
    draft_inputs,
)
from runtime.errors import InputError
from runtime.manifest import ArtifactError

__all__ = ["TrtAssistantRunner", "trt_engine_problem"]

_RANGES = ("full_len", "sliding_start", "sliding_end")


def trt_engine_problem(root: str | Path, manifest: dict[str, Any]) -> str | None:
    """Why ``draft="assistant"`` cannot run on this artifact's TensorRT engine (with the command that fixes it),
    or None when its assistant has a current TensorRT engine."""
    record = manifest.get("assistant")
    if record is None:
        return f"the artifact has no assistant; add one with `make export-assistant ASSISTANT=<checkpoint dir> OUT={root}`"
    engine = record.get("engines", {}).get("tensorrt")
    build = (f"build it with `make build-engine BACKEND=tensorrt OUT={root}` (target and assistant) or "
             f"`python -m graphs.trt_assistant --artifact {root}` (the assistant's alone)")
    if engine is None:
        return f"the artifact's assistant has no TensorRT engine; {build}"
    if engine.get("from") != record["file"] or engine.get("from_sha256") != manifest.get("files", {}).get(record["file"]):
        return (f"the assistant's TensorRT engine {engine['file']} was built from another assistant graph than "
                f"{record['file']} (exported again since); {build}")
    return None


class TrtAssistantRunner:
    """The assistant's TensorRT engine, run on a `TrtBackend`'s stream against its cache tensors."""

    def __init__(self, root: str | Path, manifest: dict[str, Any], backend, *,
                 embedding: TargetEmbedding | None = None):
        root = Path(root)
        if problem := trt_engine_problem(root, manifest):
            raise ArtifactError(f"{root}: {problem}")
        import tensorrt as trt

        record = manifest["assistant"]["engines"]["tensorrt"]
        path = root / record["file"]
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize this engine (built with TensorRT "
                               f"{record.get('tensorrt')}, this is {trt.__version__}); rebuild it")
        self._setup(root, manifest, backend, engine, trt, embedding)

    def _setup(self, root: Path, manifest: dict[str, Any], backend, engine, trt, embedding=None) -> None:
        """Everything after deserialization (tests run it on an engine emulated by ONNX Runtime)."""
        self.root, self.backend, self.engine, self.trt = Path(root), backend, engine, trt
        record = manifest["assistant"]
        self.window = int(record["config"]["text"]["sliding_window"])
        self.vocab = int(record["config"]["text"]["vocab_size"])
        self.hidden_size = int(record["config"]["backbone_hidden_size"])
        names = [s["name"] for s in manifest["graphs"]["decode"]["inputs"]
                 if s["name"].startswith(("past_key_", "past_value_"))]
        self.cache_index = {k: names.index(v) for k, v in record["target_caches"].items()}
        self.embedding = embedding or TargetEmbedding(root, manifest)
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in io if n not in self.inputs]
        where = self.root / record.get("engines", {}).get("tensorrt", {}).get("file", "(assistant engine)")
        specs = [s for s in record["inputs"] if s["name"] != OFFSET]  # a constant 0 in the engine: rings
        want = {"inputs": sorted(s["name"] for s in specs), "outputs": sorted(s["name"] for s in record["outputs"])}
        if sorted(self.inputs) != want["inputs"] or sorted(outputs) != want["outputs"]:
            raise ArtifactError(f"{where}: engine I/O {sorted(self.inputs)} -> {sorted(outputs)}; the assistant graph "
                                f"has {want['inputs']} -> {want['outputs']} (rebuild the engine)")
        torch = backend.torch
        kinds = {trt.DataType.FLOAT: torch.float32, trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32}
        self.dtypes = {}
        for spec in specs + record["outputs"]:
            got = kinds.get(engine.get_tensor_dtype(spec["name"]))
            allowed = (torch.int64, torch.int32) if spec["name"] == "token" else (getattr(torch, spec["dtype"]),)
            if got not in allowed:
                raise ArtifactError(f"{where}: tensor {spec['name']!r} is {engine.get_tensor_dtype(spec['name'])}, "
                                    f"expected {spec['dtype']} (rebuild the engine)")
            self.dtypes[spec["name"]] = got
        ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise RuntimeError(f"{where}: TensorRT could not create the assistant's execution context")
        size = int(engine.get_device_memory_size_for_profile_v2(0))
        scratch = getattr(backend, "scratch", None)
        if scratch is None or scratch.numel() < size:
            with backend._on_stream():
                scratch = self._own_scratch = torch.empty(max(size, 256), dtype=torch.uint8, device=backend.device)
        ctx.set_device_memory(scratch.data_ptr(), size)
        backend._check(ctx.set_optimization_profile_async(0, backend.stream.cuda_stream),
                       "optimization profile 0 for the assistant context")
        backend.stream.synchronize()
        self.context = ctx

    def _bind(self, name: str, buf) -> None:
        ctx, check = self.context, self.backend._check
        if name in self.inputs:
            check(ctx.set_input_shape(name, tuple(buf.shape)),
                  f"shape {tuple(buf.shape)} for assistant input {name!r} (outside the engine's profile?)")
        check(ctx.set_tensor_address(name, buf.data_ptr()), f"the address of assistant tensor {name!r}")

    def draft(self, cache: Sequence[Any], tokens, hidden, position, num_tokens: int, *, written=None,
              ranges: dict[str, Any] | None = None) -> Drafts:
        """`runtime.assistant.AssistantRunner.draft` on the backend's cache tensors: ``cache`` the backend's cache
        list (or a `TrtBackend.rows` view of it), ``tokens`` (B,) each row's last token at ``position`` (B,),
        ``hidden`` (B, hidden) the target's final-norm hidden state before it; ``written``/``ranges`` as there."""
        tokens, hidden, position, b = draft_inputs(tokens, hidden, position, num_tokens)
        bufs = {k: cache[i] for k, i in self.cache_index.items()}
        for name, buf in bufs.items():
            if buf.dtype != self.dtypes[name] or not buf.is_contiguous() or int(buf.shape[0]) != b:
                raise InputError(f"assistant: target cache {name} is {buf.dtype} of shape {tuple(buf.shape)}; expected "
                                 f"a contiguous {self.dtypes[name]} tensor of {b} rows (the backend's cache)")
        ring = int(bufs["ring_key"].shape[2])
        if ranges is None:
            ranges = clean_ranges(position, position if written is None else written, self.window, ring)
        ranges = {k: np.asarray(ranges[k], np.int64).reshape(b) for k in _RANGES}
        if np.any(ranges["sliding_end"] - ranges["sliding_start"] > ring):
            raise InputError(f"assistant: a sliding range is longer than the ring ({ring} slots)")
        fixed = {"position": position, "full_slots": np.arange(max(1, int(ranges["full_len"].max())), dtype=np.int64),
                 **ranges}
        backend, torch = self.backend, self.backend.torch
        out_tokens = []
        with backend._on_stream():
            keep = {name: backend._to_device(arr) for name, arr in fixed.items()}  # alive until the stream is done
            keep["hidden"] = backend._to_device(hidden)
            # the steps' hidden states in turn (never written into the caller's input buffer)
            states = [torch.empty((b, self.hidden_size), dtype=torch.float32, device=backend.device) for _ in "ab"]
            logits = torch.empty((num_tokens, b, self.vocab), dtype=torch.float32, device=backend.device)
            token_out = torch.empty((b,), dtype=self.dtypes["token"], device=backend.device)
            for name, buf in {**bufs, **{k: keep[k] for k in fixed}}.items():
                self._bind(name, buf)
            self._bind("token", token_out)
            token, rows = tokens, []
            for i in range(num_tokens):
                rows.append(backend._to_device(self.embedding(token)))  # (B, hidden): the target's scaled rows
                self._bind("token_embeds", rows[-1])
                self._bind("hidden", keep["hidden"] if i == 0 else states[(i - 1) % 2])
                self._bind("next_hidden", states[i % 2])
                self._bind("logits", logits[i])
                backend._check(self.context.execute_async_v3(backend.stream.cuda_stream),
                               "to run the assistant engine (execute_async_v3 returned False; see TensorRT's log)")
                token = token_out.to("cpu").numpy().astype(np.int64)  # waits for this step: the next row's id
                out_tokens.append(token)
            all_logits = logits.permute(1, 0, 2).contiguous().to("cpu")  # (B, K, V)
            next_hidden = states[(num_tokens - 1) % 2].to("cpu")
        backend.stream.synchronize()
        return Drafts(np.stack(out_tokens, 1), all_logits.numpy(), next_hidden.numpy())
