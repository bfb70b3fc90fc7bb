"""Speculative decoding through our runtime (``runtime.generate(..., draft=...)``), timed: part of ``make bench-speculative``.

`demo_pair`: the demo target (``demo/checkpoint``) exported with ``--speculative K`` (K = the demo assistant's
``num_assistant_tokens``) and the demo assistant exported into it (``exporter.export_assistant``), ONNX Runtime
engine.  Held-out questions (``demo.tasks.examples("heldout", ...)``, the split ``make eval`` scores), one at a time
(batch 1), greedy: plain, ``draft="assistant"`` and ``draft="prompt_lookup"``, each with K fixed and ``"auto"``;
``copy``: the ``continue`` questions whose answer copies the prompt for at least half its terms (the prompt gives
>= 10 terms), plain and prompt lookup only.  In one process, turns interleaved (each round runs every mode on every
question, the modes' order rotating per round); decode tokens/s = tokens after the first / seconds from the first
streamed token to the last (the prefill is not decode); per round the ratio of each mode's tokens/s to plain's in
that round, medians over rounds; and ``speedup_vs_plain_fastest_rounds``: each question's quickest round per mode,
summed (noise from other processes only adds time: on a busy machine the one-word answers, a decode step or two
each, are timed better so).  Acceptance and tokens per target pass from `SpecStats` (``mean_k``: drafts verified
per round, 0 for a plain step); every speculative answer is compared token for token with plain greedy's
(``mismatches`` must be 0).

`replay`: tokens/s against acceptance with a drafter that is not a model: it proposes the target's own greedy
continuation (recorded by a plain run) with each draft replaced by a wrong token with probability ``error`` (labelled
``replay``: an upper bound on what a drafter of that acceptance and no drafting cost gives), K = 2, 4, 6.

`assistant_step`: one assistant step (one draft) against one target decode step on the demo, interleaved.
Timing is never asserted anywhere.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO_SOFT_TOKENS = 70
MAX_NEW_TOKENS = 40
SHORT_ROUNDS = 4  # one-word answers: one or two decode steps each, a round is a few ms: more rounds per median
COPY_MIN_GIVEN = 10  # the "copy" questions: continue prompts of >= 10 terms (the answer repeats them)


def build_demo_pair(out: Path, k: int, log=print) -> Path:
    """The demo target with --speculative k and the demo assistant in it, ONNX Runtime engine (reused if built)."""
    py = sys.executable
    steps = (["-m", "exporter.export", "--model", "demo/checkpoint", "--out", str(out), "--max-len", "256",
              "--force", "--speculative", str(k)],
             ["-m", "graphs.build", "--artifact", str(out), "--backend", "onnxruntime"],
             ["-m", "exporter.export_assistant", "--assistant", "demo/assistant", "--artifact", str(out)],
             ["-m", "graphs.ort.assistant", "--artifact", str(out), "--if-engine"])  # as make export-assistant
    if (out / "ort").is_dir() and (out / "manifest.json").is_file() and "assistant" in (out / "manifest.json").read_text():
        if (out / "ort-assistant").is_dir():
            return out
        steps = steps[3:]  # built before the assistant's loop form existed
    for args in steps:
        log("[bench-speculative] " + " ".join(args))
        subprocess.run([py, *args], check=True, cwd=ROOT)
    return out


def assistant_k() -> int:
    import json

    return int(json.loads((ROOT / "demo" / "assistant" / "generation_config.json").read_text())["num_assistant_tokens"])


def _timed(model, prompt, media: dict, **kw) -> tuple[list[int], float]:
    """(answer tokens, decode seconds: first streamed token to the last) of one greedy generation."""
    import runtime

    it = runtime.generate(model, prompt, max_new_tokens=MAX_NEW_TOKENS, stream=True, detokenize=False,
                          temperature=0.0, **media, **kw)
    first = None
    for _ in it:
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    res = it.results
    return list((res[0] if isinstance(res, list) else res).tokens), end - first


def _questions(kinds: tuple[str, ...], n: int, min_given: int = 0) -> list:
    """``n`` held-out questions of ``kinds``; ``min_given``: ``continue`` questions whose prompt gives at least that
    many terms (the answer's last ``given`` of its 19 terms repeat the prompt's: >= 10 copies at least half)."""
    from demo.tasks import examples, prompt_text

    out = []
    for ex in examples("heldout", 40 * n, seed=0):
        given = ex.question.count(",") + 1 if ex.kind == "continue" else 0
        if ex.kind in kinds and len(out) < n and given >= min_given:
            out.append((ex.kind, prompt_text(ex), {"images": ex.images, "audio": ex.audio,
                                                   "max_soft_tokens": DEMO_SOFT_TOKENS}))
    return out


def interleaved(model, questions: list, modes: dict[str, dict], rounds: int, log=print) -> dict:
    """Each round: every mode on every question, modes rotating; per-mode medians of tokens/s ratios to plain."""
    from runtime.speculative.verify import SpecStats

    names = list(modes)
    reference = {i: _timed(model, p, m)[0] for i, (_, p, m) in enumerate(questions)}  # warm-up + plain tokens
    for name in names:  # warm up every mode (sessions, shapes)
        _timed(model, questions[0][1], questions[0][2], **modes[name])
    stats = {n: SpecStats() for n in names}
    per_round = {n: [] for n in names}
    mismatches = {n: 0 for n in names}
    tokens = {n: 0 for n in names}
    fastest = {n: [float("inf")] * len(questions) for n in names}  # per question, its quickest round
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        secs = {n: 0.0 for n in names}
        toks = {n: 0 for n in names}
        for i, (_, prompt, media) in enumerate(questions):
            for n in order:
                kw = dict(modes[n])
                if "draft" in kw:
                    kw["spec_stats"] = stats[n] if r == 0 else None
                got, s = _timed(model, prompt, media, **kw)
                mismatches[n] += got != reference[i]
                secs[n] += s
                fastest[n][i] = min(fastest[n][i], s)
                toks[n] += len(got) - 1
        for n in names:
            per_round[n].append(toks[n] / secs[n])
            tokens[n] += toks[n]
        log(f"[bench-speculative] round {r + 1}/{rounds}: " + ", ".join(f"{n} {per_round[n][-1]:.0f}" for n in names))
    out = {}
    for n in names:
        st = stats[n]
        row = {"decode_tokens_per_s": round(statistics.median(per_round[n]), 1),
               "speedup_vs_plain": round(statistics.median(a / b for a, b in zip(per_round[n], per_round["plain"])), 3),
               "speedup_vs_plain_fastest_rounds": round(sum(fastest["plain"]) / sum(fastest[n]), 3),
               "mismatches_vs_plain_greedy": mismatches[n], "answers_compared": rounds * len(questions)}
        if "draft" in modes[n]:
            passes = st.verify_calls + st.decode_steps
            row.update(acceptance=round(st.acceptance, 3) if st.acceptance is not None else None,
                       drafted=st.drafted, accepted=st.accepted, verify_calls=st.verify_calls,
                       plain_steps=st.decode_steps,
                       tokens_per_target_pass=round((tokens[n] / rounds) / passes, 2) if passes else None,
                       mean_k=round(float(np.mean(st.k_per_round)), 2) if st.k_per_round else None)
        out[n] = row
    return out


def demo_pair(artifact: Path, k: int, *, rounds: int, n_continue: int, n_short: int, threads: int, log=print) -> dict:
    import runtime
    from demo.tasks import SHORT_KINDS

    model = runtime.load(artifact, backend="onnxruntime", threads=threads)
    modes = {"plain": {},
             f"assistant_k{k}": {"draft": "assistant", "num_draft_tokens": k},
             "assistant_auto": {"draft": "assistant", "num_draft_tokens": "auto"},
             f"prompt_lookup_k{k}": {"draft": "prompt_lookup", "num_draft_tokens": k},
             "prompt_lookup_auto": {"draft": "prompt_lookup", "num_draft_tokens": "auto"}}
    out = {"continue": {"questions": n_continue, **interleaved(model, _questions(("continue",), n_continue), modes,
                                                               rounds, log)}}
    lookup = {"plain": {}, f"prompt_lookup_k{k}": modes[f"prompt_lookup_k{k}"],
              "prompt_lookup_auto": modes["prompt_lookup_auto"]}
    out["copy"] = {"questions": n_continue, "min_given": COPY_MIN_GIVEN, "what": "continue questions whose answer "
                   f"copies the prompt for at least half its terms (given >= {COPY_MIN_GIVEN} of 19)",
                   **interleaved(model, _questions(("continue",), n_continue, COPY_MIN_GIVEN), lookup, rounds, log)}
    short = {"plain": {}, "assistant_auto": modes["assistant_auto"], "prompt_lookup_auto": modes["prompt_lookup_auto"]}
    out["one_word_kinds"] = {"questions": n_short, "kinds": list(SHORT_KINDS),
                             "rounds": SHORT_ROUNDS * rounds,
                             **interleaved(model, _questions(SHORT_KINDS, n_short), short, SHORT_ROUNDS * rounds, log)}
    out["assistant_step"] = assistant_step(model, threads)
    return out


def assistant_step(model, threads: int, cycles: int = 200) -> dict:
    """One assistant step (one draft) and a verify call over one token vs one target decode step at a 40-token context, interleaved."""
    from runtime.assistant import AssistantRunner
    from runtime.prompt import PrefillInputs

    b = model.backend
    ids = list(range(3, 43))
    cache = b.new_cache(1, model.max_len)
    b.prefill(PrefillInputs(np.array([ids]), np.array([0]), np.array([len(ids)])), cache)
    _, hidden = b.verify(np.array([[ids[-1]]], np.int64), [len(ids) - 1], cache)
    h = np.array(hidden[0, 0], np.float32)[None]
    runner = AssistantRunner(model.root, model.manifest, threads=threads)
    p = len(ids)
    dec, ast, ver = [], [], []
    for _ in range(cycles):
        t0 = time.perf_counter()
        b.verify(np.array([[ids[-1]]], np.int64), [p], cache)
        ver.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b.decode([ids[-1]], [p], cache, copy=False)
        t1 = time.perf_counter()
        runner.draft(cache, [ids[-1]], h, [p], 1, written=[p + 1])
        t2 = time.perf_counter()
        dec.append(t1 - t0)
        ast.append(t2 - t1)
    dec, ast, ver = dec[10:], ast[10:], ver[10:]
    return {"decode_step_ms": round(1e3 * statistics.median(dec), 3), "assistant_step_ms": round(
        1e3 * statistics.median(ast), 3), "verify_1_token_ms": round(1e3 * statistics.median(ver), 3),
        "ratio_assistant_to_decode": round(statistics.median(
            a / d for a, d in zip(ast, dec)), 3), "cycles": len(dec)}


class Replay:
    """Drafts the recorded greedy continuation, each draft wrong with probability ``error`` (a seeded generator)."""

    def __init__(self, reference: np.ndarray, error: float, vocab: int, seed: int = 0):
        self.ref, self.error, self.vocab = reference, error, vocab
        self.rng = np.random.default_rng(seed)

    def __call__(self, tokens: np.ndarray, k: int) -> list[int]:
        n = len(tokens)
        out = []
        for t in self.ref[n:n + k].tolist():
            out.append((t + 1 + int(self.rng.integers(0, self.vocab - 1))) % self.vocab
                       if self.rng.random() < self.error else t)
        return out


def replay(artifact: Path, *, prompt_ids: list[int], new_tokens: int, ks=(2, 4, 6),
           errors=(0.0, 0.2, 0.4, 0.6, 0.8), rounds: int, threads: int, log=print) -> dict:
    """Tokens/s of the replay drafter against plain decode on one prompt (token ids), interleaved, medians."""
    import runtime
    from runtime.speculative import verify as spec

    model = runtime.load(artifact, backend="onnxruntime", threads=threads)
    vocab = model.config["text"]["vocab_size"]

    def run(**kw):
        it = runtime.generate(model, prompt_ids, max_new_tokens=new_tokens, stream=True, detokenize=False,
                              temperature=0.0, stop=[], **kw)
        first = None
        for _ in it:
            first = first or time.perf_counter()
        res = it.results
        return list((res[0] if isinstance(res, list) else res).tokens), time.perf_counter() - first

    ref, _ = run()
    ref_full = np.array(prompt_ids + ref, np.int64)
    configs = [(k, e) for k in ks for e in errors]
    ratios = {c: [] for c in configs}
    stats = {c: spec.SpecStats() for c in configs}
    mismatches = 0
    try:
        for r in range(rounds + 1):  # round 0: warm-up
            for k, e in configs:
                spec.DRAFTERS["replay"] = Replay(ref_full, e, vocab, seed=r)
                _, plain_s = run()
                got, s = run(draft="replay", num_draft_tokens=k, spec_stats=stats[(k, e)] if r else None)
                mismatches += got != ref
                if r:
                    ratios[(k, e)].append(plain_s / s)
            log(f"[bench-speculative] replay round {r}/{rounds}")
    finally:
        spec.DRAFTERS.pop("replay", None)
    rows = []
    for k, e in configs:
        st = stats[(k, e)]
        rows.append({"k": k, "error": e, "acceptance": round(st.acceptance, 3) if st.acceptance is not None else None,
                     "tokens_per_target_pass": round(rounds * (len(ref) - 1) / max(st.verify_calls + st.decode_steps, 1), 2),
                     "speedup_vs_plain": round(statistics.median(ratios[(k, e)]), 3)})
    return {"drafter": "replay (the target's own greedy continuation, each draft wrong with probability error; "
                       "not a real drafter: no drafting cost)", "new_tokens": new_tokens, "prompt_tokens": len(prompt_ids),
            "rounds": rounds, "mismatches_vs_plain_greedy": mismatches, "rows": rows}
