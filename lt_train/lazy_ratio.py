"""The lazy-ratio arithmetic, on its own so that the cache (online selection) and the selection code share it
without importing each other.

The lazy ratio of a layer is the softmax attention mass that its last `last_queries` queries put on the sink
keys (position < S) and the recent keys (i - j < W), averaged over queries: exp(lse over the selected keys -
lse over all keys), for the last queries only (O(last_queries * T) extra memory per layer).
"""
from __future__ import annotations

import math

import torch


def _last_query_scores(q, k, valid, sink: int, recent: int, last_queries: int, scale: float | None):
    """Scores of each row's last `last_queries` real queries against all keys, and which keys each may see.

    Returns scores [B, Hkv, rep, nq, T] (fp32, GQA folded: query head h = kv head * rep + r), `allowed` and
    `selected` [B, nq, T] (causal real keys; of those, the sinks and recent keys) and `q_valid` [B, nq]."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    rep = Hq // Hkv
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    pos = valid.long().cumsum(-1) - 1  # position of each real token
    n_real = valid.sum(-1)  # [B]
    nq = min(last_queries, T)
    # index of the r-th of the last nq real tokens of each row
    want = (n_real[:, None] - nq + torch.arange(nq, device=q.device)).clamp(min=0)  # positions
    q_valid = (n_real[:, None] - nq + torch.arange(nq, device=q.device)) >= 0
    match = (pos[:, None, :] == want[:, :, None]) & valid[:, None, :]  # [B, nq, T]
    qi = match.float().argmax(-1)  # [B, nq] cache index of those queries
    qs = q.gather(2, qi[:, None, :, None].expand(B, Hq, nq, D))  # [B, Hq, nq, D]
    # GQA without expanding K: fold the query heads of one KV head into the query axis
    qs = qs.view(B, Hkv, rep * nq, D).float()
    scores = (torch.matmul(qs, k.float().transpose(-1, -2)) * scale).view(B, Hkv, rep, nq, T)
    kp = pos[:, None, :]  # [B, 1, T]
    qp = want[:, :, None]  # [B, nq, 1]
    j = torch.arange(T, device=q.device)
    allowed = valid[:, None, :] & (j[None, None, :] <= qi[:, :, None])  # causal + real keys
    selected = allowed & ((kp < sink) | (qp - kp < recent))
    return scores, allowed, selected, q_valid


def layer_lazy_ratio(q, k, valid, sink: int, recent: int, last_queries: int, scale: float | None = None):
    """Per-head lazy ratio [B, Hq] for queries q [B, Hq, T, D] and keys k [B, Hkv, T, D] (after RoPE).

    `valid` [B, T] marks real tokens (any padding pattern); positions count real tokens only. The last
    `last_queries` real queries of each row are used; rows with fewer real tokens use all of theirs."""
    B, Hq = q.shape[:2]
    scores, allowed, selected, q_valid = _last_query_scores(q, k, valid, sink, recent, last_queries, scale)
    ninf = float("-inf")
    lse_all = scores.masked_fill(~allowed[:, None, None], ninf).logsumexp(-1)
    lse_sel = scores.masked_fill(~selected[:, None, None], ninf).logsumexp(-1)
    ratio = torch.exp(lse_sel - lse_all).nan_to_num(0.0)  # [B, Hkv, rep, nq]
    w = q_valid[:, None, None, :].float()
    per_head = (ratio * w).sum(-1) / w.sum(-1).clamp(min=1)
    return per_head.reshape(B, Hq)


def layer_output_error(q, k, v, valid, sink: int, recent: int, last_queries: int, o_proj,
                       scale: float | None = None) -> torch.Tensor:
    """Relative output error [B] of streaming attention in this layer: ||W_o (o_stream - o_full)|| /
    ||o_proj(o_full)|| for each of the last `last_queries` real queries (all heads together, after the output
    projection, so a lost key counts by what its value contributes, not only by its attention mass), averaged
    over those queries. q [B, Hq, T, D], k/v [B, Hkv, T, D]; `o_proj` the layer's output projection."""
    B, Hq = q.shape[:2]
    scores, allowed, selected, q_valid = _last_query_scores(q, k, valid, sink, recent, last_queries, scale)
    ninf = float("-inf")
    p_full = scores.masked_fill(~allowed[:, None, None], ninf).softmax(-1).nan_to_num(0.0)
    p_stream = scores.masked_fill(~selected[:, None, None], ninf).softmax(-1).nan_to_num(0.0)
    vf = v.float()[:, :, None]  # [B, Hkv, 1, T, Dv]
    full = torch.matmul(p_full, vf)  # [B, Hkv, rep, nq, Dv]
    diff = torch.matmul(p_stream - p_full, vf)
    nq, Dv = full.shape[3], full.shape[4]

    def heads_last(x):  # [B, Hkv, rep, nq, Dv] -> [B, nq, Hq * Dv], head h = kv * rep + r as the model lays them
        return x.permute(0, 3, 1, 2, 4).reshape(B, nq, Hq * Dv)

    w = o_proj.weight.float()
    y_full = torch.nn.functional.linear(heads_last(full), w, None if o_proj.bias is None else o_proj.bias.float())
    y_diff = torch.nn.functional.linear(heads_last(diff), w)  # the bias cancels in the difference
    err = y_diff.norm(dim=-1) / y_full.norm(dim=-1).clamp(min=1e-12)  # [B, nq]
    m = q_valid.float()
    return (err * m).sum(-1) / m.sum(-1).clamp(min=1)


def resolve_num_lazy(num_lazy: int | float, num_layers: int) -> int:
    """A count (int, or a whole float above 1 as Hydra may give) or a fraction of the layers in (0, 1]."""
    if isinstance(num_lazy, bool) or not isinstance(num_lazy, (int, float)):
        raise ValueError(f"num_lazy must be a count or a fraction, got {num_lazy!r}")
    if isinstance(num_lazy, float) and not (num_lazy > 1 and num_lazy.is_integer()):
        if not 0.0 < num_lazy <= 1.0:
            raise ValueError(f"num_lazy as a fraction must be in (0, 1], got {num_lazy}")
        return max(1, round(num_lazy * num_layers))
    n = int(num_lazy)
    if not 0 <= n <= num_layers:
        raise ValueError(f"num_lazy={n} is out of range for a model with {num_layers} layers (0..{num_layers})")
    return n
