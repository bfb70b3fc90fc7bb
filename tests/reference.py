"""Run transformers' Gemma4UnifiedForConditionalGeneration on a prompt prepared by our runtime.

The soft tokens come from `runtime.prompt.expand_prompt`, so both sides see the same pixels and audio frames;
preprocessing itself is tested against the reference processor's functions in test_images/test_audio.
Forward passes use the masks the reference builds for generation (`create_masks_for_generate`: image blocks are
bidirectional on sliding layers only), which is what `generate` runs.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.prompt import Prepared


def reference_inputs(prepared: Prepared, tokens: dict) -> dict:
    ids = torch.tensor([prepared.ids])
    out = {"input_ids": ids}
    mm = torch.zeros_like(ids)
    mm[ids == tokens["image"]] = 1
    mm[ids == tokens["audio"]] = 3
    out["mm_token_type_ids"] = mm
    if prepared.image_patches:
        n_max = max(len(p) for p in prepared.image_patches)
        dim = prepared.image_patches[0].shape[1]
        pv = torch.zeros(len(prepared.image_patches), n_max, dim)
        pp = torch.full((len(prepared.image_patches), n_max, 2), -1, dtype=torch.long)
        for i, (p, q) in enumerate(zip(prepared.image_patches, prepared.image_positions)):
            pv[i, : len(p)] = torch.from_numpy(p)
            pp[i, : len(q)] = torch.from_numpy(q)
        out |= {"pixel_values": pv, "image_position_ids": pp}
    if prepared.audio_frames:
        n_max = max(len(a) for a in prepared.audio_frames)
        feats = torch.zeros(len(prepared.audio_frames), n_max, prepared.audio_frames[0].shape[1])
        mask = torch.zeros(len(prepared.audio_frames), n_max, dtype=torch.bool)
        for i, a in enumerate(prepared.audio_frames):
            feats[i, : len(a)] = torch.from_numpy(a)
            mask[i, : len(a)] = True
        out |= {"input_features": feats, "input_features_mask": mask}
    return out


@torch.no_grad()
def reference_logits(ref, inputs: dict) -> np.ndarray:
    """(S, V) logits of one prompt, masks as in generation."""
    ids = inputs["input_ids"]
    s = ids.shape[1]
    masks = ref.create_masks_for_generate(
        ref.config,
        torch.zeros(1, s, ref.config.text_config.hidden_size),
        None,
        None,
        torch.arange(s)[None],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    return ref(**inputs, attention_mask=masks).logits[0].numpy()


@torch.no_grad()
def reference_generate(ref, inputs: dict, max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    """Greedy new tokens, cut after the first stop token (transformers pads after it).

    With a static cache, generate builds its masks with the model's own ``create_masks_for_generate`` (image
    blocks bidirectional on sliding layers only, as Gemma 4 specifies). With the default dynamic cache, the forward
    builds them with the generic helper, which also opens image blocks on full layers; see README "Reference".
    """
    out = ref.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=0,
        cache_implementation="static",
    )
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(new):
        if t in stop_ids:
            return new[: i + 1]
    return new


@torch.no_grad()
def reference_hidden(ref, inputs: dict) -> np.ndarray:
    """(S, hidden) last hidden states of one prompt (after the final norm: ``hidden_states[-1]``, what
    transformers' Gemma 4 assistant candidate generator passes on), masks as in generation."""
    ids = inputs["input_ids"]
    s = ids.shape[1]
    masks = ref.create_masks_for_generate(
        ref.config, torch.zeros(1, s, ref.config.text_config.hidden_size), None, None, torch.arange(s)[None],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    return ref(**inputs, attention_mask=masks, output_hidden_states=True).hidden_states[-1][0].numpy()
