"""The serving benchmark's arithmetic (``make bench-serve``): per-request records -> level summaries, ratios, targets.

Pure functions on numbers already measured (`bench.serve_load`, `bench.serve_baselines` measure them): percentiles,
one concurrency level's summary (aggregate tokens/s, TTFT and inter-token latency percentiles, errors), the ratios
the issue sets targets for, and a Markdown table.  Nothing here times, loads a model or talks HTTP, so
``tests/test_bench_serve.py`` checks it on made-up numbers with known answers.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

__all__ = ["TARGETS", "Record", "markdown", "paired_median", "percentile", "ratios", "summarize", "verdicts"]

# ratio name -> (target, "min" = the ratio must be at least the target, "max" = at most)
TARGETS = {
    "conc8_vs_conc1": (2.5, "min"),
    "conc8_vs_static8": (0.9, "min"),
    "conc8_vs_genai8": (1.0, "min"),
    "ttft_p99_conc8_vs_idle": (3.0, "max"),
    "conc1_vs_generate_decode": (0.95, "min"),
}


@dataclass
class Record:
    """One request as its client saw it: times in seconds from the moment it was sent."""

    prompt_len: int
    max_tokens: int
    start: float = 0.0  # when it was sent (the run's clock)
    end: float = 0.0  # when its last event arrived
    ttft: float | None = None  # to the first token (or content chunk)
    itl: list[float] = field(default_factory=list)  # gaps between consecutive tokens (or chunks)
    tokens: int = 0  # generated tokens (the server's usage, or the engine's count)
    chunks: int = 0  # content chunks / token events received
    finish: str | None = None
    error: str | None = None

    @property
    def decode_tok_s(self) -> float | None:
        """This stream's decode rate: tokens after the first over the time they took."""
        span = sum(self.itl)
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["itl"] = [round(x, 5) for x in self.itl]
        return {k: round(v, 5) if isinstance(v, float) else v for k, v in d.items()}


def percentile(xs: list[float], p: float) -> float | None:
    """The ``p``-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"p={p}; expected 0..100")
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def summarize(records: list[Record], wall_s: float) -> dict:
    """One level: aggregate generated tokens/s over ``wall_s`` (first request sent to last answer received),
    TTFT / inter-token latency percentiles (ms) over the requests that did not fail, errors, early stops."""
    ok = [r for r in records if r.error is None]
    tokens = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in r.itl]
    rates = [x for r in ok if (x := r.decode_tok_s) is not None]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_samples": sorted({r.error for r in records if r.error})[:3],
        "tokens": tokens,
        "tokens_asked": sum(r.max_tokens for r in ok),
        "early_stops": sum(r.finish == "stop" for r in ok),
        "chunks_per_token": round(sum(r.chunks for r in ok) / tokens, 3) if tokens else None,
        "wall_s": round(wall_s, 3),
        "tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "itl_p50_ms": _ms(percentile(itl, 50)),
        "itl_p99_ms": _ms(percentile(itl, 99)),
        "itl_max_ms": _ms(max(itl) if itl else None),
        "stream_decode_tok_s_p50": round(statistics.median(rates), 2) if rates else None,
    }


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def paired_median(recs: list[Record], gens: list[Record]) -> float | None:
    """The median over requests of (this request's decode tokens/s through ``recs``' stack) / (the same request's
    through ``gens``'), pairs taken in order and run back to back: the machine's drift cancels within a pair."""
    pairs = [x.decode_tok_s / y.decode_tok_s for x, y in zip(recs, gens) if x.decode_tok_s and y.decode_tok_s]
    return round(statistics.median(pairs), 3) if pairs else None


def ratios(levels: dict[int, dict], baselines: dict, idle_ttft_p99_ms: float | None,
           conc1_paired: float | None = None) -> dict:
    """The issue's ratios for one engine: ``levels`` concurrency -> `summarize` output; ``baselines`` with
    ``static8`` / ``genai8`` / ``generate_seq`` / ``engine8`` summaries (any may be missing), and
    ``genai8_same_len`` / ``server8_same_len`` (both at concurrency 8 on one equal-prompt-length request set:
    when present, the genai ratio compares those two).  ``conc1_paired``: `paired_median` of the concurrency-1
    requests against the same requests through `runtime.generate`, run in turn; where given it is
    ``conc1_vs_generate_decode`` (the ratio of the two sets' medians, unpaired, stays as ``..._of_p50s``)."""
    c1, c8 = levels.get(1, {}), levels.get(8, {})
    b = {k: v or {} for k, v in baselines.items()}
    # the peer's engine batches only equal prompt lengths on CPU: compared on an equal-length set where measured
    same = "tok_s" in b.get("genai8_same_len", {})
    genai = b["genai8_same_len"] if same else b.get("genai8", {})
    server8 = b.get("server8_same_len", {}) if same else c8
    of_p50s = _div(c1.get("stream_decode_tok_s_p50"), b.get("generate_seq", {}).get("stream_decode_tok_s_p50"))
    return {
        "conc8_vs_conc1": _div(c8.get("tok_s"), c1.get("tok_s")),
        "conc8_vs_static8": _div(c8.get("tok_s"), b.get("static8", {}).get("tok_s")),
        "conc8_vs_genai8": _div(server8.get("tok_s"), genai.get("tok_s")),
        "conc8_vs_engine8_in_process": _div(c8.get("tok_s"), b.get("engine8", {}).get("tok_s")),
        "ttft_p99_conc8_vs_idle": _div(c8.get("ttft_p99_ms"), idle_ttft_p99_ms),
        "conc1_vs_generate_decode": conc1_paired if conc1_paired is not None else of_p50s,
        "conc1_vs_generate_decode_of_p50s": of_p50s,
    }


def verdicts(r: dict) -> dict:
    """ratio name -> {"value", "target", "pass"} for each ratio with a target (pass None where unmeasured)."""
    out = {}
    for name, (target, kind) in TARGETS.items():
        v = r.get(name)
        ok = None if v is None else (v >= target if kind == "min" else v <= target)
        out[name] = {"value": v, "target": f"{'>=' if kind == 'min' else '<='} {target}", "pass": ok}
    return out


def _f(x, spec="{:.1f}") -> str:
    return "-" if x is None else spec.format(x)


def markdown(run: dict) -> str:
    """Tables for the docs: per engine, each level's tok/s, TTFT and ITL percentiles; baselines; ratio verdicts."""
    lines = ["| engine | conc | req | err | tokens | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 / max ms |",
             "|---|---|---|---|---|---|---|---|"]
    for name, eng in run.get("engines", {}).items():
        for conc, s in eng.get("levels", {}).items():
            lines.append(f"| {name} | {conc} | {s['requests']} | {s['errors']} | {s['tokens']} | {_f(s['tok_s'])} | "
                         f"{_f(s['ttft_p50_ms'], '{:.0f}')} / {_f(s['ttft_p99_ms'], '{:.0f}')} | "
                         f"{_f(s['itl_p50_ms'], '{:.0f}')} / {_f(s['itl_p99_ms'], '{:.0f}')} / "
                         f"{_f(s['itl_max_ms'], '{:.0f}')} |")
    lines += ["", "| engine | baseline (same requests as conc 8) | tok/s | TTFT p99 ms | ITL p99 ms |", "|---|---|---|---|---|"]
    for name, eng in run.get("engines", {}).items():
        for base, s in eng.get("baselines", {}).items():
            if s and "tok_s" in s:
                lines.append(f"| {name} | {base} | {_f(s['tok_s'])} | {_f(s.get('ttft_p99_ms'), '{:.0f}')} | "
                             f"{_f(s.get('itl_p99_ms'), '{:.0f}')} |")
            else:
                lines.append(f"| {name} | {base} | skipped: {(s or {}).get('skipped', 'not run')} | | |")
    compared = [(name, eng["compare"]) for name, eng in run.get("engines", {}).items() if "compare" in eng]
    if compared:
        lines += ["", "| engine | served from | conc 1 decode tok/s p50 | vs runtime.generate: paired median (of p50s) |",
                  "|---|---|---|---|"]
        for name, eng in run.get("engines", {}).items():
            if "levels" in eng and 1 in eng["levels"]:
                r = eng.get("ratios", {})
                lines.append(f"| {name} | {run.get('git', 'this tree')} | "
                             f"{_f(eng['levels'][1]['stream_decode_tok_s_p50'])} | "
                             f"{_f(r.get('conc1_vs_generate_decode'), '{:.3f}')} "
                             f"({_f(r.get('conc1_vs_generate_decode_of_p50s'), '{:.3f}')}) |")
        for name, c in compared:
            lines.append(f"| {name} | {c['src']} | {_f(c.get('level1', {}).get('stream_decode_tok_s_p50'))} | "
                         f"{_f(c.get('conc1_vs_generate_decode'), '{:.3f}')} "
                         f"({_f(c.get('conc1_vs_generate_decode_of_p50s'), '{:.3f}')}) |")
    lines += ["", "| engine | " + " | ".join(TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for name, eng in run.get("engines", {}).items():
        cells = []
        for v in eng.get("verdicts", {}).values():
            mark = {True: "pass", False: "FAIL", None: "n/a"}[v["pass"]]
            cells.append(f"{_f(v['value'], '{:.2f}')}x ({v['target']}: {mark})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
