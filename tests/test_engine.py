"""`runtime.Engine`'s mechanics on ONNX Runtime (the exactness cases run against every backend in
tests/test_backend_contract.py): backpressure, failures confined to their request, cancellation freeing the slot
within one step, asyncio streaming, seeded sampling as `runtime.generate` alone, stop strings, shutdown, bad input,
and how far the logits move with the batch around a row."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import runtime
from runtime.engine import Engine, Overloaded, RequestFailed, SamplingParams
from runtime.prompt import PrefillInputs

PRESET = "tiny"
A, B, C = [2, 40, 41, 42, 43, 44, 45], [2, 7, 8, 9], [2, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99]


@pytest.fixture(scope="module")
def model(artifact_store):
    return runtime.load(artifact_store(PRESET), backend="onnxruntime")


def _alone(model, prompt, n=10, **kw):
    return runtime.generate(model, prompt, max_new_tokens=n, **kw).tokens


def test_queue_limit_raises_overloaded_and_the_queue_runs_once_started(model):
    engine = Engine(model, max_batch=1, max_queue=1)
    first, second = engine.submit(A, params=SamplingParams(max_tokens=5)), engine.submit(B)
    with pytest.raises(Overloaded, match="max_queue 1") as e:
        engine.submit(C)
    assert e.value.retry_after >= 1
    assert engine.stats()["queue_depth"] == 2  # one for the free slot, one waiting
    with engine:
        assert first.result(timeout=60).tokens == _alone(model, A, 5)
        assert second.result(timeout=60).finish_reason in ("stop", "length")


def test_a_failing_prefill_fails_that_request_only(model, monkeypatch):
    prefill = model.backend.prefill

    def broken(inputs: PrefillInputs, cache):
        if 77 in inputs.input_ids:
            raise RuntimeError("ORT says no")
        return prefill(inputs, cache)

    monkeypatch.setattr(model.backend, "prefill", broken)
    with Engine(model, max_batch=2) as engine:
        good, bad, later = (engine.submit(p, params=SamplingParams(max_tokens=8)) for p in (A, [2, 77, 5], C))
        with pytest.raises(RequestFailed, match="prefill of tokens 0:3 failed: RuntimeError: ORT says no"):
            bad.result(timeout=60)
        assert bad.finish_reason == "error"
        assert good.result(timeout=60).tokens == _alone(model, A, 8)
        assert later.result(timeout=60).tokens == _alone(model, C, 8)
        with pytest.raises(RequestFailed):
            list(bad)  # iteration raises too, after the pieces it had


def test_nan_logits_fail_their_row_only(model):
    engine = Engine(model, max_batch=2)
    decode = engine._runner.decode
    calls = []

    def poisoned(feed, idle):  # the first step that decodes slot 1 gives it NaN logits
        out = decode(feed, idle).copy()
        if 1 in feed and not calls:
            calls.append(1)
            out[1] = np.nan
        return out

    engine._runner.decode = poisoned
    a = engine.submit(A, params=SamplingParams(max_tokens=8))  # both queued before the start: a in slot 0, b in 1
    b = engine.submit(B, params=SamplingParams(max_tokens=8))
    with engine:
        with pytest.raises(RequestFailed, match="NaN"):
            b.result(timeout=60)
        assert a.result(timeout=60).tokens == _alone(model, A, 8)


def test_cancel_frees_the_slot_within_one_step(model):
    with Engine(model, max_batch=1) as engine:
        h = engine.submit(A, params=SamplingParams(max_tokens=150))
        pieces = iter(h)
        next(pieces)
        h.cancel()
        steps = engine.steps  # a step may be in flight: it finishes, then the request goes
        res = h.result(timeout=30)
        assert res.finish_reason == "cancelled" and 1 <= len(res.tokens) < 150
        assert engine.steps - steps <= 1, "the slot was held for more than the step in flight"
        assert engine.stats()["busy_slots"] == 0
        assert engine.submit(B, params=SamplingParams(max_tokens=6)).result(timeout=30).tokens == _alone(model, B, 6)


def test_astream_gives_the_pieces_in_asyncio(model):
    async def collect(engine):
        handles = [engine.submit(p, params=SamplingParams(max_tokens=7)) for p in (A, C)]
        out = []
        for h in handles:
            out.append([p.token async for p in h.astream()])
        return out

    with Engine(model, max_batch=2) as engine:
        got = asyncio.run(collect(engine))
    assert got == [_alone(model, A, 7), _alone(model, C, 7)]


def test_seeded_sampling_is_generate_alone_beside_others(model):
    kw = dict(temperature=1.3, top_k=40, top_p=0.9, seed=11)
    want = _alone(model, A, 12, **kw)
    with Engine(model, max_batch=3) as engine:
        others = [engine.submit(p, params=SamplingParams(max_tokens=20, temperature=0.8, seed=1)) for p in (B, C)]
        got = engine.submit(A, params=SamplingParams(max_tokens=12, **kw)).result(timeout=60).tokens
        for o in others:
            o.result(timeout=60)
    assert got == want


def test_shutdown_cancels_what_is_left_and_refuses_new_requests(model):
    engine = Engine(model, max_batch=1).start()
    running = engine.submit(A, params=SamplingParams(max_tokens=150))
    waiting = engine.submit(B, params=SamplingParams(max_tokens=150))
    next(iter(running))
    engine.shutdown(drain_timeout=0.0)
    assert running.result(timeout=5).finish_reason == "cancelled"
    assert waiting.result(timeout=5).finish_reason == "cancelled" and waiting.result().tokens == []
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(A)
    assert not engine.ready


def test_shutdown_drains_running_requests(model):
    engine = Engine(model, max_batch=2).start()
    handles = [engine.submit(p, params=SamplingParams(max_tokens=9)) for p in (A, B)]
    engine.shutdown(drain_timeout=60)
    assert [h.result(timeout=1).tokens for h in handles] == [_alone(model, A, 9), _alone(model, B, 9)]


def test_bad_requests_are_refused_at_submit(model):
    with Engine(model, max_batch=1) as engine:
        with pytest.raises(runtime.InputError, match="max_len"):
            engine.submit([2] * model.max_len)
        with pytest.raises(runtime.InputError, match="image placeholder"):
            engine.submit(A, images=[np.zeros((48, 48, 3), np.uint8)])
        with pytest.raises(runtime.InputError, match="outside the vocabulary"):
            engine.submit([2, 10**9])
        with pytest.raises(runtime.InputError, match="max_soft_tokens"):
            engine.submit(A, max_soft_tokens=71)
        for bad in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_p=1.5), dict(seed=-3),
                    dict(stop_ids=[1.5]), dict(stop_strings="x")):
            with pytest.raises(runtime.InputError):
                SamplingParams(**bad)
        assert engine.stats()["queue_depth"] == 0 and engine.stats()["busy_slots"] == 0


def test_stop_strings_cut_the_text(demo_engine_artifact):
    model = runtime.load(demo_engine_artifact)
    from demo.tasks import examples, prompt_text

    ex = next(e for e in examples("heldout", 40) if e.kind in ("colour", "shape"))  # answered with a word
    prompt, images = prompt_text(ex), ex.images
    full = runtime.generate(model, prompt, images=images, max_new_tokens=24, max_soft_tokens=70)
    assert len(full.text) >= 3, full
    stop = full.text[1:3]
    with Engine(model, max_batch=2) as engine:
        h = engine.submit(prompt, images=images, params=SamplingParams(max_tokens=24, stop_strings=(stop,)),
                          max_soft_tokens=70)
        streamed = "".join(p.text for p in h)
        res = h.result()
    assert res.finish_reason == "stop" and res.text == streamed == full.text[:full.text.index(stop)]
    with Engine(model, max_batch=1) as engine:
        res = engine.submit(prompt, images=images, params=SamplingParams(max_tokens=24),
                            max_soft_tokens=70).result(timeout=60)
    assert (res.text, res.tokens, res.finish_reason) == (full.text, full.tokens, full.finish_reason)


def test_logits_move_little_with_the_batch_around_a_row(model, capsys):
    """The same sequence decoded alone and as row 0 beside two others: ONNX Runtime may round differently at
    another batch size; measured here, bounded by the design card's tolerance (1e-4 of the logit range)."""
    b = model.backend
    steps, worst = 6, 0.0

    def run(rows):
        cache = b.new_cache(len(rows), model.max_len)
        n = max(map(len, rows))
        ids = np.zeros((len(rows), n), np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        lens = np.array([len(r) for r in rows], np.int64)
        out = [np.array(b.prefill(PrefillInputs(ids, np.zeros(len(rows), np.int64), lens), cache))[0]]
        for s in range(steps):
            out.append(np.array(b.decode([5 + s] * len(rows), (lens + s).tolist(), cache))[0])
        return np.stack(out)

    alone, batched = run([A]), run([A, C, B])
    worst = float(np.abs(alone - batched).max() / (alone.max() - alone.min()))
    with capsys.disabled():
        print(f"\n[engine] logits of one row alone vs in a batch of 3: max |diff| = {worst:.2e} of the logit range")
    assert worst <= 1e-4
    assert (alone.argmax(-1) == batched.argmax(-1)).all()
