"""Our PyTorch model against transformers' Gemma4UnifiedForConditionalGeneration, same weights (written by
transformers' save_pretrained, read by our loader): logits within 1e-4 of the logit range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporter.config import PRESETS
from exporter.weights import load_model
from runtime.prompt import expand_prompt, pack_batch
from tests.cases import ALL_CASES, MAX_SOFT_TOKENS, cases
from tests.reference import reference_inputs, reference_logits

REL_TOL = 1e-4


def _prepare(preset: str, case_name: str):
    cfg = PRESETS[preset]
    case = cases(cfg)[case_name]
    d = cfg.to_json_dict()
    return cfg, [
        expand_prompt(ids, im, au, d, max_soft_tokens=MAX_SOFT_TOKENS)
        for ids, im, au in zip(case.ids, case.images, case.audio)
    ]


def _torch_inputs(batch):
    t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return t(batch.input_ids), t(batch.past_lens), t(batch.seq_lens), t(batch.image_patches), t(
        batch.image_positions
    ), t(batch.audio_frames)


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str, rel: float = REL_TOL):
    err = np.abs(ours - ref)
    rng = float(ref.max() - ref.min())
    assert err.max() <= rel * rng, f"{what}: max err {err.max():.3g} (mean {err.mean():.3g}) > {rel} x range {rng:.3g}"


@pytest.mark.parametrize("preset,case_name", ALL_CASES)
def test_logits_match_reference(preset, case_name, reference_store):
    ref, ckpt = reference_store(preset)
    cfg, prepared = _prepare(preset, case_name)
    model = load_model(ckpt)
    batch = pack_batch(prepared, cfg.tokens.pad)
    ids, past, lens, patches, positions, frames = _torch_inputs(batch)
    with torch.no_grad():
        logits, _ = model.prefill(
            ids, past, lens, model.empty_caches(len(prepared), ids.shape[1] + 1), patches, positions, frames,
            all_logits=True,
        )
    for i, p in enumerate(prepared):
        expected = reference_logits(ref, reference_inputs(p, cfg.to_json_dict()["tokens"]))
        assert_close(logits[i, : len(p.ids)].numpy(), expected, f"{preset}/{case_name} prompt {i}")


@pytest.mark.parametrize("preset,case_name", ALL_CASES)
def test_prefill_then_decode_equals_one_pass(preset, case_name, reference_store):
    """Prefill of P tokens then D single-token decodes gives the logits of one pass over P + D tokens; the decodes
    run past the sliding window so the ring buffer wraps."""
    _, ckpt = reference_store(preset)
    cfg, prepared = _prepare(preset, case_name)
    model = load_model(ckpt)
    window = cfg.text.sliding_window
    rng = np.random.default_rng(0)
    for p in prepared:  # extend each prompt with D text tokens
        p.ids = p.ids + [int(t) for t in rng.integers(3, 290, window + 3)]
    d = window + 3
    full = pack_batch(prepared, cfg.tokens.pad)
    ids, past, lens, patches, positions, frames = _torch_inputs(full)
    max_len = ids.shape[1] + 2
    with torch.no_grad():
        one_pass, _ = model.prefill(
            ids, past, lens, model.empty_caches(len(prepared), max_len), patches, positions, frames, all_logits=True
        )
        prompt_lens = lens - d
        logits, caches = model.prefill(
            ids[:, : int(prompt_lens.max())], past, prompt_lens, model.empty_caches(len(prepared), max_len),
            patches, positions, frames,
        )
        rows = torch.arange(len(prepared))
        assert_close(logits.numpy(), one_pass[rows, prompt_lens - 1].numpy(), "prefill")
        for step in range(d):
            pos = prompt_lens + step
            logits, caches = model.decode(ids[rows, pos][:, None], pos, caches)
            assert_close(logits.numpy(), one_pass[rows, pos].numpy(), f"decode step {step}")


def test_chunked_prefill_equals_one_prefill(reference_store):
    """A prompt prefilled in two chunks (multi-turn) gives the same logits and cache as one prefill."""
    _, ckpt = reference_store("tiny")
    model = load_model(ckpt)
    ids = torch.randint(3, 290, (2, 30), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([30, 27])
    zeros = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        one, cache_one = model.prefill(ids, zeros, lens, model.empty_caches(2, 40), all_logits=True)
        first = torch.tensor([13, 11])
        _, cache = model.prefill(ids[:, :13], zeros, first, model.empty_caches(2, 40))
        rest = torch.stack([ids[0, 13:30], torch.cat([ids[1, 11:27], ids[1, :1]])])
        two, cache = model.prefill(rest, first, lens - first, cache, all_logits=True)
    assert_close(two[0].numpy(), one[0, 13:30].numpy(), "chunk 2, sequence 0")
    assert_close(two[1, :16].numpy(), one[1, 11:27].numpy(), "chunk 2, sequence 1")
    for i, (a, b) in enumerate(zip(cache, cache_one)):
        if model.cfg.text.is_sliding(i // 2):
            assert torch.allclose(a, b, atol=1e-5), f"sliding ring {i} differs after chunked prefill"
        else:  # full layers: compare the valid positions only (padding may leave garbage past the length)
            for b_i, n in enumerate(lens.tolist()):
                assert torch.allclose(a[b_i, :, :n], b[b_i, :, :n], atol=1e-5), f"full cache {i} differs"


def test_vision_embedder_ignores_padding_positions(reference_store):
    """Padding soft tokens (position (-1, -1)) get no position embedding, as in the reference."""
    ref, ckpt = reference_store("tiny")
    model = load_model(ckpt)
    patches = torch.rand(1, 4, 6912)
    positions = torch.tensor([[[0, 0], [1, 0], [-1, -1], [-1, -1]]])
    with torch.no_grad():
        ours = model.embed_images(patches[0], positions[0])
        theirs = ref.model.embed_vision(patches, positions).pooler_output[0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
