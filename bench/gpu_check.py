"""``make gpu-check``: the plugins' Triton kernels on a CUDA GPU, checked and timed -> bench/results/gpu_check.json.

1. Correctness, with ``tl.dot`` in IEEE fp32 (``precision="ieee"``, what the engines use): FusedAttention (prefill
   and decode, sliding and full) and PatchEmbed kernels against the numpy references, at the tiny test shapes and
   at the 12B's layer shapes (sliding: 16 query / 8 KV heads of 256, window 1024; full: 16 query heads / 1 KV head
   of 512; PatchEmbed 6912 -> 3840 -> 3840).  Garbage indices (negative / huge past_lens) stay in bounds.
2. Speed, median of CUDA-event timings, IEEE and TF32 (TF32 also checked, with a looser tolerance): decode
   attention (memory-bound: bytes of cache read per step, as GB/s), prefill attention (TFLOP/s of the QK^T and PV
   products actually computed), PatchEmbed (TFLOP/s), next to a device-to-device copy (GB/s) and an fp32/bf16
   matmul (TFLOP/s) measured on the same GPU as the ceilings.
3. Where TensorRT and the export toolchain import: a tiny artifact's prefill plugin graph built into the fp32
   engine with its prefill and decode profiles, greedy tokens compared with ONNX Runtime (token-exact: fp32 + IEEE
   kernels); recorded beside them: one engine for both steps, every cache aliased, the engine's weight bytes
   (``EngineStat.TOTAL_WEIGHTS_SIZE``), the shared scratch and the device memory the load took; then the decode
   step of the one engine (its decode profile) timed against an engine of the decode plugin graph alone on the same
   cache (``tensorrt_decode_cost``: the price of one copy of the weights).
4. The drafting assistant on TensorRT (``tensorrt_assistant``): a tiny ``--speculative 3`` artifact with a random
   assistant, both engines built; greedy ``draft="assistant"`` equals plain greedy token for token (K = 1 and 3),
   the TensorRT runner's first drafts beside the ONNX Runtime runner's.
Needs only numpy, torch with CUDA and triton (no network, no ``make install``): ``python bench/gpu_check.py
--quick`` (about 2 minutes on an H100 class GPU; well within 8).  Without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` by CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _attention_case(text, layer, decode, batch, seq, past, t, seed=0):
    rng = np.random.default_rng(seed)
    h, hkv, d = text.num_heads, text.layer_kv_heads(layer), text.layer_head_dim(layer)
    s = 1 if decode else seq
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
              [(batch, s, h, d), (batch, s, hkv, d), (batch, s, hkv, d), (batch, hkv, t, d), (batch, hkv, t, d)]]
    past_lens = np.full(batch, past, np.int64)
    seq_lens = np.full(batch, s, np.int64)
    block = np.full((batch, s), -1, np.int64)
    return [*arrays, past_lens, seq_lens, block]


TOLERANCE = {"ieee": 1e-4, "tf32": 5e-3}  # max abs error of the output relative to max(1, |reference|)


def check_attention(text, layer, decode, batch, seq, past, t, results, name, check=True):
    import torch

    from plugins import fused_attention as fa
    from plugins.triton_attention import fused_attention

    inputs = _attention_case(text, layer, decode, batch, seq, past, t)
    attrs = fa.attributes(text, layer, decode=decode)
    cuda = [torch.from_numpy(x).cuda() for x in inputs]
    entry = {"batch": batch, "seq": 1 if decode else seq, "past": past, "cache_slots": t}
    want = fa.reference(*inputs, **attrs) if check else None
    for precision in ("ieee", "tf32"):
        if check:
            got = fused_attention(*[x.clone() for x in cuda], **attrs, precision=precision)
            err_out = float(np.abs(got[0].cpu().numpy() - want[0]).max())
            err_cache = float(np.abs(got[1].cpu().numpy() - want[1]).max())
            entry[f"max_abs_err_out_{precision}"], entry[f"max_abs_err_cache_{precision}"] = err_out, err_cache
            scale = max(1.0, float(np.abs(want[0]).max()))
            entry["ok"] = entry.get("ok", True) and err_out <= TOLERANCE[precision] * scale
        entry[f"ms_{precision}"] = _time(lambda: fused_attention(*cuda, **attrs, precision=precision))
    ms = entry["ms"] = entry["ms_tf32"]
    hkv, d, h = text.layer_kv_heads(layer), text.layer_head_dim(layer), text.num_heads
    if decode:
        keys = min(past + 1, t)
        entry["cache_bytes_read"] = 2 * batch * hkv * keys * d * 4
        entry["GB_per_s"] = entry["cache_bytes_read"] / ms / 1e6
    else:
        keys = past + seq if not text.is_sliding(layer) else min(text.sliding_window, past) + seq
        entry["TFLOP_per_s"] = 4 * batch * h * seq * keys * d / ms / 1e9
    results[name] = entry
    print(f"[gpu-check] {name}: {json.dumps(entry)}", flush=True)


def check_patch_embed(vision, hidden, n, results, name):
    import torch

    from plugins import patch_embed as pe
    from plugins.triton_patch_embed import patch_embed

    rng = np.random.default_rng(0)
    e, p = vision.mm_embed_dim, vision.patch_dim
    shapes = {"ln1_weight": (p,), "ln1_bias": (p,), "dense_weight": (e, p), "dense_bias": (e,), "ln2_weight": (e,),
              "ln2_bias": (e,), "pos_table": (vision.mm_posemb_size, 2, e), "pos_ln_weight": (e,),
              "pos_ln_bias": (e,), "proj_weight": (hidden, e)}
    w = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    args = [rng.random((n, p), dtype=np.float32),
            np.stack([np.arange(n) % 32, np.arange(n) // 32], 1).astype(np.int64), *[w[k] for k in pe.INPUTS[2:]]]
    attrs = pe.attributes(vision)
    want = pe.reference(*args, **attrs)
    cuda = [torch.from_numpy(a).cuda() for a in args]
    got = patch_embed(*cuda, **attrs).cpu().numpy()
    ms = _time(lambda: patch_embed(*cuda, **attrs))
    entry = {"tokens": n, "max_abs_err": float(np.abs(got - want).max()), "ms": ms,
             "TFLOP_per_s": 2 * n * (p * e + e * hidden) / ms / 1e9}
    entry["ok"] = entry["max_abs_err"] <= 1e-3 * max(1.0, float(np.abs(want).max()))
    results[name] = entry
    print(f"[gpu-check] {name}: {json.dumps(entry)}", flush=True)


def check_garbage(text, results):
    """Negative and huge past_lens / seq_lens (what TensorRT feeds while timing tactics): nothing written outside
    the buffers (guard elements keep their sentinel), and the kernels return."""
    import torch

    from plugins import fused_attention as fa
    from plugins.triton_attention import fused_attention

    ok = True
    for layer in (0, 1):
        for decode in (False, True):
            inputs = _attention_case(text, layer, decode, 3, 9, 4, text.sliding_window if layer == 0 else 64)
            bufs, views = [], []
            for x in inputs[:5]:
                buf = torch.full((x.size + 128,), 12345.0, device="cuda")
                buf[64:64 + x.size] = torch.from_numpy(x.reshape(-1)).cuda()
                bufs.append(buf)
                views.append(buf[64:64 + x.size].view(x.shape))
            past = torch.tensor([-7, 10**12, -(10**12)], device="cuda")
            seqs = torch.tensor([-3, 10**9, 0], device="cuda") if not decode else torch.ones(3, dtype=torch.int64,
                                                                                            device="cuda")
            fused_attention(*views, past, seqs, torch.from_numpy(inputs[7]).cuda(),
                            **fa.attributes(text, layer, decode=decode))
            torch.cuda.synchronize()
            ok = ok and all(bool((b[:64] == 12345.0).all() and (b[-64:] == 12345.0).all()) for b in bufs)
    results["garbage_indices_in_bounds"] = {"ok": ok}
    print(f"[gpu-check] garbage indices stay in bounds: {ok}", flush=True)


def ceilings(results):
    import torch

    x = torch.empty(512 * 2**20 // 4, device="cuda")
    y = torch.empty_like(x)
    ms = _time(lambda: y.copy_(x))
    results["d2d_copy"] = {"bytes": 2 * x.numel() * 4, "ms": ms, "GB_per_s": 2 * x.numel() * 4 / ms / 1e6}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
        ms = _time(lambda: a @ a, iters=10)
        results[f"matmul_{str(dtype).split('.')[-1]}"] = {"n": 8192, "ms": ms, "TFLOP_per_s": 2 * 8192**3 / ms / 1e9}
    print(f"[gpu-check] ceilings: {json.dumps({k: results[k] for k in ('d2d_copy', 'matmul_float32', 'matmul_bfloat16')})}")


def tensorrt_check(results, work: Path):
    try:
        import tensorrt  # noqa: F401

        import runtime
        from exporter.config import PRESETS
        from exporter.export import export_artifact
        from exporter.weights import random_model
        from graphs.build import build_engine
    except ImportError as e:
        results["tensorrt"] = {"skipped": f"tensorrt or the export toolchain is not importable ({e})"}
        print(f"[gpu-check] tensorrt: skipped ({e})", flush=True)
        return
    art = work / "tiny"
    export_artifact(random_model(PRESETS["tiny"], seed=0), art, max_len=64, log=lambda *_: None)
    build_engine(art, "auto", dtype="fp32")  # fp32 engine + IEEE kernels: token-exact against ONNX Runtime
    import torch

    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    trt_model = runtime.load(art, backend="tensorrt")
    torch.cuda.synchronize()
    loaded = free_before - torch.cuda.mem_get_info()[0]  # engine (weights once) + scratch + contexts
    ort_model = runtime.load(art, backend="onnxruntime")
    a = runtime.generate(trt_model, [2, 17, 33, 45, 80], max_new_tokens=16).tokens
    b = runtime.generate(ort_model, [2, 17, 33, 45, 80], max_new_tokens=16).tokens
    backend = trt_model.backend
    engine = backend.engines["prefill"]
    weights = int(engine.get_engine_stat(tensorrt.EngineStat.TOTAL_WEIGHTS_SIZE))
    one = backend.engines["decode"] is engine and engine.num_optimization_profiles == 2
    results["tensorrt"] = {
        "greedy_tokens_equal": a == b, "trt": a, "ort": b, "one_engine": one, "weights_bytes": weights,
        "device_bytes_after_load": int(loaded), "scratch_bytes": int(backend.scratch.numel()),
        "every_cache_aliased": all(all(v.values()) for v in backend.aliased.values()), "ok": a == b and one,
    }
    print(f"[gpu-check] tensorrt: {json.dumps(results['tensorrt'])}", flush=True)
    try:
        assistant_check(results, work)
    except Exception as e:  # a check that could not run: reported as failed with the reason
        results["tensorrt_assistant"] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"[gpu-check] tensorrt_assistant: {e}", flush=True)
    try:
        decode_cost(results, art, trt_model)
    except Exception as e:  # a measurement: report why it did not run, keep the checks above
        results["tensorrt_decode_cost"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[gpu-check] tensorrt_decode_cost: {e}", flush=True)


def assistant_check(results, work: Path, k: int = 3):
    """The drafting assistant on TensorRT: a tiny target exported with --speculative K and a random tiny assistant,
    both engines built (fp32); greedy with draft='assistant' equals plain greedy token for token (batch of two, K
    = 1 and K), and its first drafts equal the ONNX Runtime runner's."""
    import runtime
    from exporter.assistant import ASSISTANT_PRESETS, random_assistant
    from exporter.config import PRESETS
    from exporter.export import export_artifact
    from exporter.export_assistant import export_assistant
    from exporter.weights import random_model
    from graphs.build import build_engine
    from runtime.speculative.verify import SpecStats

    art = work / "tiny-spec"
    export_artifact(random_model(PRESETS["tiny"], seed=0), art, max_len=64, speculative=k, log=lambda *_: None)
    export_assistant(random_assistant(ASSISTANT_PRESETS["tiny-assistant"][1], seed=1), art, log=lambda *_: None)
    t0 = time.perf_counter()
    build_engine(art, "auto", dtype="fp32", log=lambda *_: None)
    built = time.perf_counter() - t0
    model = runtime.load(art, backend="tensorrt")
    prompts = [[2, 17, 33, 45, 80, 17, 33, 45], [2, 9, 11]]
    plain = [g.tokens for g in runtime.generate(model, prompts, max_new_tokens=24)]
    out = {"build_seconds": round(built, 1), "runner": type(model.assistant_runner()).__name__}
    equal = True
    for n in (1, k):
        stats = SpecStats()
        got = [g.tokens for g in runtime.generate(model, prompts, max_new_tokens=24, draft="assistant",
                                                  num_draft_tokens=n, spec_stats=stats)]
        equal = equal and got == plain
        out[f"k{n}"] = {"greedy_tokens_equal": got == plain, "drafted": stats.drafted, "accepted": stats.accepted}
    ort_model = runtime.load(art, backend="onnxruntime")
    drafts = {}
    for key, m in (("tensorrt", model), ("onnxruntime", ort_model)):
        from runtime.prompt import PrefillInputs

        cache = m.backend.new_cache(1, 64)
        logits = m.backend.prefill(PrefillInputs(np.array([prompts[0]]), np.zeros(1, np.int64),
                                                 np.array([len(prompts[0])])), cache)
        hidden = np.random.default_rng(0).standard_normal((1, PRESETS["tiny"].text.hidden_size)).astype(np.float32)
        drafts[key] = m.assistant_runner().draft(cache, logits.argmax(-1), hidden, [len(prompts[0])], k).tokens.tolist()
    out["drafts"], out["drafts_equal"] = drafts, drafts["tensorrt"] == drafts["onnxruntime"]  # recorded: TF32 may differ
    out["ok"] = bool(equal and out["k1"]["drafted"] > 0)
    results["tensorrt_assistant"] = out
    print(f"[gpu-check] tensorrt_assistant: {json.dumps(out)}", flush=True)


def decode_cost(results, art: Path, trt_model, blocks: int = 7, steps: int = 20):
    """What the one engine costs per decode step: its decode profile (the prefill plugin graph at one token) against
    an engine built from the decode plugin graph alone, executed on the same bound cache, blocks of ``steps``
    interleaved (median per step, CUDA events); and each engine's weight bytes (the two-engine layout held both)."""
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import EngineFromNetwork, NetworkFromOnnxPath, Profile

    from graphs.build_tensorrt import aliasing_config, profiles_for
    from runtime.manifest import read_manifest
    from runtime.prompt import PrefillInputs

    manifest = read_manifest(art)
    backend = trt_model.backend
    profile = Profile()
    for name, (lo, opt, hi) in profiles_for(manifest, "decode", max_batch=1, opt_seq=1, max_soft_tokens=0).items():
        profile.add(name, min=lo, opt=opt, max=hi)
    path = art / manifest["plugin_graphs"]["decode"]["file"]
    engine = EngineFromNetwork(NetworkFromOnnxPath(str(path), strongly_typed=True), config=aliasing_config([profile]))()
    cache = backend.new_cache(1, int(manifest["max_len"]))
    backend.prefill(PrefillInputs(input_ids=np.array([[2, 17, 33, 45, 80]]), past_lens=np.zeros(1, np.int64),
                                  seq_lens=np.array([5])), cache)
    backend.decode([7], [5], cache)  # binds the one engine's decode context on this cache
    ctx = engine.create_execution_context()
    stream = backend.stream
    with torch.cuda.stream(stream):
        ids = torch.tensor([[7]], dtype=torch.int64, device="cuda")
        lens = torch.tensor([5], dtype=torch.int64, device="cuda")
        logits = torch.empty((1, backend.vocab), dtype=torch.float32, device="cuda")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    for name in names:
        if name in ("input_ids", "past_lens"):
            buf = ids if name == "input_ids" else lens
            assert ctx.set_input_shape(name, tuple(buf.shape)), name
        elif name == "logits":
            buf = logits
        else:  # past_* / present_*: the backend's cache buffers (presents aliased)
            buf = cache[backend.cache_index[name.replace("present_", "past_", 1)]]
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                assert ctx.set_input_shape(name, tuple(buf.shape)), name
        assert ctx.set_tensor_address(name, buf.data_ptr()), name
    runs = {"one_engine": lambda: backend._execute("decode"),
            "decode_engine": lambda: ctx.execute_async_v3(stream.cuda_stream)}
    times = {k: [] for k in runs}
    for _ in range(blocks):
        for key, run in runs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(steps):
                run()
            end.record(stream)
            end.synchronize()
            times[key].append(start.elapsed_time(end) / steps)
    one, dec = statistics.median(times["one_engine"]), statistics.median(times["decode_engine"])
    stat = trt.EngineStat.TOTAL_WEIGHTS_SIZE
    results["tensorrt_decode_cost"] = {
        "one_engine_decode_ms": one, "decode_engine_ms": dec, "ratio": one / dec,
        "one_engine_weights_bytes": int(backend.engines["prefill"].get_engine_stat(stat)),
        "decode_engine_weights_bytes": int(engine.get_engine_stat(stat)),
        "note": "eager execute (Python plugin enqueue included), tiny model: launch-bound, an upper bound on the "
                "relative cost of the prefill graph's extra nodes at one token",
    }
    print(f"[gpu-check] tensorrt_decode_cost: {json.dumps(results['tensorrt_decode_cost'])}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    p.add_argument("--quick", action="store_true", help="fewer 12B-shape cases")
    a = p.parse_args()
    try:
        import torch
    except ImportError:
        print("gpu-check: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible; run this on a GPU machine", file=sys.stderr)
        return 2
    import dataclasses

    from exporter.config import PRESETS

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "machine": platform.node()}
    import triton

    results["triton"] = triton.__version__
    tiny = dataclasses.replace(PRESETS["tiny"].text, num_layers=2, layer_types=("sliding_attention", "full_attention"))
    for layer, kind in ((0, "sliding"), (1, "full")):
        check_attention(tiny, layer, False, 3, 11, 5, tiny.sliding_window if layer == 0 else 64, results,
                        f"tiny_{kind}_prefill")
        check_attention(tiny, layer, True, 3, 1, 13, tiny.sliding_window if layer == 0 else 64, results,
                        f"tiny_{kind}_decode")
        # a prefill call of one token (the one engine's decode profile): runs the decode kernel
        check_attention(tiny, layer, False, 3, 1, 13, tiny.sliding_window if layer == 0 else 64, results,
                        f"tiny_{kind}_one_token_prefill")
    big = PRESETS["gemma4-12b"]
    text = dataclasses.replace(big.text, num_layers=2, layer_types=("sliding_attention", "full_attention"))
    ctx = (4096,) if a.quick else (1024, 8192, 32768)
    for past in ctx:
        check_attention(text, 0, True, 1, 1, past, text.sliding_window, results, f"12b_sliding_decode_past{past}",
                        check=past <= 8192)
        check_attention(text, 1, True, 1, 1, past, past + 64, results, f"12b_full_decode_past{past}",
                        check=past <= 8192)
    check_attention(text, 0, False, 1, 2048, 0, text.sliding_window, results, "12b_sliding_prefill_2048", check=False)
    check_attention(text, 1, False, 1, 2048, 0, 4096, results, "12b_full_prefill_2048", check=False)
    check_attention(text, 0, False, 1, 256, 700, text.sliding_window, results, "12b_sliding_prefill_256_wrap")
    check_patch_embed(big.vision, big.text.hidden_size, 280, results, "12b_patch_embed_280")
    check_garbage(tiny, results)
    ceilings(results)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tensorrt_check(results, Path(tmp))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    bad = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"[gpu-check] written {a.out}; {'FAILED: ' + ', '.join(bad) if bad else 'all checks passed'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
