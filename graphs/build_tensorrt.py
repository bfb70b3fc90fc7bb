"""TensorRT engines from an artifact's plugin graphs (``make build-engine BACKEND=tensorrt``; needs a GPU).

Registers the plugins (`plugins.tensorrt_plugins`), casts an fp32 artifact's Linears to bf16 (default) or fp16
(`graphs.cast_precision`, in a temporary copy), parses each plugin graph with Polygraphy's
``NetworkFromOnnxPath`` as a strongly typed network (precision comes from the graph: fp32, or Q/DQ from
`calib`; TensorRT 11 has no other way), where nodes carrying ``plugin_namespace`` resolve to the registered plugins
ahead of their function bodies, and builds one engine per graph with one optimization profile each:
prefill ``input_ids`` (1..max_batch, 1..max_len) with 0..max_image_tokens image and audio soft tokens, decode
(1..max_batch, 1); caches are (batch, heads, window or max_len, head_dim) with max_len fixed by the artifact.
Engines are written to ``engines/`` and recorded with the TensorRT version and profiles.
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["build_tensorrt", "profiles_for"]


def _dims(spec: dict, batch: int, max_len: int, seq: int, tokens: int) -> tuple[int, ...]:
    named = {"batch": batch, "max_len": max_len, "seq": seq, "image_tokens": tokens, "audio_tokens": tokens}
    return tuple(named[d] if isinstance(d, str) else int(d) for d in spec["shape"])


def profiles_for(manifest: dict, graph: str, *, max_batch: int, opt_seq: int, max_soft_tokens: int) -> dict:
    """input name -> (min, opt, max) shapes."""
    max_len = int(manifest["max_len"])
    seq = (1, min(opt_seq, max_len), max_len) if graph == "prefill" else (1, 1, 1)
    out = {}
    for spec in manifest["graphs"][graph]["inputs"]:
        out[spec["name"]] = (
            _dims(spec, 1, max_len, seq[0], 0),
            _dims(spec, 1, max_len, seq[1], min(max_soft_tokens, 280)),
            _dims(spec, max_batch, max_len, seq[2], max_soft_tokens),
        )
    return out


def _cast_sources(root: Path, sources: dict[str, str], dtype: str, work: Path, log) -> dict[str, str]:
    """fp32 plugin graphs with their Linears in ``dtype`` (`graphs.cast_precision`), written under ``work``."""
    import onnx_ir as ir

    from graphs.cast_precision import cast_linears

    out = {}
    for graph, rel in sources.items():
        model = ir.load(str(root / rel))
        counts = cast_linears(model, dtype)
        path = work / f"{graph}.{dtype}.onnx"
        ir.save(model, path, external_data=f"{graph}.{dtype}.data")
        out[graph] = str(path.relative_to(root))
        log(f"[build-engine] {graph}: {counts['linears']} Linears cast to {dtype} for TensorRT")
    return out


def build_tensorrt(root: Path, manifest: dict, sources: dict[str, str], *, dtype: str = "bf16", max_batch: int = 8,
                   opt_seq: int = 512, max_soft_tokens: int = 1120, log=print) -> dict:
    """``dtype``: bf16 / fp16 casts an fp32 artifact's Linears for the GPU (Q/DQ artifacts keep their precision);
    fp32 builds the graphs as they are."""
    import shutil

    import tensorrt as trt

    import plugins.tensorrt_plugins  # noqa: F401  (registers gemma4::FusedAttention and gemma4::PatchEmbed)
    from runtime.staging import temp_name

    out_dir = root / "engines"
    out_dir.mkdir(exist_ok=True)
    work = out_dir / temp_name("cast")  # this process's own; graphs.build cleans those of dead ones
    if dtype != "fp32" and manifest.get("precision", "fp32") == "fp32":
        work.mkdir()
        sources = _cast_sources(root, sources, dtype, work, log)
    else:
        dtype = manifest.get("precision", "fp32")
    record = {"tensorrt": trt.__version__, "dtype": dtype, "max_batch": max_batch, "profiles": {}}
    try:
        _build(root, manifest, sources, out_dir, record, max_batch, opt_seq, max_soft_tokens, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return record


def _build(root, manifest, sources, out_dir, record, max_batch, opt_seq, max_soft_tokens, log) -> None:
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    for graph in ("prefill", "decode"):
        t0 = time.perf_counter()
        shapes = profiles_for(manifest, graph, max_batch=max_batch, opt_seq=opt_seq, max_soft_tokens=max_soft_tokens)
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        network = NetworkFromOnnxPath(str(root / sources[graph]), strongly_typed=True)
        engine = EngineFromNetwork(network, config=CreateConfig(profiles=[profile]))
        SaveEngine(engine, path=str(out_dir / f"{graph}.engine"))()
        record[graph] = f"engines/{graph}.engine"
        record["profiles"][graph] = {k: [list(s) for s in v] for k, v in shapes.items()}
        log(f"[build-engine] tensorrt {graph}: {record[graph]} ({time.perf_counter() - t0:.0f} s)")
