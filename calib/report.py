"""Accuracy report of a quantized artifact against its fp32 source, on held-out prompts.

* Next-token distributions: for each held-out prompt the fp32 model's greedy continuation (up to ``steps`` tokens,
  ending at a stop token) is fed to both models (teacher forcing), so both are compared on the same contexts, over
  prefill and decode graphs.  Per position: KL(p_fp32 || p_quant), top-1 agreement; the fp32 continuation's
  perplexity under each model gives the perplexity ratio (quant / fp32).
* Per-Linear signal-to-noise: the output of every quantized Linear in the quantized prefill graph against the same
  output in the fp32 graph, over the held-out prompts: ``10 log10(sum y^2 / sum (y - y_q)^2)`` dB.  Errors add up
  along the network, so this locates where they start and grow; the worst are listed.

Writes ``report.json``, ``report.md`` and ``report_snr.svg`` (the per-Linear plot, drawn here as plain SVG: no
plotting library needed) into the artifact's ``calibration/`` directory and re-hashes its manifest.
Targets (DESIGN.md section 5): FP8 mean KL <= 0.01 and top-1 >= 95 %; INT8 mean KL <= 0.03 and top-1 >= 92 %;
INT4 weight-only (ours) mean KL <= 0.05 and top-1 >= 90 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from exporter.linears import find_linears, layer_index

__all__ = ["TARGETS", "accuracy_report", "log_softmax", "next_token_metrics"]

# INT4 weight-only (W4A16, AWQ): public results put it within about 1-3 % of fp16 on task scores, like W8A8; its
# next-token distribution moves more than INT8's, hence a looser KL bound (ours; DESIGN.md section 5 has none).
TARGETS = {"fp8": {"mean_kl": 0.01, "top1": 0.95}, "int8": {"mean_kl": 0.03, "top1": 0.92},
           "int4": {"mean_kl": 0.05, "top1": 0.90}}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_metrics(ref_logits: np.ndarray, q_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: KL(ref || q), top-1 agreement, and each model's NLL of ``targets``."""
    lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    rows = np.arange(len(targets))
    return {
        "kl": np.maximum(kl, 0.0),
        "top1": (ref_logits.argmax(-1) == q_logits.argmax(-1)).astype(np.float64),
        "nll_ref": -lp[rows, targets],
        "nll_q": -lq[rows, targets],
    }


def _teacher_forced(ref, quant, prompt_set, steps: int) -> dict[str, np.ndarray]:
    from calib.data import PromptTooLong, prefill_inputs

    cfg, tk = ref.config, ref.config["tokens"]
    stop = {tk["eos"], tk["turn_end"]}
    rows: dict[str, list] = {"kl": [], "top1": [], "nll_ref": [], "nll_q": []}
    for i, prompt in enumerate(prompt_set.prompts):
        try:
            inputs = prefill_inputs(prompt, cfg, ref.tokenizer, max_soft_tokens=prompt_set.max_soft_tokens,
                                    max_len=ref.max_len)
        except PromptTooLong:
            continue
        caches = ref.backend.new_cache(1, ref.max_len), quant.backend.new_cache(1, ref.max_len)
        lr, lq = ref.backend.prefill(inputs, caches[0]), quant.backend.prefill(inputs, caches[1])
        length = int(inputs.seq_lens[0])
        for _ in range(steps):
            target = lr.argmax(-1)
            for k, v in next_token_metrics(lr, lq, target).items():
                rows[k].append(v)
            if int(target[0]) in stop or length + 1 >= ref.max_len:
                break
            past = np.array([length], np.int64)
            lr = ref.backend.decode(target[:, None], past, caches[0])
            lq = quant.backend.decode(target[:, None], past, caches[1])
            length += 1
    if not rows["kl"]:
        raise ValueError(f"{prompt_set.source}: no held-out prompt fits in max_len={ref.max_len}")
    return {k: np.concatenate(v) for k, v in rows.items()}


def _linear_snr(ref_root: Path, q_root: Path, ref_manifest: dict, q_manifest: dict, modules: list[str], prompt_set,
                tokenizer, rescale: dict[str, np.ndarray]) -> dict[str, float]:
    """``rescale``: Linears whose output SmoothQuant divided per channel (up_proj), and by what."""
    import onnx_ir as ir

    from calib.data import PromptTooLong, prefill_inputs
    from calib.stats import augmented_session
    from runtime.ort_backend import prefill_feeds, zero_cache

    # Q/DQ insertion keeps each MatMul and its output name, so the fp32 graph names both
    lin = find_linears(ir.load(str(ref_root / ref_manifest["graphs"]["prefill"]["file"])))
    names = [lin[m].node.outputs[0].name for m in modules]
    outs = {
        root: (augmented_session(root, manifest["graphs"]["prefill"]["file"], names), names)
        for root, manifest in ((ref_root, ref_manifest), (q_root, q_manifest))
    }
    signal = np.zeros(len(modules))
    noise = np.zeros(len(modules))
    cfg, max_len = ref_manifest["model_config"], int(ref_manifest["max_len"])
    for prompt in prompt_set.prompts:
        try:
            inputs = prefill_inputs(prompt, cfg, tokenizer, max_soft_tokens=prompt_set.max_soft_tokens, max_len=max_len)
        except PromptTooLong:
            continue
        feeds = prefill_feeds(inputs, ref_manifest) | zero_cache(ref_manifest, "prefill", 1, max_len)
        (s_ref, n_ref), (s_q, n_q) = outs[ref_root], outs[q_root]
        for i, (y, yq) in enumerate(zip(s_ref.run(n_ref, feeds), s_q.run(n_q, feeds))):
            if modules[i] in rescale:
                yq = yq * rescale[modules[i]]
            signal[i] += float(np.square(y.astype(np.float64)).sum())
            noise[i] += float(np.square(y.astype(np.float64) - yq).sum())
    with np.errstate(divide="ignore"):
        snr = 10 * np.log10(signal / np.maximum(noise, 1e-30))
    return {m: float(v) for m, v in zip(modules, snr) if signal[modules.index(m)] > 0}


def _short(module: str) -> str:
    i = layer_index(module)
    return f"L{i}.{module.rsplit('.', 1)[-1]}" if i is not None else module.replace("model.", "")


def _svg(snr: dict[str, float], title: str) -> str:
    """A bar chart of SNR (dB) per Linear, in graph order; bars of the worst five in red."""
    names = list(snr)
    worst = set(sorted(names, key=snr.get)[:5])
    top = max(10.0, max(snr.values()) * 1.1)
    bw, h, left, bottom = 14, 260, 50, 90
    width = left + bw * len(names) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + bottom + 30}" font-family="sans-serif" '
        f'font-size="10">',
        f'<text x="{left}" y="15" font-size="12">{title}</text>',
        f'<line x1="{left}" y1="{h + 20}" x2="{width - 10}" y2="{h + 20}" stroke="black"/>',
    ]
    for tick in np.linspace(0, top, 5):
        y = h + 20 - tick / top * h
        parts.append(f'<text x="5" y="{y + 3:.1f}">{tick:.0f} dB</text>')
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#ddd"/>')
    for i, name in enumerate(names):
        v = max(snr[name], 0.0)
        x, bh = left + i * bw, v / top * h
        colour = "#d62728" if name in worst else "#1f77b4"
        parts.append(f'<rect x="{x + 1}" y="{h + 20 - bh:.1f}" width="{bw - 2}" height="{bh:.1f}" fill="{colour}">'
                     f'<title>{name}: {snr[name]:.1f} dB</title></rect>')
        parts.append(f'<text transform="translate({x + bw - 3},{h + 24}) rotate(90)">{_short(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _markdown(r: dict) -> str:
    t = r["targets"]
    lines = [
        f"# {r['precision'].upper()} accuracy report",
        "",
        f"Quantized artifact `{r['artifact']}` against fp32 `{r['reference']}` on {r['prompts']} held-out prompts "
        f"({r['positions']} next-token positions, teacher-forced on the fp32 greedy continuation; data: "
        f"{r['data']}).",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        f"| mean next-token KL | {r['mean_kl']:.5f} | <= {t['mean_kl']} |",
        f"| top-1 agreement | {100 * r['top1']:.2f} % | >= {100 * t['top1']:.0f} % |",
        f"| perplexity ratio (quant / fp32) | {r['perplexity_ratio']:.4f} | |",
        f"| max next-token KL | {r['max_kl']:.5f} | |",
        "",
        f"Targets {'met' if r['passed'] else 'NOT met'}.",
        "",
        "## Linears with the worst signal-to-noise (prefill outputs, quant vs fp32)",
        "",
        "| Linear | SNR (dB) |",
        "|---|---|",
        *[f"| {m} | {v:.1f} |" for m, v in r["worst_linears"]],
        "",
        "![per-Linear SNR](report_snr.svg)",
        "",
    ]
    return "\n".join(lines)


def accuracy_report(quant_root: str | Path, *, reference: str | Path | None = None, data_dir=None, steps: int = 8,
                    write: bool = True, log=print) -> dict:
    """Compare ``quant_root`` with its fp32 source (from its manifest unless ``reference`` is given)."""
    import runtime
    from calib.data import prompts_for
    from runtime.manifest import read_manifest, write_manifest

    t0 = time.perf_counter()
    q_root = Path(quant_root)
    q_manifest = read_manifest(q_root)
    precision = q_manifest.get("precision")
    if precision not in TARGETS:
        raise ValueError(f"{q_root}: precision {precision!r} is not a quantized artifact (int8, fp8 or int4)")
    ref_root = Path(reference or q_manifest.get("source", {}).get("artifact", ""))
    ref = runtime.load(ref_root)
    quant = runtime.load(q_root)
    prompts = prompts_for(data_dir, "heldout", ref.config, has_tokenizer=ref.tokenizer is not None)
    log(f"[report] {len(prompts.prompts)} held-out prompts from {prompts.source}")
    m = _teacher_forced(ref, quant, prompts, steps)
    scales = json.loads((q_root / q_manifest["quantization"]["scales"]).read_text())
    modules = list(scales.get("modules") or scales["activation_scale"])
    smooth = scales.get("smoothquant") or scales.get("awq") or {"groups": []}
    rescale = {g["into"]: np.asarray(g["factors"], np.float32) for g in smooth["groups"] if g["fold"] == "linear"}
    snr = _linear_snr(ref_root, q_root, ref.manifest, q_manifest, modules, prompts, ref.tokenizer, rescale)
    targets = TARGETS[precision]
    r = {
        "precision": precision,
        "artifact": str(q_root),
        "reference": str(ref_root),
        "data": prompts.source,
        "prompts": len(prompts.prompts),
        "positions": int(len(m["kl"])),
        "mean_kl": float(m["kl"].mean()),
        "max_kl": float(m["kl"].max()),
        "top1": float(m["top1"].mean()),
        "perplexity_fp32": float(np.exp(m["nll_ref"].mean())),
        "perplexity_quant": float(np.exp(m["nll_q"].mean())),
        "perplexity_ratio": float(np.exp(m["nll_q"].mean() - m["nll_ref"].mean())),
        "linear_snr_db": snr,
        "worst_linears": sorted(snr.items(), key=lambda kv: kv[1])[:5],
        "targets": targets,
        "seconds": None,
    }
    r["passed"] = bool(r["mean_kl"] <= targets["mean_kl"] and r["top1"] >= targets["top1"])
    r["seconds"] = round(time.perf_counter() - t0, 2)
    log(f"[report] {precision}: mean KL {r['mean_kl']:.5f} (target <= {targets['mean_kl']}), top-1 "
        f"{100 * r['top1']:.2f} % (target >= {100 * targets['top1']:.0f} %), perplexity ratio "
        f"{r['perplexity_ratio']:.4f}; worst Linear {r['worst_linears'][0][0]} at {r['worst_linears'][0][1]:.1f} dB")
    if write:
        from runtime.staging import check_writable_artifact

        check_writable_artifact(q_root, q_manifest, log=log)  # the rewritten manifest must not adopt others' files
        out = q_root / "calibration"
        (out / "report.json").write_text(json.dumps(r, indent=1) + "\n")
        (out / "report.md").write_text(_markdown(r))
        (out / "report_snr.svg").write_text(_svg(snr, f"{precision.upper()}: SNR of each quantized Linear's output"))
        write_manifest(q_root, q_manifest)
        log(f"[report] written to {out}/report.md (+ report.json, report_snr.svg)")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.report", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="quantized artifact (from `make calibrate`)")
    p.add_argument("--reference", default=None, help="fp32 artifact (default: the one it was calibrated from)")
    p.add_argument("--data", default=None, help="held-out prompt directory (default: the built-in held-out set)")
    p.add_argument("--steps", type=int, default=8, help="next-token positions per prompt (prefill + decodes)")
    a = p.parse_args(argv)
    try:
        accuracy_report(a.artifact, reference=a.reference, data_dir=a.data, steps=a.steps)
    except (ValueError, FileNotFoundError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
