"""What `bench.runtime` writes: the Markdown table printed for the README and ``bench/results/runtime.json``
(``latest``, and ``baseline`` on request).  It formats what `bench.runtime_timing` measured and measures nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["markdown", "versions", "write_results"]


# ---------------------------------------------------------------------------------------------- report
def _fmt(x, spec="{:.2f}x"):
    return "" if x is None else spec.format(x)


def markdown(run: dict) -> str:
    m = run["machine"]
    lines = [f"{run['date']}, {m['nproc']} cores ({m['cpu']}), {run['threads']} intra-op threads, load average "
             f"{run['load_before']} before / {run['load_after']} after; weight-read bandwidth "
             f"{run['bandwidth_gb_s']} GB/s (median of the per-cycle probes)", "",
             "| case | stack | decode tok/s | vs genai fp32 | vs genai same precision | vs our fp32 | prefill ms "
             "| prefill vs genai fp32 | of decode bound | greedy = transformers |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case in run["cases"]:
        for s, r in case["stacks"].items():
            eq = r.get("greedy_equal_to_transformers")
            eq = "" if eq is None else f"{eq}/{case['new_tokens']}"
            lines.append(
                f"| {case['name']} | {s} | {r['decode_tok_s']:.1f} | {_fmt(r.get('decode_vs_genai-fp32'))} "
                f"| {_fmt(r.get('decode_vs_genai_same_precision'))} | {_fmt(r.get('decode_vs_ours-fp32'))} "
                f"| {r['prefill_ms']:.0f} | {_fmt(r.get('prefill_vs_genai-fp32'))} "
                f"| {_fmt(r.get('share_of_bound'), '{:.0%}')} "
                f"| {eq} |")
    lines += ["", "| stack | peak RSS MiB (artifact part) | weights read per decode step MB "
              "| kernels per decode step |",
              "|---|---|---|---|"]
    for s, r in run["stacks"].items():
        rss = r.get("rss", {})
        rs = f"{rss['peak_mib']} ({rss['artifact_mib']})" if "peak_mib" in rss else rss.get("error", "")
        wb = r.get("weight_bytes_per_step")
        k = r.get("kernels", {})
        wb = "" if wb is None else round(wb / 1e6)
        lines.append(f"| {s} | {rs} | {wb} | {k.get('kernels', k.get('error', ''))} |")
    if run["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in run["skipped"].items())]
    return "\n".join(lines)


def write_results(run: dict, path: Path, as_baseline: bool) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data["latest"] = run
    if as_baseline:
        data["baseline"] = run
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "torch", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
