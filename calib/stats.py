"""Activation statistics of every Linear input, collected once by running the fp32 prefill graph.

For each Linear (decoder projections, LM head, vision and audio projections: `exporter.linears`) the input
activation's per-channel absmax (what SmoothQuant needs), per-channel mean |x| and mean x^2 and a reservoir sample of
128 rows (what INT4's AWQ search needs), per-tensor amax, and a histogram of ``|x|`` on fixed
log-spaced bins (1e-10 .. 1e6, 2048 bins: under 1.2 % relative bin width) from which any percentile can be read
later without re-running the model.  The prefill graph is run in ONNX Runtime with the activations added as graph
outputs, one prompt at a time (batch 1, so no padding rows).  Decode shares every Linear with prefill and sees the
same per-token activations, so its scales come from here too.

Saved as one ``.npz`` (`Stats.save` / `Stats.load`) so a second quantization (another precision, alpha or
percentile) reuses it.  Does not choose scales: see `calib.scales`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exporter.linears import find_linears

__all__ = ["EDGES", "Stats", "TensorStats", "augmented_session", "collect_stats"]

EDGES = np.logspace(-10, 6, 2049)  # histogram bin edges of |x|; values above 1e6 land in the last bin
SAMPLE_ROWS = 128  # activation rows kept per Linear input for INT4's AWQ search


@dataclass
class TensorStats:
    absmax: np.ndarray  # (in_features,) per-channel max |x|
    hist: np.ndarray  # (2048,) counts of |x| per EDGES bin
    rows: int = 0  # tokens seen
    abssum: np.ndarray | None = None  # (in_features,) float64 sum of |x| (AWQ: mean |x| per channel)
    sqsum: np.ndarray | None = None  # (in_features,) float64 sum of x^2 (AWQ's diagonal objective)
    sample: np.ndarray | None = None  # (<= sample_rows, in_features) rows kept by reservoir sampling (AWQ)
    sample_rows: int = SAMPLE_ROWS  # 0: keep no rows (W8A8 and AWQ's diagonal objective need none)

    @property
    def absmean(self) -> np.ndarray:
        return self.abssum / max(self.rows, 1)

    @property
    def sqmean(self) -> np.ndarray:
        return self.sqsum / max(self.rows, 1)

    @property
    def amax(self) -> float:
        return float(self.absmax.max())

    def update(self, x: np.ndarray) -> None:
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        a = np.abs(x)
        if a.size == 0:
            return
        if self.abssum is None:
            self.abssum, self.sqsum = np.zeros(a.shape[1]), np.zeros(a.shape[1])
            if self.sample_rows:
                self.sample = np.zeros((0, a.shape[1]), np.float32)
        self.abssum += a.sum(axis=0, dtype=np.float64)
        self.sqsum += np.square(x, dtype=np.float64).sum(axis=0)
        rng = np.random.default_rng(self.rows)  # reservoir sampling, deterministic for the same prompts
        for i, row in enumerate(x if self.sample_rows else ()):
            seen = self.rows + i
            if len(self.sample) < self.sample_rows:
                self.sample = np.concatenate([self.sample, row[None]])
            elif (j := int(rng.integers(0, seen + 1))) < self.sample_rows:
                self.sample[j] = row
        np.maximum(self.absmax, a.max(axis=0), out=self.absmax)
        idx = np.clip(np.searchsorted(EDGES, a.ravel(), side="right") - 1, 0, len(EDGES) - 2)
        self.hist += np.bincount(idx, minlength=len(EDGES) - 1)
        self.rows += a.shape[0]

    def percentile(self, q: float) -> float:
        """The ``q`` percentile (0-100) of ``|x|`` (upper edge of its bin, capped at amax)."""
        total = self.hist.sum()
        if total == 0:
            return self.amax
        k = int(np.searchsorted(np.cumsum(self.hist), q / 100.0 * total))
        return float(min(EDGES[min(k + 1, len(EDGES) - 1)], self.amax))


@dataclass
class Stats:
    tensors: dict[str, TensorStats]  # module -> statistics of its input
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        arrays = {}
        for name, t in self.tensors.items():
            arrays[f"{name}/absmax"] = t.absmax
            arrays[f"{name}/hist"] = t.hist
            arrays[f"{name}/rows"] = np.array(t.rows)
            if t.abssum is not None:
                arrays[f"{name}/abssum"], arrays[f"{name}/sqsum"] = t.abssum, t.sqsum
            if t.sample is not None:
                arrays[f"{name}/sample"] = t.sample
        tmp = Path(str(path) + ".tmp.npz")
        np.savez_compressed(tmp, __meta__=np.array(json.dumps(self.meta)), **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        try:
            z = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a statistics file written by calibration ({e})") from None
        meta = json.loads(str(z["__meta__"]))
        names = sorted({k.rsplit("/", 1)[0] for k in z.files if k != "__meta__"})
        opt = lambda n, k: z[f"{n}/{k}"].copy() if f"{n}/{k}" in z.files else None  # noqa: E731 (older files)
        tensors = {n: TensorStats(z[f"{n}/absmax"].copy(), z[f"{n}/hist"].copy(), int(z[f"{n}/rows"]),
                                  opt(n, "abssum"), opt(n, "sqsum"), opt(n, "sample")) for n in names}
        return cls(tensors, meta)


def augmented_session(root: Path, graph_file: str, outputs: list[str]):
    """An ONNX Runtime session of ``graph_file`` with ``outputs`` added as graph outputs.  The graph is passed as
    bytes with its weights read from the artifact directory, so nothing is written into the artifact."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(root / graph_file), load_external_data=False)
    have = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str((root / graph_file).parent)
    )
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def collect_stats(root: str | Path, prompt_set, *, log=print) -> Stats:
    """Run every prompt of ``prompt_set`` (`calib.data.PromptSet`) through the artifact's fp32 prefill graph."""
    import onnx_ir as ir

    from calib.data import PromptTooLong, prefill_inputs
    from runtime.manifest import read_manifest
    from runtime.ort_backend import prefill_feeds, zero_cache
    from runtime.tokenizer import Tokenizer

    root = Path(root)
    manifest = read_manifest(root)
    if manifest.get("precision", "fp32") != "fp32":
        raise ValueError(f"{root}: precision {manifest['precision']!r}; calibrate from an fp32 artifact")
    graph_file = manifest["graphs"]["prefill"]["file"]
    linears = find_linears(ir.load(str(root / graph_file)))
    by_value: dict[str, list[str]] = {}
    for module, lin in linears.items():
        by_value.setdefault(lin.activation.name, []).append(module)
    names = sorted(by_value)
    sess = augmented_session(root, graph_file, names)
    tokenizer = Tokenizer.from_dir(root) if manifest.get("tokenizer") else None
    cfg, max_len = manifest["model_config"], int(manifest["max_len"])
    per_value = {n: None for n in names}
    t0, last = time.perf_counter(), 0.0
    skipped = []
    for i, prompt in enumerate(prompt_set.prompts):
        try:
            inputs = prefill_inputs(prompt, cfg, tokenizer, max_soft_tokens=prompt_set.max_soft_tokens, max_len=max_len)
        except PromptTooLong as e:
            skipped.append(str(e))
            continue
        feeds = prefill_feeds(inputs, manifest) | zero_cache(manifest, "prefill", 1, max_len)
        for name, x in zip(names, sess.run(names, feeds)):
            if per_value[name] is None:
                per_value[name] = TensorStats(np.zeros(x.shape[-1], np.float32), np.zeros(len(EDGES) - 1, np.int64))
            per_value[name].update(x)
        if time.perf_counter() - last > 5 or i + 1 == len(prompt_set.prompts):
            last = time.perf_counter()
            log(f"[calibrate] statistics: {i + 1}/{len(prompt_set.prompts)} prompts ({last - t0:.1f} s)")
    if skipped:
        log(f"[calibrate] skipped {len(skipped)} prompt(s) longer than the artifact's max_len, e.g. {skipped[0]}")
    if len(skipped) == len(prompt_set.prompts):
        raise ValueError(f"{prompt_set.source}: no prompt fits in max_len={max_len} tokens")
    tensors = {}
    for name, modules in by_value.items():
        st = per_value[name]
        if st is None or st.rows == 0:  # e.g. no prompt had an image: that projection never ran
            continue
        for module in modules:
            tensors[module] = st
    meta = {
        "artifact": str(root),
        "weights_sha256": {k: v for k, v in manifest["files"].items() if k.endswith(".data") and "/" not in k},
        "data": prompt_set.source,
        "prompts": len(prompt_set.prompts) - len(skipped),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return Stats(tensors, meta)
