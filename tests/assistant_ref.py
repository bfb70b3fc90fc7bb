"""Reference side of the assistant tests: transformers' target + assistant pair built by code, the target's shared
keys/values laid out in our cache layout, and transformers' own drafting rounds recorded from ``generate``.

`reference_pair(name)` builds the transformers assistant of `exporter.assistant.ASSISTANT_PRESETS[name]` (seeded,
perturbed weights, eager attention) beside the target of `tests.conftest.build_reference`, saves the assistant
with ``save_pretrained`` and loads it with our loader.  `record_rounds` runs ``generate(assistant_model=...)``
with a spy on `SinglePositionMultiTokenCandidateGenerator.get_candidates` that keeps, per round, what the
reference's drafter was given and what it drafted.  `reference_ranges` is the reference's choice of visible
target entries (derived from its code: the slicing to ``input_ids`` length and the window-plus-one sliding mask),
expressed as our `AssistantModel.step` arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.assistant import ASSISTANT_PRESETS, load_assistant
from tests.conftest import build_reference


def reference_assistant(name: str, seed: int = 5):
    """transformers' Gemma4UnifiedAssistantForCausalLM for an assistant preset, weights perturbed like the target's."""
    from transformers import Gemma4UnifiedAssistantConfig, Gemma4UnifiedAssistantForCausalLM

    _, cfg = ASSISTANT_PRESETS[name]
    torch.manual_seed(seed)
    ref = Gemma4UnifiedAssistantForCausalLM(Gemma4UnifiedAssistantConfig(**cfg.to_hf_dict())).eval()
    ref.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if pname.endswith("embed_tokens.weight"):
                p.normal_(0.0, 0.5, generator=gen)  # decisive argmax, far from ties
            elif p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif pname.endswith(("pre_projection.weight", "centroids.weight")):
                p.normal_(0.0, 0.1, generator=gen)
        for i, layer in enumerate(ref.model.layers):
            layer.layer_scalar.fill_(0.7 + 0.1 * i)
        if ref.masked_embedding is not None:
            ref.masked_embedding.token_ordering.copy_(torch.randperm(cfg.text.vocab_size, generator=gen))
    return ref


def reference_pair(name: str, workdir: Path):
    """(transformers target, transformers assistant, our assistant loaded from the saved checkpoint, its dir)."""
    target_preset, _ = ASSISTANT_PRESETS[name]
    target = build_reference(target_preset)
    ref = reference_assistant(name)
    path = workdir / f"assistant-{name}"
    if not (path / "config.json").is_file():
        ref.save_pretrained(path)
    return target, ref, load_assistant(path), path


@dataclass
class Round:
    input_ids: list[int]  # the whole sequence so far; its last token is the round's first input
    hidden: torch.Tensor  # (1, Hb) the target hidden state the round starts from
    full: tuple[torch.Tensor, torch.Tensor]  # the target's shared full-layer K, V (1, Hkv, Sf, D): positions 0..Sf-1
    sliding: tuple[torch.Tensor, torch.Tensor]  # shared sliding-layer K, V (1, Hkv, Ss, D): positions Sf-Ss..Sf-1
    drafts: list[int]


def record_rounds(target, assistant, ids: list[int], *, num_draft: int, max_new_tokens: int):
    """transformers' assisted greedy generation; returns (sequence, rounds as the drafter saw them)."""
    from transformers.generation import candidate_generator as cg

    assistant.generation_config.num_assistant_tokens = num_draft
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    rounds: list[Round] = []
    cls = cg.SinglePositionMultiTokenCandidateGenerator
    original = cls.get_candidates

    def spy(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kw):
        prefill = self.is_main_model_prefill
        out = original(self, input_ids, model_kwargs, model_outputs, is_first_iteration, n_last_matches, **kw)
        if not is_first_iteration and out[1] is not None:
            h = model_outputs.hidden_states[-1]
            h = h[:, -1] if prefill else h[:, n_last_matches]
            kv = model_outputs.shared_kv_states
            rounds.append(Round(input_ids[0].tolist(), h.detach().clone(),
                                tuple(t.detach().clone() for t in kv["full_attention"]),
                                tuple(t.detach().clone() for t in kv["sliding_attention"]),
                                out[0][0, input_ids.shape[1]:].tolist()))
        return out

    cls.get_candidates = spy
    try:
        with torch.no_grad():
            seq = target.generate(input_ids=torch.tensor([ids]), assistant_model=assistant, do_sample=False,
                                  max_new_tokens=max_new_tokens, pad_token_id=0)
    finally:
        cls.get_candidates = original
    return seq[0].tolist(), rounds


def reference_ranges(r: Round, window: int) -> dict[str, int]:
    """The target entries transformers' drafter reads in round ``r``, as our step arguments (batch 1).

    Full layer: the shared tensor cut to ``len(input_ids)`` entries (slot = position).  Sliding layer: its entries
    are the last ``Ss`` positions; cut to ``len(input_ids)`` entries by index, then the last ``window + 1`` of them
    (``|q - k| <= window`` on the flipped mask)."""
    length, sf, ss = len(r.input_ids), r.full[0].shape[2], r.sliding[0].shape[2]
    end = sf - ss + min(length, ss)
    return {"position": length - 1, "full_len": min(length, sf), "sliding_start": max(sf - ss, end - window - 1),
            "sliding_end": end}


class OurCaches:
    """The target's last full and last sliding layer caches in our layout, written as the runtime writes them:
    full slot = position; ring of ``ring`` slots, position p in slot p % ring, later writes overwriting."""

    def __init__(self, full_shape, ring_shape, max_len: int, ring: int):
        b, h, _, d = full_shape
        self.full_k, self.full_v = torch.zeros(b, h, max_len, d), torch.zeros(b, h, max_len, d)
        b, h, _, d = ring_shape
        self.ring_k, self.ring_v = torch.zeros(b, h, ring, d), torch.zeros(b, h, ring, d)

    def write(self, r: Round) -> None:
        sf, ss = r.full[0].shape[2], r.sliding[0].shape[2]
        self.full_k[:, :, :sf], self.full_v[:, :, :sf] = r.full
        ring = self.ring_k.shape[2]
        for i, p in enumerate(range(sf - ss, sf)):  # in position order: each slot ends with its newest position
            self.ring_k[:, :, p % ring], self.ring_v[:, :, p % ring] = r.sliding[0][:, :, i], r.sliding[1][:, :, i]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.full_k, self.full_v, self.ring_k, self.ring_v


def scaled_embedding(target, token: int) -> torch.Tensor:
    """The target's input embedding of ``token`` (its scaled embedding module), (1, Hb)."""
    with torch.no_grad():
        return target.get_input_embeddings()(torch.tensor([[token]]))[:, 0]


def prompt(n: int, seed: int) -> list[int]:
    return [2] + [int(t) for t in np.random.default_rng(seed).integers(3, 290, n - 1)]
