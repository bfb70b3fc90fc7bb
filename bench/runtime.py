"""Speed benchmark (``make bench-runtime``): our artifacts against onnxruntime-genai and transformers, side by side.

On the bench checkpoint (`bench/make_bench_checkpoint.py`: 234 M parameters, the 12B's structure), this builds

- ours: ``exporter.export`` at max_len 512 and 4096, ``graphs.build --backend onnxruntime``, and
  ``calib.calibrate`` INT8 / FP8 / INT4 of the max_len-512 artifact (each then built the same way): the commands
  behind ``make export`` / ``make calibrate`` / ``make build-engine``, rebuilt whenever the code they depend on
  changed (a hash of the source directories, committed or not), so the numbers are for the code as it is
  (``--reuse`` keeps existing ones regardless).  A precision ``calib.calibrate`` refuses is skipped and its reason
  recorded.  ``*-win`` stacks: copies of the fp32-512, INT8 and INT4 artifacts whose engine is built with
  ``--ort-sliding window`` (text and audio only, as onnxruntime-genai's gemma4_text models);
- onnxruntime-genai's own builder output at fp32 / int8 / int4 (``bench/genai_build.py``, reused while the
  checkpoint and the genai version are unchanged);
- transformers (eager attention, torch with the same thread count) as the floor and the greedy reference;

then, in ONE process, runs each case's stacks in interleaved cycles (A, B, C, ..., repeated) with the same number
of intra-op threads, and reports medians of per-cycle ratios (a cycle's stacks share the machine's load at that
moment, so ratios stay meaningful on a busy machine where absolute numbers do not).  The machine's weight-read
bandwidth is measured inside every cycle too (two threads summing a buffer larger than the caches), giving the
decode bound of each stack: bytes of weights one decode step reads / bandwidth.  Stacks compared in a case are
loaded together; cases run one after another and free their stacks, so the process holds one case's stacks at a
time (a few GiB), not all of them.

Also measured: greedy agreement with transformers per stack (the first position where the tokens differ), peak
RSS of each stack (a fresh child process per stack: VmHWM from /proc/self/status after loading and one
generation, minus the child's VmHWM after its imports), and kernels per decode step (ONNX Runtime's profiler, one
step).  Results: ``bench/results/runtime.json`` (``latest``; ``--baseline`` also stores the run as ``baseline``)
and a Markdown table printed for the README.  Timing is never asserted here; tests cover the arithmetic.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results" / "runtime.json"
# suffix of a stack whose engine was built with `--ort-sliding window` (GroupQueryAttention windowed sliding caches)
WINDOW = "-win"
CHECKPOINT = ROOT / "bench" / "checkpoints" / "bench-234m"
REF = "genai-fp32"
SAME_PRECISION = {"fp32": "genai-fp32", "int8": "genai-int8", "int4": "genai-int4"}
# Consumers that read only a few rows of a table per decode step (embedding lookups, RoPE tables).
ROW_READERS = {"Gather", "GatherND", "GatherElements", "RotaryEmbedding"}


# ---------------------------------------------------------------------------------------------- arithmetic
@dataclass
class Timing:
    """One run of one stack: prefill = prompt to first token; decode = the following steps."""

    prefill_s: float
    decode_s: float
    decode_steps: int
    batch: int
    tokens: list[list[int]] = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second per sequence (steps per second)."""
        return self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")


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


# ---------------------------------------------------------------------------------------------- stacks
class Ours:
    def __init__(self, path: Path, threads: int):
        import runtime

        self._rt = runtime
        self.path = path
        # verify=False: hashing the weights at every load costs a minute on a busy machine and is not timed anyway
        self.model = runtime.load(path, backend="onnxruntime", threads=threads, verify=False)

    def run(self, prompts: list[list[int]], new_tokens: int, max_len: int = 512) -> Timing:
        t0 = time.perf_counter()  # max_len is the artifact's own
        first = None
        stream = self._rt.generate(self.model, prompts if len(prompts) > 1 else prompts[0],
                                   max_new_tokens=new_tokens, stream=True, detokenize=False)  # ids, as genai's loop
        for _ in stream:
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        res = stream.results if len(prompts) > 1 else [stream.results]
        tokens = [r.tokens for r in res]
        steps = max(len(t) for t in tokens) - 1
        return Timing(first - t0, end - first, steps, len(prompts), tokens)


class Genai:
    def __init__(self, path: Path, threads: int):
        import onnxruntime_genai as og

        self._og = og
        cfg = og.Config(str(path))
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)

    def run(self, prompts: list[list[int]], new_tokens: int, max_len: int = 512) -> Timing:
        import numpy as np

        og = self._og
        p = len(prompts[0])
        params = og.GeneratorParams(self.model)
        # Its sliding-window GroupQueryAttention needs a KV capacity of at least the window: the same max_len as ours.
        params.set_search_options(max_length=max(max_len, p + new_tokens), batch_size=len(prompts), do_sample=False)
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(prompts, dtype=np.int32))
        gen.generate_next_token()
        first = time.perf_counter()
        steps = 0
        while steps < new_tokens - 1 and not gen.is_done():
            gen.generate_next_token()
            steps += 1
        end = time.perf_counter()
        tokens = [list(map(int, gen.get_sequence(i)[p:p + new_tokens])) for i in range(len(prompts))]
        return Timing(first - t0, end - first, steps, len(prompts), tokens)


class Transformers:
    def __init__(self, path: Path, threads: int):
        import torch
        from transformers import Gemma4UnifiedForConditionalGeneration

        torch.set_num_threads(threads)
        self._torch = torch
        self.model = Gemma4UnifiedForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.model.set_attn_implementation("eager")  # the reference's plain definition, as in the tests

    def run(self, prompts: list[list[int]], new_tokens: int, max_len: int = 512) -> Timing:
        torch = self._torch  # a dynamic cache: max_len does not apply
        with torch.no_grad():
            ids = torch.tensor(prompts, dtype=torch.long)
            t0 = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            first = time.perf_counter()
            toks = [nxt]
            for _ in range(new_tokens - 1):
                out = self.model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(nxt)
            end = time.perf_counter()
        tokens = torch.cat(toks, 1).tolist()
        return Timing(first - t0, end - first, new_tokens - 1, len(prompts), tokens)


KINDS = {"ours": Ours, "genai": Genai, "transformers": Transformers}


@dataclass
class Stack:
    name: str
    kind: str
    path: Path
    precision: str

    def load(self, threads: int):
        return KINDS[self.kind](self.path, threads)


# ---------------------------------------------------------------------------------------------- building
def _run(cmd: list[str], log: Path) -> tuple[bool, str]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return False, f"`{' '.join(cmd[2:])}` exited {rc}: {' | '.join(tail)}"
    return True, ""


def source_key(dirs: tuple[str, ...]) -> str:
    """A hash of the code in ``dirs`` as it is now: tracked blobs, uncommitted changes and untracked files."""
    import hashlib

    h = hashlib.sha256()
    for args in (["ls-files", "-s", "--", *dirs], ["diff", "HEAD", "--", *dirs]):
        h.update(subprocess.run(["git", *args], cwd=ROOT, capture_output=True).stdout)
    untracked = subprocess.run(["git", "ls-files", "-o", "--exclude-standard", "--", *dirs], cwd=ROOT,
                               capture_output=True, text=True).stdout.split()
    for rel in sorted(untracked):
        h.update(rel.encode() + (ROOT / rel).read_bytes())
    return h.hexdigest()


CODE = ("exporter", "graphs", "plugins", "runtime")


def build_ours(ckpt: Path, precisions: list[str], reuse: bool,
               jobs: int = 2) -> tuple[dict[str, Path], dict[str, str]]:
    """name -> artifact dir for what builds; name -> reason for what does not.

    A step is skipped when its artifact exists and was made by the same code from the same inputs (a stamp in
    ``bench/work/stamps``: a hash of the code directories it depends on, the checkpoint and the command); ``reuse``
    skips whenever the artifact exists.  ``jobs`` steps run at a time (the two fp32 exports, then the calibrations)."""
    from concurrent.futures import ThreadPoolExecutor

    py = sys.executable
    made, skipped = {}, {}
    logs, stamps = WORK / "logs", WORK / "stamps"
    logs.mkdir(parents=True, exist_ok=True)
    stamps.mkdir(parents=True, exist_ok=True)
    ckpt_id = (ckpt / "bench_checkpoint.json").read_text() if (ckpt / "bench_checkpoint.json").exists() else str(ckpt)
    code = {d: source_key(d) for d in (CODE, (*CODE, "calib"))}
    keys: dict[str, str] = {}

    def step(name, cmds, dirs, after=None):
        out = WORK / name
        key = json.dumps([code[dirs], ckpt_id, keys.get(after), cmds[0][1:]])
        keys[name] = key
        stamp = stamps / f"{name}.json"
        current = (out / "manifest.json").exists() and stamp.exists() and stamp.read_text() == key
        if (reuse and (out / "manifest.json").exists()) or current:
            print(f"[bench] {name}: up to date", flush=True)
            made[name] = out
            return True
        stamp.unlink(missing_ok=True)
        print(f"[bench] building {name} ...", flush=True)
        t0 = time.perf_counter()
        for i, cmd in enumerate(cmds):
            ok, why = _run(cmd, logs / f"{name}.{i}.log")
            if not ok:
                skipped[name] = why
                print(f"[bench] {name}: skipped ({why})", flush=True)
                return False
        stamp.write_text(key)
        print(f"[bench] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        made[name] = out
        return True

    def build(name):
        return [py, "-m", "graphs.build", "--artifact", str(WORK / name), "--backend", "onnxruntime"]

    def export(max_len):
        name = f"ours-fp32-{max_len}"
        step(name, [[py, "-m", "exporter.export", "--model", str(ckpt), "--out", str(WORK / name), "--force",
                     "--max-len", str(max_len)], build(name)], CODE)

    def calibrate(prec):
        name = f"ours-{prec}"
        step(name, [[py, "-m", "calib.calibrate", "--src", str(WORK / "ours-fp32-512"), "--out", str(WORK / name),
                     "--force", "--precision", prec], build(name)], (*CODE, "calib"), after="ours-fp32-512")

    def window(src):  # the same artifact with the --ort-sliding window engine (text and audio only)
        name = f"{src}{WINDOW}"
        if src not in made:
            skipped[name] = f"no {src} artifact"
            return
        copy = [py, "-c", "import shutil, sys; shutil.rmtree(sys.argv[2], ignore_errors=True); "
                "shutil.copytree(sys.argv[1], sys.argv[2])", str(WORK / src), str(WORK / name)]
        step(name, [copy, build(name) + ["--ort-sliding", "window"]], CODE, after=src)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(export, (512, 4096)))
        if "ours-fp32-512" in made:
            list(pool.map(calibrate, precisions))
        else:
            skipped.update({f"ours-{p}": "no fp32 artifact to calibrate" for p in precisions})
        list(pool.map(window, ["ours-fp32-512", *(f"ours-{p}" for p in precisions if p != "fp8")]))
    return made, skipped


def build_genai(ckpt: Path, precisions: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    made, skipped = {}, {}
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return {}, {f"genai-{p}": f"onnxruntime-genai is not installed ({e}); pip install -e '.[bench]'"
                    for p in precisions}
    stamp = {"genai": og.__version__ if hasattr(og, "__version__") else "?",
             "checkpoint": json.loads((ckpt / "bench_checkpoint.json").read_text())}
    for prec in precisions:
        name = f"genai-{prec}"
        out = WORK / name
        if (out / "bench_stamp.json").exists() and json.loads((out / "bench_stamp.json").read_text()) == stamp:
            made[name] = out
            continue
        print(f"[bench] building {name} (onnxruntime-genai builder) ...", flush=True)
        shutil.rmtree(out, ignore_errors=True)
        ok, why = _run([sys.executable, str(ROOT / "bench" / "genai_build.py"), "-i", str(ckpt), "-o", str(out),
                        "-p", prec, "-e", "cpu", "-c", str(WORK / "genai-cache")], WORK / "logs" / f"{name}.log")
        if ok:
            (out / "bench_stamp.json").write_text(json.dumps(stamp))
            made[name] = out
        else:
            skipped[name] = why
    return made, skipped


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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", stack.kind, str(stack.path),
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


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 cycle, 16 tokens, a 512-token long prompt")
    ap.add_argument("--reuse", action="store_true",
                    help="keep our existing artifacts even if the code changed since they were built")
    ap.add_argument("--no-build", action="store_true", help="measure the artifacts already in bench/work")
    ap.add_argument("--build-only", action="store_true",
                    help="build the artifacts and stop (measure later with --no-build, on a quiet machine)")
    ap.add_argument("--jobs", type=int, default=2, help="artifact builds run at a time")
    ap.add_argument("--baseline", action="store_true", help="also store this run as `baseline` in the results")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", default="", help="comma-separated case numbers to run (1-4), default all")
    ap.add_argument("--skip", default="", help="comma-separated stacks to leave out (e.g. transformers)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--no-kernels", action="store_true", help="skip the profiler's kernel count")
    ap.add_argument("--cycles", type=int, default=None, help="cycles of every case (default: 5/3/3/3)")
    ap.add_argument("--new-tokens-per-run", type=int, default=None, help="greedy tokens per run (default 64)")
    ap.add_argument("--rss-child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--new-tokens", type=int, default=8, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.rss_child:
        rss_child(a.rss_child[0], a.rss_child[1], a.threads, a.prompt_len, a.new_tokens)
        return 0

    t_start = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not (a.checkpoint / "config.json").exists():
        print(f"[bench] writing the bench checkpoint {a.checkpoint} ...", flush=True)
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_bench_checkpoint.py"), str(a.checkpoint)],
                       cwd=ROOT, check=True)
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(exist_ok=True)
    if a.no_build:  # measure what is there (e.g. while another run is still calibrating)
        ours = {p.name: p for p in sorted(WORK.glob("ours-*")) if (p / "manifest.json").exists()}
        skipped = {}
    else:
        ours, skipped = build_ours(a.checkpoint, ["int8", "fp8", "int4"], a.reuse, a.jobs)
    genai, genai_skipped = build_genai(a.checkpoint, ["fp32", "int8", "int4"])
    skipped.update(genai_skipped)
    if a.build_only:
        print(f"[bench] built: {', '.join([*ours, *genai])}; not built: {skipped or 'none'}", flush=True)
        return 0
    stacks = {n: Stack(n, "ours", p, n.split("-")[1]) for n, p in ours.items()}
    stacks.update({n: Stack(n, "genai", p, n.split("-")[1]) for n, p in genai.items()})
    stacks["transformers"] = Stack("transformers", "transformers", a.checkpoint, "fp32")
    for name in filter(None, a.skip.split(",")):
        stacks.pop(name, None)
        skipped[name] = "left out (--skip)"

    load_before = os.getloadavg()
    probe = bandwidth_probe(threads=a.threads)
    selected = [c for i, c in enumerate(cases(a.quick, a.cycles, a.new_tokens_per_run), 1)
                if not a.only or str(i) in a.only.split(",")]
    results: list[dict] = []
    per_stack: dict[str, dict] = {}
    run = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "threads": a.threads,
        "quick": a.quick,
        "load_before": [round(x, 2) for x in load_before],
        "versions": _versions(),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
        "skipped": skipped,
        "cases": results,
        "stacks": per_stack,
    }

    def save(complete: bool):
        bw = [b for r in results for b in r["bandwidth_gb_s"]]
        run.update(complete=complete, load_after=[round(x, 2) for x in os.getloadavg()],
                   bandwidth_gb_s=round(statistics.median(bw), 2) if bw else None,
                   wall_s=round(time.perf_counter() - t_start))
        run["table_md"] = markdown(run)
        write_results(run, a.out, a.baseline)  # after every case: an interrupted run keeps what it measured

    reference = None
    for case in selected:
        r = run_case(case, stacks, a.threads, probe, reference)
        if reference is None and "transformers" in r["tokens"]:
            reference = r["tokens"]["transformers"]
        results.append({"name": case.name, **r})
        save(False)
    del probe
    gc.collect()

    measured = {s for r in results for s in r["stacks"]}
    for name, st in ((n, st) for n, st in stacks.items() if n in measured):
        rec: dict = {"path": str(st.path.relative_to(ROOT)) if st.path.is_relative_to(ROOT) else str(st.path)}
        if st.kind != "transformers":
            rec["weight_bytes_per_step"] = weight_bytes_read(decode_graph(st))
            if not a.no_kernels:
                print(f"[bench] kernels per decode step: {name}", flush=True)
                try:
                    rec["kernels"] = kernel_count(st, a.threads)
                except Exception as e:  # a profiler failure must not lose the timings; it is recorded instead
                    rec["kernels"] = {"error": f"{type(e).__name__}: {e}"}
        if not a.no_rss:
            print(f"[bench] peak RSS: {name}", flush=True)
            rec["rss"] = peak_rss(st, a.threads, 128, 8)
        per_stack[name] = rec
        save(False)
    save(True)
    print(run["table_md"])
    print(f"[bench] wrote {a.out} in {run['wall_s']} s")
    return 0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "onnxruntime-genai", "torch", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
