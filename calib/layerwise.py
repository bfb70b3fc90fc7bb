"""Statistics from a checkpoint one decoder layer at a time (the first step of `calib.sequential`).

The calibration prompts are embedded (only the embedding rows they use are read) and their hidden states carried
from layer to layer through our PyTorch model (`exporter.model`).  Each layer's weights are read from the checkpoint,
run on every prompt with hooks on its Linears (`calib.stats.TensorStats`), then dropped; while the layer is in
memory its AWQ (`calib.int4.awq_search`) or SmoothQuant (`calib.smoothquant.smoothing_factors`) factors are computed
per group of Linears sharing an input (`LayerPlan`).  Peak memory: one layer in fp32 plus the prompts' activations.
Nothing here writes a graph or an artifact (`calib.stream_rewrites`, `calib.sequential`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from exporter.config import ModelConfig

__all__ = ["LayerPlan", "collect_sequential"]


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
    from exporter.linears import LM_HEAD
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
