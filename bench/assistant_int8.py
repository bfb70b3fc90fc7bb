"""The INT8 drafting assistant (`calib.assistant_int8`) against the fp32 one -> ``bench/results/assistant_int8.json``.

Accuracy, on the demo pair (``demo/checkpoint`` exported with ``--speculative K``, ONNX Runtime engine, and
``demo/assistant``): the assistant exported fp32, INT8 without SmoothQuant (the default) and INT8 with SmoothQuant
alpha 0.5; greedy speculative generation on ``--questions`` held-out ``continue`` questions (40 new tokens): the
acceptance of each (the INT8 ones run both as ONNX Runtime's 8-bit MatMulNBits form, what the runner takes on an
exact CPU, and as the artifact's Q/DQ graph, the fallback), and, on the fp32 assistant's own rounds, how often each
INT8 assistant drafts the same K tokens, its first draft's agreement and the mean KL(fp32 || INT8) of its first
draft's distribution.

Speed (one process, turns interleaved, medians of per-cycle ratios): one ``draft`` call of K steps of the demo
assistant on a real cache; and one step of a 12B-shaped assistant graph (random weights: hidden 1024, 4 layers,
MLP 4096, reading the 12B's cache shapes, plain LM head over a 32768-token vocabulary, batch 1) fp32 vs Q/DQ (ORT's
own fusion) vs MatMulNBits.  Timing is never asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages, not bench/

WORK = ROOT / "bench" / "work" / "assistant_int8"
RESULTS = ROOT / "bench" / "results" / "assistant_int8.json"
K = json.loads((ROOT / "demo" / "assistant" / "generation_config.json").read_text())["num_assistant_tokens"]


def _run(*args: str) -> None:
    print("[bench-assistant-int8]", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def build() -> dict[str, Path]:
    base = WORK / "demo-fp32"
    if not (base / "assistant").is_dir():
        shutil.rmtree(base, ignore_errors=True)
        _run("-m", "exporter.export", "--model", "demo/checkpoint", "--out", str(base), "--max-len", "256",
             "--speculative", str(K))
        _run("-m", "graphs.build", "--artifact", str(base), "--backend", "onnxruntime")
        _run("-m", "exporter.export_assistant", "--assistant", "demo/assistant", "--artifact", str(base))
    out = {"fp32": base}
    for name, sq in (("int8", "none"), ("int8-sq0.5", "0.5")):
        out[name] = WORK / f"demo-{name}"
        if not (out[name] / "assistant").is_dir():
            shutil.rmtree(out[name], ignore_errors=True)
            shutil.copytree(base, out[name])
            _run("-m", "calib.assistant_int8", "--assistant", "demo/assistant", "--artifact", str(out[name]),
                 "--smoothquant", sq)
    return out


def _runner(root: Path, form: str):
    from runtime.assistant import AssistantRunner
    from runtime.manifest import read_manifest

    manifest = read_manifest(root)
    if form == "qdq":  # the artifact's Q/DQ graph, as the runner takes it where MatMulNBits is not exact
        rec = {k: v for k, v in manifest["assistant"].items() if k != "engines"}
        manifest = dict(manifest, assistant=rec)
    return AssistantRunner(root, manifest, threads=2)


class _Compare:
    """Drafts with ``ref`` (the fp32 runner); runs each of ``others`` on the same round and counts agreement."""

    def __init__(self, ref, others: dict):
        self.ref, self.others = ref, others
        self.rounds = 0
        self.same = {n: 0 for n in others}
        self.first = {n: 0 for n in others}
        self.kl = {n: [] for n in others}

    def draft(self, cache, tokens, hidden, position, num_tokens, *, written=None):
        want = self.ref.draft(cache, tokens, hidden, position, num_tokens, written=written)
        self.rounds += 1
        p = _softmax(want.logits[:, 0])
        for name, runner in self.others.items():
            got = runner.draft(cache, tokens, hidden, position, num_tokens, written=written)
            self.same[name] += int(np.array_equal(got.tokens, want.tokens))
            self.first[name] += int(got.tokens[0, 0] == want.tokens[0, 0])
            q = _softmax(got.logits[:, 0])
            self.kl[name].append(float((p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum()))
        return want


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def accuracy(arts: dict[str, Path], n: int) -> dict:
    import runtime
    from demo.tasks import examples, prompt_text
    from runtime.speculative.verify import SpecStats

    questions = [ex for ex in examples("heldout", 20 * n, seed=0) if ex.kind == "continue"][:n]
    model = runtime.load(arts["fp32"], backend="onnxruntime", threads=2)
    runners = {"fp32": _runner(arts["fp32"], "plain")}
    for name in arts:
        if name != "fp32":
            runners |= {f"{name} MatMulNBits": _runner(arts[name], "nbits"), f"{name} Q/DQ": _runner(arts[name], "qdq")}
    out = {"questions": n, "acceptance": {}}
    for name, runner in runners.items():
        model._assistant, stats, exact = runner, SpecStats(), 0
        for ex in questions:
            plain = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0)
            spec = runtime.generate(model, prompt_text(ex), max_new_tokens=40, temperature=0.0, draft="assistant",
                                    num_draft_tokens=K, spec_stats=stats)
            exact += spec.tokens == plain.tokens
        out["acceptance"][name] = {"acceptance": round(stats.acceptance, 4), "accepted": stats.accepted,
                                   "drafted": stats.drafted, "greedy_exact": f"{exact}/{n}"}
        print("[bench-assistant-int8]", name, out["acceptance"][name], flush=True)
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


def _ratios(fns: dict, cycles: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(cycles):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    base = next(iter(fns))
    return {k: {"median_ms": round(1e3 * statistics.median(v), 3),
                "ratio_to_" + base: round(statistics.median(a / b for a, b in zip(v, times[base])), 3)}
            for k, v in times.items()}


class _Capture:
    """Drafts with ``runner`` and keeps the first round's arguments (the cache stays alive with them)."""

    def __init__(self, runner):
        self.runner, self.args = runner, None

    def draft(self, *args, **kw):
        if self.args is None:
            self.args = (args, kw)
        return self.runner.draft(*args, **kw)


def speed_demo(arts: dict[str, Path], cycles: int) -> dict:
    import runtime
    from demo.tasks import examples, prompt_text

    model = runtime.load(arts["fp32"], backend="onnxruntime", threads=2)
    runners = {"fp32": _runner(arts["fp32"], "plain"), "int8 MatMulNBits": _runner(arts["int8"], "nbits"),
               "int8 Q/DQ": _runner(arts["int8"], "qdq")}
    model._assistant = cap = _Capture(runners["fp32"])
    ex = [e for e in examples("heldout", 100, seed=0) if e.kind == "continue"][0]
    runtime.generate(model, prompt_text(ex), max_new_tokens=8, temperature=0.0, draft="assistant", num_draft_tokens=K)
    (cache, tokens, hidden, position, _), kw = cap.args
    fns = {k: (lambda r=r: r.draft(cache, tokens, hidden, position, K, **kw)) for k, r in runners.items()}
    return {"what": f"one draft() call of K={K} steps, batch 1, at position {int(position[0])}", **_ratios(fns, cycles)}


def _linear_inputs(model, args) -> dict[str, np.ndarray]:
    """Every nn.Linear's input and the final norm's output (the LM head's input) over one step, by module path."""
    import torch

    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_pre_hook(lambda m, a, name=name: [seen.setdefault(name, a[0])] and None))
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, out: [seen.setdefault("lm_head", out)] and None))
    with torch.no_grad():
        model.step(*args)
    for h in hooks:
        h.remove()
    return {k: v.reshape(-1, v.shape[-1]).numpy() for k, v in seen.items()}


def speed_12b_shaped(cycles: int) -> dict:
    import onnxruntime as ort
    import torch
    from dataclasses import replace

    from calib.assistant_int8 import ORT_GRAPH, write_int8
    from calib.stats import EDGES, Stats, TensorStats
    from exporter.assistant import AssistantConfig, AssistantModel, random_assistant
    from exporter.config import FULL, PRESETS, SLIDING
    from exporter.export_assistant import export_graph

    target = PRESETS["gemma4-12b"]
    text = replace(target.text, hidden_size=1024, intermediate_size=4096, num_layers=4, vocab_size=32768,
                   layer_types=(SLIDING,) * 3 + (FULL,))
    cfg = AssistantConfig(text=text, backbone_hidden_size=target.text.hidden_size)
    work = WORK / "shaped"
    names = {"fp32": work / "fp32" / "assistant.onnx", "int8": work / "int8" / "assistant.onnx"}
    rng = np.random.default_rng(0)
    t = target.text
    max_len, ring = 512, t.sliding_window + 8
    feeds = {"token_embeds": rng.standard_normal((1, 3840), np.float32),
             "hidden": rng.standard_normal((1, 3840), np.float32),
             "position": np.array([400]), "full_slots": np.arange(400), "full_len": np.array([400]),
             "sliding_start": np.array([0]), "sliding_end": np.array([400]),
             "full_key": rng.standard_normal((1, t.num_global_kv_heads, max_len, t.global_head_dim), np.float32),
             "full_value": rng.standard_normal((1, t.num_global_kv_heads, max_len, t.global_head_dim), np.float32),
             "ring_key": rng.standard_normal((1, t.num_kv_heads, ring, t.head_dim), np.float32),
             "ring_value": rng.standard_normal((1, t.num_kv_heads, ring, t.head_dim), np.float32)}
    model: AssistantModel = random_assistant(cfg)
    params = sum(p.numel() for p in model.parameters())
    if not names["int8"].is_file():
        shutil.rmtree(work, ignore_errors=True)
        for p in names.values():
            p.parent.mkdir(parents=True)
            export_graph(model, target, p)
        args = [torch.from_numpy(np.asarray(v)) for v in feeds.values()]
        stats = {}
        for name, x in _linear_inputs(model, args).items():
            stats[name] = TensorStats(np.zeros(x.shape[1], np.float32), np.zeros(len(EDGES) - 1, np.int64),
                                      sample_rows=0)
            stats[name].update(x)
        write_int8(names["int8"], Stats(stats, {"data": "one random step"}))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    exact = ort.SessionOptions()
    exact.intra_op_num_threads = 2
    exact.add_session_config_entry("session.x64quantprecision", "1")
    sessions = {"fp32": ort.InferenceSession(str(names["fp32"]), opts),
                "int8 MatMulNBits": ort.InferenceSession(str(names["int8"].parent / ORT_GRAPH), opts),
                "int8 Q/DQ": ort.InferenceSession(str(names["int8"]), exact)}
    fns = {k: (lambda s=s: s.run(["token"], feeds)) for k, s in sessions.items()}
    for fn in fns.values():
        fn()
    return {"what": f"one step of a random 12B-shaped assistant ({params / 1e6:.0f} M parameters: hidden 1024, 4 layers, "
                    "MLP 4096, vocab 32768 plain LM head), batch 1, 400 target positions", **_ratios(fns, cycles)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--cycles", type=int, default=200)
    a = p.parse_args(argv)
    arts = build()
    result = {"machine": {"cpu_threads": 2}, "K": K, "accuracy": accuracy(arts, a.questions),
              "speed_demo": speed_demo(arts, a.cycles), "speed_12b_shaped": speed_12b_shaped(max(20, a.cycles // 4))}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
