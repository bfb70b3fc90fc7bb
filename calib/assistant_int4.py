"""INT4 weights for the drafting assistant's graph: `exporter.export_assistant` with every Linear rewritten.

Every Linear with a constant weight (pre/post projections, q/o projections, the MLPs, the plain LM head) becomes a
block-wise INT4 ``DequantizeLinear -> MatMul`` (`calib.int4.quantize_graph_int4`, the target's INT4 form; ONNX
Runtime fuses each into ``MatMulNBits``), with its scales chosen by one of the target's two INT4 methods:

* ``awq`` (the default, as for the target's ``make calibrate``): activation-aware per-input-channel factors
  (`calib.int4.plan_int4` / `awq_search`, its objective the output error on sampled activation rows), calibrated on
  the assistant's own inputs in real drafting rounds: the same statistics as the INT8 path
  (`calib.assistant_stats.collect_assistant_stats`, here keeping `calib.stats.SAMPLE_ROWS` rows per Linear input);
  the factors fold into the RMSNorm weights (q, the MLP's gate/up, the final norm before post_projection and the
  LM head) and into up_proj's rows (down_proj), or stay a ``Mul`` where nothing can absorb them (pre_projection,
  whose input is a Concat of graph inputs; o_proj).  Written to ``assistant/int4_scales.json``.
* ``rtn``: plain round-to-nearest, no calibration data.

On the demo pair (bench/results/assistant_int4.json, `python bench/assistant_int4.py`): see docs/quantization.md,
"The drafting assistant".

    python -m calib.assistant_int4 --assistant <checkpoint dir> --artifact <artifact> [--block-size 32]
        [--int4-method awq|rtn] [--data DIR] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from calib.assistant_stats import data_dir_problem
from exporter.export_assistant import GRAPH, export_assistant
from runtime.staging import error_message

__all__ = ["METHODS", "quantize_int4", "quantize_int4_awq"]

METHODS = ("awq", "rtn")
SCALES = "int4_scales.json"


def quantize_int4(path: Path, block_size: int, stats=None, *, log=print) -> dict:
    """Rewrite the graph at ``path`` in place (its external data file replaced); returns the counts.

    ``stats`` None: round-to-nearest.  Else `calib.stats.Stats` (module -> TensorStats of its input, with sample
    rows for the search's objective): AWQ, its factors and search summary written to ``int4_scales.json`` beside
    the graph, and the counts carry under ``record`` what the manifest's assistant record adds."""
    import onnx_ir as ir

    from calib.int4 import plan_int4, quantize_graph_int4
    from calib.smoothquant import apply_smoothing
    from exporter.linears import find_linears

    model = ir.load(str(path))
    linears = find_linears(model)
    modules = sorted(linears)
    muls, plan, summary = {}, None, {}
    if stats is not None:
        plan, muls, summary = plan_int4(linears, stats, modules, block_size, "awq", log=log)
        if plan.groups:
            apply_smoothing(linears, plan)
    counts = quantize_graph_int4(model, linears, modules, block_size, muls)
    tmp, data = path.with_name("int4-" + path.name), f"{path.name}.int4.data"  # not the file being read
    ir.save(model, str(tmp), external_data=data)
    del model, linears
    for f in path.parent.iterdir():
        if f.name not in (tmp.name, data):
            f.unlink()  # the fp32 graph and its data
    tmp.replace(path)
    if stats is None:
        return counts
    (path.parent / SCALES).write_text(json.dumps({
        "precision": "int4", "qmax": 7, "block_size": block_size, "method": "awq", "modules": modules,
        "awq": {"search": summary,
                "groups": [{"modules": g.modules, "fold": g.kind, "into": g.source, "factors": g.factors.tolist()}
                           for g in plan.groups],
                "input_mul": {m: f.tolist() for m, f in muls.items()}},
        "calibration": stats.meta}, indent=1) + "\n")
    gains = [v["loss"] / v["rtn_loss"] for v in summary.values() if v["rtn_loss"] > 0]
    record = {"quantization": {
        "format": f"block-wise int4 DequantizeLinear(axis 0, block {block_size}, zero points 0) -> MatMul",
        "method": "awq", "block_size": block_size, "linears": counts["linears"],
        "awq_error_vs_rtn": round(sum(gains) / len(gains), 4) if gains else None,
        "scales": f"{Path(GRAPH).parent.as_posix()}/{SCALES}", **stats.meta}}
    return dict(counts, folded_groups=len(plan.groups), record=record)


def quantize_int4_awq(path: Path, *, artifact: str | Path, block_size: int, data_dir=None, max_new_tokens: int = 32,
                      log=print) -> dict:
    """`export_assistant`'s rewrite for AWQ: statistics with sample rows on drafting rounds
    (`calib.assistant_stats.collect_assistant_stats`), then `quantize_int4` with them."""
    from calib.assistant_stats import collect_assistant_stats
    from calib.stats import SAMPLE_ROWS

    stats = collect_assistant_stats(path, Path(artifact), data_dir=data_dir, max_new_tokens=max_new_tokens,
                                    sample_rows=SAMPLE_ROWS, tag="assistant-int4", log=log)
    return quantize_int4(path, block_size, stats, log=log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m calib.assistant_int4", description=__doc__.split("\n")[0])
    p.add_argument("--assistant", required=True, help="assistant checkpoint directory (transformers' format)")
    p.add_argument("--artifact", required=True,
                   help="the target's artifact directory (for awq: exported with --speculative K; its ONNX Runtime "
                        "engine drafts the calibration rounds)")
    p.add_argument("--block-size", type=int, default=32, choices=(16, 32, 64, 128),
                   help="input channels per INT4 scale")
    p.add_argument("--int4-method", default="awq", choices=METHODS,
                   help="activation-aware scales calibrated on drafting rounds (awq, default) or plain "
                        "round-to-nearest (rtn)")
    p.add_argument("--data", default=None, help="awq: calibration prompts directory (default: the built-in set)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="awq: tokens generated per calibration prompt")
    a = p.parse_args(argv)
    problem = (f"--max-new-tokens {a.max_new_tokens}: expected at least 1" if a.max_new_tokens < 1
               else "--data: calibration prompts are for --int4-method awq; rtn takes none"
               if a.data is not None and a.int4_method == "rtn" else None)
    problem = problem or data_dir_problem(a.data)
    if problem:
        print(f"assistant-int4: error: {problem}", file=sys.stderr)
        return 2
    if a.int4_method == "awq":
        rewrite = functools.partial(quantize_int4_awq, artifact=a.artifact, block_size=a.block_size, data_dir=a.data,
                                    max_new_tokens=a.max_new_tokens)
        precision = f"int4 (block {a.block_size}, AWQ on drafting rounds)"
    else:
        rewrite = functools.partial(quantize_int4, block_size=a.block_size)
        precision = f"int4 (block {a.block_size}, round-to-nearest)"
    try:
        export_assistant(a.assistant, a.artifact, rewrite=rewrite, precision=precision)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"assistant-int4: error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
