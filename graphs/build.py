"""``make build-engine``: turn an exported artifact's graphs into engines for a backend, recorded in the manifest.

* plugin graphs first (`graphs.plugin_graphs`: one ``FusedAttention`` per layer, one ``PatchEmbed``), unless
  ``--no-plugins``; engines are built from them.
* ``onnxruntime``: ONNX Runtime's extended graph optimisations (constant folding, redundant-node elimination,
  LayerNorm/GELU/MatMul fusions) applied once and saved as ``ort/prefill.onnx`` (and ``ort/decode.onnx`` only when
  the lowering left an attention node, e.g. ``--no-plugins``: else the prefill graph serves decode, one session)
  with their weights in external data, so loading does not redo them.  The saved graphs are checked to run.
* ``tensorrt``: one engine from the prefill plugin graph with a prefill and a decode profile, so the GPU holds the
  weights once (`graphs.build_tensorrt`, ``engines/model.engine``), and the assistant's engine when the artifact has
  one (`graphs.trt_assistant`, ``engines/assistant.engine``); needs an NVIDIA GPU, ``tensorrt`` >= 10.6,
  torch with CUDA and triton, else it stops with the reason.
* ``auto``: TensorRT where it can build, and the ONNX Runtime form in every case (it runs everywhere).

New files are written beside the artifact and moved in only when complete; the manifest is rewritten last.  Only
an artifact is written into, and only one holding no files its manifest does not list (`runtime.staging`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from runtime.manifest import read_manifest, write_manifest
from runtime.staging import check_writable_artifact, error_message, replace_dir, temp_name

__all__ = ["build_engine", "tensorrt_unavailable_reason"]

BACKENDS = ("auto", "onnxruntime", "tensorrt")


def tensorrt_unavailable_reason() -> str | None:
    """Why a TensorRT engine cannot be built here, or None when it can."""
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401  (Python plugins: TensorRT >= 10.6)
    except ImportError as e:
        return f"the tensorrt Python package (>= 10.6, with tensorrt.plugin) is not importable ({e}); it needs an NVIDIA GPU machine"
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as e:
        return f"the plugins' kernels need torch with CUDA and triton ({e})"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def _pack_qkv(model, src: Path, config: dict, log):
    """`graphs.ort.packed_qkv` on what ONNX Runtime will load (``model``: the lowered file or its serialized
    proto with weights beside ``src``): the model to load and the pass's counts."""
    import onnx

    from graphs.ort.packed_qkv import pack_qkv

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    report = pack_qkv(proto, Path(src).parent)
    if not report["packed"]:
        return model, report
    log(f"[build-engine] {Path(src).name}: {report['packed']} GroupQueryAttention take q/k/v packed, their per-head "
        f"norms in one kernel ({len(report['refused'])} left as they were)")
    config.setdefault("session.model_external_initializers_file_folder_path", str(Path(src).parent))
    return proto.SerializeToString(), report


def _build_onnxruntime(root: Path, manifest: dict, log, sources: dict[str, str], int8_kernel: str = "auto",
                       fp8_activations: str = "fp32", sliding: str = "ring", slack: int | None = None,
                       ring_decode: str = "auto") -> dict:
    import onnxruntime as ort

    from graphs.ort.qdq import lower_quantized_for_ort

    if manifest.get("precision") == "bf16":
        raise RuntimeError(f"{root}: bf16 weights (--weight-dtype bf16) cannot run on ONNX Runtime's CPU (no bf16 "
                           "MatMul); build with BACKEND=tensorrt, or export --weight-dtype fp32 for the CPU")

    from graphs.ort.lower import lower_to_file, remove_lowered
    from runtime.ort_backend import _ort_errors

    stage = root / temp_name("ort")
    stage.mkdir()
    lowering: dict[str, dict] = {}
    from runtime.progress import Progress

    # one lowered graph serves prefill and decode when every attention node was lowered (a decode step is a prefill
    # of one token; every cache is then written in place): one ONNX Runtime session holds the weights once
    layers = len(manifest["model_config"]["text"]["layer_types"])
    one_graph = False
    quant_form: dict[str, str] = {}  # int8_kernel / fp8_activations: what the quantized Linears became
    bar = Progress(2, "build-engine onnxruntime", unit="graphs")  # ORT's optimiser reports nothing itself
    try:
        for graph in ("prefill", "decode"):
            if graph == "decode":
                a = lowering["prefill"]["attention"]
                one_graph = not a["kept"] and not a["refused"] and a["GroupQueryAttention"] + a["Attention"] == layers
                if one_graph:
                    log("[build-engine] onnxruntime: the lowered prefill graph also serves decode (one session, "
                        "one copy of the weights)")
                    bar.update(1, note="decode: served by the prefill graph")
                    break
            t0 = time.perf_counter()
            # fused attention/norm kernels (graphs.ort.lower), written beside the source until ORT has saved its form
            src, lowering[graph] = lower_to_file(root / sources[graph], manifest, decode=graph == "decode", log=log,
                                                 sliding=sliding, slack=slack, ring_decode=ring_decode)
            if sliding == "window" and graph == "prefill":
                a = lowering[graph]["attention"]
                if a["kept"] or a["refused"] or a["GroupQueryAttention"] != layers:
                    raise ValueError(f"{root}: --ort-sliding window needs every attention node lowered to "
                                     f"GroupQueryAttention; {a['GroupQueryAttention']} of {layers} were "
                                     f"(refused: {a['refused'] or 'none'})")
            # quantized graphs: integer kernels for INT8, fp32 weights for FP8, MatMulNBits for INT4
            model, config, disabled, qcounts = lower_quantized_for_ort(src, manifest.get("precision", "fp32"), stage,
                                                                       int8_kernel=int8_kernel,
                                                                       fp8_activations=fp8_activations, log=log)
            quant_form.update({k: qcounts[k] for k in ("int8_kernel", "fp8_activations") if k in qcounts})
            model, lowering[graph]["packed_qkv"] = _pack_qkv(model, src, config, log)
            opts = ort.SessionOptions()
            for key, value in config.items():
                opts.add_session_config_entry(key, value)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            opts.optimized_model_filepath = str(stage / f"{graph}.onnx")
            opts.add_session_config_entry(
                "session.optimized_model_external_initializers_file_name", f"{graph}.onnx.data"
            )
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            opts.log_severity_level = 3
            try:
                ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                     providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
            except _ort_errors() as e:  # e.g. a full disk while ORT writes the optimised weights: one line, no trace
                free = shutil.disk_usage(stage).free / 2**30
                raise RuntimeError(f"{root}: ONNX Runtime could not optimise and save the {graph} graph "
                                   f"({free:.1f} GiB free on that disk; the build needs about twice the weights "
                                   f"free for a quantized artifact); the artifact is unchanged: {e}") from None
            remove_lowered(root)
            for tmp in stage.glob("*.tmp"):
                tmp.unlink()
            check = ort.SessionOptions()
            check.log_severity_level = 3
            ort.InferenceSession(str(stage / f"{graph}.onnx"), check, providers=["CPUExecutionProvider"])
            log(f"[build-engine] onnxruntime {graph}: optimised graph saved ({time.perf_counter() - t0:.1f} s)")
            bar.update(1, note=f"{graph} done")
        bar.close()
        from exporter.share_weights import share_external_data

        if not one_graph and share_external_data(stage, log=log):
            log("[build-engine] onnxruntime graphs share ort/weights.data")
        replace_dir(stage, root / "ort", log=log)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        remove_lowered(root)
        raise
    return {
        "prefill": "ort/prefill.onnx",
        # one graph: the same file, all caches in place; runtime.ort_backend opens one session for both
        "decode": "ort/prefill.onnx" if one_graph else "ort/decode.onnx",
        "one_graph": one_graph,
        # GroupQueryAttention takes no prompt with past context at batch > 1: such a call runs per sequence
        # (unless it takes query_seqlens: the windowed sliding form)
        **({"prefill_with_past": "per_sequence"} if lowering["prefill"]["attention"]["GroupQueryAttention"]
           and sliding != "window" else {}),
        # the windowed sliding form has no bidirectional image blocks: the runtime refuses image rows
        **({"images": False} if sliding == "window" else {}),
        # INT8 Linears: 8-bit MatMulNBits (the runtime refuses it on a CPU whose int8 dot products saturate) or ORT's
        # MatMulIntegerToFloat (exact u8 x u8 everywhere); FP8: activations fp32 (weights only) or fake-quantized
        **quant_form,
        "from": {"prefill": sources["prefill"], "decode": sources["prefill" if one_graph else "decode"]},
        "optimization": "ORT_ENABLE_EXTENDED",
        # the attention geometry the graph takes as inputs, computed by runtime.ort_attention (the window it needs)
        **({"attention_inputs": {"window": lowering["prefill"]["attention"]["window"],
                                 **({"sliding": "window",
                                     "sliding_slots": lowering["prefill"]["attention"].get("sliding_slots")}
                                    if sliding == "window" else {}),
                                 **({"ring_slots": lowering["prefill"]["attention"]["ring_slots"]}
                                    if "ring_slots" in lowering["prefill"]["attention"] else {})}} if "prefill" in lowering
           and lowering["prefill"]["attention"]["GroupQueryAttention"] + lowering["prefill"]["attention"]["Attention"]
           else {}),
        "lowering": {g: {"attention": {k: v for k, v in r["attention"].items()
                                       if k not in ("refused", "window", "sliding", "sliding_slots", "ring_slots")},
                         "norms": r["norms"]["SimplifiedLayerNormalization"]} for g, r in lowering.items()},
        "onnxruntime": ort.__version__,
        "providers": ["CPUExecutionProvider"],
    }


def build_engine(artifact: str | Path, backend: str = "auto", *, plugins: bool = True, dtype: str = "bf16",
                 int8_kernel: str = "auto", fp8_activations: str = "fp32", ort_sliding: str = "ring",
                 ort_sliding_slack: int | None = None, ort_ring_decode: str = "auto", log=print) -> dict:
    """Build engines for ``backend``; with ``plugins`` (the default) from the plugin graphs, written first.
    ``int8_kernel``, ``fp8_activations``: ONNX Runtime's form of INT8 / FP8 Linears
    (`graphs.ort.qdq.lower_quantized_for_ort`).  ``ort_sliding``: ONNX Runtime's sliding layers, ``ring``
    (every input) or ``window`` (faster, text and audio only: `graphs.ort.attention.lower_attention`), with
    ``ort_sliding_slack`` slots beyond the window.  ``ort_ring_decode``: a ring engine's decode step, ``in_place``
    (the ring written, then read where it lies by GroupQueryAttention), ``copy`` (the slots read copied) or
    ``auto`` (= in_place)."""
    from graphs.ort.attention import RING_DECODE_FORMS, SLIDING_FORMS

    if ort_sliding not in SLIDING_FORMS:
        raise ValueError(f"--ort-sliding {ort_sliding!r}; expected one of {', '.join(SLIDING_FORMS)}")
    if ort_ring_decode not in RING_DECODE_FORMS:
        raise ValueError(f"--ort-ring-decode {ort_ring_decode!r}; expected one of {', '.join(RING_DECODE_FORMS)}")
    if ort_sliding == "window" and not plugins:
        raise ValueError("--ort-sliding window lowers the plugin graphs' attention nodes; drop --no-plugins")
    if backend not in BACKENDS:
        raise ValueError(f"BACKEND={backend!r}; expected one of {', '.join(BACKENDS)}")
    root = Path(artifact)
    manifest = read_manifest(root)
    check_writable_artifact(root, manifest, log=log)
    reason = tensorrt_unavailable_reason()
    if backend == "tensorrt" and reason:
        raise RuntimeError(f"cannot build a TensorRT engine for {root}: {reason}")
    sources = {g: manifest["graphs"][g]["file"] for g in ("prefill", "decode")}
    if plugins:
        from graphs.check_plugins import PluginGraphError
        from graphs.plugin_graphs import make_plugin_graphs

        try:
            manifest = dict(manifest, plugin_graphs=make_plugin_graphs(root, manifest, log=log))
            sources = {g: manifest["plugin_graphs"][g]["file"] for g in sources}
        except PluginGraphError as e:
            if backend == "tensorrt":
                raise RuntimeError(f"cannot build a TensorRT engine for {root}: {e}") from None
            log(f"[build-engine] plugin graphs not made ({e}); ONNX Runtime runs the exported graphs "
                "(re-export with this version to get them)")
    engines = dict(manifest.get("engines", {}))
    if backend == "tensorrt" and "plugin_graphs" not in manifest:
        raise RuntimeError(f"cannot build a TensorRT engine for {root}: it is built from the plugin graphs "
                           "(drop --no-plugins)")
    if backend in ("tensorrt", "auto") and not reason and "plugin_graphs" in manifest:
        from graphs.build_tensorrt import build_tensorrt

        engines["tensorrt"] = build_tensorrt(root, manifest, sources, dtype=dtype, log=log)
        trt_assistant = engines["tensorrt"].pop("assistant", None)
        if trt_assistant is not None:  # recorded beside the assistant's other forms
            assistant = dict(manifest["assistant"])
            assistant["engines"] = dict(assistant.get("engines", {}), tensorrt=trt_assistant)
            manifest = dict(manifest, assistant=assistant)
    elif backend == "auto":
        log(f"[build-engine] TensorRT not used: {reason or 'no plugin graphs'}; building the ONNX Runtime form")
    if backend == "auto" and manifest.get("precision") == "bf16" and "tensorrt" in engines:
        log("[build-engine] bf16 artifact: no ONNX Runtime form (its CPU has no bf16 MatMul)")
    elif backend in ("onnxruntime", "auto"):
        engines["onnxruntime"] = _build_onnxruntime(root, manifest, log, sources, int8_kernel, fp8_activations,
                                                    ort_sliding, ort_sliding_slack, ort_ring_decode)
    manifest = write_manifest(root, dict(manifest, engines=engines))
    log(f"[build-engine] {root}: engines {sorted(engines)} recorded in manifest.json")
    if "onnxruntime" in engines and "assistant" in manifest:
        from graphs.ort.assistant import add_ort_assistant

        manifest = add_ort_assistant(root, manifest=manifest, log=log)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graphs.build", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="artifact directory written by `make export`")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--no-plugins", action="store_true",
                   help="build from the exported graphs instead of the plugin graphs (FusedAttention/PatchEmbed)")
    p.add_argument("--fp8-activations", default="fp32", choices=("fp32", "qdq"),
                   help="ONNX Runtime, FP8 artifacts: fp32 activations (default: fp32 speed) or the artifact's FP8 "
                        "activation fake quantization (its numbers, slower)")
    p.add_argument("--int8-kernel", default="auto", choices=("auto", "MatMulNBits", "MatMulIntegerToFloat", "mixed"),
                   help="ONNX Runtime, INT8 artifacts: every Linear as 8-bit MatMulNBits, as MatMulIntegerToFloat, or "
                        "mixed (the LM head MatMulNBits, the rest MatMulIntegerToFloat); auto picks by this CPU "
                        "(graphs.ort.qdq.auto_int8_kernel)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="TensorRT: precision of an fp32 artifact's Linears on the GPU (Q/DQ artifacts keep theirs)")
    from graphs.ort.attention import RING_DECODE_FORMS, SLIDING_FORMS

    p.add_argument("--ort-sliding", default="ring", choices=SLIDING_FORMS,
                   help="ONNX Runtime: sliding layers over a ring of window slots (default; text, images, audio) or "
                        "GroupQueryAttention's windowed cache (one kernel per layer, faster decode; text and audio "
                        "only: images are refused by the runtime)")
    p.add_argument("--ort-sliding-slack", type=int, default=None,
                   help="--ort-sliding window: cache slots beyond the window (default 256; the cache compacts once "
                        "every slack + 1 tokens)")
    p.add_argument("--ort-ring-decode", default="auto", choices=RING_DECODE_FORMS,
                   help="ring engines' decode step: in_place (the new token written first, the ring attended where "
                        "it lies by GroupQueryAttention: no copy of it), copy (the slots read copied twice per layer), "
                        "auto (= in_place; default)")
    a = p.parse_args(argv)
    try:
        build_engine(a.artifact, a.backend, plugins=not a.no_plugins, dtype=a.dtype, int8_kernel=a.int8_kernel,
                     fp8_activations=a.fp8_activations, ort_sliding=a.ort_sliding,
                     ort_sliding_slack=a.ort_sliding_slack, ort_ring_decode=a.ort_ring_decode)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"build-engine: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
