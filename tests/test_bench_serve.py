"""The serving benchmark's arithmetic (bench/serve_report.py) on made-up numbers, and its make target: nothing
is timed or served here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.serve_report import Record, markdown, percentile, ratios, summarize, verdicts

ROOT = Path(__file__).resolve().parents[1]


def test_percentile_interpolates_between_closest_ranks():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 99) == pytest.approx(3.97)  # numpy.percentile([1, 2, 3, 4], 99)
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_summarize_counts_tokens_errors_and_latencies():
    a = Record(16, 4, start=0.0, end=1.0, ttft=0.1, itl=[0.2, 0.2, 0.2], tokens=4, chunks=4, finish="length")
    b = Record(32, 3, start=0.5, end=2.0, ttft=0.3, itl=[0.4, 0.4], tokens=3, chunks=3, finish="stop")
    bad = Record(8, 5, error="APIConnectionError: refused")
    s = summarize([a, b, bad], wall_s=2.0)
    assert (s["requests"], s["errors"], s["tokens"], s["early_stops"]) == (3, 1, 7, 1)
    assert s["tok_s"] == 3.5
    assert s["ttft_p50_ms"] == pytest.approx(200.0)
    assert s["itl_p50_ms"] == pytest.approx(200.0)  # gaps 0.2 x3, 0.4 x2
    assert s["itl_max_ms"] == pytest.approx(400.0)
    assert s["chunks_per_token"] == 1.0
    assert a.decode_tok_s == pytest.approx(5.0)  # 3 tokens after the first in 0.6 s
    assert s["stream_decode_tok_s_p50"] == pytest.approx(3.75)  # median of 5.0 and 2.5
    assert s["error_samples"] == ["APIConnectionError: refused"]


def test_ratios_and_verdicts_against_the_targets():
    levels = {1: {"tok_s": 10.0, "stream_decode_tok_s_p50": 19.0, "ttft_p99_ms": 100.0},
              8: {"tok_s": 30.0, "ttft_p99_ms": 250.0}}
    base = {"static8": {"tok_s": 40.0}, "genai8": {"tok_s": 30.0}, "generate_seq": {"stream_decode_tok_s_p50": 20.0},
            "engine8": None}
    r = ratios(levels, base, idle_ttft_p99_ms=100.0)
    assert r["conc8_vs_conc1"] == 3.0
    assert r["conc8_vs_static8"] == 0.75
    assert r["conc8_vs_genai8"] == 1.0
    assert r["conc8_vs_engine8_in_process"] is None
    assert r["ttft_p99_conc8_vs_idle"] == 2.5
    assert r["conc1_vs_generate_decode"] == r["conc1_vs_generate_decode_of_p50s"] == 0.95
    paired = ratios(levels, base, 100.0, conc1_paired=0.9)  # the paired median decides where measured
    assert (paired["conc1_vs_generate_decode"], paired["conc1_vs_generate_decode_of_p50s"]) == (0.9, 0.95)
    assert verdicts(paired)["conc1_vs_generate_decode"]["pass"] is False
    v = verdicts(r)
    assert {k: x["pass"] for k, x in v.items()} == {
        "conc8_vs_conc1": True, "conc8_vs_static8": False, "conc8_vs_genai8": True, "ttft_p99_conc8_vs_idle": True,
        "conc1_vs_generate_decode": True}
    same = ratios(levels, {**base, "genai8_same_len": {"tok_s": 20.0}, "server8_same_len": {"tok_s": 18.0}}, 100.0)
    assert same["conc8_vs_genai8"] == 0.9  # equal-length sets compared with each other, not with the mixed level
    assert verdicts({})["conc8_vs_conc1"]["pass"] is None
    table = markdown({"engines": {"ours-fp32": {"levels": {8: summarize([], 1.0)}, "baselines": {"genai8": {
        "skipped": "not installed"}}, "verdicts": v}}})
    assert "| ours-fp32 | 8 |" in table and "skipped: not installed" in table and "FAIL" in table


def test_make_help_lists_bench_serve():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert any(line.startswith("make bench-serve") for line in out.splitlines())


def test_concurrency_option_and_the_before_after_table():
    import argparse

    from bench.serve import _levels

    assert _levels("8,1,8") == (1, 8)
    for bad in ("0,8", "", "one"):
        with pytest.raises(argparse.ArgumentTypeError):
            _levels(bad)
    one = summarize([Record(16, 3, itl=[0.01, 0.01], tokens=3, chunks=3, finish="length")], 1.0)
    run = {"git": "abc1234", "engines": {"ours-int4": {
        "levels": {1: one}, "ratios": {"conc1_vs_generate_decode": 0.912, "conc1_vs_generate_decode_of_p50s": 0.9},
        "compare": {"src": "76af01c", "level1": one, "conc1_vs_generate_decode": 0.85,
                    "conc1_vs_generate_decode_of_p50s": 0.84}}}}
    table = markdown(run)
    assert "| ours-int4 | abc1234 | 100.0 | 0.912 (0.900) |" in table
    assert "| ours-int4 | 76af01c | 100.0 | 0.850 (0.840) |" in table


def test_paired_median_pairs_requests_in_order():
    from bench.serve_report import paired_median

    def rec(rate):  # 5 tokens, 4 gaps of 1/rate seconds: decode_tok_s == rate
        return Record(8, 5, itl=[1 / rate] * 4, tokens=5, chunks=5, finish="length")

    served = [rec(9.0), rec(30.0), rec(50.0), Record(8, 1, tokens=1)]  # the last has no decode rate: left out
    alone = [rec(10.0), rec(20.0), rec(100.0), rec(10.0)]
    # per pair 0.9, 1.5, 0.5 -> median 0.9; the unpaired medians (30 vs 20) would say 1.5
    assert paired_median(served, alone) == 0.9
    assert paired_median([], alone) is None
