"""`runtime.generate` prefills prompts longer than the backend's chunk in several calls on the growing cache (what
TensorRT engines need: their profile caps tokens per call); the greedy tokens equal one-shot prefill, image soft
tokens are never split across calls, and every call stays within the chunk and the cache."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from exporter.config import PRESETS
from runtime.generate import PREFILL_CHUNK
from tests.cases import MAX_SOFT_TOKENS, cases

NEW = 12


def _generate(model, case, chunk):
    calls = []
    prefill = model.backend.prefill

    def recording(inputs, cache):
        calls.append(inputs)
        return prefill(inputs, cache)

    model.backend.prefill = recording
    model.backend.prefill_chunk = chunk
    try:
        batched = len(case.ids) > 1
        out = runtime.generate(model, case.ids if batched else case.ids[0],
                               images=case.images if batched else case.images[0],
                               audio=case.audio if batched else case.audio[0], max_new_tokens=NEW,
                               max_soft_tokens=MAX_SOFT_TOKENS)
    finally:
        model.backend.prefill = prefill
        del model.backend.prefill_chunk
    return (out if batched else [out]), calls


def _image_runs(ids: np.ndarray, image: int) -> list[tuple[int, int]]:
    runs, j = [], 0
    while j < len(ids):
        if ids[j] == image:
            k = j
            while k < len(ids) and ids[k] == image:
                k += 1
            runs.append((j, k))
            j = k
        else:
            j += 1
    return runs


@pytest.mark.parametrize("case_name", ["long", "batch", "two_images", "audio"])
def test_chunked_prefill_gives_the_one_shot_tokens(case_name, artifact_store):
    cfg = PRESETS["tiny"]
    model = runtime.load(artifact_store("tiny"))
    case = cases(cfg)[case_name]
    image = cfg.to_json_dict()["tokens"]["image"]
    one, one_calls = _generate(model, case, PREFILL_CHUNK)
    assert len(one_calls) == 1
    prompts = [one_calls[0].input_ids[i, :n] for i, n in enumerate(one_calls[0].seq_lens)]
    longest_image = max([b - a for p in prompts for a, b in _image_runs(p, image)], default=0)
    chunk = max(7, longest_image + 3)  # an image fits a call, but a call boundary would fall inside one
    many, calls = _generate(model, case, chunk)
    assert len(calls) > 1, "the prompt did not need chunking: the test proves nothing"
    assert [r.tokens for r in many] == [r.tokens for r in one], case_name
    done = np.zeros(len(prompts), np.int64)
    owner: dict[tuple[int, int], int] = {}  # (row, token index in the prompt) -> the call that prefilled it
    for k, call in enumerate(calls):
        np.testing.assert_array_equal(call.past_lens, done)  # each call continues where the last stopped
        assert call.input_ids.shape[1] <= chunk
        assert call.input_ids.shape[1] + int(call.past_lens.max()) <= model.max_len  # padded writes in the cache
        for i, n in enumerate(call.seq_lens):
            np.testing.assert_array_equal(call.input_ids[i, :n], prompts[i][done[i]:done[i] + n])
            owner.update({(i, int(done[i]) + j): k for j in range(n)})
        done = done + call.seq_lens
    np.testing.assert_array_equal(done, [len(p) for p in prompts])
    runs = [(i, a, b) for i, p in enumerate(prompts) for a, b in _image_runs(p, image)]
    for i, a, b in runs:
        assert len({owner[(i, t)] for t in range(a, b)}) == 1, f"row {i}: image tokens {a}..{b} split across calls"
    if case_name == "two_images":
        assert len(runs) == 2 and any(owner[(0, a)] > 0 for _, a, _ in runs)  # not all in the first call
