"""Gemma 4 Unified in PyTorch, written for export: the KV cache is data and prefill/decode are two functions.

Faithful to transformers' ``gemma4_unified`` (the tests compare against it), with these choices of ours:

* ``prefill(...)`` takes S new tokens per sequence after ``past_lens`` cached ones, with ``seq_lens`` valid
  (right padding), plus the soft tokens of every image and audio clip in the batch in prompt order; it returns the
  logits of each sequence's last valid token (``all_logits=True`` returns every position, for tests;
  ``logits_index`` the logits and final-normed hidden states of chosen positions: speculative verification).
* ``decode(...)`` takes one token per sequence.
* Caches are a flat list ``[k_0, v_0, k_1, v_1, ...]``: sliding layers (B, Hkv, R, D) ring buffers (R = window, or
  window + K + 1 for speculative decoding: `ring_slots`; positions from R, masks from the window), full layers
  (B, 1, max_len, 512) linear buffers.  See `exporter.kv` for how they are written.

Masks (as the reference builds them for generation): full layers are causal; sliding layers allow key position
``k`` for query ``q`` when ``k > q - window`` and (``k <= q`` or both are in the same contiguous image block).

Module names mirror the checkpoint (``model.language_model.*``, ``model.vision_embedder.*``,
``model.embed_vision.*``, ``model.embed_audio.*``) so a state dict loads without renaming.  This module does not
load weights (`exporter.weights`) or export (`exporter.export`).
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F
from torch import nn

from exporter.config import ModelConfig, TextConfig, VisionConfig
from exporter.kv import ring_positions, ring_write_prefill, tensor_scatter

__all__ = ["Gemma4Model", "cache_shapes", "ring_slots"]


def ring_slots(cfg: TextConfig, speculative: int = 0) -> int:
    """Slots R of a sliding layer's ring: the window W, or W + K + 1 for a speculative export (K = the most draft
    tokens one verify call checks), the fewest that hold, after any history of accepted and rejected drafts, all
    that the target's next calls and the assistant's next round read.  A verify call at position L writes L..L+K;
    after it the ring holds positions [L + K + 1 - R, L + K] (rejected drafts included; a stale slot is masked by
    the position its slot maps to).  The target's later queries (>= L + 1: the call's first token is always kept)
    see keys > L + 1 - W: R >= W + K - 1 would do.  The assistant's next round (`runtime.assistant.clean_ranges`)
    reads the window + 1 accepted positions before its query at L + n + 1 (n drafts accepted): with n = 0 those
    start at L - W, so R >= W + K + 1 (tests/test_assistant_runtime.py builds the history that W + K cuts short)."""
    if isinstance(speculative, bool) or not isinstance(speculative, int) or speculative < 0:
        raise ValueError(f"speculative={speculative!r}; expected an integer >= 0 draft tokens")
    return cfg.sliding_window + (speculative + 1 if speculative else 0)


def cache_shapes(cfg: TextConfig, batch: int, max_len: int, ring_slots: int | None = None) -> list[tuple[int, int, int, int]]:
    """Shapes of the flat cache list [k_0, v_0, ...] for a batch and a maximum total length; sliding rings hold
    ``ring_slots`` slots (default: the window; a speculative artifact's rings have slack: `ring_slots`)."""
    shapes = []
    for i in range(cfg.num_layers):
        length = (ring_slots or cfg.sliding_window) if cfg.is_sliding(i) else max_len
        shape = (batch, cfg.layer_kv_heads(i), length, cfg.layer_head_dim(i))
        shapes += [shape, shape]
    return shapes


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: computed in fp32, multiplied by the weight itself (not 1 + w); optionally no weight."""

    def __init__(self, dim: int, eps: float, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


class Rope(nn.Module):
    """RoPE inverse frequencies; ``rotary_fraction`` < 1 is Gemma 4's proportional RoPE (the other slots are 0)."""

    def __init__(self, head_dim: int, theta: float, rotary_fraction: float = 1.0):
        super().__init__()
        n_rot = int(rotary_fraction * head_dim // 2)
        inv = 1.0 / (theta ** (torch.arange(0, 2 * n_rot, 2, dtype=torch.int64).float() / head_dim))
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - n_rot)])
        self.register_buffer("inv_freq", inv, persistent=False)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, S, D) for positions (B, S)."""
    freqs = positions[..., None].float() * inv_freq  # (B, S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE.  x (B, S, H, D); cos/sin (B, S, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class AttentionCore(nn.Module):
    """Everything of one layer's attention between the projections (+ q/k/v norms) and o_proj: RoPE, the Gemma 4
    mask, scale-1.0 GQA attention and the cache write.  Exactly the ``FusedAttention`` plugin's contract
    (`plugins.fused_attention`): the graph rewrite turns the nodes exported from this module into one plugin node.
    No parameters; ``inv_freq`` is the layer type's RoPE constant (the plugin derives it from its attributes)."""

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.window = cfg.sliding_window
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.layer_kv_heads(layer)
        self.head_dim = cfg.layer_head_dim(layer)

    def forward(self, q, k, v, past_k, past_v, past_lens, seq_lens, image_block, inv_freq, decode: bool = False):
        """q (B, S, H, D), k and v (B, S, Hkv, D): normed, before RoPE; past_k/past_v (B, Hkv, T, D);
        past_lens, seq_lens (B,) int64; image_block (B, S) int64 (image run index, -1 elsewhere).
        Returns the attention output (B, S, H * D) and the new caches."""
        s = q.shape[1]
        steps = torch.arange(s, device=q.device)
        pos = past_lens[:, None] + steps  # (B, S)
        cos, sin = rope_tables(pos, inv_freq, q.dtype)
        q = apply_rope(q, cos, sin).transpose(1, 2)  # (B, H, S, D)
        k = apply_rope(k, cos, sin).transpose(1, 2)  # (B, Hkv, S, D)
        v = v.transpose(1, 2)
        write = self._decode if decode else self._prefill
        k_all, v_all, allowed, k_out, v_out = write(k, v, past_k, past_v, past_lens, seq_lens, image_block, pos)
        return self.attend(q, k_all, v_all, allowed), k_out, v_out

    def _prefill(self, k, v, past_k, past_v, past_lens, seq_lens, block, pos):
        qp = pos[:, :, None]
        if not self.sliding:  # write in place, attend over the whole buffer, causal
            k_new = tensor_scatter(past_k, k, past_lens, circular=False)
            v_new = tensor_scatter(past_v, v, past_lens, circular=False)
            slots = torch.arange(k_new.shape[2], device=k.device)
            return k_new, v_new, slots[None, None, :] <= qp, k_new, v_new
        # sliding: attend over [ring before the write, new tokens]; the ring is rebuilt from both.  The ring has R
        # >= window slots (slack for taking back rejected draft tokens): positions from R, the mask from the window
        window, s = self.window, k.shape[2]
        valid = torch.arange(s, device=k.device)[None] < seq_lens[:, None]  # (B, S)
        ring_pos = ring_positions(past_lens - 1, past_k.shape[2])  # (B, R)
        k_pos = torch.cat([ring_pos, pos], 1)  # (B, R + S)
        k_ok = torch.cat([ring_pos >= 0, valid], 1)
        k_block = torch.cat([torch.full_like(ring_pos, -1), block], 1)
        kp = k_pos[:, None, :]
        same_block = (block[:, :, None] == k_block[:, None, :]) & (block[:, :, None] >= 0)
        allowed = k_ok[:, None, :] & (kp > qp - window) & ((kp <= qp) | same_block)
        k_all, v_all = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        k_new = ring_write_prefill(past_k, k, past_lens, seq_lens)
        v_new = ring_write_prefill(past_v, v, past_lens, seq_lens)
        return k_all, v_all, allowed, k_new, v_new

    def _decode(self, k, v, past_k, past_v, past_lens, seq_lens, block, pos):
        # one token never wraps: the ring write is a linear TensorScatter at slot past_len % R (TensorRT documents
        # TensorScatter's linear mode only; circular would matter for engines built without the plugins)
        write = torch.remainder(past_lens, past_k.shape[2]) if self.sliding else past_lens
        k_new = tensor_scatter(past_k, k, write, circular=False)
        v_new = tensor_scatter(past_v, v, write, circular=False)
        if self.sliding:
            slot_pos = ring_positions(past_lens, k_new.shape[2])  # (B, R)
            allowed = (slot_pos >= 0) & (slot_pos > pos - self.window)
        else:
            allowed = torch.arange(k_new.shape[2], device=k.device)[None, :] <= pos
        return k_new, v_new, allowed[:, None, :], k_new, v_new

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """q (B, H, S, D); k, v (B, Hkv, T, D); allowed (B, S, T) bool.  Scale 1.0, no soft-capping."""
        b, _, s, d = q.shape
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, self.num_kv_heads, groups, s, d)  # (B, Hkv, G, S, D)
        scores = torch.matmul(q, k[:, :, None].transpose(-1, -2))  # (B, Hkv, G, S, T)
        scores = torch.where(allowed[:, None, None], scores, torch.finfo(scores.dtype).min)
        # fp32 softmax (bf16/fp16 scores upcast); a float64 run (the tests' exact reference) keeps float64, whose
        # masked scores would overflow to -inf in fp32 and turn fully masked padding rows into NaN
        probs = torch.softmax(scores if scores.dtype == torch.float64 else scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v[:, :, None])  # (B, Hkv, G, S, D)
        return out.reshape(b, self.num_heads, s, d).transpose(1, 2).reshape(b, s, self.num_heads * d)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.sliding = cfg.is_sliding(layer)
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.layer_kv_heads(layer)
        self.head_dim = cfg.layer_head_dim(layer)
        k_eq_v = cfg.attention_k_eq_v and not self.sliding
        hd, kvd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kvd, bias=False)
        self.v_proj = None if k_eq_v else nn.Linear(cfg.hidden_size, kvd, bias=False)
        self.o_proj = nn.Linear(hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.v_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, with_scale=False)
        self.core = AttentionCore(cfg, layer)

    def forward(self, x, past_k, past_v, past_lens, seq_lens, image_block, inv_freq, decode: bool = False):
        """x (B, S, hidden) -> (B, S, hidden) and this layer's new caches."""
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.num_heads, self.head_dim))
        k_raw = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v_raw = k_raw if self.v_proj is None else self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        out, k_out, v_out = self.core(
            q, self.k_norm(k_raw), self.v_norm(v_raw), past_k, past_v, past_lens, seq_lens, image_block, inv_freq,
            decode=decode,
        )
        return self.o_proj(out), k_out, v_out


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, attention: type[nn.Module] | None = None):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = (attention or Attention)(cfg, layer)  # the assistant's layers: query-only attention
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.register_buffer("layer_scalar", torch.ones(1))

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(attn_out)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class VisionEmbedder(nn.Module):
    """Encoder-free patch embedding: LN -> Linear -> LN -> + 2-D position table -> LN (projection is separate)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_ln1 = nn.LayerNorm(cfg.patch_dim)
        self.patch_dense = nn.Linear(cfg.patch_dim, cfg.mm_embed_dim)
        self.patch_ln2 = nn.LayerNorm(cfg.mm_embed_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(cfg.mm_posemb_size, 2, cfg.mm_embed_dim))
        self.pos_norm = nn.LayerNorm(cfg.mm_embed_dim)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """patches (N, patch_dim) float; positions (N, 2) int64 (x, y), (-1, -1) for padding."""
        h = self.patch_ln2(self.patch_dense(self.patch_ln1(patches.to(self.patch_dense.weight.dtype))))
        valid = (positions != -1).to(h.dtype)  # (N, 2)
        clamped = positions.clamp(min=0)
        pos_x = self.pos_embedding[clamped[:, 0], 0] * valid[:, 0:1]  # (N, E)
        pos_y = self.pos_embedding[clamped[:, 1], 1] * valid[:, 1:2]
        return self.pos_norm(h + (pos_x + pos_y))


class Projection(nn.Module):
    """RMSNorm without weight, then a Linear into the text hidden size (the vision and audio projections)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(in_dim, eps, with_scale=False)
        self.embedding_projection = nn.Linear(in_dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.embedding_projection.weight.dtype)
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


class _Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.text
        self.language_model = TextModel(t)
        if cfg.vision is not None:
            self.vision_embedder = VisionEmbedder(cfg.vision)
            self.embed_vision = Projection(cfg.vision.mm_embed_dim, t.hidden_size, cfg.vision.rms_norm_eps)
        if cfg.audio is not None:
            self.embed_audio = Projection(cfg.audio.samples_per_token, t.hidden_size, cfg.audio.rms_norm_eps)


def _round_to(x: float, dtype: torch.dtype) -> float:
    """``x`` rounded to ``dtype`` (as the reference's ``embed_scale.to(weight.dtype)``), in plain Python so that
    tracing under FakeTensorMode sees a constant, not a tensor."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if dtype == torch.bfloat16:
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round to nearest even on the top 16 bits
    elif dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", x))[0]
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _place(embeds: torch.Tensor, is_slot: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Put soft tokens (N, H) at the slots (B, S) in row-major order; embeds (B, S, H)."""
    b, s, hidden = embeds.shape
    flat = is_slot.reshape(-1)
    if not torch.onnx.is_in_onnx_export() and int(flat.sum()) != soft.shape[0]:
        raise ValueError(f"{int(flat.sum())} placeholder tokens in input_ids but {soft.shape[0]} soft tokens given")
    # float32 CumSum (TensorRT documents CumSum for float types only): exact below 2^24 placeholders per batch
    idx = torch.cumsum(flat.float(), 0).long() - 1
    n = soft.shape[0]
    table = torch.cat([soft.to(embeds.dtype), embeds.new_zeros(1, hidden)], dim=0)  # row n is a safe dummy
    picked = table[torch.where(flat, idx, n)].reshape(b, s, hidden)
    return torch.where(is_slot[..., None], picked, embeds)


def _image_blocks(is_image: torch.Tensor) -> torch.Tensor:
    """Contiguous runs of image tokens numbered 0, 1, ... per row; -1 elsewhere.  (B, S) int64."""
    prev = torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
    starts = is_image & ~prev
    return torch.where(is_image, torch.cumsum(starts.float(), 1).long() - 1, -1)  # float CumSum, as in _place


class Gemma4Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        self.model = _Backbone(cfg)
        self.rope_sliding = Rope(t.head_dim, t.sliding_rope_theta)
        self.rope_full = Rope(t.global_head_dim, t.full_rope_theta, t.full_partial_rotary_factor)
        self.embed_scale = float(t.hidden_size) ** 0.5

    # ------------------------------------------------------------------ pieces
    def _embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        tk = self.cfg.tokens
        is_mm = (input_ids == tk.image) | (input_ids == tk.audio) | (input_ids == tk.video)
        ids = torch.where(is_mm, tk.pad, input_ids)
        w = self.model.language_model.embed_tokens.weight
        return F.embedding(ids, w) * _round_to(self.embed_scale, w.dtype)  # scale rounded to the weight dtype

    def embed_images(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_vision(self.model.vision_embedder(patches, positions))

    def embed_audio(self, frames: torch.Tensor) -> torch.Tensor:
        return self.model.embed_audio(frames)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._head(self.model.language_model.norm(h))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Tied LM head and final softcap on the final-normed hidden state."""
        logits = torch.matmul(h, self.model.language_model.embed_tokens.weight.t())
        cap = self.cfg.text.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _run_layers(self, h, past_lens, seq_lens, image_block, caches, decode: bool):
        present = []
        for i, layer in enumerate(self.model.language_model.layers):
            attn = layer.self_attn
            inv_freq = (self.rope_sliding if attn.sliding else self.rope_full).inv_freq
            a, k_out, v_out = attn(
                layer.input_layernorm(h), caches[2 * i], caches[2 * i + 1], past_lens, seq_lens, image_block,
                inv_freq, decode=decode,
            )
            h = layer.finish(h, a)
            present += [k_out, v_out]
        return h, present

    # ------------------------------------------------------------------ prefill
    def prefill(
        self,
        input_ids: torch.Tensor,
        past_lens: torch.Tensor,
        seq_lens: torch.Tensor,
        caches: list[torch.Tensor],
        image_patches: torch.Tensor | None = None,
        image_positions: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        all_logits: bool = False,
        logits_index: torch.Tensor | None = None,
    ):
        """input_ids (B, S) int64 with one image/audio token per soft token; past_lens, seq_lens (B,) int64.

        Returns (logits, caches): logits (B, V) of each row's last valid token, (B, S, V) with ``all_logits``.
        ``logits_index`` (B, N) int64 (indices into the S new tokens; a speculative graph's verify input) returns
        (logits (B, N, V), hidden (B, N, hidden), caches) at those tokens, ``hidden`` after the final norm: what
        transformers' ``hidden_states[-1]`` is and the Gemma 4 assistant reads."""
        tk = self.cfg.tokens
        b = input_ids.shape[0]
        h = self._embed_text(input_ids)
        if image_patches is not None and self.cfg.vision is not None:
            h = _place(h, input_ids == tk.image, self.embed_images(image_patches, image_positions))
        if audio_frames is not None and self.cfg.audio is not None:
            h = _place(h, input_ids == tk.audio, self.embed_audio(audio_frames))
        block = _image_blocks(input_ids == tk.image)  # (B, S)
        h, present = self._run_layers(h, past_lens, seq_lens, block, caches, decode=False)
        if logits_index is not None:
            n = logits_index.shape[1]
            h = torch.gather(h, 1, logits_index[:, :, None].expand(b, n, h.shape[-1]))  # (B, N, hidden)
            hidden = self.model.language_model.norm(h)
            return self._head(hidden), hidden, present
        if not all_logits:
            last = (seq_lens - 1).clamp(min=0)
            h = torch.gather(h, 1, last[:, None, None].expand(b, 1, h.shape[-1]))[:, 0]  # (B, hidden)
        return self._logits(h), present

    # ------------------------------------------------------------------ decode
    def decode(
        self, input_ids: torch.Tensor, past_lens: torch.Tensor, caches: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids (B, 1) int64; past_lens (B,) int64.  Returns logits (B, V) and the updated caches."""
        h = self._embed_text(input_ids)
        seq_lens = torch.ones_like(past_lens)
        block = torch.full_like(input_ids, -1)  # no images in decode
        h, present = self._run_layers(h, past_lens, seq_lens, block, caches, decode=True)
        return self._logits(h[:, 0]), present

    # ------------------------------------------------------------------ helpers
    def empty_caches(self, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                     ring_slots: int | None = None) -> list[torch.Tensor]:
        return [torch.zeros(s, dtype=dtype) for s in cache_shapes(self.cfg.text, batch, max_len, ring_slots)]

