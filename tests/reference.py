"""Independent references for the tests: plain softmax attention with an explicit boolean mask.

Nothing here calls lt_train's kernels; the mask is written out from the definition:
query i sees key j iff j is a real token of the same document (idx - pos equal), idx_j <= idx_i and
(pos_j < S or pos_i - pos_j < W).
"""
from __future__ import annotations

import math

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def dense_streaming_reference(q, k, v, sink, window, q_pos, k_pos, q_idx, k_idx, k_valid, scale=None):
    """q [B, Hq, Q, D], k/v [B, Hkv, K, D]; the rest [B, Q] / [B, K]. fp32 math."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1).float()
    v = v.repeat_interleave(rep, dim=1).float()
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k) * scale
    same_doc = (k_idx - k_pos)[:, None, :] == (q_idx - q_pos)[:, :, None]  # packed documents
    allowed = (
        k_valid[:, None, :]
        & same_doc
        & (k_idx[:, None, :] <= q_idx[:, :, None])
        & ((k_pos[:, None, :] < sink) | (q_pos[:, :, None] - k_pos[:, None, :] < window))
    )
    # queries with no real key (padding) attend to themselves, as the code under test promises
    allowed = allowed | (~allowed.any(-1, keepdim=True) & (k_idx[:, None, :] == q_idx[:, :, None]))
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v).to(q.dtype)


def reference_layout(B, T, pads, device="cpu"):
    """Left padding as generate() lays it out: pads get position 0, real tokens 0..n-1."""
    pads = torch.as_tensor(pads)
    t = torch.arange(T)
    valid = t[None, :] >= pads[:, None]
    pos = (t[None, :] - pads[:, None]).clamp(min=0)
    idx = t.expand(B, T)
    return pos.to(device), idx.to(device), valid.to(device)


def _reference_model_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A whole-sequence (no cache) attention for a reference model: streaming in layers that carry
    `lt_streaming`, plain causal elsewhere. Takes the 2D padding mask from kwargs['ref_valid']."""
    B, _, T, _ = query.shape
    valid = kwargs["ref_valid"]
    pos = kwargs["position_ids"].expand(B, T)
    idx = torch.arange(T).expand(B, T)
    spec = getattr(module, "lt_streaming", None)
    full = dense_streaming_reference(query, key, value, 0, 1 << 40, pos, pos, idx, idx, valid, scaling)
    out = full
    if spec is not None:
        out = dense_streaming_reference(query, key, value, spec.sink, spec.window, pos, pos, idx, idx, valid, scaling)
        # online selection: queries before `ref_stream_from` (the prompt) were computed with full attention
        start = kwargs.get("ref_stream_from", 0)
        out = torch.where((idx < start)[:, None, :, None], full, out)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("lt_test_reference", _reference_model_attention)
AttentionMaskInterface.register("lt_test_reference", sdpa_mask)


def reference_logits(ref_model, input_ids, attention_mask, **extra):
    """Logits of a full recompute over the whole sequence, positions as generate() makes them."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return ref_model(input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                     ref_valid=attention_mask.bool(), **extra).logits


def reference_greedy(ref_model, input_ids, attention_mask, steps, **extra):
    ids, am = input_ids, attention_mask
    for _ in range(steps):
        nxt = reference_logits(ref_model, ids, am, **extra)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        am = torch.cat([am, torch.ones_like(nxt)], dim=1)
    return ids
