"""W8A8 INT8 for the drafting assistant's graph, calibrated on the assistant's own inputs in real drafting rounds.

`exporter.export_assistant` traces the fp32 step graph; `quantize_int8` then rewrites it in place:

1. statistics (`calib.assistant_stats`, shared with the INT4 AWQ path): the target runs greedy speculative
   generation (`runtime.generate`, ``draft="assistant"``, the artifact's ONNX Runtime engine) on calibration prompts
   (`calib.data`: the built-in ``assistant`` set, prompts with long answers, or ``--data``), the staged fp32
   assistant drafting: every draft step of every round adds its Linear inputs to `calib.stats.TensorStats`;
2. the target's INT8 form (`calib.qdq.quantize_graph`): static per-tensor activation scales (``amax / 127``), int8
   weights per output channel, explicit ``QuantizeLinear -> DequantizeLinear`` (TensorRT-legal), on every Linear
   (projections, q/o, MLPs, the LM head); SmoothQuant (`calib.smoothquant`) folded first when ``alpha`` is given;
3. ONNX Runtime's form beside it, ``assistant.ort.onnx``: the same Linears as 8-bit ``MatMulNBits``
   (`graphs.ort.qdq.matmul_nbits`, what build-engine makes of the target's INT8), recorded as the assistant's
   ``engines.onnxruntime``: `runtime.assistant` runs it where its int8 dot products are exact, else the Q/DQ graph
   (ORT's own fusion: 3.3x slower than fp32 on a 12B-shaped assistant, where MatMulNBits took 0.48x fp32's time).

SmoothQuant alpha 0.5 by default, as for the target: on the demo pair (bench/results/assistant_int8.json, 40 held-out
``continue`` questions) it cut the mean KL(fp32 || INT8) of the first draft 3.4x (0.00039 -> 0.00011) and the rounds
whose K drafts differ from fp32's from 0.8 % to 0.4 %; acceptance was the same either way (within 0.6 points of
fp32's 0.892: saturated on this pair).  ``pre_projection`` (its input a Concat of graph inputs) and the o_projs are
not smoothed (`calib.smoothquant` records why).
Not done: percentile scales, FP8, a TensorRT engine for the assistant, a faster fallback than the Q/DQ graph on CPUs
where 8-bit MatMulNBits saturates (none found so far).

    python -m calib.assistant_int8 --assistant <checkpoint dir> --artifact <artifact> [--data DIR] [--smoothquant A]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from calib.assistant_stats import collect_assistant_stats, data_dir_problem
from exporter.export_assistant import GRAPH, export_assistant
from runtime.staging import error_message

__all__ = ["quantize_int8", "write_int8"]

ORT_GRAPH = "assistant.ort.onnx"  # beside GRAPH: the 8-bit MatMulNBits form ONNX Runtime runs
SCALES = "int8_scales.json"


def quantize_int8(path: Path, *, artifact: str | Path, smoothquant: float | None = 0.5, data_dir=None,
                  max_new_tokens: int = 32, log=print) -> dict:
    """`export_assistant`'s rewrite: statistics on drafting rounds (`collect_assistant_stats`), then `write_int8`."""
    if smoothquant is not None and not 0.0 <= smoothquant <= 1.0:
        raise ValueError(f"SmoothQuant alpha={smoothquant}; expected a value in [0, 1] or none")
    stats = collect_assistant_stats(path, Path(artifact), data_dir=data_dir, max_new_tokens=max_new_tokens,
                                    tag="assistant-int8", log=log)
    return write_int8(path, stats, smoothquant=smoothquant, log=log)


def write_int8(path: Path, stats, *, smoothquant: float | None = None, log=print) -> dict:
    """Rewrite the fp32 assistant graph at ``path`` in place into W8A8 Q/DQ with the activation statistics ``stats``
    (`calib.stats.Stats`, module -> TensorStats) and write its ONNX Runtime form beside it (module docstring).
    Returns counts, and under ``record`` what the manifest's assistant record adds."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    from calib.qdq import PRECISIONS, activation_scales, quantize_graph, weight_scales
    from calib.smoothquant import apply_smoothing, plan_smoothing
    from exporter.linears import find_linears
    from graphs.ort.qdq import matmul_nbits

    prec = PRECISIONS["int8"]
    model = ir.load(str(path))
    linears = find_linears(model)
    modules = sorted(linears)
    plan = plan_smoothing(linears, stats, modules, smoothquant) if smoothquant is not None else None
    if plan is not None:
        done = apply_smoothing(linears, plan)
        log(f"[assistant-int8] SmoothQuant alpha {smoothquant}: {done['groups']} groups folded; not smoothed: "
            + ", ".join(sorted(plan.skipped)))
    a_scales = activation_scales(stats, modules, prec, smooth=plan)
    w_scales = {m: weight_scales(linears[m], prec) for m in modules}
    counts = quantize_graph(model, linears, a_scales, w_scales, prec)
    tmp, data = path.with_name("int8-" + path.name), f"{path.name}.int8.data"  # not the file being read
    ir.save(model, str(tmp), external_data=data)
    del model, linears
    for f in path.parent.iterdir():
        if f.name not in (tmp.name, data):
            f.unlink()  # the fp32 graph and its data
    tmp.replace(path)
    proto = onnx.load(str(path), load_external_data=False)
    nbits = matmul_nbits(proto, path.parent, path.parent / f"{ORT_GRAPH}.data", bits=(8,))
    onnx.save(proto, str(path.parent / ORT_GRAPH))
    try:
        ort.InferenceSession(str(path.parent / ORT_GRAPH), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT's own exception types; reported with the file
        raise RuntimeError(f"{path.parent / ORT_GRAPH}: ONNX Runtime cannot load the MatMulNBits form ({e})") from None
    (path.parent / SCALES).write_text(json.dumps({
        "precision": "int8", "qmax": prec.qmax, "activation_scale": a_scales,
        "smoothquant": None if plan is None else {
            "alpha": plan.alpha, "not_smoothed": plan.skipped,
            "groups": [{"modules": g.modules, "fold": g.kind, "into": g.source, "factors": g.factors.tolist()}
                       for g in plan.groups]},
        "calibration": stats.meta}, indent=1) + "\n")
    folder = Path(GRAPH).parent.as_posix()
    record = {
        "engines": {"onnxruntime": {"file": f"{folder}/{ORT_GRAPH}", "int8_kernel": "MatMulNBits"}},
        "quantization": {
            "format": "QuantizeLinear/DequantizeLinear: static per-tensor activations, per-channel int8 weights "
                      "(axis = output), zero points 0", "linears": counts["linears"], "smoothquant_alpha": smoothquant,
            "scales": f"{folder}/{SCALES}", **stats.meta},
    }
    return {"linears": counts["linears"], "activation_qdq": counts["activation_qdq"],
            "matmul_nbits": nbits["nodes"], "record": record}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.assistant_int8", description=__doc__.split("\n")[0])
    p.add_argument("--assistant", required=True, help="assistant checkpoint directory (transformers' format)")
    p.add_argument("--artifact", required=True,
                   help="the target's artifact directory (exported with --speculative K; its ONNX Runtime engine "
                        "drafts the calibration rounds)")
    p.add_argument("--data", default=None, help="calibration prompts directory (default: the built-in set)")
    p.add_argument("--smoothquant", default="0.5", help="SmoothQuant alpha in [0, 1] (default 0.5), or 'none'")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per calibration prompt")
    a = p.parse_args(argv)
    try:
        alpha = None if a.smoothquant == "none" else float(a.smoothquant)
    except ValueError:
        print(f"assistant-int8: error: --smoothquant {a.smoothquant!r}: expected a number or 'none'", file=sys.stderr)
        return 2
    problem = (f"--smoothquant {alpha}: SmoothQuant alpha must be in [0, 1]" if alpha is not None and not 0 <= alpha <= 1
               else f"--max-new-tokens {a.max_new_tokens}: expected at least 1" if a.max_new_tokens < 1 else None)
    problem = problem or data_dir_problem(a.data)
    if problem:
        print(f"assistant-int8: error: {problem}", file=sys.stderr)
        return 2
    rewrite = functools.partial(quantize_int8, artifact=a.artifact, smoothquant=alpha, data_dir=a.data,
                                max_new_tokens=a.max_new_tokens)
    sq = "none" if alpha is None else f"alpha {alpha}"
    try:
        export_assistant(a.assistant, a.artifact, rewrite=rewrite,
                         precision=f"int8 (W8A8, static per-tensor activation scales, SmoothQuant {sq})")
    except (ValueError, OSError, RuntimeError) as e:
        print(f"assistant-int8: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
