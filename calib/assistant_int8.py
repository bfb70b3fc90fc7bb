"""W8A8 INT8 for the drafting assistant's graph, calibrated on the assistant's own inputs in real drafting rounds.

`exporter.export_assistant` traces the fp32 step graph; `quantize_int8` then rewrites it in place:

1. statistics: the target runs greedy speculative generation (`runtime.generate`, ``draft="assistant"``, the
   artifact's ONNX Runtime engine) on calibration prompts (`calib.data`: the built-in ``assistant`` set, prompts
   with long answers, or ``--data``), the staged fp32 assistant drafting through `_Recorder` (the runner's drafting
   loop on a session whose every Linear input is an extra output): every draft step of every round adds its Linear
   inputs to `calib.stats.TensorStats`;
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

import numpy as np

from exporter.export_assistant import GRAPH, export_assistant, target_caches
from runtime.staging import error_message

__all__ = ["collect_assistant_stats", "quantize_int8", "write_int8"]

ORT_GRAPH = "assistant.ort.onnx"  # beside GRAPH: the 8-bit MatMulNBits form ONNX Runtime runs
SCALES = "int8_scales.json"


class _Recorder:
    """Stands in for `runtime.assistant.AssistantRunner` in `runtime.generate`: drafts as it does (the same inputs,
    steps and ranges: `runtime.assistant.clean_ranges`) with the fp32 graph at ``graph``, and adds every Linear
    input of every step to ``stats`` (activation value name -> TensorStats)."""

    def __init__(self, graph: Path, root: Path, manifest: dict, names: list[str]):
        from calib.stats import augmented_session
        from exporter.config import ModelConfig
        from runtime.assistant import TargetEmbedding

        self.session = augmented_session(graph.parent, graph.name, names)
        self.names, self.stats, self.steps = names, {}, 0
        self.embedding = TargetEmbedding(root, manifest)
        caches = target_caches(ModelConfig.from_json_dict(manifest["model_config"]))
        order = [s["name"] for s in manifest["graphs"]["decode"]["inputs"]
                 if s["name"].startswith(("past_key_", "past_value_"))]
        self.cache_index = {k: order.index(v) for k, v in caches.items()}
        self.window = int(manifest["model_config"]["text"]["sliding_window"])

    def draft(self, cache, tokens, hidden, position, num_tokens: int, *, written=None):
        from calib.stats import EDGES, TensorStats
        from runtime.assistant import Drafts, clean_ranges

        position = np.asarray(position, np.int64).reshape(-1)
        values = {k: cache[i] for k, i in self.cache_index.items()}
        shape = values["ring_key"].shape  # an OrtValue's is a method, an array's a tuple
        ring = int((shape() if callable(shape) else shape)[2])
        feeds = dict(values, position=position, **clean_ranges(position, position if written is None else written,
                                                               self.window, ring))
        feeds["full_slots"] = np.arange(max(1, int(feeds["full_len"].max())), dtype=np.int64)
        token, hidden = np.asarray(tokens, np.int64).reshape(-1), np.ascontiguousarray(hidden, np.float32)
        out_tokens, out_logits = [], []
        for _ in range(num_tokens):
            feeds |= {"token_embeds": self.embedding(token), "hidden": hidden}
            logits, hidden, token, *acts = self.session.run(["logits", "next_hidden", "token", *self.names], feeds)
            for name, x in zip(self.names, acts):
                if name not in self.stats:
                    self.stats[name] = TensorStats(np.zeros(x.shape[-1], np.float32), np.zeros(len(EDGES) - 1, np.int64),
                                                   sample_rows=0)
                self.stats[name].update(x)
            out_tokens.append(token)
            out_logits.append(logits)
            self.steps += 1
        return Drafts(np.stack(out_tokens, 1), np.stack(out_logits, 1), hidden)


def collect_assistant_stats(graph: Path, artifact: Path, *, data_dir=None, max_new_tokens: int = 32, log=print):
    """`calib.stats.Stats` of the Linear inputs of the fp32 assistant graph ``graph`` (module -> TensorStats) over
    the drafting rounds of greedy speculative generation on the calibration prompts, by the target of ``artifact``."""
    import onnx_ir as ir

    import runtime
    from calib.data import prompts_for
    from calib.stats import Stats
    from exporter.linears import find_linears
    from runtime.errors import InputError

    model = runtime.load(artifact, backend="onnxruntime")
    manifest = model.manifest
    by_value: dict[str, list[str]] = {}
    for module, lin in find_linears(ir.load(str(graph))).items():
        by_value.setdefault(lin.activation.name, []).append(module)
    recorder = _Recorder(graph, Path(artifact), manifest, sorted(by_value))
    model._assistant = recorder  # runtime.generate drafts through it (LoadedModel.assistant_runner) ...
    model.manifest = dict(manifest, assistant={"file": str(graph)})  # ... once check_draft sees an assistant
    prompts = prompts_for(data_dir, "assistant", manifest["model_config"],
                          has_tokenizer=bool(manifest.get("tokenizer")))
    k = int(model.backend.max_draft_tokens or 0)
    if k < 1:
        raise ValueError(f"{artifact}: exported without --speculative K, so its target cannot verify drafts and the "
                         "assistant has no drafting rounds to calibrate on; export it with `make export SPECULATIVE=K`")
    ran, skipped = 0, []
    for p in prompts.prompts:
        try:
            runtime.generate(model, p.text if p.ids is None else p.ids, images=p.images or None,
                             audio=p.audio or None, max_new_tokens=max_new_tokens, temperature=0.0,
                             max_soft_tokens=prompts.max_soft_tokens, draft="assistant", num_draft_tokens=k)
            ran += 1
        except InputError as e:  # too long for max_len, or the artifact cannot draft: say which
            if "max_len" not in str(e):
                raise ValueError(f"{p.name}: speculative generation with the assistant failed: {e}") from None
            skipped.append(p.name)
    if skipped:
        log(f"[assistant-int8] skipped {len(skipped)} prompt(s) longer than the artifact's max_len, e.g. {skipped[0]}")
    missing = sorted(m for v, ms in by_value.items() if v not in recorder.stats for m in ms)
    if not ran or missing:
        raise ValueError(f"{prompts.source}: the assistant drafted {recorder.steps} steps on {ran} prompt(s); no "
                         f"statistics for {missing or 'any Linear'}")
    log(f"[assistant-int8] statistics: {recorder.steps} draft steps over {ran} prompts from {prompts.source}")
    tensors = {m: recorder.stats[v] for v, ms in by_value.items() for m in ms}
    return Stats(tensors, {"data": prompts.source, "prompts": ran, "draft_steps": recorder.steps,
                           "max_new_tokens": max_new_tokens})


def quantize_int8(path: Path, *, artifact: str | Path, smoothquant: float | None = 0.5, data_dir=None,
                  max_new_tokens: int = 32, log=print) -> dict:
    """`export_assistant`'s rewrite: statistics on drafting rounds (`collect_assistant_stats`), then `write_int8`."""
    if smoothquant is not None and not 0.0 <= smoothquant <= 1.0:
        raise ValueError(f"SmoothQuant alpha={smoothquant}; expected a value in [0, 1] or none")
    stats = collect_assistant_stats(path, Path(artifact), data_dir=data_dir, max_new_tokens=max_new_tokens, log=log)
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
    if problem is None and a.data is not None:  # before the export traces anything
        from calib.data import load_dir

        try:
            load_dir(a.data)
        except (ValueError, OSError) as e:
            problem = f"--data: {error_message(e)}"
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
