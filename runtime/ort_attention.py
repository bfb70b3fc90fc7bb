"""The attention geometry an ONNX Runtime engine takes as inputs: positions, masks and cache-write indices, computed
on the host from the lengths the runtime already has.

`graphs.ort.attention` lowers each attention node of the one-graph engine to ONNX Runtime kernels
(GroupQueryAttention for full layers; RotaryEmbedding + Attention + an in-place ring write for sliding layers).
Those kernels need a few small tensors that depend only on ``past_lens``, ``seq_lens``, the number of new tokens S,
the window and where the image tokens are; every layer of a kind shares them.  Computed inside the graph they cost
~50 kernels per call (a decode step: an ``If`` with a one-token branch, ~0.4 ms of a ~12 ms INT4 bench-model step);
here they are a few numpy operations on arrays of (B, S + window) elements.

The values are the plugin contract's (`plugins.fused_attention.reference`, sliding prefill branch), per sequence:

* positions (B, S): past_lens + i, the RoPE position of new token i;
* ring slots read n = max(1, min(W, max(past_lens))): until a ring has wrapped its later slots hold nothing;
* ring bias (B, 1, S, n + S) float32, 0 or float32 min: key valid (ring slot j holds position
  p_j = L - ((L - j) mod W), L = past_lens - 1, valid iff p_j >= 0; new key i iff i < seq_lens), inside the window
  (kp > qp - W) and causal, or both in the same image block (bidirectional attention within an image);
* ring write: U = min(S, W) slots from slot ``first`` = (past_lens + seq_lens - U) mod W, and for each the index into
  concat(ring slots read, new keys) it takes: the new token where its position is >= past_lens, else the slot's
  own value (padded tokens never reach the ring);
* the one-token branch (ring engines; a call of one new token in every row; GroupQueryAttention over the ring after
  the write): one_token, the last slot each row reads s = min(past_lens, R - 1) (int32, and as an int64 gather
  index (B, 1, 1, 1)), T = max(s) + 1 and the bias (B, 1, 1, T) by the position each slot holds (`_one_token`).
  The ring path's inputs are then made for n = 1 (not used).  Engines that take ``write_first`` instead of
  ``one_token`` also take that branch for a text call of S > 1 tokens in one row whose ring has not wrapped
  (past_lens + S <= R, so slot j holds position j after the write: a verify pass): its S queries read slots
  0..past_lens + S - 1 (gather indices (1, 1, S, 1) of the slots written, bias (1, 1, S, T) by the window,
  GroupQueryAttention's own mask is causal);
* full layers (GroupQueryAttention): seqlens_k = past_lens + S - 1 (int32) and the total length max(past_lens + S);
  for engines whose GroupQueryAttention takes ``query_seqlens`` (the windowed sliding form) query_seqlens =
  seq_lens and seqlens_k = past_lens + seq_lens - 1 (at least 0): right padding never enters a cache.

Rings of R > W slots (a speculative artifact's, `exporter.model.ring_slots`: slack to take back rejected draft
tokens) use R wherever a slot or a position modulo the ring appears (n, p_j, U, ``first``, the gather, the one-token
branch's last slot read) and W only in the window test; a slot's position is then checked against the window in the
one-token branch's bias too (p_j = past - ((past - j) mod R) > past - W).  ``slots`` None means R = W.

Image blocks are contiguous runs of the image token, numbered per row, only when the call has image rows (a decode
step that generates the image token id embeds it as text: `graphs.ort.lower.gate_soft_token_slots`).
Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["INPUTS", "attention_feeds", "attention_inputs", "bind_gqa", "check_engine_inputs", "decode_inputs",
           "gqa_output", "gqa_outputs", "image_blocks", "window_offset", "window_verify_tokens"]

# graph input name per value
INPUTS = {
    "positions": "attn_positions",  # (B, S) int64
    "ring_used": "attn_ring_used",  # (1,) int64
    "ring_bias": "attn_ring_bias",  # (B, 1, S, n + S) float32
    "ring_first": "attn_ring_first",  # (B,) int64
    "ring_gather": "attn_ring_gather",  # (B, 1, U, 1) int64
    "seqlens_k": "attn_seqlens_k",  # (B,) int32
    "total_len": "attn_total_len",  # () int32
    "query_seqlens": "attn_query_seqlens",  # (B,) int32, engines whose attention skips right padding
    "one_token": "attn_one_token",  # () bool, ring engines: one new token in every row (the one-token branch)
    "write_first": "attn_write_first",  # () bool, newer ring engines: that branch, also for S > 1 (`attention_inputs`)
    "ring_seqlens_k": "attn_ring_seqlens_k",  # (B,) int32, the last ring slot the one-token branch reads
    "ring_total": "attn_ring_total",  # () int32 T, max(ring_seqlens_k) + 1
    "ring_last": "attn_ring_last",  # (B, 1, S', 1) int64, the slots of the branch's S' queries (S' = 1 or S)
    "ring_bias_read": "attn_ring_bias_read",  # (B, 1, S', T) float32
}
_SLIDING = ("positions", "ring_used", "ring_bias", "ring_first", "ring_gather", "one_token", "write_first",
            "ring_seqlens_k", "ring_total", "ring_last", "ring_bias_read")
_ONE_TOKEN = ("one_token", "write_first", "ring_seqlens_k", "ring_total", "ring_last", "ring_bias_read")
# the one-token form's GroupQueryAttention over a ring writes its present outputs to extra graph outputs named this
# prefix + the cache output's name (`gqa_output`); the runtime binds them to that cache's buffer too (`bind_gqa`)
GQA_PRESENT = "attn_ring_gqa_"
NEG = np.finfo(np.float32).min


def image_blocks(is_image: np.ndarray) -> np.ndarray:
    """Contiguous runs of image tokens numbered 0, 1, ... per row; -1 elsewhere.  (B, S) int64."""
    is_image = np.asarray(is_image, bool)
    prev = np.concatenate([np.zeros_like(is_image[:, :1]), is_image[:, :-1]], axis=1)
    starts = is_image & ~prev
    return np.where(is_image, np.cumsum(starts, axis=1) - 1, -1).astype(np.int64)


def attention_inputs(past_lens, seq_lens, s: int, *, window: int | None, blocks: np.ndarray | None = None,
                     want=INPUTS.keys(), slots: int | None = None) -> dict[str, np.ndarray]:
    """The values named in ``want`` (keys of `INPUTS`) for a call of ``s`` new tokens per row; ``blocks`` (B, S)
    image block ids (`image_blocks`), None for no image tokens; ``window`` is needed for the sliding values,
    ``slots`` is the rings' slot count R when it is not the window."""
    past = np.asarray(past_lens, np.int64).reshape(-1)
    lens = np.asarray(seq_lens, np.int64).reshape(-1)
    if len(past) != len(lens):
        raise ValueError(f"attention inputs: {len(past)} past lengths but {len(lens)} sequence lengths")
    b, want = len(past), set(want)
    out: dict[str, np.ndarray] = {}
    if "query_seqlens" in want:  # padding never enters a cache: each row's length counts, not the call's width
        out["query_seqlens"] = lens.astype(np.int32)
        out["seqlens_k"] = np.maximum(past + lens - 1, 0).astype(np.int32)  # a row of no tokens keeps its cache
    elif "seqlens_k" in want:
        out["seqlens_k"] = (past + s - 1).astype(np.int32)
    if "total_len" in want:
        out["total_len"] = np.array(int((past + s).max(initial=s)), np.int32)
    if not want & set(_SLIDING):
        return out
    w, r = _ring(window, slots)
    ar = np.arange(s, dtype=np.int64)
    pos = past[:, None] + ar[None]  # (B, S)
    one = bool(want & set(_ONE_TOKEN)) and s == 1 and bool((lens == 1).all())
    # several tokens of one text row before its ring wraps: the branch too, where the engine takes them (write_first)
    many = ("write_first" in want and s > 1 and b == 1 and int(lens[0]) == s and int(past[0]) + s <= r
            and (blocks is None or not (np.asarray(blocks) >= 0).any()))
    # the one-token branch writes, then reads the ring in place: the prefill path's inputs are fed but not used, so
    # they are made for n = 1 (small and of fixed shape)
    n = 1 if one or many else max(1, min(r, int(past.max(initial=0))))
    out["positions"] = pos
    out["ring_used"] = np.array([n], np.int64)
    if want & set(_ONE_TOKEN):
        out.update(_one_token(past, w, one or many, r, s if many else 1))
    if "ring_bias" in want:
        last = past[:, None] - 1
        ring_pos = last - np.mod(last - np.arange(n)[None], r)  # (B, n)
        k_pos = np.concatenate([ring_pos, pos], 1)  # (B, n + S)
        k_ok = np.concatenate([ring_pos >= 0, ar[None] < lens[:, None]], 1)
        qp, kp = pos[:, :, None], k_pos[:, None, :]
        ok = k_ok[:, None, :] & (kp > qp - w)
        causal = kp <= qp
        if blocks is not None:
            blk = np.asarray(blocks, np.int64).reshape(b, s)
            k_blk = np.concatenate([np.full((b, n), -1, np.int64), blk], 1)
            causal = causal | ((blk[:, :, None] == k_blk[:, None, :]) & (blk[:, :, None] >= 0))
        out["ring_bias"] = np.where(ok & causal, np.float32(0), NEG).astype(np.float32)[:, None]
    if want & {"ring_first", "ring_gather"}:
        u = min(s, r)
        start = past + lens - u  # (B,) may be < 0
        out["ring_first"] = np.mod(start, r)
        p = start[:, None] + np.arange(u)[None]  # (B, U) the positions written
        idx = np.where(p >= past[:, None], p - past[:, None] + n,  # new token i sits at n + i after the n slots
                       np.minimum(np.mod(p, r), n - 1))  # old slots: < n unless p < 0 (never valid: any slot)
        out["ring_gather"] = idx[:, None, :, None].astype(np.int64)
    return {k: v for k, v in out.items() if k in want}


def _ring(window, slots) -> tuple[int, int]:
    """(W, R) checked: the window and the rings' slot count (>= W; None: W)."""
    if not window or window < 1:
        raise ValueError(f"attention inputs: the sliding layers need the window, got {window!r}")
    r = int(window) if slots is None else int(slots)
    if r < window:
        raise ValueError(f"attention inputs: rings of {r} slots cannot hold a window of {window}")
    return int(window), r


def gqa_output(cache_output: str) -> str:
    """The name of the extra graph output of a ring's GroupQueryAttention present (`GQA_PRESENT`)."""
    return GQA_PRESENT + cache_output


def gqa_outputs(output_names) -> dict[str, str]:
    """cache output name -> its ring's GroupQueryAttention present output, for an engine that has them (both must
    be bound to the same buffer: the attention then reads the ring where the write left it and copies nothing)."""
    names = set(output_names)
    return {n[len(GQA_PRESENT):]: n for n in output_names
            if n.startswith(GQA_PRESENT) and n[len(GQA_PRESENT):] in names}


def check_engine_inputs(root, input_names, window) -> None:
    """Refuse an engine whose attention inputs this runtime cannot make: inputs of an earlier lowering (the ring
    decode step before GroupQueryAttention read the rings), or the sliding geometry without the window."""
    from runtime.manifest import ArtifactError

    names = set(input_names)
    if stale := sorted({"attn_ring_read", "attn_ring_full"} & names):
        raise ArtifactError(f"{root}: the ONNX Runtime engine takes {stale}, inputs of an earlier lowering of the "
                            "sliding layers' decode step; rebuild it with `make build-engine BACKEND=onnxruntime`")
    if names & {INPUTS[k] for k in ("positions", "ring_bias", "ring_first", "ring_gather")} and not window:
        raise ArtifactError(f"{root}: the ONNX Runtime engine takes the sliding layers' attention geometry as "
                            "inputs but its record has no attention_inputs.window; rebuild it with "
                            "`make build-engine BACKEND=onnxruntime`")


def bind_gqa(binding, present: list[str], names_out: list[str], cache: list, in_place: list[bool]) -> None:
    """Bind each ring's GroupQueryAttention present output (`gqa_outputs`: ring engines' one-token form) to its
    cache's buffer, as that cache's own output is: the attention then shares past and present in place.  Unbound,
    ONNX Runtime gives it a buffer of its own, which GroupQueryAttention clears and fills (correct, but a copy)."""
    extra = gqa_outputs(names_out)
    for i, p_out in enumerate(present):
        if p_out in extra:
            if in_place[i]:
                binding.bind_ortvalue_output(extra[p_out], cache[i])
            else:
                binding.bind_output(extra[p_out], "cpu")


def _one_token(past: np.ndarray, w: int, one: bool, slots: int | None = None, s: int = 1) -> dict[str, np.ndarray]:
    """The one-token branch's inputs (GroupQueryAttention over a ring of ``slots`` slots, default the window W, as
    the write left it: `graphs.ort.attention._ring_gqa`): row b reads slots 0..s_b, s_b = min(past_b, R - 1), the
    slots filled so far (all R once wrapped); slot j then holds position p_j = past_b - ((past_b - j) mod R) and is
    masked unless past_b - W < p_j (always so when R = W; a ring with slack holds older positions too).  Not a
    one-token call: s_b = 0 and no mask (the branch's output is not used: one slot read and written back).

    ``s`` > 1 (``one`` True, one row, past + s <= R: `attention_inputs`' write-first call of several tokens): query
    i (position past + i) sits at slot past + i and reads slots 0..past + s - 1 (GroupQueryAttention's causal mask
    hides those after its own), the bias masks slots outside its window (p_j <= past + i - W) and after it."""
    r = w if slots is None else int(slots)
    if r < w:
        raise ValueError(f"attention inputs: a ring of {r} slots cannot hold a window of {w}")
    b = len(past)
    if s > 1 and not (one and b == 1 and int(past[0]) + s <= r):
        raise ValueError(f"attention inputs: {s} tokens in the one-token branch need one row whose ring of {r} slots "
                         f"has not wrapped (past {past.tolist()})")
    end = past + s - 1  # the last position written
    last = np.minimum(end, r - 1) if one else np.zeros(b, np.int64)  # the last slot read
    t = int(last.max(initial=0)) + 1
    held = end[:, None] - np.mod(end[:, None] - np.arange(t)[None], r)  # (B, T) position in slot j after the write
    qp = past[:, None, None] + np.arange(s)[None, :, None]  # (B, S, 1) the queries' positions
    ok = ~np.asarray(one) | ((held[:, None] > qp - w) & (held[:, None] <= qp)
                            & (np.arange(t)[None, None] <= last[:, None, None]))
    rows = (last[:, None] - (s - 1) + np.arange(s)[None]).reshape(b, 1, s, 1)  # the slots of the s queries
    return {"one_token": np.array(one), "write_first": np.array(one), "ring_seqlens_k": last.astype(np.int32),
            "ring_total": np.array(t, np.int32), "ring_last": rows.astype(np.int64),
            "ring_bias_read": np.where(ok, np.float32(0), NEG).astype(np.float32).reshape(b, 1, s, t)}


def decode_inputs(past_lens: np.ndarray, *, window: int | None, want=INPUTS.keys(),
                  slots: int | None = None) -> dict[str, np.ndarray]:
    """`attention_inputs` for a decode step (one new token in every row, no image tokens), in a few numpy calls.

    The decode loop calls this between two ONNX Runtime runs, when the interpreter's and numpy's code and data are
    out of the CPU caches: the general function's ~25 numpy calls cost ~0.4 ms there (3 % of an INT4 bench-model
    step).  With S = 1 the formulas reduce to: positions = past; n = max(1, min(W, max(past))); ring slot j of row b
    valid iff j < past_b, except the slot the new token replaces once the ring has wrapped (j = past_b mod W, its
    position past_b - W is outside the window); the new key always valid; the ring written at slot past_b mod W from
    the new token (index n of the concat).  Rings of R > W slots: slot j holds p_j = (past_b - 1) - ((past_b - 1 - j)
    mod R), valid iff p_j >= 0 and p_j > past_b - W.  Equal to `attention_inputs(past, 1, 1, window=...)` (tested)."""
    past = np.asarray(past_lens, np.int64).reshape(-1)
    want = set(want)
    out: dict[str, np.ndarray] = {}
    if "seqlens_k" in want:
        out["seqlens_k"] = past.astype(np.int32)
    if "query_seqlens" in want:
        out["query_seqlens"] = np.ones(len(past), np.int32)
    if "total_len" in want:
        out["total_len"] = np.array(int(past.max(initial=0)) + 1, np.int32)
    if not want & set(_SLIDING):
        return out
    (w, r), b = _ring(window, slots), len(past)
    one = bool(want & set(_ONE_TOKEN))
    n = 1 if one else max(1, min(r, int(past.max(initial=0))))
    out["positions"] = past.reshape(b, 1).copy()
    out["ring_used"] = np.array([n], np.int64)
    if one:
        out.update(_one_token(past, w, True, r))
    slot = past % r
    if "ring_bias" in want:
        bias = np.zeros((b, 1, 1, n + 1), np.float32)
        j = np.arange(n)
        if r == w:
            bad = (j[None] >= past[:, None]) | ((past >= w)[:, None] & (j[None] == slot[:, None]))
        else:
            last = past[:, None] - 1
            p_j = last - np.mod(last - j[None], r)
            bad = (p_j < 0) | (p_j <= past[:, None] - w)
        bias[:, 0, 0, :n][bad] = NEG
        out["ring_bias"] = bias
    if "ring_first" in want:
        out["ring_first"] = slot
    if "ring_gather" in want:
        out["ring_gather"] = np.full((b, 1, 1, 1), n, np.int64)
    return {k: v for k, v in out.items() if k in want}


def attention_feeds(input_names, feeds: dict[str, Any], engine: dict[str, Any],
                    tokens: dict[str, int]) -> dict[str, np.ndarray]:
    """The engine inputs of `INPUTS` that a session with ``input_names`` takes, for the call in ``feeds``
    (``input_ids``, ``past_lens``, ``seq_lens``, ``image_patches`` as `runtime.ort_backend.prefill_feeds` makes
    them); ``engine`` is the manifest's ``engines.onnxruntime`` record (its ``attention_inputs.window``)."""
    names = set(input_names)
    want = [k for k, v in INPUTS.items() if v in names]
    if not want:
        return {}
    ids = np.asarray(feeds["input_ids"])
    blocks = None
    patches = feeds.get("image_patches")
    if "ring_bias" in want and "image" in tokens and patches is not None and len(patches):
        blocks = image_blocks(ids == tokens["image"])
    record = engine.get("attention_inputs") or {}
    values = attention_inputs(feeds["past_lens"], feeds["seq_lens"], ids.shape[1], window=record.get("window"),
                              blocks=blocks, want=want, slots=record.get("ring_slots"))
    return {INPUTS[k]: v for k, v in values.items()}


def window_offset(total, window: int, capacity: int) -> np.ndarray:
    """E(T): the position a windowed GroupQueryAttention cache (``--ort-sliding window``: ``capacity`` C slots,
    window W) holds in row 0 after ``total`` T tokens, (B,) int64 for (B,) totals.  ONNX Runtime's contract: the
    cache holds the last L(T) = T - E(T) positions from row 0 (row s holds position E(T) + s), E(T) = 0 for T <= C,
    else G * ceil((T - C) / G) with G = C - W + 1 (it compacts once every G tokens, keeping the last W)."""
    g = capacity - window + 1
    if g < 1:
        raise ValueError(f"a windowed cache of {capacity} slots cannot hold the window {window}")
    t = np.asarray(total, np.int64)
    return np.where(t <= capacity, 0, g * -(-(t - capacity) // g)).astype(np.int64)


def window_verify_tokens(past_len: int, window: int, capacity: int) -> int:
    """The most new tokens (>= 1) one call may bring to a windowed GroupQueryAttention cache (``--ort-sliding
    window``: ``capacity`` C slots, window W) of ``past_len`` tokens such that dropping any of them but the first
    afterwards is exact by the lengths alone.  ONNX Runtime's contract: after T tokens the cache holds the last
    L(T) = T - E(T) positions from row 0, E(T) = 0 for T <= C, else G * ceil((T - C) / G) with G = C - W + 1; taking
    back k tokens is exact iff E(T - k) = E(T).  E is constant on (C + (m - 1) G, C + m G], so a call may run up to
    the end of the interval that holds its first token."""
    g = capacity - window + 1
    if g < 1:
        raise ValueError(f"a windowed cache of {capacity} slots cannot hold the window {window}")
    first = past_len + 1
    end = capacity if first <= capacity else capacity + g * -(-(first - capacity) // g)
    return max(1, end - past_len)
