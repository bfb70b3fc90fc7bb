"""Export `Gemma4Model` to ``prefill.onnx`` and ``decode.onnx`` (opset 24) and write the artifact manifest.

Opset 24 because the KV cache is updated with ONNX ``TensorScatter`` (new in opset 24), which ONNX Runtime
updates in place when the same buffer is bound as past input and present output, and which TensorRT parses
from 10.15.  Dynamic dims are named: ``batch``, ``seq`` (new tokens), ``max_len`` (full-layer cache length),
``image_tokens`` and ``audio_tokens``; sliding-layer ring buffers have the static window length.  Weights go to
external data files next to each graph.

The artifact is staged in a temporary directory and moved into place only when complete.  The CLI traces a fake
model and streams the weights (checkpoint tensors, or a preset's seeded ones) into external data one block at a time
(`exporter.stream`), so memory does not grow with the model; ``--weight-dtype bf16|fp16`` stores the decoder Linears
in that type (for GPU engines; ONNX Runtime on the CPU needs fp32 or a quantized artifact).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
import sys
import time
from pathlib import Path

import torch
from torch import nn

from exporter.config import ModelConfig, PRESETS, load_config
from exporter.model import Gemma4Model, cache_shapes, ring_slots
from exporter.share_weights import share_external_data
from runtime.manifest import write_manifest
from runtime.staging import check_output, error_message, staged_artifact

__all__ = ["OPSET", "WEIGHT_DTYPES", "export_artifact", "graph_io"]

OPSET = 24
WEIGHT_DTYPES = ("fp32", "bf16", "fp16")  # bf16/fp16: the decoder Linears (`exporter.stream.cast_rewrite`)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"  # sampling defaults and eos ids (`runtime.generation_config`)


def _cache_names(cfg: ModelConfig, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(cfg.text.num_layers) for kind in ("key", "value")]


def graph_io(cfg: ModelConfig, graph: str, speculative: int = 0) -> tuple[list[dict], list[dict]]:
    """Input and output specs (name, dtype, shape with named dynamic dims) of the prefill or decode graph.

    ``speculative`` K > 0 (a speculative export): sliding rings of window + K + 1 slots, and the prefill graph takes
    ``logits_index`` (batch, n_logits) (indices into the call's new tokens) and returns ``logits`` (batch, n_logits,
    vocab) and ``hidden`` (batch, n_logits, hidden: after the final norm) at those tokens; a plain call passes
    ``seq_lens - 1`` (n_logits 1), a verify call of K + 1 tokens 0..K."""
    t = cfg.text
    seq = "seq" if graph == "prefill" else 1
    inputs = [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", seq]},
        {"name": "past_lens", "dtype": "int64", "shape": ["batch"]},
    ]
    if graph == "prefill":
        inputs.append({"name": "seq_lens", "dtype": "int64", "shape": ["batch"]})
        if cfg.vision is not None:
            inputs.append({"name": "image_patches", "dtype": "float32", "shape": ["image_tokens", cfg.vision.patch_dim]})
            inputs.append({"name": "image_positions", "dtype": "int64", "shape": ["image_tokens", 2]})
        if cfg.audio is not None:
            inputs.append({"name": "audio_frames", "dtype": "float32", "shape": ["audio_tokens", cfg.audio.samples_per_token]})
    verify = graph == "prefill" and speculative > 0
    if verify:
        inputs.append({"name": "logits_index", "dtype": "int64", "shape": ["batch", "n_logits"]})
    shapes = cache_shapes(t, 1, 1)
    cache_specs = []
    for i, shape in enumerate(shapes):
        layer = i // 2
        length = ring_slots(t, speculative) if t.is_sliding(layer) else "max_len"
        cache_specs.append(["batch", shape[1], length, shape[3]])
    inputs += [{"name": n, "dtype": "float32", "shape": s} for n, s in zip(_cache_names(cfg, "past"), cache_specs)]
    if verify:
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "n_logits", t.vocab_size]},
                   {"name": "hidden", "dtype": "float32", "shape": ["batch", "n_logits", t.hidden_size]}]
    else:
        outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", t.vocab_size]}]
    outputs += [{"name": n, "dtype": "float32", "shape": s} for n, s in zip(_cache_names(cfg, "present"), cache_specs)]
    return inputs, outputs


class _Prefill(nn.Module):
    def __init__(self, model: Gemma4Model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, past_lens, seq_lens, image_patches, image_positions, audio_frames, caches):
        logits, present = self.m.prefill(
            input_ids, past_lens, seq_lens, list(caches), image_patches, image_positions, audio_frames
        )
        return (logits, *present)


class _PrefillVerify(nn.Module):
    """The prefill of a speculative export: logits and final-normed hidden states at ``logits_index``."""

    def __init__(self, model: Gemma4Model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, past_lens, seq_lens, image_patches, image_positions, audio_frames, logits_index,
                caches):
        logits, hidden, present = self.m.prefill(
            input_ids, past_lens, seq_lens, list(caches), image_patches, image_positions, audio_frames,
            logits_index=logits_index,
        )
        return (logits, hidden, *present)


class _Decode(nn.Module):
    def __init__(self, model: Gemma4Model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, past_lens, caches):
        logits, present = self.m.decode(input_ids, past_lens, list(caches))
        return (logits, *present)


def _example(cfg: ModelConfig, graph: str, speculative: int = 0):
    """Tracing inputs whose sizes differ from each other and from every static dim, so nothing specialises."""
    from torch.export import Dim

    tk = cfg.tokens
    batch, seq, max_len, n_img, n_aud = 2, 11, 37, 3, 2
    d_batch, d_seq, d_len = Dim("batch", min=1, max=1024), Dim("seq", min=1, max=1 << 20), Dim("max_len", min=2, max=1 << 22)
    slots = ring_slots(cfg.text, speculative)
    caches = tuple(torch.zeros(s) for s in cache_shapes(cfg.text, batch, max_len, slots))
    cache_dyn = tuple(
        {0: d_batch, 2: d_len} if not cfg.text.is_sliding(i // 2) else {0: d_batch} for i in range(len(caches))
    )
    if graph == "decode":
        args = (torch.full((batch, 1), 7, dtype=torch.long), torch.tensor([4, 9]), caches)
        dyn = {"input_ids": {0: d_batch}, "past_lens": {0: d_batch}, "caches": cache_dyn}
        return args, dyn
    ids = torch.full((batch, seq), 7, dtype=torch.long)
    image_patches = image_positions = audio_frames = None
    dyn = {"input_ids": {0: d_batch, 1: d_seq}, "past_lens": {0: d_batch}, "seq_lens": {0: d_batch}}
    if cfg.vision is not None:
        ids[0, 1:1 + n_img] = tk.image
        image_patches = torch.rand(n_img, cfg.vision.patch_dim)
        image_positions = torch.tensor([[0, 0], [1, 0], [2, 0]])
        dyn |= {"image_patches": {0: Dim("image_tokens", min=0, max=1 << 20)}, "image_positions": {0: Dim("image_tokens", min=0, max=1 << 20)}}
    else:
        dyn |= {"image_patches": None, "image_positions": None}
    if cfg.audio is not None:
        ids[1, 2:2 + n_aud] = tk.audio
        audio_frames = torch.randn(n_aud, cfg.audio.samples_per_token)
        dyn |= {"audio_frames": {0: Dim("audio_tokens", min=0, max=1 << 20)}}
    else:
        dyn |= {"audio_frames": None}
    args = (ids, torch.tensor([0, 5]), torch.tensor([seq, seq - 3]), image_patches, image_positions, audio_frames)
    if speculative:  # 5 indices: a size no other input has
        args += (torch.tensor([[0, 2, 4, 6, 10], [1, 3, 5, 7, 7]]),)
        dyn["logits_index"] = {0: d_batch, 1: Dim("n_logits", min=1, max=1 << 20)}
    dyn["caches"] = cache_dyn
    return args + (caches,), dyn


def _export_graph(model: Gemma4Model, graph: str, path: Path, weights_from, log, rewrite=None,
                  share_with: Path | None = None, speculative: int = 0) -> None:
    """Trace one graph and save it; with ``weights_from`` the model is fake and weights stream from there."""
    import onnx

    cfg = model.cfg
    prefill = _PrefillVerify if speculative else _Prefill
    module = (prefill(model) if graph == "prefill" else _Decode(model)).eval()
    args, dyn = _example(cfg, graph, speculative)
    inputs, outputs = graph_io(cfg, graph, speculative)
    with warnings.catch_warnings(), _quiet_torch_logs():
        # torch.onnx reports benign renames of shared dynamic axes and missing torchvision ops; keep output readable
        warnings.simplefilter("ignore")
        # unoptimised: keeps module regions (plugin rewrites) and weight names (calibration); ORT optimises at build
        program = _torch_export(module, args, dyn, inputs, outputs, optimize=False)
    if weights_from is None:
        program.save(str(path), external_data=True)
    else:
        from exporter.stream import stream_graph

        stream_graph(program, path, weights_from, cfg, rewrite=rewrite, share_with=share_with, log=log)
    del program
    proto = onnx.load(str(path), load_external_data=False)
    _name_dims(proto, inputs + outputs)
    onnx.save(proto, str(path))  # the graph only: its external data file stays as written
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != [i["name"] for i in inputs] or got_out != [o["name"] for o in outputs]:
        raise RuntimeError(f"{path.name}: exported graph I/O {got_in} -> {got_out} differs from the contract")


def _name_dims(proto, specs: list[dict]) -> None:
    """Give every dynamic dim its contract name (torch.onnx names some ``s15``), consistently across the graph."""
    by_name = {s["name"]: s["shape"] for s in specs}
    rename: dict[str, str] = {}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for dim, want in zip(vi.type.tensor_type.shape.dim, by_name[vi.name]):
            if isinstance(want, str):
                if dim.dim_param and rename.setdefault(dim.dim_param, want) != want:
                    raise RuntimeError(f"dim {dim.dim_param} of {vi.name} is both {rename[dim.dim_param]} and {want}")
                if not dim.dim_param:
                    raise RuntimeError(f"{vi.name}: dim expected dynamic ({want}) but exported static {dim.dim_value}")
    for vi in list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info):
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _torch_export(module, args, dyn, inputs, outputs, *, optimize: bool):
    return torch.onnx.export(
        module,
        args,
        dynamo=True,
        opset_version=OPSET,
        dynamic_shapes=dyn,
        input_names=[i["name"] for i in inputs],
        output_names=[o["name"] for o in outputs],
        external_data=True,
        optimize=optimize,
        verbose=False,
    )


@contextlib.contextmanager
def _quiet_torch_logs():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _versions() -> dict[str, str]:
    import onnx

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def export_artifact(
    model: Gemma4Model,
    out: str | Path,
    *,
    max_len: int | None = None,
    source: dict | None = None,
    tokenizer_dir: Path | None = None,
    weights_from: Path | None = None,
    force: bool = False,
    weights=None,
    weight_dtype: str = "fp32",
    rewrite=None,
    manifest_extra: dict | None = None,
    add_files=None,
    speculative: int = 0,
    log=print,
) -> dict:
    """Export both graphs of ``model`` into the artifact directory ``out`` (replaced only on success).

    ``out`` may be new, empty or a previous artifact; anything else, or a path that is, contains or lies inside the
    checkpoint, is refused (`runtime.staging`; ``force`` allows replacing other directories, never the checkpoint).

    With ``weights_from`` (a checkpoint directory), ``model`` may be a fake model (`exporter.stream.fake_model`):
    weights are streamed from the checkpoint into external data instead of taken from the model.
    ``add_files(stage)`` writes more files into the staged artifact after the graphs (a quantizing rewrite's scales);
    they are listed in the manifest like the rest.
    ``speculative`` K > 0: graphs for speculative decoding with up to K draft tokens per verify call (`graph_io`:
    rings of window + K + 1 slots, the prefill graph's ``logits_index`` input and ``hidden`` output), recorded in the
    manifest as ``speculative``; 0 (default) exports the plain graphs, unchanged.
    """
    cfg = model.cfg
    if max_len is None:
        max_len = min(cfg.text.max_position_embeddings, 8192)
    if isinstance(speculative, bool) or not isinstance(speculative, int) or not 0 <= speculative <= 64:
        raise ValueError(f"speculative={speculative!r}; expected 0 (plain graphs) or 1..64 draft tokens per verify")
    if max_len < 2 or max_len > cfg.text.max_position_embeddings:
        raise ValueError(f"max_len={max_len} must be in [2, {cfg.text.max_position_embeddings}] for this model")
    tokenizer_files = [n for n in TOKENIZER_FILES if tokenizer_dir and (Path(tokenizer_dir) / n).is_file()]
    if not {"tokenizer.json", "tokenizer.model"} & set(tokenizer_files):
        where = f"no tokenizer.json or tokenizer.model in {tokenizer_dir}" if tokenizer_dir else "none given"
        log(f"[export] warning: no tokenizer ({where}): text prompts will not work with this artifact, "
            "token-id prompts will")
    sources = {"checkpoint": weights_from, "tokenizer directory": tokenizer_dir}
    stream = weights if weights is not None else weights_from
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype={weight_dtype!r}; expected one of {', '.join(WEIGHT_DTYPES)}")
    if weight_dtype != "fp32":
        if stream is None:
            raise ValueError(f"weight_dtype={weight_dtype} needs streamed weights (weights= or weights_from=)")
        from exporter.stream import cast_rewrite

        rewrite = cast_rewrite(weight_dtype)
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    with staged_artifact(out, sources=sources, force=force, expected_bytes=fp32_bytes, log=log) as stage:
        timings = {}
        for graph in ("prefill", "decode"):
            log(f"[export] tracing {graph} graph ...")
            t0 = time.perf_counter()
            with torch.no_grad():
                _export_graph(model, graph, stage / f"{graph}.onnx", stream, log, rewrite,
                              share_with=stage / "prefill.onnx" if graph == "decode" else None,
                              speculative=speculative)
            timings[graph] = round(time.perf_counter() - t0, 2)
            log(f"[export] {graph}.onnx written in {timings[graph]} s")
        if share_external_data(stage, log=log):
            log("[export] prefill and decode share weights.data")
        for name in tokenizer_files:
            shutil.copy2(Path(tokenizer_dir) / name, stage / name)
        has_generation_config = bool(tokenizer_dir) and (Path(tokenizer_dir) / GENERATION_CONFIG).is_file()
        if has_generation_config:
            shutil.copy2(Path(tokenizer_dir) / GENERATION_CONFIG, stage / GENERATION_CONFIG)
        manifest = {
            "model_config": cfg.to_json_dict(),
            "source": source or getattr(model, "source", {}),
            "precision": weight_dtype,
            "max_len": max_len,
            "opset": OPSET,
            "graphs": {
                g: {"file": f"{g}.onnx", "inputs": graph_io(cfg, g, speculative)[0],
                    "outputs": graph_io(cfg, g, speculative)[1]}
                for g in ("prefill", "decode")
            },
            "kv_cache": {
                "layout": "flat [key_0, value_0, key_1, ...]; sliding layers are ring buffers of R slots (position p "
                "in slot p % R; R = the window, or window + K + 1 in a speculative export of K), full layers hold "
                "position p in slot p",
                "layer_types": list(cfg.text.layer_types),
                "in_place": "present_* aliases past_* (TensorScatter) except sliding layers in prefill",
            },
            **({"speculative": {"max_draft_tokens": speculative, "ring_slots": ring_slots(cfg.text, speculative)}}
               if speculative else {}),
            "tokenizer": tokenizer_files,
            **({"generation_config": GENERATION_CONFIG} if has_generation_config else {}),
            "engines": {},
            "versions": _versions(),
            "export_seconds": timings,
        }
        manifest |= manifest_extra or {}  # e.g. precision/quantization of a quantizing rewrite
        if add_files is not None:
            add_files(stage)
        manifest = write_manifest(stage, manifest)
    log(f"[export] artifact ready: {out}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m exporter.export", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help=f"checkpoint directory or preset ({', '.join(PRESETS)})")
    p.add_argument("--out", required=True,
                   help="artifact directory to write: new, empty or a previous artifact (replaced on success)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT even if it is a directory that is not an artifact (never the checkpoint)")
    p.add_argument("--max-len", type=_max_len, default=None,
                   help="maximum total tokens per sequence (KV cache length, >= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights when --model is a preset")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="graphs for speculative decoding with up to K draft tokens per verify call (sliding rings "
                        "of window + K + 1 slots, logits and hidden states at chosen positions); 0: plain graphs")
    p.add_argument("--weight-dtype", default="fp32", choices=WEIGHT_DTYPES,
                   help="decoder Linear weights: fp32 (ONNX Runtime CPU) or bf16/fp16 (GPU engines: no fp32 copy)")
    a = p.parse_args(argv)
    try:
        _run(a)
    except (ValueError, OSError) as e:  # CheckpointError, OutputRefused are ValueErrors; a full disk an OSError
        print(f"export: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


def _max_len(text: str) -> int:
    import argparse

    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of tokens >= 2")
    return n


def _run(a) -> None:
    from exporter.stream import fake_model
    from exporter.stream import SeededWeights
    from exporter.weights import plan_checkpoint

    t0 = time.perf_counter()
    # OUT is checked before any work (and again when the artifact is moved into place)
    check_output(a.out, sources={"checkpoint": a.model if Path(a.model).exists() else None}, force=a.force)
    if a.model in PRESETS and not Path(a.model).exists():
        cfg = load_config(a.model)
        print(f"[export] preset {a.model!r}: seeded random weights (seed {a.seed})")
        source = {"preset": a.model, "seed": a.seed, "generator": "exporter.stream.SeededWeights"}
        export_artifact(fake_model(cfg), a.out, max_len=a.max_len, source=source, force=a.force,
                        weights=SeededWeights(cfg, a.seed), weight_dtype=a.weight_dtype, speculative=a.speculative)
    else:
        ckpt = Path(a.model)
        cfg = load_config(ckpt)
        plan_checkpoint(ckpt, cfg)  # every tensor checked before any work
        print(f"[export] checkpoint {ckpt}: tracing without weights, streaming them into external data")
        source = {"checkpoint": str(ckpt.resolve())}
        export_artifact(fake_model(cfg), a.out, max_len=a.max_len, source=source, tokenizer_dir=ckpt, weights_from=ckpt,
                        force=a.force, weight_dtype=a.weight_dtype, speculative=a.speculative)
    print(f"[export] total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
