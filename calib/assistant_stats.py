"""The assistant's activation statistics on real drafting rounds: what its INT8 (`calib.assistant_int8`) and INT4 AWQ
(`calib.assistant_int4`) calibrations share.

The target runs greedy speculative generation (`runtime.generate`, ``draft="assistant"``, the artifact's ONNX Runtime
engine) on calibration prompts (`calib.data`: the built-in ``assistant`` set, prompts with long answers, or a
directory), the staged fp32 assistant drafting through `_Recorder` (the runner's drafting loop on a session whose
every Linear input is an extra output): every draft step of every round adds its Linear inputs to
`calib.stats.TensorStats` (with ``sample_rows`` activation rows kept per input for AWQ's search; W8A8 needs none).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporter.export_assistant import target_caches

__all__ = ["collect_assistant_stats", "data_dir_problem"]


class _Recorder:
    """Stands in for `runtime.assistant.AssistantRunner` in `runtime.generate`: drafts as it does (the same inputs,
    steps and ranges: `runtime.assistant.clean_ranges`) with the fp32 graph at ``graph``, and adds every Linear
    input of every step to ``stats`` (activation value name -> TensorStats)."""

    def __init__(self, graph: Path, root: Path, manifest: dict, names: list[str], sample_rows: int = 0):
        from calib.stats import augmented_session
        from exporter.config import ModelConfig
        from runtime.assistant import TargetEmbedding

        self.session = augmented_session(graph.parent, graph.name, names)
        self.names, self.stats, self.steps, self.sample_rows = names, {}, 0, sample_rows
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
                                                   sample_rows=self.sample_rows)
                self.stats[name].update(x)
            out_tokens.append(token)
            out_logits.append(logits)
            self.steps += 1
        return Drafts(np.stack(out_tokens, 1), np.stack(out_logits, 1), hidden)


def collect_assistant_stats(graph: Path, artifact: Path, *, data_dir=None, max_new_tokens: int = 32, sample_rows: int = 0,
                            tag: str = "assistant", log=print):
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
    recorder = _Recorder(graph, Path(artifact), manifest, sorted(by_value), sample_rows)
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
        log(f"[{tag}] skipped {len(skipped)} prompt(s) longer than the artifact's max_len, e.g. {skipped[0]}")
    missing = sorted(m for v, ms in by_value.items() if v not in recorder.stats for m in ms)
    if not ran or missing:
        raise ValueError(f"{prompts.source}: the assistant drafted {recorder.steps} steps on {ran} prompt(s); no "
                         f"statistics for {missing or 'any Linear'}")
    log(f"[{tag}] statistics: {recorder.steps} draft steps over {ran} prompts from {prompts.source}")
    tensors = {m: recorder.stats[v] for v, ms in by_value.items() for m in ms}
    return Stats(tensors, {"data": prompts.source, "prompts": ran, "draft_steps": recorder.steps,
                           "max_new_tokens": max_new_tokens})


def data_dir_problem(data_dir: str | None) -> str | None:
    """The CLIs' ``--data`` check, before an export traces anything: None where ``data_dir`` is None or holds
    calibration prompts `calib.data.load_dir` reads, else the error line naming the option."""
    if data_dir is None:
        return None
    from calib.data import load_dir
    from runtime.staging import error_message

    try:
        load_dir(data_dir)
    except (ValueError, OSError) as e:
        return f"--data: {error_message(e)}"
    return None
