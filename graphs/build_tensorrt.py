"""The TensorRT engine from an artifact's plugin graphs (``make build-engine BACKEND=tensorrt``; needs a GPU).

Registers the plugins (`plugins.tensorrt_plugins`), casts an fp32 artifact's Linears to bf16 (default) or fp16
(`exporter.cast_precision`, in a temporary copy), parses the prefill plugin graph with Polygraphy's
``NetworkFromOnnxPath`` as a strongly typed network (precision comes from the graph: fp32, or Q/DQ from
`calib`; TensorRT 11 has no other way), where nodes carrying ``plugin_namespace`` resolve to the registered plugins
ahead of their function bodies, and builds **one engine with two optimization profiles**:

* profile 0, prefill: ``input_ids`` (1..max_batch, 1..prefill_chunk) with 0..max_image_tokens image and audio
  soft tokens;
* profile 1, decode: ``input_ids`` (1..max_batch, 1), no image or audio rows: a decode step is a prefill of one
  token per sequence (the plugin runs its decode kernel for it).

One engine holds the weights once on the device (two engines, one per graph, would hold them twice: 2 x 24 GB in
bf16 for the 12B, and TensorRT documents no way for two engines to share device weights; a refit copies the given
weights into the engine).  It works because every FusedAttention output aliases its cache input in every mode
(sliding prefill included): the runtime (`runtime.trt_backend`) opens two execution contexts on the engine, one
per profile, on the same cache buffers and one shared scratch allocation.  Caches are (batch, heads, window or
max_len, head_dim) with max_len fixed by the artifact.  A prefill call takes at most ``prefill_chunk`` tokens per
sequence (default 2048, so at most max_batch x 2048 tokens of activations; `runtime.generate` prefills longer
prompts in chunks): the 12B at max_len 32768 x batch 8 in one call would need tens of GB of activations and pass
2^31 elements in its MLP.

Before parsing, every plugin creator the graph's nodes name is checked to be registered (else the parser silently
inlines the nodes' model-local functions, keyed by name only: every layer would run layer 0's body).  The builder
config enables ``PreviewFeature.ALIASED_PLUGIN_IO_10_03``, without which TensorRT ignores the plugins' output
aliasing (present_* = past_*, the in-place KV cache).  The engine is built into a staging directory that replaces
``engines/`` only when it is complete (a failed build leaves the artifact as it was, and a rebuild leaves no engine
of an older layout behind); it is recorded with the TensorRT version, its profiles, their indices and the chunk.
An artifact with an assistant gets the assistant's engine in the same staging directory
(``engines/assistant.engine``, `graphs.trt_assistant`): both or neither.
"""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["ENGINE_FILE", "PREFILL_CHUNK", "PROFILES", "aliasing_config", "build_tensorrt", "engine_profiles",
           "plugin_creators", "profiles_for", "require_plugin_creators"]

PREFILL_CHUNK = 2048  # tokens per sequence per prefill call (the engine's profile; runtime.generate chunks)
PROFILES = ("prefill", "decode")  # the engine's optimization profiles, in index order
ENGINE_FILE = "engines/model.engine"  # the one engine, both profiles


def _dims(spec: dict, batch: int, max_len: int, seq: int, tokens: int, logits: int = 1) -> tuple[int, ...]:
    named = {"batch": batch, "max_len": max_len, "seq": seq, "image_tokens": tokens, "audio_tokens": tokens,
             "n_logits": logits}
    return tuple(named[d] if isinstance(d, str) else int(d) for d in spec["shape"])


def profiles_for(manifest: dict, graph: str, *, max_batch: int, opt_seq: int, max_soft_tokens: int,
                 prefill_chunk: int = PREFILL_CHUNK, step: str | None = None) -> dict:
    """input name -> (min, opt, max) shapes of ``graph``'s inputs for ``step`` (default: the graph's own):
    prefill takes up to ``prefill_chunk`` tokens per sequence and the media; decode one token, no media rows (the
    prefill graph's decode profile, or the decode graph).  A speculative artifact's ``logits_index`` takes 1..K + 1
    positions per row in prefill (a verify call), 1 in decode."""
    max_len = int(manifest["max_len"])
    top = min(prefill_chunk, max_len)
    step = step or graph
    if step not in PROFILES:
        raise ValueError(f"profile {step!r}; expected one of {PROFILES}")
    seq = (1, min(opt_seq, top), top) if step == "prefill" else (1, 1, 1)
    media = (0, min(max_soft_tokens, 280), max_soft_tokens) if step == "prefill" else (0, 0, 0)
    k = int((manifest.get("speculative") or {}).get("max_draft_tokens", 0))
    logits = (1, 1, min(k + 1, top)) if step == "prefill" else (1, 1, 1)
    out = {}
    for spec in manifest["graphs"][graph]["inputs"]:
        out[spec["name"]] = tuple(_dims(spec, batch, max_len, n, m, g)
                                  for batch, n, m, g in zip((1, 1, max_batch), seq, media, logits))
    return out


def plugin_creators(onnx_path: Path) -> set[tuple[str, str, str]]:
    """(name, version, namespace) of every node that routes the TensorRT parser to a plugin creator (nodes with
    a ``plugin_namespace`` attribute; ``plugin_version`` defaults to "1")."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    out = set()
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if "plugin_namespace" in attrs:
            version = attrs["plugin_version"].s.decode() if "plugin_version" in attrs else "1"
            out.add((node.op_type, version, attrs["plugin_namespace"].s.decode()))
    return out


def require_plugin_creators(onnx_path: Path) -> None:
    """Raise unless TensorRT's registry has a creator for every plugin node of the graph."""
    from plugins.tensorrt_plugins import check_registered

    missing = check_registered(sorted(plugin_creators(onnx_path)))
    if missing:
        raise RuntimeError(
            f"{onnx_path}: TensorRT has no plugin creator for {', '.join(missing)}; the ONNX parser would inline "
            "these nodes' model-local functions instead, keyed by name only (every layer would run layer 0's "
            "body). Import plugins.tensorrt_plugins (it registers gemma4::FusedAttention and gemma4::PatchEmbed) "
            "and check that tensorrt.plugin imports"
        )


def _cast_sources(root: Path, sources: dict[str, str], dtype: str, work: Path, log) -> dict[str, str]:
    """fp32 plugin graphs with their Linears in ``dtype`` (`exporter.cast_precision`), written under ``work``."""
    import onnx_ir as ir

    from exporter.cast_precision import cast_linears

    out = {}
    work.mkdir(parents=True, exist_ok=True)
    for graph, rel in sources.items():
        model = ir.load(str(root / rel))
        counts = cast_linears(model, dtype)
        path = work / f"{graph}.{dtype}.onnx"
        ir.save(model, path, external_data=f"{graph}.{dtype}.data")
        out[graph] = str(path.relative_to(root))
        log(f"[build-engine] {graph}: {counts['linears']} Linears cast to {dtype} for TensorRT")
    return out


def build_tensorrt(root: Path, manifest: dict, sources: dict[str, str], *, dtype: str = "bf16", max_batch: int = 8,
                   opt_seq: int = 512, max_soft_tokens: int = 1120, prefill_chunk: int = PREFILL_CHUNK,
                   log=print) -> dict:
    """``dtype``: bf16 / fp16 casts an fp32 artifact's Linears for the GPU (Q/DQ artifacts keep their precision);
    fp32 builds the graph as it is.  ``sources``: the plugin graphs (only ``prefill`` is built).  An artifact with
    an assistant also gets its engine (`graphs.trt_assistant`), recorded under the returned record's
    ``assistant`` key (`graphs.build` moves it to ``assistant.engines.tensorrt``)."""
    import shutil

    import tensorrt as trt

    import plugins.tensorrt_plugins  # noqa: F401  (registers gemma4::FusedAttention and gemma4::PatchEmbed)
    from runtime.staging import replace_dir, temp_name

    requested = dtype  # the assistant's Linears follow DTYPE even beside a Q/DQ target
    stage = root / temp_name("engines")  # this process's own; graphs.build cleans those of dead ones
    stage.mkdir()
    sources = {"prefill": sources["prefill"]}
    try:
        if dtype != "fp32" and manifest.get("precision", "fp32") == "fp32":
            sources = _cast_sources(root, sources, dtype, stage / "cast", log)
        else:
            dtype = manifest.get("precision", "fp32")
        record = {"tensorrt": trt.__version__, "dtype": dtype, "max_batch": max_batch,
                  "prefill_chunk": min(prefill_chunk, int(manifest["max_len"]))}
        record.update(_build(root, manifest, sources["prefill"], stage, max_batch=max_batch, opt_seq=opt_seq,
                             max_soft_tokens=max_soft_tokens, prefill_chunk=record["prefill_chunk"], log=log))
        shutil.rmtree(stage / "cast", ignore_errors=True)
        if "assistant" in manifest:  # its engine beside the target's: engines/ gets both or neither
            from graphs.trt_assistant import build_assistant_engine

            record["assistant"] = build_assistant_engine(root, manifest, stage, dtype=requested,
                                                         max_batch=max_batch, log=log)
        replace_dir(stage, root / Path(ENGINE_FILE).parent, log=log)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return record


def aliasing_config(profiles: list):
    """A Polygraphy config loader: TensorRT's defaults, our profiles, and plugin output aliasing enabled."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig

    base = CreateConfig(profiles=profiles)

    def load(builder, network):
        config = base(builder, network)
        config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
        return config

    return load


def engine_profiles(manifest: dict, *, max_batch: int, opt_seq: int, max_soft_tokens: int,
                    prefill_chunk: int) -> dict[str, dict]:
    """step -> input name -> (min, opt, max): the prefill graph's shapes for each profile, in `PROFILES` order."""
    return {step: profiles_for(manifest, "prefill", max_batch=max_batch, opt_seq=opt_seq,
                               max_soft_tokens=max_soft_tokens, prefill_chunk=prefill_chunk, step=step)
            for step in PROFILES}


def _build(root, manifest, source, stage, *, max_batch, opt_seq, max_soft_tokens, prefill_chunk, log) -> dict:
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    t0 = time.perf_counter()
    shapes = engine_profiles(manifest, max_batch=max_batch, opt_seq=opt_seq, max_soft_tokens=max_soft_tokens,
                             prefill_chunk=prefill_chunk)
    profiles = []
    for step in PROFILES:
        profile = Profile()
        for name, (lo, opt, hi) in shapes[step].items():
            profile.add(name, min=lo, opt=opt, max=hi)
        profiles.append(profile)
    path = root / source  # the plugin graph, or its cast copy under the stage
    require_plugin_creators(path)
    network = NetworkFromOnnxPath(str(path), strongly_typed=True)
    engine = EngineFromNetwork(network, config=aliasing_config(profiles))
    SaveEngine(engine, path=str(stage / Path(ENGINE_FILE).name))()
    log(f"[build-engine] tensorrt: {ENGINE_FILE}, one engine for prefill (profile 0) and decode (profile 1), "
        f"the weights once ({time.perf_counter() - t0:.0f} s)")
    return {
        # both steps name the same file: runtime.trt_backend deserializes it once, one context per profile
        "prefill": ENGINE_FILE, "decode": ENGINE_FILE, "one_engine": True,
        "profile_index": {step: i for i, step in enumerate(PROFILES)},
        "profiles": {step: {k: [list(d) for d in v] for k, v in shapes[step].items()} for step in PROFILES},
    }
