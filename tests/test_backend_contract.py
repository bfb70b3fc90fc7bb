"""The backend contract (`runtime.backend.Backend`) and the backend-generic tests, run against every implementation
present: ONNX Runtime; `TrtBackend` over an engine emulated by ONNX Runtime (`tests.trt_emulated`: the backend's
own binding, aliasing and CUDA-graph code on the CPU); `TrtBackend` over a real TensorRT engine where a GPU with
TensorRT is present (skipped here with the reason).

What each backend must show: it satisfies the Protocol; greedy generation equals transformers token for token
(text, prompts past the sliding window so rings wrap, images, audio); `rows` gives views that update the parent
cache in place and touch no other row; and in-flight batching through `runtime.Engine` gives every request the
tokens `runtime.generate` gives it alone (staggered arrivals, different lengths, images, audio, cancellation and
slot reuse, a slot full of another request's garbage).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import time

import numpy as np
import pytest

import runtime
from exporter.config import PRESETS
from runtime.backend import Backend
from runtime.engine import Engine, SamplingParams
from runtime.prompt import PrefillInputs, expand_prompt
from tests.cases import MAX_SOFT_TOKENS, cases
from tests.reference import reference_generate, reference_inputs
from tests.trt_emulated import emulated_trt_backend

PRESET = "tiny"
NEW = 12


def _gpu_trt_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "needs TensorRT (full, not the lean runtime) and a CUDA GPU: tensorrt is not importable"
    try:
        import torch
    except ImportError:
        return "needs torch with CUDA"
    return None if torch.cuda.is_available() else "needs a CUDA GPU (none visible)"


@pytest.fixture(scope="module", params=["onnxruntime", "tensorrt-emulated", "tensorrt"])
def model(request, artifact_store, tmp_path_factory):
    art = artifact_store(PRESET)
    if request.param == "onnxruntime":
        return runtime.load(art, backend="onnxruntime")
    if request.param == "tensorrt-emulated":
        # 96 tokens per call: an image's 70 soft tokens and its markers fit one call, as on a real engine's profile
        return dataclasses.replace(runtime.load(art, backend="onnxruntime"),
                                   backend=emulated_trt_backend(art, prefill_chunk=96))
    if reason := _gpu_trt_reason():
        pytest.skip(reason)
    from graphs.build import build_engine

    own = tmp_path_factory.mktemp("trt") / "artifact"
    shutil.copytree(art, own)
    build_engine(own, "tensorrt", dtype="fp32", log=lambda *_: None)  # fp32 + IEEE kernels: token-exact
    return runtime.load(own, backend="tensorrt")


def _requests():
    """(name, ids, images, audio) of every prompt of every case, one request each."""
    out = []
    for name, case in cases(PRESETS[PRESET]).items():
        for i, (ids, im, au) in enumerate(zip(case.ids, case.images, case.audio)):
            out.append((f"{name}[{i}]", ids, im, au))
    return out


def _alone(model, requests, new=NEW):
    return [runtime.generate(model, ids, images=im, audio=au, max_new_tokens=new,
                             max_soft_tokens=MAX_SOFT_TOKENS).tokens for _, ids, im, au in requests]


def test_backend_satisfies_the_contract(model):
    b = model.backend
    assert isinstance(b, Backend), f"{type(b).__name__} lacks part of runtime.backend.Backend"
    assert b.name in ("onnxruntime", "tensorrt")
    assert b.prefill_chunk is None or (isinstance(b.prefill_chunk, int) and b.prefill_chunk > 0)


def test_greedy_matches_transformers(model, reference_store):
    ref, _ = reference_store(PRESET)
    cfg = PRESETS[PRESET]
    tokens = cfg.to_json_dict()["tokens"]
    stop = [tokens["eos"], tokens["turn_end"]]
    for name, ids, im, au in _requests():
        if name.startswith("batch"):
            continue  # one prompt at a time here; batches: tests/test_generate.py and the engine test below
        ours = runtime.generate(model, ids, images=im, audio=au, max_new_tokens=NEW, max_soft_tokens=MAX_SOFT_TOKENS)
        prepared = expand_prompt(ids, im, au, cfg.to_json_dict(), max_soft_tokens=MAX_SOFT_TOKENS)
        want = reference_generate(ref, reference_inputs(prepared, tokens), NEW, stop)
        assert ours.tokens == want, f"{model.backend.name} {name}: {ours.tokens} != transformers {want}"


def test_rows_are_views_that_step_in_place(model):
    b, max_len = model.backend, model.max_len
    prompt = np.array([[2, 40, 41, 42, 43, 44]], np.int64)
    one = PrefillInputs(prompt, np.zeros(1, np.int64), np.array([prompt.shape[1]], np.int64))
    alone = b.new_cache(1, max_len)
    want = np.array(b.prefill(one, alone))
    want_next = np.array(b.decode([7], [prompt.shape[1]], alone))

    cache = b.new_cache(3, max_len)
    view = b.rows(cache, 1, 2)
    assert b.rows(cache, 1, 2) is view, "the same rows must give the same view object"
    got = np.array(b.prefill(one, view))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    got_next = np.array(b.decode([7], [prompt.shape[1]], view))
    np.testing.assert_allclose(got_next, want_next, rtol=0, atol=1e-5 * np.abs(want_next).max())
    for i, (parent, own) in enumerate(zip(b.cache_arrays(cache), b.cache_arrays(alone))):
        assert not parent[0].any() and not parent[2].any(), f"cache {i}: a step on row 1 wrote another row"
        np.testing.assert_array_equal(parent[1:2], own, err_msg=f"cache {i}: row 1 differs from the batch-1 cache")
    for bad in ((0, 0), (2, 4), (-1, 1)):
        with pytest.raises(ValueError, match="rows"):
            b.rows(cache, *bad)


def test_engine_gives_each_request_its_tokens_alone(model):
    """Every prompt of every case (text, past the window, images, audio, the batch's three lengths) through an
    engine of 3 slots with staggered arrivals and 16-token prefill chunks (where the backend's own limit is
    larger): each request's greedy tokens equal `runtime.generate` of it alone."""
    requests = _requests()
    want = _alone(model, requests)
    engine = Engine(model, max_batch=3, prefill_chunk=min(16, model.backend.prefill_chunk or 16))
    rows, decode = [], engine._runner.decode
    engine._runner.decode = lambda feed, idle: rows.append(len(feed)) or decode(feed, idle)
    try:
        handles = []
        for k, (_, ids, im, au) in enumerate(requests):
            handles.append(engine.submit(ids, images=im, audio=au, params=SamplingParams(max_tokens=NEW),
                                         max_soft_tokens=MAX_SOFT_TOKENS))
            if k == 2:
                engine.start()  # the first three start together, the rest arrive while they run
            elif k > 2:
                time.sleep(0.005)
        got = [h.result(timeout=300).tokens for h in handles]
    finally:
        engine.shutdown(drain_timeout=0)
    for (name, *_), w, g in zip(requests, want, got):
        assert g == w, f"{model.backend.name} {name}: engine {g} != alone {w}"
    assert max(rows) == 3 and len(rows) < sum(len(w) for w in want), f"decoded rows per step: {rows}"


def test_engine_sampling_matches_generate_alone(model):
    """Seeded sampling at temperature 3 (every token depends on the whole distribution, not only its argmax; the
    tiny model's greedy answers often repeat one token): the engine's tokens equal `runtime.generate` alone."""
    requests = _requests()
    kw = dict(temperature=3.0, top_p=0.98)
    want = [runtime.generate(model, ids, images=im, audio=au, max_new_tokens=NEW, max_soft_tokens=MAX_SOFT_TOKENS,
                             seed=i, **kw).tokens for i, (_, ids, im, au) in enumerate(requests)]
    with Engine(model, max_batch=4, prefill_chunk=min(16, model.backend.prefill_chunk or 16)) as engine:
        handles = [engine.submit(ids, images=im, audio=au, max_soft_tokens=MAX_SOFT_TOKENS,
                                 params=SamplingParams(max_tokens=NEW, seed=i, **kw))
                   for i, (_, ids, im, au) in enumerate(requests)]
        got = [h.result(timeout=300).tokens for h in handles]
    assert got == want
    assert len({t for w in want for t in w}) > 3 * len(want), "the sampled answers are too uniform to tell"


def test_engine_slot_reuse_after_cancel_and_garbage(model):
    """A request cancelled mid-stream frees its slot; the next request in that slot, whose rows first hold
    another request's state and then large random values, gets its tokens alone."""
    requests = [r for r in _requests() if r[0] in ("long[0]", "text[0]", "audio[0]")]
    want = _alone(model, requests)
    engine = Engine(model, max_batch=1).start()
    try:
        first = engine.submit(requests[0][1], params=SamplingParams(max_tokens=40))
        next(iter(first))  # it runs and has written its slot's rows
        first.cancel()
        assert first.result(timeout=60).finish_reason == "cancelled"
        got = [engine.submit(ids, images=im, audio=au, params=SamplingParams(max_tokens=NEW),
                             max_soft_tokens=MAX_SOFT_TOKENS).result(timeout=120).tokens
               for _, ids, im, au in requests]
        assert got == want, "state of an earlier request leaked into the slot"
        _fill_garbage(engine._runner.cache, np.random.default_rng(0))  # nothing of it may be attended
        got = [engine.submit(ids, images=im, audio=au, params=SamplingParams(max_tokens=NEW),
                             max_soft_tokens=MAX_SOFT_TOKENS).result(timeout=120).tokens
               for _, ids, im, au in requests]
        assert got == want, "garbage left in a free slot changed a later request's tokens"
    finally:
        engine.shutdown(drain_timeout=0)


def _fill_garbage(cache, rng) -> None:
    """Large random values in every row of every cache buffer (numpy arrays behind OrtValues, or torch tensors)."""
    arrays = getattr(cache, "arrays", None)
    for i, c in enumerate(cache):
        if arrays is not None:
            arrays[i][...] = rng.uniform(-50, 50, arrays[i].shape)
        else:
            import torch

            c.copy_(torch.from_numpy(rng.uniform(-50, 50, tuple(c.shape)).astype(np.float32)))
