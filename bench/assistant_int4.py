"""The INT4 drafting assistant (`calib.assistant_int4`), AWQ and round-to-nearest, against the fp32 one
-> ``bench/results/assistant_int4.json``.

On the demo pair (``demo/checkpoint`` exported with ``--speculative K``, ONNX Runtime engine, and
``demo/assistant``): the assistant exported fp32, INT4 RTN and INT4 AWQ (calibrated on drafting rounds of the
built-in ``assistant`` prompts), block 32 (the assistant's default) and 16; greedy speculative generation on
``--questions`` held-out ``continue`` questions (40 new tokens) with the same target: the acceptance of each and
whether its output equals plain greedy's; and, on the fp32 assistant's own rounds, how often each INT4 assistant
drafts the same K tokens, its first draft's agreement and the mean KL(fp32 || INT4) of its first draft's
distribution (what acceptance, saturated on this pair, may not show).  Also the AWQ search's own calibration
objective against RTN's per Linear group (from the artifact's ``int4_scales.json``).  No timing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages, not bench/

from bench.assistant_int8 import K, _Compare, _run, _runner

WORK = ROOT / "bench" / "work" / "assistant_int4"
RESULTS = ROOT / "bench" / "results" / "assistant_int4.json"
BLOCKS = (32, 16)


def build() -> dict[str, Path]:
    base = WORK / "demo-fp32"
    if not (base / "assistant").is_dir():
        shutil.rmtree(base, ignore_errors=True)
        _run("-m", "exporter.export", "--model", "demo/checkpoint", "--out", str(base), "--max-len", "256",
             "--speculative", str(K))
        _run("-m", "graphs.build", "--artifact", str(base), "--backend", "onnxruntime")
        _run("-m", "exporter.export_assistant", "--assistant", "demo/assistant", "--artifact", str(base))
    out = {"fp32": base}
    for block in BLOCKS:
        for method in ("rtn", "awq"):
            name = f"int4-b{block}-{method}"
            out[name] = WORK / f"demo-{name}"
            if not (out[name] / "assistant").is_dir():
                shutil.rmtree(out[name], ignore_errors=True)
                shutil.copytree(base, out[name])
                _run("-m", "calib.assistant_int4", "--assistant", "demo/assistant", "--artifact", str(out[name]),
                     "--block-size", str(block), "--int4-method", method)
    return out


def accuracy(arts: dict[str, Path], n: int) -> dict:
    import runtime
    from demo.tasks import examples, prompt_text
    from runtime.speculative.verify import SpecStats

    questions = [ex for ex in examples("heldout", 20 * n, seed=0) if ex.kind == "continue"][:n]
    model = runtime.load(arts["fp32"], backend="onnxruntime", threads=2)
    runners = {name: _runner(root, "plain") for name, root in arts.items()}
    plain = {ex.question: runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0).tokens
             for ex in questions}
    out = {"questions": n, "acceptance": {}}
    for name, runner in runners.items():
        model._assistant, stats, exact = runner, SpecStats(), 0
        for ex in questions:
            spec = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0, draft="assistant",
                                    num_draft_tokens=K, spec_stats=stats)
            exact += spec.tokens == plain[ex.question]
        out["acceptance"][name] = {"acceptance": round(stats.acceptance, 4), "accepted": stats.accepted,
                                   "drafted": stats.drafted, "greedy_exact": f"{exact}/{n}"}
        print("[bench-assistant-int4]", name, out["acceptance"][name], flush=True)
    cmp = _Compare(runners["fp32"], {k: v for k, v in runners.items() if k != "fp32"})
    model._assistant = cmp
    for ex in questions:
        runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0, draft="assistant",
                         num_draft_tokens=K)
    out["vs_fp32_on_fp32_rounds"] = {
        name: {"rounds": cmp.rounds, "same_K_drafts": round(cmp.same[name] / cmp.rounds, 4),
               "first_draft_agrees": round(cmp.first[name] / cmp.rounds, 4),
               "mean_kl_first_draft": float(f"{statistics.fmean(cmp.kl[name]):.3g}")} for name in cmp.others}
    return out


def awq_search(arts: dict[str, Path]) -> dict:
    """Per AWQ artifact: the search's objective (output error on the sampled drafting-round activations) at the
    chosen alpha as a fraction of round-to-nearest's, per Linear group, and the mean."""
    out = {}
    for name, root in arts.items():
        if name.endswith("-awq"):
            search = json.loads((root / "assistant" / "int4_scales.json").read_text())["awq"]["search"]
            ratios = {g: round(v["loss"] / v["rtn_loss"], 4) for g, v in search.items() if v["rtn_loss"] > 0}
            out[name] = {"mean_error_vs_rtn": round(statistics.fmean(ratios.values()), 4),
                         "alpha": {g: v["alpha"] for g, v in search.items()}, "error_vs_rtn": ratios}
    return out


def main(argv=None) -> int:
    import subprocess

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=40)
    a = p.parse_args(argv)
    arts = build()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True).stdout
    calibration = json.loads((arts[f"int4-b{BLOCKS[0]}-awq"] / "manifest.json").read_text())["assistant"][
        "quantization"]
    calibration["data"] = calibration["data"].removeprefix(f"{ROOT}/")  # the built-in set: a repository path
    result = {"machine": {"cpu_threads": 2}, "commit": commit.strip(), "K": K, "calibration": calibration,
              "awq_search": awq_search(arts), "accuracy": accuracy(arts, a.questions)}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
