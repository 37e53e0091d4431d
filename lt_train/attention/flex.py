"""Streaming attention with torch FlexAttention and a block-sparse mask.

The compiled kernel and the block masks are cached per shape. FlexAttention has no backward pass on CPU
(torch 2.13): use the `sdpa` backend to train on CPU.
"""
from __future__ import annotations

import functools

import torch

from .sdpa import complete_padding

_BLOCK_MASKS: dict[tuple, object] = {}


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(T: int, sink: int, window: int, device, pad: torch.Tensor | None, offset: torch.Tensor | None,
                doc_pos: torch.Tensor | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    if doc_pos is not None:  # packed rows: documents where index - position is constant
        key = (T, sink, window, str(device), "docs", hash(doc_pos.cpu().numpy().tobytes()))
        start = torch.arange(T, device=device)[None] - doc_pos

        def mask_mod(b, h, qi, kv):
            same = start[b, qi] == start[b, kv]
            return same & (kv <= qi) & ((doc_pos[b, kv] < sink) | (qi - kv < window))

        batch = doc_pos.shape[0]
    elif pad is None:
        key = (T, sink, window, str(device))

        def mask_mod(b, h, qi, kv):
            return (kv <= qi) & ((kv < sink) | (qi - kv < window))

        batch = None
    else:
        key = (T, sink, window, str(device), tuple(pad.tolist()), tuple(offset.tolist()))

        def mask_mod(b, h, qi, kv):
            p, o = pad[b], offset[b]
            ok = (kv >= p) & (kv <= qi) & ((kv - o < sink) | (qi - kv < window))
            return ok | ((qi < p) & (kv == qi))  # padding queries attend to themselves only

        batch = pad.shape[0]
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) > 32:
            _BLOCK_MASKS.clear()
        _BLOCK_MASKS[key] = create_block_mask(mask_mod, batch, None, T, T, device=device)
    return _BLOCK_MASKS[key]


def flex_streaming(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    scale: float | None = None,
    pad: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    doc_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `sdpa.chunked_streaming_sdpa`, or `sdpa.packed_streaming_sdpa` with `doc_pos`."""
    pad, offset = complete_padding(pad, offset)
    if not torch.is_grad_enabled():  # inference: do not let requires_grad inputs trip the CPU check
        q, k, v = q.detach(), k.detach(), v.detach()
    bm = _block_mask(q.shape[2], sink, window, q.device, pad, offset, doc_pos)
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError(
            "FlexAttention has no backward pass on CPU; use backend='sdpa' for training on CPU."
        )
    return _compiled_flex()(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
