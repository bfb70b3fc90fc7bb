"""Polygraphy check of a quantized artifact's graphs against the fp32 graphs: distribution metrics on real prompts.

Both artifacts' prefill graphs run under Polygraphy's ``OnnxrtRunner`` on the held-out prompts (one iteration per
prompt); their decode graphs run one step past each prompt from the fp32 cache (the fp32 greedy token), so decode's
Q/DQ is checked too.  ``Comparator.compare_accuracy`` checks the logits' cosine similarity with Polygraphy's
``CosineSimilarityCompareFunc`` averaged over the prompts (``check_average``); top-1 agreement, top-5 overlap and KL
divergence are computed from the same run results.  The check requires a mean cosine >= ``min_cosine`` and the
precision's targets (`calib.report.TARGETS`: mean KL and top-1 agreement), for prefill and for decode.
``make check-quant OUT=<artifact>`` runs it; CI runs it on the demo checkpoint's INT8 and FP8 artifacts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from calib.report import TARGETS, next_token_metrics

__all__ = ["check_quantized", "distribution_metrics"]


def distribution_metrics(ref_logits: np.ndarray, q_logits: np.ndarray) -> dict[str, np.ndarray]:
    """Per row of (N, vocab) logits: top-1 agreement, top-5 overlap, KL(ref || quant)."""
    m = next_token_metrics(ref_logits, q_logits, ref_logits.argmax(-1))
    top5 = [len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5.0 for a, b in zip(ref_logits, q_logits)]
    return {"top1": m["top1"], "top5": np.asarray(top5), "kl": m["kl"]}


def _logits(results, runner: int) -> np.ndarray:
    iterations = results[runner][1]
    return np.concatenate([np.asarray(it["logits"], np.float64).reshape(-1, it["logits"].shape[-1]) for it in iterations])


def _feeds(ref_root: Path, prompt_set):
    """Prefill feeds per prompt, and decode feeds one step later from the fp32 model's cache."""
    import runtime
    from calib.data import PromptTooLong, prefill_inputs
    from runtime.ort_backend import prefill_feeds, zero_cache

    ref = runtime.load(ref_root)
    prefill, decode = [], []
    for prompt in prompt_set.prompts:
        try:
            inputs = prefill_inputs(prompt, ref.config, ref.tokenizer, max_soft_tokens=prompt_set.max_soft_tokens,
                                    max_len=ref.max_len)
        except PromptTooLong:
            continue
        prefill.append(prefill_feeds(inputs, ref.manifest) | zero_cache(ref.manifest, "prefill", 1, ref.max_len))
        cache = ref.backend.new_cache(1, ref.max_len)
        token = ref.backend.prefill(inputs, cache).argmax(-1)
        specs = ref.manifest["graphs"]["decode"]["inputs"]
        names = [i["name"] for i in specs if i["name"].startswith(("past_key_", "past_value_"))]
        decode.append({"input_ids": token.reshape(1, 1).astype(np.int64), "past_lens": inputs.seq_lens.copy(),
                       **dict(zip(names, ref.backend.cache_arrays(cache)))})
    return prefill, decode


def check_quantized(quant_root: str | Path, *, reference: str | Path | None = None, data_dir=None,
                    min_cosine: float = 0.99, log=print) -> dict:
    """Run the comparison; returns a summary with ``passed``."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc
    from polygraphy.logger import G_LOGGER

    from calib.data import prompts_for
    from runtime.manifest import read_manifest

    import onnxruntime as ort

    # Polygraphy's runner binds no buffers in place, so TensorScatter copies and says so on every call
    ort.set_default_logger_severity(3)
    q_root = Path(quant_root)
    q_manifest = read_manifest(q_root)
    precision = q_manifest.get("precision")
    if precision not in TARGETS:
        raise ValueError(f"{q_root}: precision {precision!r} is not a quantized artifact (int8, fp8 or int4)")
    ref_root = Path(reference or q_manifest["source"]["artifact"])
    ref_manifest = read_manifest(ref_root)
    prompts = prompts_for(data_dir, "heldout", ref_manifest["model_config"],
                          has_tokenizer=bool(ref_manifest.get("tokenizer")))
    feeds = dict(zip(("prefill", "decode"), _feeds(ref_root, prompts)))
    targets = TARGETS[precision]
    summary = {"precision": precision, "targets": targets, "min_cosine_target": min_cosine}
    passed = True
    only_logits = lambda name, index, result: [name] if name == "logits" else []  # noqa: E731
    for graph in ("prefill", "decode"):
        runners = [
            OnnxrtRunner(SessionFromOnnx(str(root / m["graphs"][graph]["file"]), providers=["cpu"]), name=f"{tag}-{graph}")
            for root, m, tag in ((ref_root, ref_manifest, "fp32"), (q_root, q_manifest, precision))
        ]
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            results = Comparator.run(runners, data_loader=feeds[graph])
            cosine = Comparator.compare_accuracy(
                results, compare_func=CosineSimilarityCompareFunc(min_cosine, find_output_func=only_logits),
                check_average=True,
            )
        matched, _, total = cosine[0].stats()
        dist = distribution_metrics(_logits(results, 0), _logits(results, 1))
        s = {
            "iterations": total,
            "cosine_average_passed": bool(cosine),
            "iterations_above_min_cosine": f"{matched}/{total}",
            "mean_top1": float(dist["top1"].mean()),
            "mean_top5": float(dist["top5"].mean()),
            "mean_kl": float(dist["kl"].mean()),
        }
        ok = bool(cosine) and s["mean_kl"] <= targets["mean_kl"] and s["mean_top1"] >= targets["top1"]
        passed = passed and ok
        summary[graph] = s | {"passed": ok}
        log(f"[check-quant] {graph}: {'PASS' if ok else 'FAIL'}: mean cosine {'>=' if bool(cosine) else '<'} "
            f"{min_cosine} ({matched}/{total} prompts above), top-1 {100 * s['mean_top1']:.1f} % (target >= "
            f"{100 * targets['top1']:.0f} %), top-5 overlap {100 * s['mean_top5']:.1f} %, mean KL {s['mean_kl']:.5f} "
            f"(target <= {targets['mean_kl']})")
    summary["passed"] = passed
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.check", description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True, help="quantized artifact (from `make calibrate`)")
    p.add_argument("--reference", default=None, help="fp32 artifact (default: the one it was calibrated from)")
    p.add_argument("--data", default=None, help="held-out prompt directory (default: the built-in held-out set)")
    p.add_argument("--min-cosine", type=float, default=0.99)
    a = p.parse_args(argv)
    try:
        s = check_quantized(a.artifact, reference=a.reference, data_dir=a.data, min_cosine=a.min_cosine)
    except (ValueError, FileNotFoundError) as e:
        print(f"check-quant: error: {e}", file=sys.stderr)
        return 2
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
