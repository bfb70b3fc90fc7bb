"""The speed benchmark's arithmetic (bench/runtime.py) on synthetic timings: no timing is measured or asserted here."""

from __future__ import annotations

import math

import pytest

from bench import runtime as bench


def test_schedule_interleaves_every_stack_once_per_cycle():
    order = bench.schedule(["a", "b", "c"], 3, extra=("bandwidth",))
    assert len(order) == 12
    for c in range(3):
        assert [s for cyc, s in order if cyc == c] == ["a", "b", "c", "bandwidth"]
    assert [cyc for cyc, _ in order] == sorted(cyc for cyc, _ in order)  # cycles run one after another
    with pytest.raises(ValueError, match="cycles"):
        bench.schedule(["a"], 0)


def test_cycle_ratios_pair_values_of_the_same_cycle():
    # The machine slows down 3x in cycle 2; per-cycle ratios stay constant, ratios of overall medians would not.
    rates = {"ref": [10.0, 3.0, 10.0], "fast": [20.0, 6.0, 20.0], "slow": [5.0, 1.5, 5.0]}
    r = bench.cycle_ratios(rates, "ref")
    assert r["fast"] == [2.0, 2.0, 2.0]
    assert r["slow"] == [0.5, 0.5, 0.5]
    assert r["ref"] == [1.0, 1.0, 1.0]
    times = {"ref": [0.4, 1.2], "quick": [0.2, 0.6]}
    t = bench.cycle_ratios(times, "ref", higher_is_better=False)
    assert t["quick"] == [2.0, 2.0]  # half the prefill time = 2x as fast


def test_cycle_ratios_skip_missing_cycles_and_name_a_missing_reference():
    r = bench.cycle_ratios({"ref": [10.0, 0.0, 10.0], "x": [5.0, 5.0, None]}, "ref")
    assert r["x"] == [0.5]
    assert bench.median_or_none(r["x"]) == 0.5
    assert bench.median_or_none([]) is None
    with pytest.raises(KeyError, match="genai-fp32"):
        bench.cycle_ratios({"x": [1.0]}, "genai-fp32")


def test_decode_bound_is_bandwidth_over_bytes():
    # 936 MB of fp32 weights at 22 GB/s: at most 23.5 steps per second.
    assert bench.decode_bound(936_000_000, 22e9) == pytest.approx(23.504, rel=1e-3)
    assert bench.decode_bound(234_000_000, 22e9) == pytest.approx(4 * bench.decode_bound(936_000_000, 22e9))
    with pytest.raises(ValueError):
        bench.decode_bound(0, 1e9)


def test_timing_rate_and_agreement():
    t = bench.Timing(prefill_s=0.4, decode_s=3.15, decode_steps=63, batch=1)
    assert t.decode_tok_s == pytest.approx(20.0)
    assert math.isnan(bench.Timing(0.1, 0.0, 0, 1).decode_tok_s)
    assert bench.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert bench.agreement([1, 2, 3], [1, 2, 3, 4]) == 3
    assert bench.agreement([7], [1]) == 0


def test_weight_bytes_read_skips_tables_only_gathered(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")  # lookup only: one row per step
    tied = numpy_helper.from_array(np.zeros((50, 8), np.float32), "tied")  # lookup and LM head: read fully
    w = numpy_helper.from_array(np.zeros((8, 8), np.float32), "w")
    q = helper.make_tensor("q", TensorProto.INT4, [8, 8], np.zeros(32, np.uint8).tobytes(), raw=True)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("Gather", ["tied", "ids"], ["e2"]),
        helper.make_node("MatMul", ["e", "w"], ["h"]),
        helper.make_node("DequantizeLinear", ["q", "s"], ["wq"]),
        helper.make_node("MatMul", ["h", "wq"], ["h2"]),
        helper.make_node("Gemm", ["h2", "tied"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [table, tied, w, q, numpy_helper.from_array(np.ones(1, np.float32), "s")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    # tied 50*8*4 + w 8*8*4 + q 64 int4 = 32 bytes + s 4 bytes; the gathered-only table is not counted
    assert bench.weight_bytes_read(path) == 1600 + 256 + 32 + 4


def test_markdown_lists_every_stack_of_every_case():
    stack = {"decode_tok_s": 20.0, "prefill_ms": 390.0, "decode_vs_genai-fp32": 0.92, "share_of_bound": 0.8,
             "greedy_equal_to_transformers": 64}
    run = {
        "date": "2026-12-02 07:00 UTC", "machine": {"nproc": 2, "cpu": "X"}, "threads": 2, "load_before": [1, 1, 1],
        "load_after": [2, 2, 2], "bandwidth_gb_s": 20.0, "skipped": {"ours-int4": "no int4"},
        "cases": [{"name": "fp32 b1", "new_tokens": 64, "stacks": {"genai-fp32": stack, "ours-fp32-512": stack}}],
        "stacks": {"ours-fp32-512": {"rss": {"peak_mib": 1000, "artifact_mib": 900}, "weight_bytes_per_step": 9e8,
                                     "kernels": {"kernels": 1170}}},
    }
    md = bench.markdown(run)
    assert "| fp32 b1 | genai-fp32 | 20.0 | 0.92x |" in md
    assert "| fp32 b1 | ours-fp32-512 |" in md and "64/64" in md and "80%" in md
    assert "| ours-fp32-512 | 1000 (900) | 900 | 1170 |" in md
    assert "ours-int4: no int4" in md


def test_bench_12b_keeps_earlier_steps_and_refuses_unknown_ones(tmp_path, capsys):
    """A bench-12b run of some steps keeps the other steps' records of the same layer count (with their date) and
    drops them for another layer count; an unknown step is refused before anything runs."""
    import json

    from bench import bench_12b

    out, work = tmp_path / "12b.json", tmp_path / "work"
    old = {"layers": 2, "date": "2026-01-01 00:00 UTC", "config": "slice",
           "steps": {"int4": {"wall_s": 5.0}, "checkpoint": {"wall_s": 1.0, "date": "2026-01-02 00:00 UTC"}}}
    out.write_text(json.dumps(old))
    assert bench_12b.main(["--layers", "2", "--steps", "", "--work", str(work), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert list(got["steps"]) == ["checkpoint", "int4"]  # the pipeline's order
    assert got["steps"]["int4"] == {"wall_s": 5.0, "date": "2026-01-01 00:00 UTC"}
    assert got["steps"]["checkpoint"]["date"] == "2026-01-02 00:00 UTC"
    assert got["config"] == "slice" and got["date"] != old["date"]
    assert bench_12b.main(["--layers", "3", "--steps", "", "--work", str(work), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["steps"] == {}
    assert bench_12b.main(["--steps", "int4,bogus", "--work", str(work), "--out", str(out)]) == 2
    assert "--steps bogus: unknown" in capsys.readouterr().err


def test_calibration_args_of_bench_precision_names():
    from bench.runtime_stacks import calibration_args

    assert calibration_args("int8") == ["--precision", "int8"]
    assert calibration_args("int4") == ["--precision", "int4"]  # calib's default block size
    assert calibration_args("int4-b128") == ["--precision", "int4", "--block-size", "128"]
    for bad in ("int4-b", "int4-bx", "int8-b128", "fp16", "int4-128"):
        with pytest.raises(ValueError, match="int4-b<block size>"):
            calibration_args(bad)
