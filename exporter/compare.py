"""``make compare``: Polygraphy comparison of an artifact's ONNX Runtime graphs against our PyTorch model.

`TorchGemma4Runner` is a Polygraphy runner (a ``BaseRunner``) that executes `Gemma4Model.prefill` or
``.decode`` on the graph's feed dict, so ``Comparator.run`` can put it beside Polygraphy's ``OnnxrtRunner``.
Inputs are consistent random batches (placeholder counts match the soft tokens, lengths fit the cache, caches
hold random past K/V so prefill runs on a non-empty cache) on shapes other than the ones used to export.
Tolerances are per output: logits against the logit range, caches absolute.

Does not compare against transformers (the test suite does) or time anything.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from exporter.config import ModelConfig
from exporter.model import Gemma4Model
from runtime.ort_backend import cache_shape

__all__ = ["TorchGemma4Runner", "compare_artifact", "feeds_for", "model_for_artifact"]


def _lazy_base():
    from polygraphy.backend.base import BaseRunner

    return BaseRunner


class TorchGemma4Runner(_lazy_base()):
    """Runs the prefill or decode function of our PyTorch model on Polygraphy feed dicts."""

    def __init__(self, model: Gemma4Model, graph: str, input_specs: list[dict], output_names: list[str]):
        super().__init__(prefix=f"torch-gemma4-{graph}")
        self.model, self.graph = model, graph
        self.input_specs, self.output_names = input_specs, output_names

    def activate_impl(self):
        self.model.eval()

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for spec in self.input_specs:
            shape = [d if isinstance(d, int) else -1 for d in spec["shape"]]
            meta.add(spec["name"], np.dtype(spec["dtype"]), shape)
        return meta

    @torch.no_grad()
    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()}
        caches = [t[s["name"]] for s in self.input_specs if s["name"].startswith(("past_key_", "past_value_"))]
        if self.graph == "prefill":
            logits, present = self.model.prefill(
                t["input_ids"], t["past_lens"], t["seq_lens"], caches, t.get("image_patches"),
                t.get("image_positions"), t.get("audio_frames"),
            )
        else:
            logits, present = self.model.decode(t["input_ids"], t["past_lens"], caches)
        out = OrderedDict(zip(self.output_names, [x.numpy() for x in (logits, *present)]))
        self.inference_time = time.perf_counter() - start
        return out


class OneGraphDecodeRunner(_lazy_base()):
    """A decode step through a one-graph ONNX Runtime engine (``engines.onnxruntime.one_graph``): the decode feed
    dict becomes a one-token prefill exactly as `runtime.ort_backend` builds it, so Polygraphy compares the path the
    runtime takes against our decode function."""

    def __init__(self, path: Path, manifest: dict, input_specs: list[dict], output_names: list[str]):
        super().__init__(prefix="onnxrt-one-graph-decode")
        self.path, self.manifest = path, manifest
        self.input_specs, self.output_names = input_specs, output_names
        self.session = None

    def activate_impl(self):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])

    def deactivate_impl(self):
        self.session = None

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for spec in self.input_specs:
            meta.add(spec["name"], np.dtype(spec["dtype"]), [d if isinstance(d, int) else -1 for d in spec["shape"]])
        return meta

    def infer_impl(self, feed_dict):
        from runtime.ort_backend import engine_feeds, prefill_feeds
        from runtime.prompt import PrefillInputs

        start = time.perf_counter()
        ids = np.asarray(feed_dict["input_ids"], np.int64).reshape(-1, 1)
        feeds = prefill_feeds(PrefillInputs(input_ids=ids, past_lens=np.asarray(feed_dict["past_lens"], np.int64),
                                            seq_lens=np.ones(len(ids), np.int64)), self.manifest)
        feeds.update({k: v for k, v in feed_dict.items() if k.startswith(("past_key_", "past_value_"))})
        feeds = engine_feeds(self.session, feeds, self.manifest)
        names = [o.name for o in self.session.get_outputs()]
        got = dict(zip(names, self.session.run(names, feeds)))
        out = OrderedDict((n, got[n]) for n in self.output_names)
        self.inference_time = time.perf_counter() - start
        return out


class BackendPrefillRunner(OneGraphDecodeRunner):
    """A prefill through `runtime.ort_backend.OrtBackend`, as the runtime runs it: where the engine record says
    ``prefill_with_past: per_sequence`` (GroupQueryAttention takes no prompt with past context at batch > 1), such a
    batch runs one sequence per call on views of its cache rows."""

    def __init__(self, root: Path, manifest: dict, input_specs: list[dict], output_names: list[str]):
        super().__init__(root, manifest, input_specs, output_names)
        self.name = self.name.replace("one-graph-decode", "backend-prefill")

    def activate_impl(self):
        from runtime.ort_backend import OrtBackend

        self.session = OrtBackend(self.path, self.manifest)

    def infer_impl(self, feed_dict):
        from runtime.prompt import PrefillInputs

        start = time.perf_counter()
        backend = self.session
        ids = np.asarray(feed_dict["input_ids"], np.int64)
        some_past = feed_dict[backend.cache_specs[0]["name"]]
        cache = backend.new_cache(len(ids), int(some_past.shape[2]) if backend.cache_specs[0]["shape"][2] == "max_len"
                                  else int(feed_dict[next(s["name"] for s in backend.cache_specs
                                                          if s["shape"][2] == "max_len")].shape[2]))
        for arr, spec in zip(cache.arrays, backend.cache_specs):
            arr[...] = feed_dict[spec["name"]]
        patches = feed_dict.get("image_patches")
        frames = feed_dict.get("audio_frames")
        logits = backend.prefill(PrefillInputs(
            ids, np.asarray(feed_dict["past_lens"], np.int64), np.asarray(feed_dict["seq_lens"], np.int64),
            patches if patches is not None and len(patches) else None,
            feed_dict.get("image_positions") if patches is not None and len(patches) else None,
            frames if frames is not None and len(frames) else None), cache)
        got = {"logits": logits}
        got.update({spec["name"].replace("past_", "present_"): arr for arr, spec in zip(cache.arrays, backend.cache_specs)})
        self.inference_time = time.perf_counter() - start
        return OrderedDict((n, got[n]) for n in self.output_names)


def feeds_for(cfg: ModelConfig, graph: str, input_specs: list[dict], *, batch: int, seq: int, max_len: int, seed: int):
    """One consistent random feed dict for ``graph``."""
    rng = np.random.default_rng(seed)
    tk = cfg.tokens
    s = seq if graph == "prefill" else 1
    past = rng.integers(0, max_len - s, batch)
    ids = rng.integers(3, min(cfg.text.vocab_size, 290), (batch, s))
    feeds: dict[str, np.ndarray] = {}
    n_img = n_aud = 0
    if graph == "prefill":
        if cfg.vision is not None and s >= 4:
            n_img = 3
            ids[0, 1:4] = tk.image
        if cfg.audio is not None and s >= 6 and batch > 1:
            n_aud = 2
            ids[-1, 4:6] = tk.audio
        feeds["seq_lens"] = np.maximum(1, s - rng.integers(0, s, batch)).astype(np.int64)
        feeds["seq_lens"][0] = s
        if cfg.vision is not None:
            feeds["image_patches"] = rng.random((n_img, cfg.vision.patch_dim), dtype=np.float32)
            feeds["image_positions"] = np.array([[0, 0], [1, 0], [0, 1]][:n_img], dtype=np.int64).reshape(n_img, 2)
        if cfg.audio is not None:
            feeds["audio_frames"] = rng.standard_normal((n_aud, cfg.audio.samples_per_token)).astype(np.float32)
    feeds["input_ids"] = ids.astype(np.int64)
    feeds["past_lens"] = past.astype(np.int64)
    for spec in input_specs:
        if spec["name"].startswith(("past_key_", "past_value_")):
            shape = cache_shape(spec, batch, max_len)  # (B, Hkv, T, D)
            cache = rng.standard_normal(shape).astype(np.float32)
            # slots no position has reached yet are empty (zero), as in the runtime's caches: what an engine leaves
            # in never-written slots is unspecified (GroupQueryAttention's present copies only the valid length)
            empty = np.arange(shape[2])[None, :] >= past[:, None]  # (B, T)
            cache[np.broadcast_to(empty[:, None, :, None], cache.shape)] = 0.0
            feeds[spec["name"]] = cache
    return OrderedDict((spec["name"], feeds[spec["name"]]) for spec in input_specs)


def model_for_artifact(root: Path, manifest: dict) -> Gemma4Model:
    """The PyTorch model an artifact was exported from (its checkpoint, or its preset and seed)."""
    from exporter.weights import load_model, random_model

    cfg = ModelConfig.from_json_dict(manifest["model_config"])
    source = manifest.get("source", {})
    if "checkpoint" in source:
        return load_model(source["checkpoint"], cfg=cfg)
    if source.get("generator") == "exporter.stream.SeededWeights":  # a preset streamed with per-tensor seeds
        from exporter.stream import preset_model

        return preset_model(cfg, seed=int(source.get("seed", 0)))
    if "seed" in source:  # a preset exported with seeded random weights
        return random_model(cfg, seed=int(source.get("seed", 0)))
    raise ValueError(f"{root}/manifest.json: 'source' names neither a checkpoint nor a random-weights seed; cannot rebuild the model")


def compare_artifact(root: str | Path, *, model: Gemma4Model | None = None, iterations: int = 2, log=print) -> bool:
    """Comparator.run + compare_accuracy for both graphs; True when every output is within tolerance."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc

    from runtime.manifest import read_manifest

    root = Path(root)
    manifest = read_manifest(root)
    model = model or model_for_artifact(root, manifest)
    cfg = model.cfg
    ok = True
    for graph in ("prefill", "decode"):
        spec = manifest["graphs"][graph]
        engine = manifest.get("engines", {}).get("onnxruntime", {})
        rel = engine.get(graph, spec["file"])
        outputs = [o["name"] for o in spec["outputs"]]
        if graph == "decode" and engine.get("one_graph"):  # decode runs as a one-token prefill of that graph
            onnxrt = OneGraphDecodeRunner(root / rel, manifest, spec["inputs"], outputs)
        elif graph == "prefill" and engine.get("prefill_with_past") == "per_sequence":
            onnxrt = BackendPrefillRunner(root, manifest, spec["inputs"], outputs)
        else:
            onnxrt = OnnxrtRunner(SessionFromOnnx(str(root / rel), providers=["CPUExecutionProvider"]))
        runners = [TorchGemma4Runner(model, graph, spec["inputs"], outputs), onnxrt]
        shapes = [(3, 13, min(manifest["max_len"], 45)), (1, 5, min(manifest["max_len"], 29))][:iterations]
        data = [
            feeds_for(cfg, graph, spec["inputs"], batch=b, seq=s, max_len=m, seed=i)
            for i, (b, s, m) in enumerate(shapes)
        ]
        results = Comparator.run(runners, data_loader=data)
        # Logits: scale with the soft-capped range (|logit| <= cap); caches: values of order 1.
        cap = cfg.text.final_logit_softcapping or 30.0
        compare = CompareFunc.simple(atol={"logits": 2e-4 * cap, "": 1e-3}, rtol={"": 1e-3}, check_error_stat="max")
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
        ok &= bool(accuracy)
        log(f"[compare] {graph}: {'PASSED' if accuracy else 'FAILED'} ({len(data)} batches, {len(outputs)} outputs)")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exporter.compare", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    a = p.parse_args(argv)
    try:
        return 0 if compare_artifact(a.artifact) else 1
    except (ValueError, FileNotFoundError) as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
