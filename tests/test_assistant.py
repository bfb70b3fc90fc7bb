"""Our PyTorch assistant (`exporter.assistant`) against transformers' Gemma4UnifiedAssistantForCausalLM: one step's
logits and next hidden state on the same target keys/values (our ring and full-cache layout, ring wrapped, ring
slack), the drafts of every round of transformers' own assisted ``generate`` token for token (context longer than
the window, plain and centroid-masked LM heads), the reference's assisted output equal to its plain greedy output,
config parsing and the loader's refusals.  Every preset of `ASSISTANT_PRESETS` is run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from exporter.assistant import ASSISTANT_PRESETS, AssistantConfig, load_assistant
from exporter.config import PRESETS
from exporter.weights import CheckpointError
from tests.assistant_ref import OurCaches, prompt, record_rounds, reference_ranges, scaled_embedding

K = 4  # drafts per round


def _step(ours, target, token, hidden, rg, caches):
    with torch.no_grad():
        return ours.step(scaled_embedding(target, token), hidden, torch.tensor([rg["position"]]),
                         torch.arange(rg["full_len"] + 2), torch.tensor([rg["full_len"]]),
                         torch.tensor([rg["sliding_start"]]), torch.tensor([rg["sliding_end"]]), *caches)


@pytest.mark.parametrize("name", sorted(ASSISTANT_PRESETS))
def test_step_matches_transformers_forward(pairs, name):
    """Logits within 1e-4 of the logit range and the next hidden state within 1e-5 of its scale, for queries at the
    end of the prompt, inside it and before the window fills, reading a ring of window + 1 and of window + 4 slots
    written past the query (the rejected-draft slack) and a full cache longer than what is read."""
    target, ref, ours, _ = pairs(name)
    window = ref.config.text_config.sliding_window
    ids = prompt(3 * window + 5, 1)
    with torch.no_grad():
        out = target(input_ids=torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True)
    fk, fv = out.shared_kv_states["full_attention"]
    sk, sv = out.shared_kv_states["sliding_attention"]
    hidden_all, n = out.hidden_states[-1], len(ids)
    checked = 0
    for ring in (window + 1, window + 4):
        for end in (n, n - 3, window - 2):
            kv = {"full_attention": (fk[:, :, :end], fv[:, :, :end]), "sliding_attention": (sk[:, :, :end], sv[:, :, :end])}
            token = ids[end] if end < n else 7
            emb = torch.cat([scaled_embedding(target, token), hidden_all[:, end - 1]], -1)
            with torch.no_grad():
                want = ref(inputs_embeds=emb[:, None], position_ids=torch.tensor([[end]]), shared_kv_states=kv)
            caches = OurCaches(fk.shape, sk.shape, max_len=n + 6, ring=ring)
            caches.full_k[:, :, :n], caches.full_v[:, :, :n] = fk, fv
            for p in range(min(n, end + ring - window - 1)):  # written past `end` as far as the slack allows
                caches.ring_k[:, :, p % ring], caches.ring_v[:, :, p % ring] = sk[:, :, p], sv[:, :, p]
            rg = {"position": end, "full_len": end, "sliding_start": max(0, end - window - 1), "sliding_end": end}
            logits, nxt, tok = _step(ours, target, token, hidden_all[:, end - 1], rg, caches.tensors())
            ref_logits = want.logits[:, 0]
            span = float(ref_logits.max() - ref_logits.min())
            err = float((logits - ref_logits).abs().max())
            assert err <= 1e-4 * span, f"{name} ring {ring} end {end}: logits max err {err:.3g} (range {span:.3g})"
            h_err = float((nxt - want.last_hidden_state[:, 0]).abs().max())
            h_scale = float(want.last_hidden_state.abs().max())
            assert h_err <= 1e-5 * h_scale, f"{name}: next hidden max err {h_err:.3g} (scale {h_scale:.3g})"
            assert int(tok) == int(ref_logits.argmax())
            checked += 1
    assert checked == 6


@pytest.mark.parametrize("name", sorted(ASSISTANT_PRESETS))
def test_drafts_match_transformers_candidate_generator(pairs, name):
    """Every round of transformers' assisted greedy generate (prompt of 2 windows + 3, 3 windows of new tokens:
    the ring wraps several times): our drafts, read from our cache layout (ring of window + K + 1 slots) at the
    positions the reference reads, equal the reference's token for token; its assisted output equals plain greedy."""
    target, ref, ours, _ = pairs(name)
    window = ref.config.text_config.sliding_window
    ids = prompt(2 * window + 3, 2)
    seq, rounds = record_rounds(target, ref, ids, num_draft=K, max_new_tokens=3 * window)
    with torch.no_grad():
        plain = target.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=3 * window,
                                pad_token_id=0)[0].tolist()
    assert seq == plain, "transformers' assisted greedy output differs from its plain greedy output"
    ring = window + K + 1
    assert len(rounds) >= 2 * window and len(rounds[-1].input_ids) > 3 * ring  # many rounds, the ring wrapped
    caches, mismatches = None, []
    for i, r in enumerate(rounds):
        caches = caches or OurCaches(r.full[0].shape, r.sliding[0].shape, max_len=len(seq) + K + 2, ring=ring)
        caches.write(r)
        rg = reference_ranges(r, window)
        if i == 0:  # the first round reads exactly the clean positions the runtime uses by default
            p = rg["position"]
            assert rg == {"position": p, "full_len": p, "sliding_start": p - window - 1, "sliding_end": p}
        token, hidden, drafts = r.input_ids[-1], r.hidden, []
        for _ in r.drafts:
            _, hidden, tok = _step(ours, target, token, hidden, rg, caches.tensors())
            token = int(tok)
            drafts.append(token)
        if drafts != r.drafts:
            mismatches.append((i, r.drafts, drafts))
    assert not mismatches, f"{name}: {len(mismatches)} of {len(rounds)} rounds differ, first {mismatches[0]}"


def test_config_round_trip_and_refusals(pairs):
    _, ref, ours, path = pairs("tiny-deep-assistant")
    d = json.loads((path / "config.json").read_text())
    cfg = AssistantConfig.from_hf_dict(d)
    assert cfg == ASSISTANT_PRESETS["tiny-deep-assistant"][1]
    assert cfg.text.intermediate_size == 2 * d["text_config"]["intermediate_size"]  # double-wide MLP
    cfg.check_target(PRESETS["tiny-deep"].text)
    with pytest.raises(ValueError, match="head_dim"):
        cfg.check_target(PRESETS["tiny"].text)
    with pytest.raises(ValueError, match="model_type"):
        AssistantConfig.from_hf_dict(d | {"model_type": "gemma4_unified"})
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        AssistantConfig.from_hf_dict(d | {"text_config": d["text_config"] | {"num_kv_shared_layers": 1}})
    with pytest.raises(ValueError, match="num_centroids"):
        AssistantConfig.from_hf_dict(d | {"num_centroids": 7})


def test_loader_names_every_bad_tensor(pairs, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, _, path = pairs("tiny-assistant")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    state = load_file(bad / "model.safetensors")
    state.pop("pre_projection.weight")
    state["post_projection.weight"] = state["post_projection.weight"][:, :3].contiguous()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(2, 2)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_assistant(bad)
    for needle in ("missing tensor 'pre_projection.weight'", "'post_projection.weight' in model.safetensors has shape",
                   "unexpected tensor 'model.layers.0.self_attn.k_proj.weight'"):
        assert needle in str(e.value)
