"""Streaming attention with plain `scaled_dot_product_attention`, chunked over query blocks.

Each block of `block` queries attends to the `S` sink keys plus the `block + W - 1` keys that can fall in
its window, so the cost grows as T * (S + W + block) instead of T^2. All blocks go to SDPA in one batched
call (the blocks are folded into a batch dimension), which keeps the kernel launch count constant.

Two entry points:
- `chunked_streaming_sdpa`: the fast path, for queries and keys that are the same contiguous tokens
  (training and prefill from an empty cache).
- `positional_streaming_sdpa`: the general path, for keys given with explicit positions (decode with a
  cache); dense over the (small) key set, chunked over queries to bound memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_BLOCK = 256

# Masks that depend only on (T, S, W, block) are reused across layers and steps.
_MASK_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _block_index_grids(T: int, window: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute query indices [nblk, block] and window key indices [nblk, block + W - 1] per block."""
    nblk = (T + block - 1) // block
    starts = torch.arange(nblk, device=device) * block
    qi = starts[:, None] + torch.arange(block, device=device)[None, :]
    kj = starts[:, None] - (window - 1) + torch.arange(block + window - 1, device=device)[None, :]
    return qi, kj


def _masks(
    T: int, sink: int, window: int, block: int, device, pad: torch.Tensor | None, offset: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Boolean masks [B|1, nblk, 1, block, S] (sinks) and [B|1, nblk, 1, block, L] (window), and sink indices.

    `pad[b]`: keys before this index are padding. `offset[b]`: a token's position is `index - offset[b]`,
    so sinks are the keys with `index - offset[b] < S`.
    """
    qi, kj = _block_index_grids(T, window, block, device)  # [n, bq], [n, L]
    if pad is None:
        pad = torch.zeros(1, dtype=torch.long, device=device)
        offset = pad
    pad_ = pad.view(-1, 1, 1, 1)
    i = qi[None, :, :, None]  # [1, n, bq, 1]
    j = kj[None, :, None, :]  # [1, n, 1, L]
    win = (j <= i) & (i - j < window) & (j >= pad_) & (j >= 0)
    # A query with no valid key (left padding, or the tail of the last block) attends to itself only, so
    # that its (discarded) output stays finite and its gradient is zero rather than NaN.
    orphan = (i < pad_) | (i >= T)
    win = win | (orphan & (j == i))
    sink_idx = None
    if sink > 0:
        sink_idx = offset.view(-1, 1) + torch.arange(sink, device=device)[None, :]  # [B|1, S]
        s = sink_idx[:, None, None, :]
        ok = (s >= pad.view(-1, 1, 1, 1)) & (s >= 0) & (s < T)
        # Sinks inside the window are already counted there: keep them only where i - s >= W.
        sm = ok & (s <= i) & (i - s >= window) & ~orphan
    else:
        sm = None
    return (sm.unsqueeze(2) if sm is not None else None), win.unsqueeze(2), sink_idx


def complete_padding(pad, offset):
    """Backends take padding as both `pad` and `offset` or neither; fill the missing one with zeros."""
    if pad is not None and offset is None:
        offset = torch.zeros_like(pad)
    if offset is not None and pad is None:
        pad = torch.zeros_like(offset)
    return pad, offset


def _window_blocks(x: torch.Tensor, W: int, block: int, Tp: int, front: int | None = None) -> torch.Tensor:
    """[B, H, T, D] -> [B, n, H, block + W - 1, D]: the keys that can fall in each query block's window
    (block b: keys b * block - front ..; `front` defaults to W - 1, the window of a block's first query)."""
    front = W - 1 if front is None else front
    xp = F.pad(x, (0, 0, front, Tp + W - 1 - front - x.shape[2]))
    return xp.unfold(2, block + W - 1, block).permute(0, 2, 1, 4, 3)


def _blocked_sdpa(q, kb, vb, mask, scale, block: int) -> torch.Tensor:
    """Fold the query blocks into the batch and run one SDPA call: 4-D inputs reach the fused (flash)
    kernels, 5-D ones fall back to the slow math path on CPU. kb/vb [B, n, Hkv, K, D], mask [B*n, 1, bq, K]."""
    B, Hq, T, D = q.shape
    nblk = kb.shape[1]
    Tp = nblk * block
    n = B * nblk
    qb = F.pad(q, (0, 0, 0, Tp - T)).view(B, Hq, nblk, block, D).transpose(1, 2).reshape(n, Hq, block, D)
    kb = kb.reshape(n, kb.shape[2], -1, D)
    vb = vb.reshape(n, vb.shape[2], -1, D)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=Hq != kb.shape[1])
    return out.view(B, nblk, Hq, block, D).transpose(1, 2).reshape(B, Hq, Tp, D)[:, :, :T]


def _recomputed(fn, q, k, v, *args):
    """`fn(q, k, v, *args)`; when gradients flow, backward recomputes it from q, k, v (`torch.utils.checkpoint`)
    instead of keeping what it built: the blocked keys and values are (S + block + W - 1) / block times the size
    of k and v each, where a dense fused kernel keeps only its inputs and output. The recompute costs one more
    streaming forward per lazy layer, a small share of the step."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return checkpoint(fn, q, k, v, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(q, k, v, *args)


def chunked_streaming_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    scale: float | None = None,
    pad: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] -> [B, Hq, T, D]. Query i sees key j iff
    pad[b] <= j <= i and (j - offset[b] < S or i - j < W)."""
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if pad is None and offset is None:
        if window >= T:  # the window covers every key: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        # Queries before W see every earlier key: the fused causal kernel does them (it skips the masked half
        # of its tiles, where the blocked path would compute sink + window keys for each); the rest stream.
        head = F.scaled_dot_product_attention(q[:, :, :window], k[:, :, :window], v[:, :, :window],
                                              is_causal=True, scale=scale, enable_gqa=gqa)
        tail = _recomputed(_streaming_tail, q, k, v, sink, window, scale, block)
        return torch.cat([head, tail], dim=2)
    return _recomputed(_chunked, q, k, v, sink, window, scale, pad, offset, block)


def _streaming_tail(q, k, v, sink: int, window: int, scale, block: int) -> torch.Tensor:
    """Streaming attention of the queries from W on, for rows without padding: the blocked computation of
    `_chunked` with query blocks starting at W. Query W + i (local i) sees window keys i + 1 .. W + i and the
    sinks s with i >= s (a sink inside the window counts there once)."""
    B, Hq, T, D = q.shape
    Hkv, W = k.shape[1], window
    Tq = T - W
    block = min(block, Tq)
    nblk = (Tq + block - 1) // block
    key = ("tail", B, T, sink, W, block, q.device, q.dtype)
    if key not in _MASK_CACHE:
        if len(_MASK_CACHE) > 32:
            _MASK_CACHE.clear()
        qi, kj = _block_index_grids(Tq, W, block, q.device)  # local query i, key W + kj (kj may be negative)
        i, j = qi[:, None, :, None], kj[:, None, None, :]
        mask = (j <= i) & (i - j < W)  # never empty, so the padded tail of the last block stays finite
        if sink:
            s = torch.arange(sink, device=q.device)
            mask = torch.cat([(i >= s).expand(nblk, 1, block, sink), mask], dim=-1)
        _MASK_CACHE[key] = _additive(mask, q.dtype).expand(B, -1, -1, -1, -1).reshape(B * nblk, 1, block, -1)
    mask = _MASK_CACHE[key]
    # block b's window keys are W + kj, kj from b * block - (W - 1): indices from b * block + 1 of k
    kb = _window_blocks(k[:, :, 1:], W, block, nblk * block, front=0)
    vb = _window_blocks(v[:, :, 1:], W, block, nblk * block, front=0)
    if sink:
        ks = k[:, :, :sink].unsqueeze(1).expand(B, nblk, Hkv, sink, D)
        vs = v[:, :, :sink].unsqueeze(1).expand(B, nblk, Hkv, sink, D)
        kb, vb = torch.cat([ks, kb], dim=3), torch.cat([vs, vb], dim=3)
    return _blocked_sdpa(q[:, :, W:], kb, vb, mask, scale, block)


def _chunked(q, k, v, sink: int, window: int, scale, pad, offset, block: int) -> torch.Tensor:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    pad, offset = complete_padding(pad, offset)
    W = min(window, T)  # a window longer than the sequence is the same as W = T
    block = min(block, T)
    nblk = (T + block - 1) // block
    Tp = nblk * block

    if pad is None:  # the mask depends on shapes only: build it once per shape
        key = (B, T, sink, W, block, q.device, q.dtype)
        if key not in _MASK_CACHE:
            if len(_MASK_CACHE) > 32:
                _MASK_CACHE.clear()
            _MASK_CACHE[key] = _sdpa_mask(B, T, sink, W, block, q.device, q.dtype, None, None)
        mask, sink_idx = _MASK_CACHE[key]
    else:
        mask, sink_idx = _sdpa_mask(B, T, sink, W, block, q.device, q.dtype, pad, offset)

    kb, vb = _window_blocks(k, W, block, Tp), _window_blocks(v, W, block, Tp)
    if sink_idx is not None:
        idx = sink_idx.clamp(0, T - 1)[:, None, :, None].expand(B, Hkv, sink, D)
        ks = k.gather(2, idx).unsqueeze(1).expand(B, nblk, Hkv, sink, D)
        vs = v.gather(2, idx).unsqueeze(1).expand(B, nblk, Hkv, sink, D)
        kb = torch.cat([ks, kb], dim=3)
        vb = torch.cat([vs, vb], dim=3)
    return _blocked_sdpa(q, kb, vb, mask, scale, block)


def _sdpa_mask(B, T, sink, W, block, device, dtype, pad, offset):
    """The additive float mask [B * nblk, 1, block, S + L] (faster than a boolean one in CPU SDPA)."""
    sm, wm, sink_idx = _masks(T, sink, W, block, device, pad, offset)
    mask = wm if sm is None else torch.cat([sm, wm], dim=-1)
    nblk = mask.shape[1]
    mask = _additive(mask, dtype).expand(B, nblk, 1, block, mask.shape[-1]).reshape(B * nblk, 1, block, -1)
    return mask, sink_idx


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def positional_streaming_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    k_valid: torch.Tensor,
    scale: float | None = None,
    q_chunk: int = 1024,
) -> torch.Tensor:
    """General streaming attention over keys given with explicit metadata.

    q [B, Hq, Q, D]; k/v [B, Hkv, K, D]; q_pos/q_idx [B, Q]; k_pos/k_idx/k_valid [B, K]. `*_pos` are
    position ids (sinks and window are measured on them), `*_idx` are cache indices (causality). A query and
    a key belong to the same document when index - position agree; attention never crosses documents."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for s in range(0, q.shape[2], q_chunk):
        qp = q_pos[:, s : s + q_chunk, None]
        qi = q_idx[:, s : s + q_chunk, None]
        kp, ki = k_pos[:, None, :], k_idx[:, None, :]
        same_doc = (ki - kp) == (qi - qp)  # a document is a run where index - position is constant
        allowed = k_valid[:, None, :] & (ki <= qi) & same_doc & ((kp < sink) | (qp - kp < window))
        # A query without any allowed key (padding) attends to itself: finite output, no NaN gradients.
        allowed = allowed | (~allowed.any(-1, keepdim=True) & (ki == qi))
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, s : s + q_chunk], k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def packed_streaming_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    pos: torch.Tensor,
    scale: float | None = None,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """Streaming attention over packed rows: several documents per row, `pos` [B, T] restarting at 0 at each
    document. Attention never crosses documents, and the sinks of a query are the first S tokens of its own
    document. Same blocking as `chunked_streaming_sdpa`; each block gathers the sinks of every document that
    its queries belong to."""
    return _recomputed(_packed, q, k, v, sink, window, pos, scale, block)


def _packed(q, k, v, sink: int, window: int, pos: torch.Tensor, scale, block: int) -> torch.Tensor:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    dev = q.device
    W = min(window, T)
    block = min(block, T)
    nblk = (T + block - 1) // block
    Tp = nblk * block
    L = block + W - 1
    t = torch.arange(T, device=dev)
    start = t[None] - pos  # index where each token's document starts  [B, T]
    new_doc = torch.ones_like(pos, dtype=torch.bool)
    new_doc[:, 1:] = start[:, 1:] != start[:, :-1]
    doc = new_doc.long().cumsum(1) - 1  # document number of each token  [B, T]
    ndocs = int(doc[:, -1].max()) + 1
    # where each document starts: negative for a row that begins in the middle of a document
    doc_start = torch.full((B, ndocs + 1), T, dtype=torch.long, device=dev)
    doc_start.scatter_(1, torch.where(new_doc, doc, ndocs), start)
    doc_start[:, ndocs] = T

    qi, kj = _block_index_grids(T, W, block, dev)  # [n, bq], [n, L]
    qc = qi.clamp(max=T - 1)
    q_start = start.gather(1, qc.reshape(1, -1).expand(B, -1)).view(B, nblk, block)
    in_range = qi < T
    # window part: same document, 0 <= i - j < W
    kjc = kj.clamp(0, T - 1)
    k_start = start.gather(1, kjc.reshape(1, -1).expand(B, -1)).view(B, nblk, 1, L)
    i, j = qi[None, :, :, None], kj[None, :, None, :]
    win = (j >= 0) & (j <= i) & (i - j < W) & (k_start == q_start[..., None])
    win = win | (~in_range[None, :, :, None] & (j == i))  # tail of the last block: itself only
    masks, ks, vs = [win], [], []
    if sink > 0:
        first = doc.gather(1, qc[:, 0][None].expand(B, -1))  # first document of each block  [B, n]
        last = doc.gather(1, qc[:, -1][None].expand(B, -1))
        nd = int((last - first).max()) + 1  # documents per block, at most
        d = (first[..., None] + torch.arange(nd, device=dev)).clamp(max=ndocs)  # [B, n, nd]
        s_idx = doc_start.gather(1, d.view(B, -1)).view(B, nblk, nd, 1) + torch.arange(sink, device=dev)
        s_idx = s_idx.view(B, nblk, nd * sink)  # [B, n, nd*S] key indices of those sinks
        # a document shorter than S would lend its neighbour's first tokens: keep only keys of its own
        own = torch.arange(sink, device=dev).repeat(nd)
        s_c = s_idx.clamp(0, T - 1)
        s_ok = (s_idx >= 0) & (s_idx < T) & (pos.gather(1, s_c.view(B, -1)).view(B, nblk, -1) == own)
        s_start = start.gather(1, s_c.view(B, -1)).view(B, nblk, 1, nd * sink)
        s_pos = pos.gather(1, s_c.view(B, -1)).view(B, nblk, 1, nd * sink)
        si = s_idx[:, :, None, :]
        sm = (s_ok[:, :, None, :] & (s_start == q_start[..., None]) & (s_pos < sink) & (si <= i) & (i - si >= W)
              & in_range[None, :, :, None])
        masks.insert(0, sm)
        gidx = s_c.view(B, 1, -1, 1).expand(B, Hkv, nblk * nd * sink, D)
        ks.append(k.gather(2, gidx).view(B, Hkv, nblk, nd * sink, D).transpose(1, 2))
        vs.append(v.gather(2, gidx).view(B, Hkv, nblk, nd * sink, D).transpose(1, 2))

    kb = torch.cat(ks + [_window_blocks(k, W, block, Tp)], dim=3)
    vb = torch.cat(vs + [_window_blocks(v, W, block, Tp)], dim=3)
    mask = _additive(torch.cat(masks, dim=-1), q.dtype).reshape(B * nblk, 1, block, -1)
    return _blocked_sdpa(q, kb, vb, mask, scale, block)
