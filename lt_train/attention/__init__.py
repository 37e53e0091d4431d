"""Streaming attention: query i sees key j iff j <= i and (j < S or i - j < W).

`S` = sink tokens, `W` = window (the query itself counts in the window). Positions are the model's
position ids, so with left padding the sinks are the first S real tokens of each row.

Backends behind `streaming_attention`:
- `sdpa`: query-blocked `scaled_dot_product_attention` over sink + window keys (CPU and GPU, forward and
  backward, any padding). The default wherever flash-attn is not usable.
- `flex`: torch FlexAttention with a block mask (compiled; forward only on CPU).
- `flash_attn`: flash-attn's variable-length sliding window plus each document's sinks merged through the
  log-sum-exp (CUDA, fp16/bf16; whole rows or packed documents; left-padded batches go to `sdpa`).
- `auto`: packed rows on GPU: `flex`; else `sdpa`. It does not pick `flash_attn` (ask for it by name) until
  `FLASH_VERIFIED`: its kernels have not yet run on a GPU against the dense reference (`benchmarks/gpu_check.py`
  has the section that does).
"""
from __future__ import annotations

import torch

from . import flash as _flash
from .flex import flex_streaming
from .sdpa import chunked_streaming_sdpa, packed_streaming_sdpa, positional_streaming_sdpa

BACKENDS = ("auto", "sdpa", "flex", "flash_attn")

__all__ = ["BACKENDS", "check_backend", "resolve_backend", "streaming_attention", "positional_streaming_sdpa"]


def check_backend(name: str) -> None:
    """Fail early, with the reason, for a backend name that cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown streaming attention backend {name!r}; choose one of {BACKENDS}")
    if name == "flash_attn" and not _flash.is_available():
        raise ImportError(
            "backend='flash_attn' needs the flash-attn package and a CUDA GPU "
            "(pip install 'lt_train[gpu]'); use backend='auto' to fall back to sdpa"
        )


# True once the GPU check has run the flash-attn path (forward, backward, packed rows) against the dense reference
FLASH_VERIFIED = False


def resolve_backend(name: str, q: torch.Tensor, padded: bool, packed: bool = False) -> str:
    if name == "auto":
        usable = (FLASH_VERIFIED and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                  and _flash.is_available())
        if usable and not padded:
            return "flash_attn"
        return "flex" if packed and q.is_cuda else "sdpa"
    if name == "flash_attn" and padded:
        return "sdpa"  # left padding: per-row sinks after the pads; see flash.py
    return name


def streaming_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sink: int,
    window: int,
    scale: float | None = None,
    backend: str = "auto",
    pad: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    doc_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """Streaming attention over one contiguous run of tokens per row, or over packed documents.

    q [B, Hq, T, D]; k, v [B, Hkv, T, D] with Hq a multiple of Hkv (GQA without expanding K/V).
    pad [B] (optional): keys before this index are padding. offset [B] (optional): the position of the
    token at index t is t - offset[b] (left padding with position ids that start at each row's first
    real token). doc_pos [B, T] (optional, packed rows): positions restarting at 0 at each document;
    attention stays inside documents and each document has its own sinks. Returns [B, Hq, T, D]. Padding
    queries attend to themselves only (finite, ignorable).
    """
    if sink < 0 or window < 1:
        raise ValueError(f"need sink >= 0 and window >= 1, got sink={sink}, window={window}")
    chosen = resolve_backend(backend, q, padded=pad is not None or offset is not None, packed=doc_pos is not None)
    if chosen == "flash_attn":
        check_backend("flash_attn")
        return _flash.flash_streaming(q, k, v, sink, window, scale, doc_pos=doc_pos)
    if doc_pos is not None:
        if chosen == "flex":
            return flex_streaming(q, k, v, sink, window, scale, doc_pos=doc_pos)
        return packed_streaming_sdpa(q, k, v, sink, window, doc_pos, scale)
    if chosen == "sdpa":
        return chunked_streaming_sdpa(q, k, v, sink, window, scale, pad, offset)
    if chosen == "flex":
        return flex_streaming(q, k, v, sink, window, scale, pad, offset)
    raise ValueError(f"unknown streaming attention backend {backend!r}; choose one of {BACKENDS}")
