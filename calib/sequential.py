"""Quantize straight from a checkpoint in bounded memory: layer-by-layer statistics, then a streamed INT4 export.

For models whose fp32 artifact does not fit (the 12B: 48 GB), `make calibrate` (which runs the fp32 graph) is not
an option.  This module does what llm-compressor's sequential pipeline and AutoAWQ do:

1. **Statistics, one decoder layer at a time** (`collect_sequential`): the calibration prompts are embedded (only
   the embedding rows they use are read) and their hidden states carried from layer to layer through our PyTorch
   model (`exporter.model`).  Each layer's weights are read from the checkpoint, run on every prompt with hooks
   on its Linears (`calib.stats.TensorStats`: absmax, mean |x|, mean x^2, a row sample), then dropped.  While the
   layer is in memory its AWQ factors are searched (`calib.int4.awq_search`) per group of Linears sharing an input.
   Peak memory: one layer in fp32 plus the prompts' activations.
2. **Export** (`quantize_checkpoint`): the model is traced without weights (`exporter.stream`), and every weight
   streams from the checkpoint into external data, the decoder Linears quantized tensor by tensor on the way
   (`calib.int4.quantize_graph_int4`: ``DequantizeLinear(int4, axis 0, block_size) -> MatMul``, the same graph
   form as ``make calibrate PRECISION=int4``).  AWQ factors fold into the input RMSNorms (q/k/v, gate/up) and
   up_proj's rows (down_proj) as the weights stream (`FoldedWeights`), or stay a ``Mul`` before o_proj.
   The tied LM head is quantized too (``lm_head``), and the embedding gather reads an fp16 copy
   of the table (rows are cast to fp32 after the gather), so the 12B's 1 B-parameter table costs 2 GB + 0.5 GB
   instead of 4 GB: that is what keeps the INT4 12B under 9 GB.

**W8A8** (``precision`` int8 / fp8): the same per-layer statistics give the activation ranges (and, for the LM head,
the final norm's output over every calibration position); SmoothQuant factors (INT8: alpha 0.5 by default) are
computed while a layer's weights are in memory, from the same formula as ``make calibrate``
(`calib.smoothquant.smoothing_factors`), and folded as the weights stream (`FoldedWeights`); the graph gets the
Q/DQ form of `calib.qdq.quantize_graph` (static per-tensor activations, per-channel weights), each weight quantized
block by block as it is saved (the tied LM head from the embedding's row blocks).  The artifact is what
``make calibrate`` makes from an fp32 artifact, with ``calibration/scales.json`` and ``stats.npz``; the only
difference is the LM head's activation range, taken over every position rather than each prompt's last.

No fp32 artifact is written and no whole fp32 model is held.  Not done here: AWQ's clipping search.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from exporter.config import ModelConfig

__all__ = ["FoldedWeights", "LayerPlan", "collect_sequential", "quantize_checkpoint"]


def _layer_prefix(i: int) -> str:
    return f"model.language_model.layers.{i}."


class LayerPlan:
    """AWQ factors of one model: group (tuple of module names) -> (fold target or None for a Mul, factors)."""

    def __init__(self):
        self.groups: dict[tuple[str, ...], tuple[str | None, np.ndarray]] = {}
        self.search: dict[str, dict] = {}

    def input_muls(self) -> dict[str, np.ndarray]:
        return {m: s for mods, (tgt, s) in self.groups.items() if tgt is None for m in mods}

    def factor_of(self, module: str) -> np.ndarray | None:
        """The factors a module's input is divided by (`calib.qdq.activation_scales` takes this as ``smooth``)."""
        return next((s for mods, (_, s) in self.groups.items() if module in mods), None)

    def to_json(self) -> dict:
        return {"search": self.search,
                "groups": [{"modules": list(m), "fold": t or "Mul", "factors": s.tolist()}
                           for m, (t, s) in self.groups.items()]}


# ---------------------------------------------------------------------------------------------- reading rows
def _rows(source, name: str, ids: np.ndarray) -> torch.Tensor:
    """Rows ``ids`` of a 2-D source tensor (the embedding) without reading the rest."""
    from exporter import stream

    shape = source.shapes[name]
    uniq = np.unique(ids)
    table = {}
    if hasattr(source, "plan"):
        from exporter.weights import _open

        path, key = source.plan[name]
        with _open(path) as f:
            view = f.get_slice(key)
            for r in uniq:
                table[int(r)] = view[int(r):int(r) + 1].to(torch.float32)[0]
    else:
        step = stream._block_rows(shape)
        for b in np.unique(uniq // step):
            start = int(b) * step
            block = stream._seeded_block(name, shape, source.seed, start, min(start + step, shape[0]))
            for r in uniq[(uniq // step) == b]:
                table[int(r)] = block[int(r) - start]
    return torch.stack([table[int(r)] for r in ids.reshape(-1)]).reshape(*ids.shape, shape[1])


def _load_part(model, source, prefix: str) -> None:
    """Assign the source tensors under ``prefix`` (fp32) into the meta model."""
    state = {n: source.tensor(n) for n in source.shapes if n.startswith(prefix)}
    model.load_state_dict(state, strict=False, assign=True)


def _drop_layer(model, i: int) -> None:
    from exporter.model import DecoderLayer

    with torch.device("meta"):
        model.model.language_model.layers[i] = DecoderLayer(model.cfg.text, i)


# ---------------------------------------------------------------------------------------------- statistics
def _prompt_inputs(cfg: ModelConfig, data_dir, tokenizer_dir: Path | None, max_prompts: int, max_soft_tokens: int,
                   max_len: int):
    from calib.data import PromptTooLong, prefill_inputs, prompts_for

    config = cfg.to_json_dict()
    tok = None
    if tokenizer_dir is not None and ((tokenizer_dir / "tokenizer.json").is_file()
                                      or (tokenizer_dir / "tokenizer.model").is_file()):
        from runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_dir(tokenizer_dir)
    pset = prompts_for(data_dir, "calibration", config, has_tokenizer=tok is not None)
    soft = min(pset.max_soft_tokens, max_soft_tokens)
    out = []
    for p in pset.prompts:
        if len(out) >= max_prompts:
            break
        if (p.images and cfg.vision is None) or (p.audio and cfg.audio is None):
            continue
        try:
            out.append(prefill_inputs(p, config, tok, max_soft_tokens=soft, max_len=max_len))
        except PromptTooLong:
            continue
    if not out:
        raise ValueError(f"no calibration prompt of {pset.source} fits this model")
    return out, {"data": pset.source, "prompts": len(out), "max_soft_tokens": soft,
                 "tokens": int(sum(int(x.seq_lens.sum()) for x in out))}


@torch.no_grad()
def _embed(model, source, x) -> torch.Tensor:
    """Hidden states after the embedding (and the image/audio soft tokens) for one batch-1 prompt."""
    from exporter.model import _place

    cfg, tk = model.cfg, model.cfg.tokens
    ids = torch.from_numpy(x.input_ids.astype(np.int64))
    is_mm = (ids == tk.image) | (ids == tk.audio) | (ids == tk.video)
    rows = _rows(source, "model.language_model.embed_tokens.weight", torch.where(is_mm, tk.pad, ids).numpy())
    h = rows * float(cfg.text.hidden_size) ** 0.5
    if x.image_patches is not None and len(x.image_patches) and cfg.vision is not None:
        soft = model.embed_images(torch.from_numpy(x.image_patches), torch.from_numpy(x.image_positions))
        h = _place(h, ids == tk.image, soft)
    if x.audio_frames is not None and len(x.audio_frames) and cfg.audio is not None:
        h = _place(h, ids == tk.audio, model.embed_audio(torch.from_numpy(x.audio_frames)))
    return h


def _groups(layer, i: int) -> list[tuple[tuple[str, ...], str | None]]:
    """(Linears sharing an input, where AWQ factors fold: a norm/up_proj tensor name, or None for a Mul)."""
    p = _layer_prefix(i)
    qkv = tuple(p + f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")
                if getattr(layer.self_attn, n) is not None)
    return [
        (qkv, p + "input_layernorm.weight"),
        ((p + "self_attn.o_proj",), None),
        ((p + "mlp.gate_proj", p + "mlp.up_proj"), p + "pre_feedforward_layernorm.weight"),
        ((p + "mlp.down_proj",), p + "mlp.up_proj.weight"),
    ]


@torch.no_grad()
def collect_sequential(source, cfg: ModelConfig, inputs: list, *, block_size: int = 128, method: str | None = "awq",
                       awq_grid: int = 10, awq_objective: str = "sample", smooth_alpha: float | None = None,
                       log=print):
    """Per-Linear input statistics of the decoder (and the LM head's: the final norm's output at every position),
    one layer in memory at a time; AWQ factors (``method="awq"``) or SmoothQuant factors (``smooth_alpha``) per group.

    ``awq_objective``: "sample" scores each candidate on the sampled activation rows (`calib.int4.weight_error`);
    "diag" on the per-channel second moments only (``sum_j E[x_j^2] |dW_j|^2``), much cheaper on 12B-sized layers.

    Returns (`calib.stats.Stats`, `LayerPlan`, per-layer records {seconds, peak RSS})."""
    import resource

    from calib.int4 import awq_search
    from calib.linears import LM_HEAD
    from calib.smoothquant import smoothing_factors
    from calib.stats import EDGES, SAMPLE_ROWS, Stats, TensorStats
    from exporter.model import Gemma4Model
    from runtime.progress import Progress

    rows = SAMPLE_ROWS if method == "awq" and awq_objective == "sample" else 0  # only AWQ's sampled objective reads rows

    with torch.device("meta"):
        model = Gemma4Model(cfg)
    model.rope_sliding.inv_freq = _real_inv_freq(cfg)["rope_sliding.inv_freq"]
    model.rope_full.inv_freq = _real_inv_freq(cfg)["rope_full.inv_freq"]
    for part in ("model.vision_embedder.", "model.embed_vision.", "model.embed_audio."):
        _load_part(model, source, part)
    hs = [_embed(model, source, x) for x in inputs]
    blocks = [_image_block(model, x) for x in inputs]
    stats: dict[str, TensorStats] = {}
    plan = LayerPlan()
    records = []
    t = cfg.text
    with Progress(t.num_layers, "calibrate layers", unit="layers") as bar:
        for i in range(t.num_layers):
            t0 = time.perf_counter()
            _load_part(model, source, _layer_prefix(i))
            layer = model.model.language_model.layers[i]
            hooks = []
            for mods, _ in _groups(layer, i):  # Linears sharing an input share one record (one hook)
                mod = layer.get_submodule(mods[0][len(_layer_prefix(i)):])
                st = TensorStats(np.zeros(mod.in_features), np.zeros(len(EDGES) - 1, np.int64), sample_rows=rows)
                stats.update({name: st for name in mods})
                hooks.append(mod.register_forward_pre_hook(lambda m, a, st=st: st.update(a[0].detach().numpy())))
            attn = layer.self_attn
            inv_freq = (model.rope_sliding if attn.sliding else model.rope_full).inv_freq
            for j, (h, x) in enumerate(zip(hs, inputs)):
                s = h.shape[1]
                shape = (1, t.layer_kv_heads(i), t.sliding_window if attn.sliding else s + 1, t.layer_head_dim(i))
                past = torch.zeros(shape)
                a, _, _ = attn(layer.input_layernorm(h), past, past.clone(), torch.zeros(1, dtype=torch.long),
                               torch.from_numpy(x.seq_lens.astype(np.int64)), blocks[j], inv_freq)
                hs[j] = layer.finish(h, a)
            for hk in hooks:
                hk.remove()
            if smooth_alpha is not None:  # `calib.smoothquant.plan_smoothing`'s groups: o_proj has no fold target
                for mods, target in _groups(layer, i):
                    if target is None:
                        continue
                    w_max = np.max([np.abs(layer.get_submodule(m[len(_layer_prefix(i)):]).weight.numpy()).max(axis=0)
                                    for m in mods], axis=0)
                    plan.groups[mods] = (target, smoothing_factors(stats[mods[0]].absmax, w_max, smooth_alpha))
            if method == "awq":
                for mods, target in _groups(layer, i):
                    w = np.concatenate([layer.get_submodule(m[len(_layer_prefix(i)):]).weight.numpy().T for m in mods],
                                       axis=1)  # (in, sum of outs)
                    st = stats[mods[0]]
                    if awq_objective == "diag":
                        st = _Moments(st.absmean, st.sqmean)
                    res = awq_search(w, st, block_size, grid=awq_grid)
                    plan.search[",".join(mods)] = {"alpha": res.alpha, "loss": res.loss, "rtn_loss": res.rtn_loss}
                    if res.alpha > 0:
                        plan.groups[mods] = (target, res.factors.astype(np.float32))
            _drop_layer(model, i)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            records.append({"layer": i, "seconds": round(time.perf_counter() - t0, 2), "peak_rss_gib": round(rss, 3)})
            bar.update(1, note=f"layer {i} {records[-1]['seconds']:.1f} s, peak RSS {rss:.2f} GiB")
    _load_part(model, source, "model.language_model.norm.")
    head = TensorStats(np.zeros(t.hidden_size), np.zeros(len(EDGES) - 1, np.int64), sample_rows=0)
    for h in hs:
        head.update(model.model.language_model.norm(h).numpy())
    stats[LM_HEAD] = head
    meta = {"prompts": len(inputs), "sequential": True}
    return Stats(stats, meta), plan, records


class _Moments:
    """Per-channel moments only: `calib.int4.awq_search` then uses its diagonal objective."""

    sample = None

    def __init__(self, absmean, sqmean):
        self.absmean, self.sqmean = absmean, sqmean


def _real_inv_freq(cfg):
    from exporter.weights import real_buffers

    return real_buffers(cfg)


def _image_block(model, x) -> torch.Tensor:
    from exporter.model import _image_blocks

    ids = torch.from_numpy(x.input_ids.astype(np.int64))
    return _image_blocks(ids == model.cfg.tokens.image)


# ---------------------------------------------------------------------------------------------- folding
class FoldedWeights:
    """A weight source with AWQ factors applied as the tensors stream: norm weights / s, the Linears' input
    columns * s, up_proj's output rows / s (down_proj's factors).  Mul groups are left to the graph rewrite."""

    def __init__(self, source, plan: LayerPlan):
        self.inner, self.shapes, self.source = source, source.shapes, source.source
        self.col: dict[str, np.ndarray] = {}
        self.row: dict[str, np.ndarray] = {}
        self.vec: dict[str, np.ndarray] = {}
        for mods, (target, s) in plan.groups.items():
            if target is None:
                continue
            for m in mods:
                self.col[m + ".weight"] = s
            if target.endswith("up_proj.weight"):
                self.row[target] = s
            else:
                self.vec[target] = s

    def _apply(self, name: str, t: torch.Tensor, start: int = 0) -> torch.Tensor:
        if name in self.vec:
            t = t / torch.from_numpy(self.vec[name])
        if name in self.col:
            t = t * torch.from_numpy(self.col[name])[None, :]
        if name in self.row:
            t = t / torch.from_numpy(self.row[name][start:start + t.shape[0]])[:, None]
        return t

    def tensor(self, name: str) -> torch.Tensor:
        return self._apply(name, self.inner.tensor(name))

    def blocks(self, name: str):
        start = 0
        for b in self.inner.blocks(name):
            yield self._apply(name, b, start)
            start += b.shape[0] if b.dim() else 1


# ---------------------------------------------------------------------------------------------- graph rewrite
def int4_rewrite(plan: LayerPlan, block_size: int, *, lm_head: bool = True, embedding_fp16: bool = True):
    """A `exporter.stream.stream_graph` rewrite: decoder Linears (and the LM head) to block-wise INT4.  The
    weights' scales are computed once (one read of every weight, with a progress bar) and reused for the second
    graph."""
    cache: dict[str, np.ndarray] = {}

    def rewrite(model, source, progress) -> None:
        from calib.int4 import quantize_graph_int4
        from calib.linears import LM_HEAD, find_linears, group_of
        from runtime.progress import Progress

        linears = find_linears(model)
        modules = [m for m in linears if group_of(m) == "decoder"]
        todo = sum(m not in cache for m in modules)
        with Progress(todo, "int4 weight scales", unit="Linears") as bar:
            quantize_graph_int4(model, linears, modules, block_size, plan.input_muls(), scales_cache=cache,
                                on_module=lambda m: bar.update(1 if todo else 0,
                                                               note=m.removeprefix("model.language_model.")))
        if lm_head and LM_HEAD in linears:
            _quantize_lm_head(model, linears[LM_HEAD], block_size)
        if embedding_fp16:
            from calib.embedding import gather_fp16

            gather_fp16(model)

    return rewrite


def w8a8_rewrite(plan: LayerPlan, stats, precision, quantize: tuple[str, ...], *, embedding_fp16: bool,
                 percentile: float | None = None, scales: dict | None = None):
    """A `exporter.stream.stream_graph` rewrite: the Linears of the ``quantize`` groups to W8A8 Q/DQ
    (`calib.qdq.quantize_graph`), activation scales from ``stats`` after the ``plan``'s SmoothQuant factors.  Weight
    scales are computed once (from the folded weights, block by block) and reused for the second graph; ``scales``,
    if given, receives the scales.json content."""
    cache: dict[str, np.ndarray] = {}

    def rewrite(model, source, progress) -> None:
        from calib.linears import find_linears, group_of
        from calib.qdq import activation_scales, quantize_graph, weight_scales

        from runtime.progress import Progress

        linears = find_linears(model)
        modules = [m for m in linears if group_of(m) in quantize]
        a_scales = activation_scales(stats, modules, precision, smooth=plan, percentile=percentile)
        todo = [m for m in modules if m not in cache]
        with Progress(len(todo), f"{precision.name} weight scales", unit="Linears") as bar:
            for m in todo:  # reads every weight once (block by block, folded): minutes for the 12B
                cache[m] = weight_scales(linears[m], precision)
                bar.update(1, note=m.removeprefix("model.language_model."))
        quantize_graph(model, linears, a_scales, {m: cache[m] for m in modules}, precision)
        if embedding_fp16:
            from calib.embedding import gather_fp16

            gather_fp16(model)
        if scales is not None:
            scales.setdefault("activation_scale", {}).update(a_scales)
            scales.setdefault("weight_scale", {}).update({m: cache[m].tolist() for m in modules})

    return rewrite


def _quantize_lm_head(model, lin, block_size: int) -> None:
    """The tied LM head in the same INT4 form, quantized from the embedding's row blocks (each block of rows is a
    block of output columns, quantized independently), so the 262144 x 3840 table is never held in fp32: the
    int4 values (1 byte each while collected, 0.5 packed) and the small scales are all that is kept."""
    import ml_dtypes
    import onnx_ir as ir

    from calib.int4 import int4_values
    from calib.linears import LM_HEAD

    emb = lin.weight.const_value  # (out, in) lazy block tensor of the embedding
    out_f, in_f = (int(d) for d in emb.shape.numpy())
    nb = -(-in_f // block_size)
    cache: dict = {}

    def compute():
        if "q" not in cache:
            q = np.empty((in_f, out_f), ml_dtypes.int4)
            scales = np.empty((nb, out_f), np.float32)
            start = 0
            blocks = emb.iter_blocks() if hasattr(emb, "iter_blocks") else iter([emb.numpy()])
            for rows in blocks:
                rows = np.asarray(rows, np.float32)
                qb, sb = int4_values(rows.T, block_size)
                q[:, start:start + len(rows)] = qb.astype(ml_dtypes.int4)
                scales[:, start:start + len(rows)] = sb
                start += len(rows)
            cache["q"], cache["scales"] = q, scales
        return cache["q"], cache["scales"]

    def make():
        q = compute()[0]
        cache.clear()  # the values are written once per graph; recomputed for the next one
        return ir.tensor(q)

    name = f"{LM_HEAD}.weight_int4"
    wq = ir.Value(name=name, const_value=ir.LazyTensor(make, dtype=ir.DataType.INT4, shape=ir.Shape((in_f, out_f)),
                                                       name=name))
    scales = compute()[1]  # one pass now for the scales (small); the values are recomputed when saved
    cache.pop("q", None)
    ws = ir.Value(name=f"{LM_HEAD}.weight_scale", const_value=ir.tensor(scales, name=f"{LM_HEAD}.weight_scale"))
    zp = ir.Value(name=f"{LM_HEAD}.weight_zero_point",
                  const_value=ir.tensor(np.zeros(scales.shape, ml_dtypes.int4), name=f"{LM_HEAD}.weight_zero_point"))
    graph = model.graph
    for v in (wq, ws, zp):
        graph.register_initializer(v)
    node = lin.node
    dq = ir.node("DequantizeLinear", [wq, ws, zp], attributes={"axis": 0, "block_size": block_size},
                 name=f"{LM_HEAD}.weight_dequantize")
    dq.outputs[0].name = f"{LM_HEAD}.weight_dq"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.metadata_props.update(node.metadata_props)
    graph.insert_before(node, [dq])
    node.replace_input_with(1, dq.outputs[0])


# ---------------------------------------------------------------------------------------------- driver
def quantize_checkpoint(model_arg: str, out: str | Path, *, precision: str = "int4", block_size: int = 128,
                        method: str = "awq", smoothquant: float | None | str = "auto", percentile: float | None = None,
                        quantize: tuple[str, ...] | None = None, data_dir=None, max_prompts: int = 8,
                        max_soft_tokens: int = 70, max_len: int | None = None, seed: int = 0, awq_grid: int = 10,
                        awq_objective: str = "sample", force: bool = False, log=print) -> dict:
    """A quantized artifact from a checkpoint directory (or a preset's seeded weights) in bounded memory.

    ``precision`` int4 (weight-only; ``method`` awq|rtn, ``block_size``) or int8 / fp8 (W8A8; ``smoothquant`` alpha,
    None, or "auto": 0.5 for int8, none for fp8; ``quantize``: parts as in ``make calibrate``, default its
    `calib.calibrate.DEFAULT_QUANTIZE`; ``percentile`` of |x| for the activation ranges instead of the max)."""
    import resource

    from calib.calibrate import DEFAULT_QUANTIZE, GROUPS
    from calib.qdq import PRECISIONS
    from exporter.config import PRESETS, load_config
    from exporter.export import export_artifact
    from exporter.stream import CheckpointWeights, SeededWeights, fake_model
    from runtime.staging import check_output

    t0 = time.perf_counter()
    if precision not in ("int4", *PRECISIONS):
        raise ValueError(f"precision {precision!r}; expected int4, {', '.join(PRECISIONS)}")
    w8a8 = precision != "int4"
    alpha = (0.5 if precision == "int8" else None) if smoothquant == "auto" else smoothquant
    if not w8a8 and alpha is not None:
        raise ValueError("SmoothQuant is for W8A8; INT4 weight-only takes --method awq|rtn")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha={alpha}; expected a value in [0, 1]")
    if percentile is not None and not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile}; expected a value in (50, 100]")
    if w8a8:
        quantize = tuple(quantize or DEFAULT_QUANTIZE[precision])
        if bad := [g for g in quantize if g not in GROUPS]:
            raise ValueError(f"cannot quantize {bad}; choose from {', '.join(GROUPS)}")
    elif quantize is not None and tuple(quantize) != ("decoder", "lm_head"):
        raise ValueError("INT4 from a checkpoint quantizes the decoder and the LM head (--quantize is for int8/fp8)")
    is_preset = model_arg in PRESETS and not Path(model_arg).exists()
    check_output(out, sources={"checkpoint": None if is_preset else model_arg}, force=force)  # before any work
    cfg = load_config(model_arg)
    source = SeededWeights(cfg, seed) if is_preset else CheckpointWeights(model_arg, cfg)
    tok_dir = None if is_preset else Path(model_arg)
    if max_len is None:
        max_len = min(cfg.text.max_position_embeddings, 8192)
    if not 2 <= max_len <= cfg.text.max_position_embeddings:
        raise ValueError(f"max_len={max_len} must be in [2, {cfg.text.max_position_embeddings}] for this model")
    inputs, data_meta = _prompt_inputs(cfg, data_dir, tok_dir, max_prompts, max_soft_tokens, max_len)
    how = (f"SmoothQuant alpha {alpha}" if alpha is not None else "no smoothing") if w8a8 \
        else f"{method}, block {block_size}"
    log(f"[quantize] {data_meta['prompts']} calibration prompts ({data_meta['tokens']} tokens) from "
        f"{data_meta['data']}; statistics layer by layer ({precision}: {how})")
    stats, plan, records = collect_sequential(source, cfg, inputs, block_size=block_size,
                                              method=None if w8a8 else method, smooth_alpha=alpha,
                                              awq_grid=awq_grid, awq_objective=awq_objective, log=log)
    t_stats = time.perf_counter() - t0
    rss_stats = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    del inputs
    log(f"[quantize] statistics in {t_stats:.0f} s (peak RSS {rss_stats:.2f} GiB); exporting with {precision} weights")
    common = {
        "precision": precision,
        "from_checkpoint": True,
        "sequential": {"layers": records, "statistics_seconds": round(t_stats, 1)},
        "calibration_data": data_meta["data"],
        "calibration_prompts": data_meta["prompts"],
        "calibration_tokens": data_meta["tokens"],
        "max_soft_tokens": data_meta["max_soft_tokens"],
    }
    add_files = None
    if w8a8:
        prec = PRECISIONS[precision]
        embedding_fp16 = "lm_head" in quantize
        scales: dict = {"precision": precision, "qmax": prec.qmax}
        rewrite = w8a8_rewrite(plan, stats, prec, quantize, embedding_fp16=embedding_fp16, percentile=percentile,
                               scales=scales)

        def add_files(stage: Path) -> None:
            scales["smoothquant"] = None if alpha is None else {
                "alpha": alpha,
                "groups": [{"modules": list(mods), "fold": "linear" if tgt.endswith("up_proj.weight") else "norm",
                            "into": tgt.removesuffix(".weight"), "factors": f.tolist()}
                           for mods, (tgt, f) in plan.groups.items()],
                "not_smoothed": {m: "its input comes from attention (no weighted norm or Linear output to fold into)"
                                 for m in scales["activation_scale"] if m.endswith("o_proj")},
            }
            (stage / "calibration").mkdir()
            (stage / "calibration" / "scales.json").write_text(json.dumps(scales, indent=1) + "\n")
            stats.save(stage / "calibration" / "stats.npz")

        extra = {"precision": precision, "quantization": {
            "format": "QuantizeLinear/DequantizeLinear (opset 24): static per-tensor activations, per-channel weights "
                      "(axis = output), zero points 0",
            "quantized": list(quantize),
            "embedding": "fp16" if embedding_fp16 else "fp32",
            "smoothquant_alpha": alpha,
            "percentile": percentile,
            "lm_head_activation_range": "the final norm's output at every calibration position",
            "scales": "calibration/scales.json",
            "stats": "calibration/stats.npz",
            **common,
        }}
    else:
        rewrite = int4_rewrite(plan, block_size)
        extra = {"precision": "int4", "quantization": {
            "format": "DequantizeLinear (opset 24) of INT4 weights: symmetric block-wise along the input dim "
                      f"(axis 0, block_size {block_size}, 2-D scales), zero points 0; activations fp32",
            "block_size": block_size,
            "int4_method": method,
            "awq_grid": awq_grid if method == "awq" else None,
            "awq_objective": awq_objective if method == "awq" else None,
            "quantized": ["decoder", "lm_head"],
            "embedding": "fp16 table, rows cast to fp32 after the gather",
            "awq": plan.to_json()["search"],
            **common,
        }}
    src_meta = {"preset": model_arg, "seed": seed, "generator": "exporter.stream.SeededWeights"} if is_preset \
        else {"checkpoint": str(Path(model_arg).resolve())}
    manifest = export_artifact(fake_model(cfg), out, max_len=max_len, source=src_meta,
                               tokenizer_dir=tok_dir, weights_from=None if is_preset else Path(model_arg),
                               weights=FoldedWeights(source, plan), rewrite=rewrite,
                               manifest_extra=extra, add_files=add_files, force=force, log=log)
    log(f"[quantize] {precision} artifact ready: {out} ({time.perf_counter() - t0:.0f} s, peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.sequential", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="bf16/fp32 checkpoint directory, or a preset (seeded weights)")
    p.add_argument("--out", required=True, help="quantized artifact directory to write")
    p.add_argument("--precision", default="int4", choices=("int4", "int8", "fp8"))
    p.add_argument("--block-size", type=int, default=128, choices=(32, 64, 128), help="INT4: input channels per scale")
    p.add_argument("--method", default="awq", choices=("awq", "rtn"), help="INT4: AWQ search or round-to-nearest")
    p.add_argument("--smoothquant", default="auto",
                   help="INT8/FP8: SmoothQuant alpha in [0, 1], 'none', or 'auto' (0.5 for int8, none for fp8)")
    p.add_argument("--percentile", type=float, default=None,
                   help="INT8/FP8: activation range from this percentile of |x| instead of the max")
    p.add_argument("--quantize", default=None,
                   help="INT8/FP8: comma-separated parts (decoder, lm_head, vision, audio); default as make calibrate")
    p.add_argument("--data", default=None, help="calibration data directory (default: the built-in set)")
    p.add_argument("--max-prompts", type=int, default=8)
    p.add_argument("--max-soft-tokens", type=int, default=70, choices=(70, 140, 280, 560, 1120))
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--awq-grid", type=int, default=10, help="alpha candidates of the AWQ search")
    p.add_argument("--awq-objective", default="sample", choices=("sample", "diag"),
                   help="score AWQ candidates on sampled activation rows, or on per-channel moments (cheaper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    try:
        sq = None if a.smoothquant == "none" else a.smoothquant if a.smoothquant == "auto" else float(a.smoothquant)
    except ValueError:
        print(f"quantize: error: --smoothquant {a.smoothquant!r}: expected a number, 'none' or 'auto'", file=sys.stderr)
        return 2
    quantize = None if a.quantize is None else tuple(x.strip() for x in a.quantize.split(",") if x.strip())
    try:
        quantize_checkpoint(a.model, a.out, precision=a.precision, block_size=a.block_size, method=a.method,
                            smoothquant=sq, percentile=a.percentile, quantize=quantize, data_dir=a.data,
                            max_prompts=a.max_prompts, max_soft_tokens=a.max_soft_tokens, max_len=a.max_len,
                            seed=a.seed, awq_grid=a.awq_grid, awq_objective=a.awq_objective, force=a.force)
    except (ValueError, OSError) as e:
        from runtime.staging import error_message

        print(f"quantize: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
