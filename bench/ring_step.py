"""One sliding layer's decode step in the default (ring) ONNX Runtime engine, with and without the one-token branch.

`graphs.ort.attention` lowers a ring sliding layer to RotaryEmbedding + an ``Attention`` over
concat(first n ring slots, new keys) + an in-place ring write.  For a one-token call that path copies the part of
the ring it reads twice (a ``Slice``, then the concat), per layer, for K and V.  The one-token branch
(``ring_decode="in_place"``, the default for the 12B) writes the new token first and attends over the ring where it
lies, with GroupQueryAttention reading each row's filled slots (`graphs.ort.attention._ring_gqa`).

This benchmark lowers one real ``FusedAttention`` node at given dimensions (the 12B's sliding layer and the 234 M
bench model's) both ways, runs decode steps on one cache per form, interleaved in one process (this machine's
bandwidth drifts), at several context lengths, checks that both forms give the same output and cache, and writes
the medians to ``bench/results/ring_step.json``.

    python bench/ring_step.py [--rounds 40] [--out bench/results/ring_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugins import fused_attention as fa  # noqa: E402
from runtime.ort_attention import INPUTS, attention_inputs, gqa_outputs  # noqa: E402

SHAPES = {  # name: heads, KV heads, head size, window (sliding layers)
    "12b": (16, 8, 256, 1024),
    "bench-234m": (4, 2, 128, 512),
}


def one_layer_model(h: int, hkv: int, d: int, w: int):
    """An ONNX model holding one sliding prefill ``FusedAttention`` node of the plugin contract."""
    import onnx_ir as ir

    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64

    def value(name, dtype, shape):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    ins = [value("q", f32, ["B", "S", h, d]), value("k", f32, ["B", "S", hkv, d]), value("v", f32, ["B", "S", hkv, d]),
           value("past_key", f32, ["B", hkv, w, d]), value("past_value", f32, ["B", hkv, w, d]),
           value("past_lens", i64, ["B"]), value("seq_lens", i64, ["B"]), value("image_block", i64, ["B", "S"])]
    ids = value("input_ids", i64, ["B", "S"])  # gives the host inputs their batch and sequence dims
    attrs = {"mode": 0, "sliding": 1, "window": w, "num_heads": h, "num_kv_heads": hkv, "head_dim": d, "rotary_dim": d,
             "rope_theta": 10000.0, "scale": 1.0, "plugin_namespace": fa.DOMAIN, "plugin_version": fa.VERSION}
    node = ir.node(fa.OP, ins, attributes=attrs, domain=fa.DOMAIN, num_outputs=3, name="layer0")
    for out, name in zip(node.outputs, ("out", "present_key", "present_value")):
        out.name = name
    for out, dims in zip(node.outputs, (["B", "S", h * d], ["B", hkv, w, d], ["B", hkv, w, d])):
        out.type, out.shape = ir.TensorType(f32), ir.Shape(dims)
    graph = ir.Graph([*ins, ids], list(node.outputs), nodes=[node], opset_imports={"": 24, fa.DOMAIN: 1},
                     name="one_layer")
    return ir.Model(graph, ir_version=10)


def lowered(shape, *, ring_decode: str, max_len: int) -> bytes:
    import onnx_ir as ir

    from graphs.ort.attention import lower_attention

    model = one_layer_model(*shape)
    report = lower_attention(model, decode=False, max_len=max_len, log=lambda *_: None, ring_decode=ring_decode)
    if report["Attention"] != 1:
        raise RuntimeError(f"the sliding node was not lowered: {report}")
    return ir.to_proto(model).SerializeToString()


def run(rounds: int, pasts: list[int], log=print) -> dict:
    import onnxruntime as ort

    results = {}
    for name, shape in SHAPES.items():
        h, hkv, d, w = shape
        max_len = max(pasts) + 2
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.log_severity_level = 3
        sessions = {form: ort.InferenceSession(lowered(shape, ring_decode="in_place" if form == "one_token" else "copy",
                                                       max_len=max_len),
                                               opts, providers=["CPUExecutionProvider"])
                    for form in ("ring_path", "one_token")}
        rng = np.random.default_rng(0)
        rows = []
        for past in pasts:
            ring_k = rng.standard_normal((1, hkv, w, d)).astype(np.float32)
            ring_v = rng.standard_normal((1, hkv, w, d)).astype(np.float32)
            base = {"q": rng.standard_normal((1, 1, h, d)).astype(np.float32),
                    "k": rng.standard_normal((1, 1, hkv, d)).astype(np.float32),
                    "v": rng.standard_normal((1, 1, hkv, d)).astype(np.float32),
                    "past_lens": np.array([past]), "seq_lens": np.array([1]),
                    "image_block": np.full((1, 1), -1, np.int64), "input_ids": np.zeros((1, 1), np.int64)}
            bound, caches = {}, {}
            for form, sess in sessions.items():
                names = [i.name for i in sess.get_inputs()]
                keys = [k for k, v in INPUTS.items() if v in names]
                feeds = {**base, **{INPUTS[k]: v for k, v in attention_inputs(
                    base["past_lens"], base["seq_lens"], 1, window=w, want=keys).items()}}
                caches[form] = (ring_k.copy(), ring_v.copy())
                binding = sess.io_binding()
                for n in names:
                    if n in feeds:
                        binding.bind_cpu_input(n, np.ascontiguousarray(feeds[n]))
                kv = [ort.OrtValue.ortvalue_from_numpy(c) for c in caches[form]]
                binding.bind_ortvalue_input("past_key", kv[0])
                binding.bind_ortvalue_input("past_value", kv[1])
                binding.bind_output("out", "cpu")
                binding.bind_ortvalue_output("present_key", kv[0])
                binding.bind_ortvalue_output("present_value", kv[1])
                for cache, out in gqa_outputs([o.name for o in sess.get_outputs()]).items():  # the one-token
                    binding.bind_ortvalue_output(out, kv[cache == "present_value"])  # branch's GQA, in place
                bound[form] = (binding, kv)
            outs = {}
            for form, sess in sessions.items():  # one step each on the same inputs: same output, same cache
                sess.run_with_iobinding(bound[form][0])
                outs[form] = bound[form][0].get_outputs()[0].numpy().copy()
            err = float(np.abs(outs["ring_path"] - outs["one_token"]).max())
            cache_equal = all(np.array_equal(a, b) for a, b in zip(caches["ring_path"], caches["one_token"]))
            if err > 1e-4 or not cache_equal:
                raise RuntimeError(f"{name} past {past}: the forms differ (output {err:.2e}, caches equal "
                                   f"{cache_equal})")
            times = {form: [] for form in sessions}
            for _ in range(rounds):  # interleaved; every step rewrites the same slot with the same token
                for form, sess in sessions.items():
                    t = time.perf_counter()
                    sess.run_with_iobinding(bound[form][0])
                    times[form].append(time.perf_counter() - t)
            med = {form: float(np.median(v)) * 1e6 for form, v in times.items()}
            row = {"past": past, "ring_path_us": round(med["ring_path"], 1), "one_token_us": round(med["one_token"], 1),
                   "speedup": round(med["ring_path"] / med["one_token"], 3), "max_abs_diff": err}
            log(f"[ring-step] {name} (H {h}, Hkv {hkv}, D {d}, W {w}) past {past}: ring path {row['ring_path_us']} us, "
                f"one-token branch {row['one_token_us']} us ({row['speedup']}x)")
            rows.append(row)
        results[name] = {"heads": h, "kv_heads": hkv, "head_dim": d, "window": w, "steps": rows}
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--pasts", default="100,500,1100,4000", help="context lengths (tokens already cached)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ring_step.json")
    args = ap.parse_args(argv)
    if args.out.is_dir():  # refused before the run: the record is one file
        print(f"ring-step: error: --out {args.out} is a directory; give a file path", file=sys.stderr)
        return 2
    import onnxruntime as ort

    results = run(args.rounds, [int(x) for x in args.pasts.split(",")])
    record = {"what": "one sliding layer's decode step, ONNX Runtime ring engine: ring path vs one-token branch, "
                      "median of interleaved runs, 2 threads",
              "onnxruntime": ort.__version__, "machine": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "shapes": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(args.out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"[ring-step] -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
