"""How `bench.runtime` measures: every case's stacks in interleaved cycles, compared cycle by cycle.

`schedule` interleaves the stacks (and the bandwidth probe) so a cycle's runs share the machine's load at that
moment; `cycle_ratios` pairs values of the same cycle; `run_case` loads a case's stacks, runs its cycles and
reduces them to medians, ratios, decode bounds (`weight_bytes_read` over the `bandwidth_probe`) and greedy
agreement.  Also here: kernels per decode step (`kernel_count`, ONNX Runtime's profiler) and peak RSS
(`peak_rss`, a fresh child process per stack).  Timing is never asserted; tests cover the arithmetic.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.paths import ROOT
from bench.runtime_stacks import KINDS, WINDOW, Stack, Timing

__all__ = ["Case", "agreement", "bandwidth_probe", "cases", "cycle_ratios", "decode_bound", "decode_graph",
           "kernel_count", "machine_info", "median_or_none", "peak_rss", "rss_child", "run_case", "schedule",
           "weight_bytes_read"]

REF = "genai-fp32"
SAME_PRECISION = {"fp32": "genai-fp32", "int8": "genai-int8", "int4": "genai-int4"}
# Consumers that read only a few rows of a table per decode step (embedding lookups, RoPE tables).
ROW_READERS = {"Gather", "GatherND", "GatherElements", "RotaryEmbedding"}
# the entry point, run again as the peak-RSS child process
ENTRY = ROOT / "bench" / "runtime.py"


# ---------------------------------------------------------------------------------------------- arithmetic
def schedule(stacks: list[str], cycles: int, extra: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """Interleaved order: every cycle runs every stack (and the extra probes) once, in the same order."""
    if cycles < 1:
        raise ValueError(f"cycles={cycles}; expected at least 1")
    return [(c, s) for c in range(cycles) for s in (*stacks, *extra)]


def cycle_ratios(values: dict[str, list[float]], ref: str, *, higher_is_better: bool = True) -> dict[str, list[float]]:
    """Per-cycle ratio of every stack to ``ref`` in the same cycle (> 1 means faster than ``ref``).

    ``values[stack][c]`` is a rate (higher is better) or a time (``higher_is_better=False``: the ratio is
    ref / stack).  Cycles where either value is missing or not positive are skipped."""
    if ref not in values:
        raise KeyError(f"reference stack {ref!r} was not measured; have {sorted(values)}")
    out = {}
    for name, vals in values.items():
        r = []
        for v, rv in zip(vals, values[ref]):
            if v is None or rv is None or not (v > 0 and rv > 0):
                continue
            r.append(v / rv if higher_is_better else rv / v)
        out[name] = r
    return out


def median_or_none(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def decode_bound(weight_bytes: int, bandwidth_bytes_s: float) -> float:
    """Upper bound on decode steps per second when every step reads all weights once at the measured bandwidth."""
    if weight_bytes <= 0 or bandwidth_bytes_s <= 0:
        raise ValueError(f"weight_bytes={weight_bytes}, bandwidth={bandwidth_bytes_s}: both must be positive")
    return bandwidth_bytes_s / weight_bytes


def agreement(tokens: list[int], reference: list[int]) -> int:
    """Number of leading positions where ``tokens`` equals ``reference`` (greedy agreement)."""
    n = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        n += 1
    return n


_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16, 17: 8,
         18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}  # onnx.TensorProto data types -> bits per element


def weight_bytes_read(onnx_path: Path) -> int:
    """Bytes of initializers one decode step reads: all of them except those consumed only by row readers."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    consumers: dict[str, set[str]] = {}

    def visit(graph):
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
            for attr in node.attribute:
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(g)

    visit(model.graph)
    total = 0
    for init in model.graph.initializer:
        ops = consumers.get(init.name, set())
        if not ops or ops <= ROW_READERS:
            continue
        n = 1
        for d in init.dims:
            n *= d
        total += n * _BITS.get(init.data_type, 32) // 8
    return total


# ---------------------------------------------------------------------------------------------- machine
def bandwidth_probe(buffer_mib: int = 512, threads: int = 2, repeats: int = 3):
    """Weight-read bandwidth: ``threads`` threads summing halves of a buffer larger than the caches (best of N)."""
    import numpy as np

    buf = np.ones(buffer_mib * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(buf, threads)

    def probe() -> float:
        out = [0.0] * threads

        def work(i):
            out[i] = float(parts[i].sum())

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return buf.nbytes / (time.perf_counter() - t0)

    probe()  # touch
    return lambda: max(probe() for _ in range(repeats))


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"nproc": os.cpu_count(), "cpu": model, "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": load}


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------------------------- profiling
def _decode_feeds(stack: Stack, sess, past: int) -> dict:
    """One decode step's inputs at ``past`` cached tokens, batch 1."""
    import numpy as np

    if stack.kind == "ours":
        from runtime.manifest import read_manifest
        from runtime.ort_backend import zero_cache

        manifest = read_manifest(stack.path, verify=False)
        feeds = zero_cache(manifest, "decode", 1, int(manifest["max_len"]), engine=True)
        ids, lens = np.array([[5]], dtype=np.int64), np.array([past], dtype=np.int64)
        if manifest.get("engines", {}).get("onnxruntime", {}).get("one_graph"):  # decode = a one-token prefill
            from runtime.ort_backend import prefill_feeds
            from runtime.prompt import PrefillInputs

            feeds.update(prefill_feeds(PrefillInputs(input_ids=ids, past_lens=lens,
                                                     seq_lens=np.ones(1, np.int64)), manifest))
        else:
            feeds.update(input_ids=ids, past_lens=lens)
        from runtime.ort_backend import engine_feeds

        return engine_feeds(sess, feeds, manifest)  # + the attention geometry a built engine takes
    window = json.loads((stack.path / "genai_config.json").read_text())["model"]["decoder"].get(
        "sliding_window", {}).get("window_size", past)
    dims = {"batch_size": 1, "sequence_length": 1, "past_sequence_length": past, "total_sequence_length": past + 1,
            "past_sliding_length": max(window, past)}  # its windowed caches hold at least the window
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) else dims[d] for d in i.shape]
        if i.name == "attention_mask":
            feeds[i.name] = np.ones(shape, dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.full(shape, past, dtype=np.int64)
        elif i.name == "input_ids":
            feeds[i.name] = np.full(shape, 5, dtype=np.int64)
        else:
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
    return feeds


def decode_graph(stack: Stack) -> Path:
    """The graph file ONNX Runtime runs for one decode step of ``stack``."""
    if stack.kind == "genai":
        return stack.path / json.loads((stack.path / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    manifest = json.loads((stack.path / "manifest.json").read_text())
    engine = manifest.get("engines", {}).get("onnxruntime", {})
    return stack.path / engine.get("decode", manifest["graphs"]["decode"]["file"])


def kernel_count(stack: Stack, threads: int, past: int = 128, runs: int = 10) -> dict:
    """ONNX Runtime kernels run in one decode step (its profiler's Node events inside a profiled run; the time shares
    summed over ``runs`` runs).  Our caches
    are bound in place, as the runtime binds them (a plain ``run`` would copy every ring in ``TensorScatter``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        opts.profile_file_prefix = str(Path(tmp) / stack.name)
        sess = ort.InferenceSession(str(decode_graph(stack)), opts, providers=["CPUExecutionProvider"])
        feeds = _decode_feeds(stack, sess, past)
        bind = sess.io_binding()
        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        for k, v in values.items():
            bind.bind_ortvalue_input(k, v)
        for out in sess.get_outputs():
            past_of = values.get(out.name.replace("present", "past", 1)) if stack.kind == "ours" else None
            if past_of is not None:  # as `runtime.ort_backend` runs it: caches written in place
                bind.bind_ortvalue_output(out.name, past_of)
            else:
                bind.bind_output(out.name)
        for _ in range(2 + runs):  # the first runs also allocate; the last ``runs`` are counted
            sess.run_with_iobinding(bind)
        events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-runs:]
    kernels = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    ops: dict[str, float] = {}
    per_run = []
    for r in model_runs:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        nodes = [e for e in kernels if lo <= e["ts"] <= hi]
        per_run.append(len(nodes))
        for e in nodes:
            op = e.get("args", {}).get("op_name", "?")
            ops[op] = ops.get(op, 0.0) + e["dur"]
    total = sum(ops.values()) or 1.0
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:6]
    return {"kernels": max(per_run), "top_ops_time_share": {k: round(v / total, 3) for k, v in top},
            "profiled_runs": len(model_runs)}


# ---------------------------------------------------------------------------------------------- peak RSS
def rss_child(kind: str, path: str, threads: int, prompt_len: int, new_tokens: int) -> None:
    """Runs in a fresh process: imports, load, one generation; prints VmHWM at each point as JSON."""
    if kind == "ours":
        import runtime  # noqa: F401
    elif kind == "genai":
        import onnxruntime_genai  # noqa: F401
    else:
        import transformers  # noqa: F401
    after_imports = _vm("VmHWM")
    stack = KINDS[kind](Path(path), threads)
    after_load = _vm("VmHWM")
    stack.run([make_prompt(prompt_len, 0)], new_tokens)
    print(json.dumps({"after_imports": after_imports, "after_load": after_load, "peak": _vm("VmHWM")}))


def peak_rss(stack: Stack, threads: int, prompt_len: int, new_tokens: int) -> dict:
    cmd = [sys.executable, str(ENTRY), "--rss-child", stack.kind, str(stack.path),
           "--threads", str(threads), "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
    d = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    return {"peak_mib": round(d["peak"] / mib), "imports_mib": round(d["after_imports"] / mib),
            "artifact_mib": round((d["peak"] - d["after_imports"]) / mib),
            "after_load_mib": round(d["after_load"] / mib)}


# ---------------------------------------------------------------------------------------------- cases
def make_prompt(length: int, seed: int) -> list[int]:
    """bos + seeded ids from the ordinary part of the vocabulary (no special tokens)."""
    import numpy as np

    rng = np.random.default_rng(1000 + seed)
    return [2] + rng.integers(1000, 200_000, size=length - 1).tolist()


@dataclass
class Case:
    name: str
    stacks: list[str]
    prompt_len: int
    batch: int
    new_tokens: int
    cycles: int
    max_len: int = 512  # genai's KV capacity (ours: the artifact's)


def cases(quick: bool, cycles: int | None = None, new_tokens: int | None = None) -> list[Case]:
    out = _cases(quick)
    for c in out:
        c.cycles = cycles or c.cycles
        c.new_tokens = new_tokens or c.new_tokens
    return out


def _cases(quick: bool) -> list[Case]:
    q = quick
    n = 16 if q else 64
    quantized = ["genai-fp32", "genai-int8", "genai-int4", "ours-fp32-512", "ours-int8", "ours-fp8", "ours-int4",
                 f"ours-int8{WINDOW}", f"ours-int4{WINDOW}"]
    return [
        Case("fp32, batch 1, 128-token prompt",
             ["genai-fp32", "ours-fp32-512", "ours-fp32-4096", f"ours-fp32-512{WINDOW}", "transformers"],
             128, 1, n, 1 if q else 5),
        Case("quantized, batch 1, 128-token prompt", quantized, 128, 1, n, 1 if q else 3),
        Case("fp32, batch 1, 2048-token prompt (max_len 4096)", ["genai-fp32", "ours-fp32-4096"],
             512 if q else 2048, 1, n, 1 if q else 3, 4096),
        Case("batch 4, 128-token prompts", quantized, 128, 4, n, 1 if q else 3),
    ]


def run_case(case: Case, available: dict[str, Stack], threads: int, probe, reference: list[int] | None) -> dict:
    names = [s for s in case.stacks if s in available]
    print(f"[bench] case: {case.name}: {', '.join(names)}; {case.cycles} cycles", flush=True)
    loaded = {}
    for s in names:
        t0 = time.perf_counter()
        loaded[s] = available[s].load(threads)
        print(f"[bench]   loaded {s} in {time.perf_counter() - t0:.1f} s", flush=True)
    prompts = [make_prompt(case.prompt_len, i) for i in range(case.batch)]
    for s in names:  # a short warm-up run of each stack, not timed
        loaded[s].run(prompts, min(4, case.new_tokens), case.max_len)
    runs: dict[str, list[Timing]] = {s: [] for s in names}
    bandwidth: list[float] = []
    for c, s in schedule(names, case.cycles, extra=("bandwidth",)):
        if s == "bandwidth":
            bandwidth.append(probe())
            continue
        runs[s].append(loaded[s].run(prompts, case.new_tokens, case.max_len))
        t = runs[s][-1]
        print(f"[bench]   cycle {c + 1}: {s:16s} prefill {t.prefill_s * 1e3:8.0f} ms  "
              f"decode {t.decode_tok_s:6.1f} tok/s", flush=True)
    del loaded
    gc.collect()
    warm = {s: runs[s][0] for s in names}  # the first timed run's tokens give the greedy agreement
    if reference is None and "transformers" in warm and case.batch == 1 and case.prompt_len == 128:
        reference = warm["transformers"].tokens[0]

    decode = {s: [t.decode_tok_s for t in runs[s]] for s in names}
    prefill = {s: [t.prefill_s for t in runs[s]] for s in names}
    out = {"prompt_len": case.prompt_len, "batch": case.batch, "new_tokens": case.new_tokens, "cycles": case.cycles,
           "bandwidth_gb_s": [round(b / 1e9, 2) for b in bandwidth], "stacks": {}}
    refs = {"genai-fp32": REF, "ours-fp32": "ours-fp32-512"}
    ratios = {}
    for label, ref in refs.items():
        if ref in names:
            ratios[label] = (cycle_ratios(decode, ref), cycle_ratios(prefill, ref, higher_is_better=False))
    for s in names:
        st = available[s]
        rec = {
            "decode_tok_s": round(statistics.median(decode[s]), 2),
            "prefill_ms": round(statistics.median(prefill[s]) * 1e3, 1),
            "decode_steps": runs[s][0].decode_steps,
        }
        for label, (dr, pr) in ratios.items():
            rec[f"decode_vs_{label}"] = _r(median_or_none(dr[s]))
            rec[f"prefill_vs_{label}"] = _r(median_or_none(pr[s]))
        same = SAME_PRECISION.get(st.precision)
        if st.kind == "ours" and same in names:
            rec["decode_vs_genai_same_precision"] = _r(median_or_none(cycle_ratios(decode, same)[s]))
            rec["prefill_vs_genai_same_precision"] = _r(median_or_none(
                cycle_ratios(prefill, same, higher_is_better=False)[s]))
        if st.kind != "transformers":
            wb = weight_bytes_read(decode_graph(st))
            bounds = [decode_bound(wb, b) for b in bandwidth]
            rec["weight_bytes_per_step"] = wb
            rec["decode_bound_tok_s"] = round(statistics.median(bounds), 1)
            rec["share_of_bound"] = _r(median_or_none([r.decode_tok_s / b for r, b in zip(runs[s], bounds)]))
        if reference is not None and case.batch == 1 and case.prompt_len == 128:
            rec["greedy_equal_to_transformers"] = agreement(warm[s].tokens[0], reference)
        out["stacks"][s] = rec
    if "genai-fp32" in warm and "ours-fp32-4096" in warm:
        out["greedy_ours_fp32_4096_vs_genai_fp32"] = agreement(warm["ours-fp32-4096"].tokens[0],
                                                               warm["genai-fp32"].tokens[0])
    out["tokens"] = {s: warm[s].tokens[0] for s in names}
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
