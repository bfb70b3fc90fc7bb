"""The stacks `bench.runtime` compares, and how their artifacts are made.

A stack is one way to generate from the bench checkpoint: ours (`runtime` on an artifact), onnxruntime-genai (its
builder's output) or transformers (the floor and the greedy reference).  Each loads once and runs a batch of
prompts, returning a `Timing`.  `build_ours` makes our artifacts with the commands behind ``make export`` /
``make calibrate`` / ``make build-engine`` (rebuilt when the code they depend on changed); `build_genai` runs
``bench/genai_build.py``.  Nothing here compares stacks or writes results (`bench.runtime_timing`,
`bench.runtime_report`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.paths import ROOT

__all__ = ["CHECKPOINT", "KINDS", "Stack", "Timing", "WINDOW", "WORK", "build_genai", "build_ours", "calibration_args"]

WORK = ROOT / "bench" / "work"
# suffix of a stack whose engine was built with `--ort-sliding window` (GroupQueryAttention windowed sliding caches)
WINDOW = "-win"
CHECKPOINT = ROOT / "bench" / "checkpoints" / "bench-234m"


# ---------------------------------------------------------------------------------------------- one run
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


def calibration_args(precision: str) -> list[str]:
    """``calib.calibrate`` arguments of a bench precision name: ``int8``, ``fp8``, ``int4`` (calib's defaults) or
    ``int4-b<N>`` (INT4 at block size N)."""
    base, sep, block = precision.partition("-b")
    if base in ("int8", "fp8", "int4") and not sep:
        return ["--precision", base]
    if base == "int4" and block.isdigit():
        return ["--precision", "int4", "--block-size", block]
    raise ValueError(f"precision {precision!r}: expected int8, fp8, int4 or int4-b<block size> (e.g. int4-b128)")


def build_ours(ckpt: Path, precisions: list[str], reuse: bool, jobs: int = 2, max_lens: tuple[int, ...] = (512, 4096),
               windows: tuple[str, ...] | None = None) -> tuple[dict[str, Path], dict[str, str]]:
    """name -> artifact dir for what builds; name -> reason for what does not.

    ``precisions``: calibrations of the fp32-512 export (``int8``, ``fp8``, ``int4`` with calib's defaults), each
    ``ours-<precision>``; ``int4-b<N>`` is INT4 at block size N (``--block-size N``).  ``max_lens``: the fp32
    exports (512 is the one calibrated); ``windows``: the artifacts that also get a ``-win`` copy (default: fp32-512
    and every precision but FP8).

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
        try:
            args = calibration_args(prec)
        except ValueError as e:
            skipped[name] = str(e)
            return
        step(name, [[py, "-m", "calib.calibrate", "--src", str(WORK / "ours-fp32-512"), "--out", str(WORK / name),
                     "--force", *args], build(name)], (*CODE, "calib"), after="ours-fp32-512")

    def window(src):  # the same artifact with the --ort-sliding window engine (text and audio only)
        name = f"{src}{WINDOW}"
        if src not in made:
            skipped[name] = f"no {src} artifact"
            return
        copy = [py, "-c", "import shutil, sys; shutil.rmtree(sys.argv[2], ignore_errors=True); "
                "shutil.copytree(sys.argv[1], sys.argv[2])", str(WORK / src), str(WORK / name)]
        step(name, [copy, build(name) + ["--ort-sliding", "window"]], CODE, after=src)

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(export, max_lens))
        if "ours-fp32-512" in made:
            list(pool.map(calibrate, precisions))
        else:
            skipped.update({f"ours-{p}": "no fp32 artifact to calibrate" for p in precisions})
        if windows is None:
            windows = ("ours-fp32-512", *(f"ours-{p}" for p in precisions if p != "fp8"))
        list(pool.map(window, windows))
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
