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
    sink_idx = _sink_index(offset, sink)
    if sink > 0:
        s = sink_idx[:, None, None, :]
        ok = (s >= pad.view(-1, 1, 1, 1)) & (s >= 0) & (s < T)
        # Sinks inside the window are already counted there: keep them only where i - s >= W.
        sm = ok & (s <= i) & (i - s >= window) & ~orphan
    else:
        sm = None
    return (sm.unsqueeze(2) if sm is not None else None), win.unsqueeze(2), sink_idx


def _sink_index(offset: torch.Tensor, sink: int) -> torch.Tensor | None:
    """Key indices of each row's sinks [B|1, S] (a row's positions start at index offset[b])."""
    return offset.view(-1, 1) + torch.arange(sink, device=offset.device)[None, :] if sink > 0 else None


def complete_padding(pad, offset):
    """Backends take padding as both `pad` and `offset` or neither; fill the missing one with zeros."""
    if pad is not None and offset is None:
        offset = torch.zeros_like(pad)
    if offset is not None and pad is None:
        pad = torch.zeros_like(offset)
    return pad, offset


def _balanced(T: int, block: int) -> int:
    """The block size at most `block` that splits T queries into the same number of blocks with the least
    padding (T = 1028, block 256: five blocks of 206, not five of 256 with 252 padded queries)."""
    block = min(block, T)
    return -(-T // -(-T // block))


def _window_blocks(x: torch.Tensor, W: int, block: int, Tp: int, front: int | None = None) -> torch.Tensor:
    """[B, H, T, D] -> [B, n, H, block + W - 1, D]: the keys that can fall in each query block's window
    (block b: keys b * block - front ..; `front` defaults to W - 1, the window of a block's first query)."""
    front = W - 1 if front is None else front
    xp = F.pad(x, (0, 0, front, Tp + W - 1 - front - x.shape[2]))
    return xp.unfold(2, block + W - 1, block).permute(0, 2, 1, 4, 3)


def _blocked_sdpa(q, k, v, blocks, mask_fn, scale, block: int, head: int = 0, scatter=None) -> torch.Tensor:
    """Streaming attention of the queries q [B, Hq, Tq, D] as one SDPA call over query blocks folded into the
    batch (4-D inputs reach the fused flash kernel; 5-D ones fall back to the slow math path on CPU). With
    `head`, the first `head` queries attend causally to the first `head` keys (the fused causal kernel) and the
    blocks cover the queries after them.
    `blocks(x)` turns k or v [B, Hkv, T, D] into the keys of each block [B, n, Hkv, K, D]; `mask_fn()` gives
    the additive mask [B*n | 1, 1, block, K] (called again in backward rather than kept). `scatter(dx, dxb, sl)`,
    where a layout has one, is the backward of `blocks(x, sl)` summed into dx in place (used by the CPU backward).

    With gradients the blocked keys and values are not kept for backward ((S + block + W - 1) / block times
    the size of k and v each, where a dense fused kernel keeps only its inputs and output): on CPU the fused
    kernel's own backward runs from the saved output and log-sum-exp on keys rebuilt from k and v
    (`_BlockedFlashCPU`, no second forward); elsewhere backward recomputes the call (`torch.utils.checkpoint`)."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and q.device.type == "cpu" and _FLASH_CPU_BACKWARD is not None:
        # one function for head and tail: one output and one dq, no concatenation or slice gradients
        return _BlockedFlashCPU.apply(q, k, v, blocks, mask_fn, scale, block, head, scatter)
    qt = q[:, :, head:]
    if grad:
        tail = checkpoint(_folded_sdpa, qt, k, v, blocks, mask_fn, scale, block,
                          use_reentrant=False, preserve_rng_state=False)
    else:
        tail = _folded_sdpa(qt, k, v, blocks, mask_fn, scale, block)
    if not head:
        return tail
    first = F.scaled_dot_product_attention(q[:, :, :head], k[:, :, :head], v[:, :, :head], is_causal=True,
                                           scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.cat([first, tail], dim=2)


def _to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, T, D] -> [B * n, H, block, D], the last block padded with zeros."""
    B, H, T, D = x.shape
    n = -(-T // block)
    return F.pad(x, (0, 0, 0, n * block - T)).view(B, H, n, block, D).transpose(1, 2).reshape(B * n, H, block, D)


def _from_blocks(xb: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """The inverse of `_to_blocks`: [B * n, H, block, D] -> [B, H, T, D]."""
    n, H, block, D = xb.shape[0] // B, xb.shape[1], xb.shape[2], xb.shape[3]
    return xb.view(B, n, H, block, D).transpose(1, 2).reshape(B, H, n * block, D)[:, :, :T]


def _fold(x: torch.Tensor) -> torch.Tensor:
    """[B, n, H, K, D] -> [B * n, H, K, D]."""
    return x.reshape(-1, *x.shape[2:])


def _folded_sdpa(q, k, v, blocks, mask_fn, scale, block) -> torch.Tensor:
    qb, kb, vb = _to_blocks(q, block), _fold(blocks(k)), _fold(blocks(v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask_fn(), scale=scale,
                                         enable_gqa=qb.shape[1] != kb.shape[1])
    return _from_blocks(out, q.shape[0], q.shape[2])


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


class _BlockedFlashCPU(torch.autograd.Function):
    """`_folded_sdpa` on CPU keeping for backward only q, k, v, the output and the log-sum-exp (what the fused
    kernel keeps for dense attention). Backward re-blocks them (copies, no attention), runs the kernel's own
    backward, and sends the blocked key/value gradients back through the blocking (overlapping windows sum).
    Both passes go a few query blocks at a time (`_chunks`), so the blocked copies they build stay below half the
    size of k and v: the backward of a step's last layers runs at the step's memory peak."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, mask_fn, scale, block, head, scatter):
        B, T = q.shape[0], q.shape[2]
        mask = mask_fn()
        out = torch.empty_like(q)
        lse = None
        if head:
            o, lse = _FLASH_CPU(q[:, :, :head], k[:, :, :head], v[:, :, :head], 0.0, True, scale=scale)
            out[:, :, :head] = o
            lse = torch.cat([lse, lse.new_empty(B, q.shape[1], T - head)], dim=2)
        ctx.keys_per_block = blocks(k, slice(0, 1)).shape[3]
        for sl, t0, t1 in _chunks(T - head, block, ctx.keys_per_block, k.shape[2]):
            o, m = _FLASH_CPU(_to_blocks(q[:, :, head + t0:head + t1], block), _fold(blocks(k, sl)),
                              _fold(blocks(v, sl)), 0.0, False, attn_mask=_mask_rows(mask, B, sl), scale=scale)
            if lse is None:
                lse = q.new_empty(q.shape[:3], dtype=m.dtype)
            out[:, :, head + t0:head + t1] = _from_blocks(o, B, t1 - t0)
            lse[:, :, head + t0:head + t1] = _from_blocks(m.unsqueeze(-1), B, t1 - t0).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.mask_fn, ctx.scale, ctx.block, ctx.head = blocks, mask_fn, scale, block, head
        ctx.scatter = scatter
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        B, T, block, blocks, h = q.shape[0], q.shape[2], ctx.block, ctx.blocks, ctx.head
        mask = ctx.mask_fn()
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if h:
            dq[:, :, :h], dk[:, :, :h], dv[:, :, :h] = _FLASH_CPU_BACKWARD(
                grad_out[:, :, :h].contiguous(), q[:, :, :h], k[:, :, :h], v[:, :, :h], out[:, :, :h],
                lse[:, :, :h].contiguous(), 0.0, True, scale=ctx.scale)
        # the blocked key/value gradients go back to dk, dv by the layout's own scatter where it has one (adds
        # in place), else through autograd (which builds a k-sized gradient per chunk before the sum)
        scatter = ctx.scatter
        k_, v_ = (k, v) if scatter else (k.detach().requires_grad_(), v.detach().requires_grad_())
        for sl, t0, t1 in _chunks(T - h, block, ctx.keys_per_block, k.shape[2]):
            with torch.set_grad_enabled(scatter is None):
                kb, vb = _fold(blocks(k_, sl)), _fold(blocks(v_, sl))
            dqb, dkb, dvb = _FLASH_CPU_BACKWARD(
                _to_blocks(grad_out[:, :, h + t0:h + t1], block), _to_blocks(q[:, :, h + t0:h + t1], block),
                kb.detach(), vb.detach(), _to_blocks(out[:, :, h + t0:h + t1], block),
                _to_blocks(lse[:, :, h + t0:h + t1].unsqueeze(-1), block).squeeze(-1), 0.0, False,
                attn_mask=_mask_rows(mask, B, sl), scale=ctx.scale)
            if scatter:
                scatter(dk, dkb, sl)
                scatter(dv, dvb, sl)
            else:
                gk, gv = torch.autograd.grad([kb, vb], [k_, v_], [dkb, dvb])
                dk += gk
                dv += gv
            dq[:, :, h + t0:h + t1] = _from_blocks(dqb, B, t1 - t0)
        return dq, dk, dv, None, None, None, None, None, None


def _chunks(T: int, block: int, keys_per_block: int, kv_len: int):
    """(block slice, first query, end query) of groups of query blocks whose blocked keys number at most half
    of k's length (at least one block per group)."""
    n = -(-T // block)
    c = max(1, (kv_len // 2) // keys_per_block)
    for b0 in range(0, n, c):
        b1 = min(n, b0 + c)
        yield slice(b0, b1), b0 * block, min(T, b1 * block)


def _mask_rows(mask: torch.Tensor, B: int, sl: slice) -> torch.Tensor:
    """The rows of the folded mask [B * n | 1, 1, block, K] that belong to the query blocks `sl` of every batch row."""
    n = mask.shape[0] // B
    if mask.shape[0] == 1 or sl == slice(0, n):  # one mask broadcast over every block, or all blocks
        return mask
    return mask.view(B, n, *mask.shape[1:])[:, sl].reshape(-1, *mask.shape[1:])


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
        if window + sink >= T:  # every query sees every earlier key: plain causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        # Queries before W + S see every earlier key: the fused causal kernel does them (it skips the masked
        # half of its tiles, where the blocked path would compute sink + window keys for each); the rest stream.
        return _head_and_tail(q, k, v, sink, window, scale, block)
    return _chunked(q, k, v, sink, window, scale, pad, offset, block)


def _head_and_tail(q, k, v, sink: int, window: int, scale, block: int) -> torch.Tensor:
    """Streaming attention for rows without padding: the first W + S queries (each sees every earlier key:
    query W + i's window reaches back to key i + 1, the sinks cover 0 .. S - 1) by the fused causal kernel (the
    head), the others by blocked SDPA with query blocks starting at W + S (the tail). A tail query's window
    starts after the sinks, so it sees all S sinks and a band of W keys: the same mask for every block, built
    once per call ([1, 1, block, S + block + W - 1], broadcast over the blocks) rather than once per block."""
    B, Hq, T, D = q.shape
    Hkv, W = k.shape[1], window
    head = W + sink
    block = _balanced(T - head, block)
    nblk = (T - head + block - 1) // block

    device, dtype = q.device, q.dtype

    def tail_mask():  # built per call, not cached: a kept mask would sit in memory at the step's peak, where
        # dense causal attention keeps none (forward and backward each build it, [1, 1, block, K]: 1.25 MiB
        # at block 256, S 4, W 1020 in float32; the build is a small fraction of the call).
        # Block b: query i is token head + b * block + i, window key c is token sink + 1 + b * block + c, so
        # the key is in the query's window (W tokens ending at the query) iff i <= c <= i + W - 1; never empty,
        # so the padded tail of the last block stays finite
        i = torch.arange(block, device=device)[:, None]
        c = torch.arange(block + W - 1, device=device)[None, :]
        band = (c >= i) & (c <= i + W - 1)
        mask = torch.cat([torch.ones(block, sink, dtype=torch.bool, device=device), band], dim=-1)
        return _additive(mask, dtype)[None, None]

    def blocks(x, sl=slice(None)):  # block b's window keys: from sink + 1 + b * block, block + W - 1 of them
        xb = _window_blocks(x[:, :, sink + 1:], W, block, nblk * block, front=0)[:, sl]
        if not sink:
            return xb
        return torch.cat([x[:, :, :sink].unsqueeze(1).expand(B, xb.shape[1], Hkv, sink, D), xb], dim=3)

    def scatter(dx, dxb, sl):  # the backward of blocks(x, sl): dxb [B * n, Hkv, K, D] summed into dx in place
        dxb = dxb.view(B, -1, *dxb.shape[1:])
        if sink:
            dx[:, :, :sink] += dxb[:, :, :, :sink].sum(1)
        for b in range(dxb.shape[1]):  # a few blocks per call
            lo = sink + 1 + (sl.start + b) * block
            hi = min(T, lo + block + W - 1)
            dx[:, :, lo:hi] += dxb[:, b, :, sink : sink + hi - lo]
    return _blocked_sdpa(q, k, v, blocks, tail_mask, scale, block, head=head, scatter=scatter)


def _chunked(q, k, v, sink: int, window: int, scale, pad, offset, block: int) -> torch.Tensor:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    pad, offset = complete_padding(pad, offset)
    W = min(window, T)  # a window longer than the sequence is the same as W = T
    block = _balanced(T, block)
    nblk = (T + block - 1) // block
    Tp = nblk * block

    # padded rows only (rows without padding take `_head_and_tail`); the mask is rebuilt in backward rather than
    # kept: it is as large as the blocked keys
    sink_idx = _sink_index(offset, sink)

    def blocks(x, sl=slice(None)):
        xb = _window_blocks(x, W, block, Tp)[:, sl]
        if sink_idx is None:
            return xb
        idx = sink_idx.clamp(0, T - 1)[:, None, :, None].expand(B, Hkv, sink, D)
        return torch.cat([x.gather(2, idx).unsqueeze(1).expand(B, xb.shape[1], Hkv, sink, D), xb], dim=3)
    return _blocked_sdpa(q, k, v, blocks, lambda: _sdpa_mask(B, T, sink, W, block, q.device, q.dtype, pad, offset)[0],
                         scale, block)


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
    return _packed(q, k, v, sink, window, pos, scale, block)


def _packed(q, k, v, sink: int, window: int, pos: torch.Tensor, scale, block: int) -> torch.Tensor:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    W = min(window, T)
    block = min(block, T)
    nblk = (T + block - 1) // block
    Tp = nblk * block
    _, sink_keys = _packed_layout(pos, sink, W, block, q.dtype, mask=False)

    def blocks(x, sl=slice(None)):
        xb = _window_blocks(x, W, block, Tp)[:, sl]
        if sink_keys is None:
            return xb
        g = sink_keys[:, sl].reshape(B, 1, -1, 1).expand(B, Hkv, xb.shape[1] * sink_keys.shape[2], D)
        return torch.cat([x.gather(2, g).view(B, Hkv, xb.shape[1], -1, D).transpose(1, 2), xb], dim=3)
    return _blocked_sdpa(q, k, v, blocks, lambda: _packed_layout(pos, sink, W, block, q.dtype)[0], scale, block)


def _packed_layout(pos: torch.Tensor, sink: int, W: int, block: int, dtype, mask: bool = True):
    """For packed rows: the additive mask [B * n, 1, block, sinks + L] (None with mask=False) and the key index
    of each block's sinks [B, n, nd * S] (None without sinks): every document its queries belong to lends
    its first S tokens."""
    B, T = pos.shape
    dev = pos.device
    nblk = (T + block - 1) // block
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
    masks, s_c = [], None
    if mask:  # window part: same document, 0 <= i - j < W
        kjc = kj.clamp(0, T - 1)
        k_start = start.gather(1, kjc.reshape(1, -1).expand(B, -1)).view(B, nblk, 1, L)
        i, j = qi[None, :, :, None], kj[None, :, None, :]
        win = (j >= 0) & (j <= i) & (i - j < W) & (k_start == q_start[..., None])
        masks.append(win | (~in_range[None, :, :, None] & (j == i)))  # tail of the last block: itself only
    if sink > 0:
        first = doc.gather(1, qc[:, 0][None].expand(B, -1))  # first document of each block  [B, n]
        last = doc.gather(1, qc[:, -1][None].expand(B, -1))
        nd = int((last - first).max()) + 1  # documents per block, at most
        d = (first[..., None] + torch.arange(nd, device=dev)).clamp(max=ndocs)  # [B, n, nd]
        s_idx = doc_start.gather(1, d.view(B, -1)).view(B, nblk, nd, 1) + torch.arange(sink, device=dev)
        s_idx = s_idx.view(B, nblk, nd * sink)  # [B, n, nd*S] key indices of those sinks
        s_c = s_idx.clamp(0, T - 1)
        if mask:  # a document shorter than S would lend its neighbour's first tokens: keep only keys of its own
            own = torch.arange(sink, device=dev).repeat(nd)
            s_ok = (s_idx >= 0) & (s_idx < T) & (pos.gather(1, s_c.view(B, -1)).view(B, nblk, -1) == own)
            s_start = start.gather(1, s_c.view(B, -1)).view(B, nblk, 1, nd * sink)
            s_pos = pos.gather(1, s_c.view(B, -1)).view(B, nblk, 1, nd * sink)
            si = s_idx[:, :, None, :]
            masks.insert(0, s_ok[:, :, None, :] & (s_start == q_start[..., None]) & (s_pos < sink) & (si <= i)
                         & (i - si >= W) & in_range[None, :, :, None])
    if not mask:
        return None, s_c
    return _additive(torch.cat(masks, dim=-1), dtype).reshape(B * nblk, 1, block, -1), s_c
