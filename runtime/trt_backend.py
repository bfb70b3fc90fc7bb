"""TensorRT backend: runs an artifact's prefill and decode engines on a GPU with the KV cache updated in place.

Same interface as `runtime.ort_backend.OrtBackend` (``new_cache``, ``prefill``, ``decode``), so `runtime.generate`
drives either.  Engines are deserialized once (the plugins are registered first: `plugins.tensorrt_plugins`); the
cache is a list of CUDA tensors allocated once per generation and bound by address as both ``past_*`` and
``present_*`` (the plugin aliases them), except sliding rings in prefill, whose new buffers replace the old.  Steps
run with ``execute_async_v3`` on one stream; the decode step of each batch size is captured in a CUDA graph on first
use and replayed afterwards (its inputs are copied into fixed buffers first).  Needs torch with CUDA and tensorrt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from runtime.ort_backend import cache_shape, is_cache, prefill_feeds
from runtime.prompt import PrefillInputs

__all__ = ["TrtBackend"]


class TrtBackend:
    name = "tensorrt"

    def __init__(self, root: Path, manifest: dict[str, Any]):
        import tensorrt as trt
        import torch

        import plugins.tensorrt_plugins  # noqa: F401  (the engines reference the plugins)

        self.torch, self.trt = torch, trt
        self.root, self.manifest = Path(root), manifest
        engines = manifest["engines"]["tensorrt"]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for graph in ("prefill", "decode"):
            data = (self.root / engines[graph]).read_bytes()
            engine = runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise RuntimeError(f"{self.root / engines[graph]}: TensorRT could not deserialize this engine "
                                   f"(built with TensorRT {engines.get('tensorrt')}, this is {trt.__version__})")
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.cache_specs = [i for i in manifest["graphs"]["decode"]["inputs"] if is_cache(i["name"])]
        self.layer_types = manifest["model_config"]["text"]["layer_types"]
        self._graphs: dict[int, tuple] = {}

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch: int, max_len: int) -> list:
        cache = [self.torch.zeros(cache_shape(spec, batch, max_len), dtype=self.torch.float32, device="cuda")
                 for spec in self.cache_specs]
        self._graphs.clear()  # captured decode graphs point at the previous cache
        return cache

    def _is_sliding(self, i: int) -> bool:
        return self.layer_types[i // 2] == "sliding_attention"

    # ------------------------------------------------------------------ steps
    def _bind(self, graph: str, feeds: dict, cache: list, in_place: list[bool]):
        torch = self.torch
        ctx, engine = self.contexts[graph], self.engines[graph]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        keep = {}
        for name in inputs:
            if is_cache(name):
                continue
            t = torch.as_tensor(np.ascontiguousarray(feeds[name])).to("cuda", non_blocking=True)
            keep[name] = t
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        past = [n for n in inputs if is_cache(n)]
        new_cache = list(cache)
        for i, name in enumerate(past):
            ctx.set_input_shape(name, tuple(cache[i].shape))
            ctx.set_tensor_address(name, cache[i].data_ptr())
            present = name.replace("past_", "present_")
            if not in_place[i]:
                new_cache[i] = torch.empty_like(cache[i])
            ctx.set_tensor_address(present, new_cache[i].data_ptr())
        batch = int(feeds["input_ids"].shape[0])
        logits = torch.empty((batch, int(self.manifest["model_config"]["text"]["vocab_size"])), device="cuda")
        ctx.set_tensor_address("logits", logits.data_ptr())
        return logits, new_cache, keep

    def prefill(self, inputs: PrefillInputs, cache: list) -> np.ndarray:
        feeds = prefill_feeds(inputs, self.manifest)
        in_place = [not self._is_sliding(i) for i in range(len(cache))]
        logits, new_cache, _keep = self._bind("prefill", feeds, cache, in_place)
        self.contexts["prefill"].execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        cache[:] = new_cache
        self._graphs.clear()
        return logits.cpu().numpy()

    def decode(self, input_ids: np.ndarray, past_lens: np.ndarray, cache: list) -> np.ndarray:
        """One step; the first call per batch size runs eagerly and captures a CUDA graph, later calls replay it."""
        torch = self.torch
        batch = int(input_ids.shape[0])
        ids = np.asarray(input_ids, np.int64).reshape(-1, 1)
        lens = np.asarray(past_lens, np.int64)
        if batch not in self._graphs:
            feeds = {"input_ids": ids, "past_lens": lens}
            logits, _, keep = self._bind("decode", feeds, cache, [True] * len(cache))
            with torch.cuda.stream(self.stream):
                self.contexts["decode"].execute_async_v3(self.stream.cuda_stream)  # eager step (also warms up)
            self.stream.synchronize()
            out = logits.cpu().numpy()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self.contexts["decode"].execute_async_v3(self.stream.cuda_stream)
            self._graphs[batch] = (graph, keep["input_ids"], keep["past_lens"], logits)
            return out
        graph, ids_buf, lens_buf, logits = self._graphs[batch]
        ids_buf.copy_(torch.from_numpy(ids))
        lens_buf.copy_(torch.from_numpy(lens))
        graph.replay()
        torch.cuda.synchronize()
        return logits.cpu().numpy()

    @staticmethod
    def cache_arrays(cache: list) -> list[np.ndarray]:
        return [c.cpu().numpy() for c in cache]
