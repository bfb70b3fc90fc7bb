"""The serve step of `bench/bench_12b.py`: the INT4 engine behind `runtime.Engine` with 4 slots, one client alone
and then 4 concurrent text clients plus one with an image (five requests for four slots: one waits), in a child
process whose peak RSS the parent measures.  Prints one JSON line: load time, one client's decode tokens/s and
TTFT, the concurrent run's aggregate generated tokens/s (and its ratio to one client's), each request's TTFT, and
the number of tokens each request generated (the random-weight checkpoint may stop early at an eos).

``python bench/serve_12b.py ARTIFACT [--new 16]``; in-process clients (threads), no HTTP: the HTTP layer's cost is
measured by ``make bench-serve`` on the bench model.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT_PROMPTS = [[2, 105, 17, 42, 99, 7, 250, 3, 11, 106, 105], [2, 105, 18, 43, 98, 8, 251, 4, 12, 106, 105],
                [2, 105, 19, 44, 97, 9, 252, 5, 13, 106, 105], [2, 105, 20, 45, 96, 10, 253, 6, 14, 106, 105]]


def _timed(handle, t0: float) -> dict:
    """Stream a request: its TTFT (from ``t0``), decode tokens/s after the first token, tokens."""
    times = [time.perf_counter() - t0 for piece in handle if piece.token >= 0]
    n = len(times)
    decode = (n - 1) / (times[-1] - times[0]) if n > 1 and times[-1] > times[0] else float("nan")
    return {"ttft_s": round(times[0], 3) if times else None, "tokens": n, "decode_tok_s": round(decode, 3)}


def run(art: str, new: int) -> dict:
    import numpy as np

    import runtime
    from runtime.engine import Engine, SamplingParams

    t0 = time.perf_counter()
    model = runtime.load(art)
    out = {"load_s": round(time.perf_counter() - t0, 2), "slots": 4, "new_tokens": new}
    tk = model.config["tokens"]
    image = np.random.default_rng(0).integers(0, 256, size=(480, 672, 3), dtype=np.uint8)
    image_prompt = [2, 105, 17, tk["image"], 42, 99, 106, 105]
    params = SamplingParams(max_tokens=new, stop_ids=())
    with Engine(model, max_batch=4) as engine:
        t0 = time.perf_counter()
        out["one_client"] = _timed(engine.submit(TEXT_PROMPTS[0], params=params), t0)
        requests = [(p, None) for p in TEXT_PROMPTS] + [(image_prompt, [image])]
        records: list[dict | None] = [None] * len(requests)
        t0 = time.perf_counter()
        handles = [engine.submit(p, images=im, params=params) for p, im in requests]

        def client(i):
            records[i] = _timed(handles[i], t0)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(handles))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in records)
    one = out["one_client"]
    one_rate = one["tokens"] / (one["ttft_s"] + (one["tokens"] - 1) / one["decode_tok_s"]) if one["tokens"] > 1 else 0
    out["concurrent"] = {"clients": len(requests), "with_image": 1, "wall_s": round(wall, 2),
                         "aggregate_tok_s": round(tokens / wall, 3), "requests": records,
                         "aggregate_vs_one_client": round(tokens / wall / one_rate, 3) if one_rate else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--new", type=int, default=16)
    a = p.parse_args(argv)
    print(json.dumps(run(a.artifact, a.new)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
