"""Streaming attention with flash-attn (optional, CUDA only), for whole rows and for packed documents.

Tokens are handled as flash-attn's variable-length batch: every document (a whole row when unpacked) is one
sequence in `cu_seqlens`. The window part is flash-attn's sliding window (`window_size=(W-1, 0)`); the S sink
keys of a query's own document that lie outside its window are attended separately (S is small) and the two
parts are merged through their log-sum-exps. flash-attn does not propagate gradients through its returned
log-sum-exp, so the backward pass is written out: the window part calls flash-attn's own backward with the
*merged* output and log-sum-exp (which yields exactly the gradient of the merged softmax restricted to window
keys), and the sink part is computed by hand. Padded batches are not handled here (the dispatcher sends them
to `sdpa`).

The two flash-attn calls sit in `_window_forward` / `_window_backward`; tests replace them with a dense
reference to check everything else on CPU. The real kernels need a CUDA GPU: their test skips elsewhere.
"""
from __future__ import annotations

import inspect
import math

import torch

SINK_CHUNK = 4096  # tokens per chunk of the sink part (bounds the gathered sink keys' memory)


def is_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _window_forward(q, k, v, cu, max_len: int, scale: float, window: int):
    """(out [N, H, D], lse [H, N] fp32) of causal attention over the last `window` keys, per sequence."""
    from flash_attn import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, softmax_scale=scale, causal=True,
                                         window_size=(window - 1, 0), return_attn_probs=True)
    return out, lse


def _window_backward(dout, q, k, v, out, lse, cu, max_len: int, scale: float, window: int):
    from flash_attn import flash_attn_interface as fai

    fn = fai._flash_attn_varlen_backward
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    fn(dout, q, k, v, out, lse, dq, dk, dv, cu, cu, max_len, max_len,
       **backward_keywords(inspect.signature(fn).parameters, scale, window))
    return dq, dk, dv


# keywords whose value here means "off": a flash-attn without them computes the same thing
_OFF = dict(dropout_p=0.0, softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None)


def backward_keywords(params, scale: float, window: int) -> dict:
    """Keywords for flash-attn's private `_flash_attn_varlen_backward`, checked against its signature: the window,
    the scale and causality must each be accepted under a name we know, or this raises (a renamed window argument
    silently dropped would give the gradient of full causal attention); the "off" settings are passed only where
    the installed version has them."""
    if "window_size_left" in params and "window_size_right" in params:
        kw = dict(window_size_left=window - 1, window_size_right=0)
    elif "window_size" in params:
        kw = dict(window_size=(window - 1, 0))
    else:
        raise TypeError("the installed flash-attn's _flash_attn_varlen_backward takes no window argument we know "
                        f"(window_size or window_size_left/right); its parameters: {list(params)}")
    for name in ("softmax_scale", "causal"):
        if name not in params:
            raise TypeError(f"the installed flash-attn's _flash_attn_varlen_backward has no {name!r}; "
                            f"its parameters: {list(params)}")
    kw.update(softmax_scale=scale, causal=True)
    kw.update({n: val for n, val in _OFF.items() if n in params})
    return kw


def _sink_table(pos: torch.Tensor, sink: int, window: int):
    """For flattened tokens: indices [N, S] of the sink keys of each token's document and which of them
    count (inside the row, before the token and outside its window)."""
    B, T = pos.shape
    n = torch.arange(B * T, device=pos.device).view(B, T)
    row_start = (torch.arange(B, device=pos.device) * T)[:, None]
    start = n - pos  # where each token's document starts (before the row if the row starts mid-document)
    idx = start[..., None] + torch.arange(sink, device=pos.device)  # [B, T, S]
    ok = (idx >= row_start[..., None]) & (n[..., None] - idx >= window)
    return idx.clamp(min=0).view(B * T, sink), ok.view(B * T, sink)


def _sink_scores(q, ks, ok, scale):
    """q [n, H, D], ks [n, S, Hkv, D] -> masked scores [n, Hkv, rep, S] (fp32), no K expansion."""
    n, H, D = q.shape
    hkv = ks.shape[2]
    s = torch.einsum("ngrd,nsgd->ngrs", q.view(n, hkv, H // hkv, D).float(), ks.float()) * scale
    return s.masked_fill(~ok[:, None, None, :], float("-inf"))


class _FlashStreaming(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, sink_idx, sink_ok, window, scale):
        out_w, lse_w = _window_forward(q, k, v, cu, max_len, scale, window)
        out, lse = out_w.float(), lse_w.float()  # [N, H, D], [H, N]
        if sink_idx is not None:
            N, H, D = q.shape
            hkv = k.shape[1]
            for a in range(0, N, SINK_CHUNK):
                b = min(N, a + SINK_CHUNK)
                s = _sink_scores(q[a:b], k[sink_idx[a:b]], sink_ok[a:b], scale)  # [n, g, r, S]
                lse_s = s.logsumexp(-1).reshape(b - a, H).T  # [H, n]
                lse_all = torch.logaddexp(lse[:, a:b], lse_s)
                p = torch.exp(s - lse_all.T.reshape(b - a, hkv, H // hkv, 1)).nan_to_num(0.0)
                o_s = torch.einsum("ngrs,nsgd->ngrd", p, v[sink_idx[a:b]].float()).reshape(b - a, H, -1)
                out[a:b] = out[a:b] * torch.exp(lse[:, a:b] - lse_all).T[..., None] + o_s
                lse[:, a:b] = lse_all
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu, sink_idx, sink_ok)
        ctx.max_len, ctx.window, ctx.scale = max_len, window, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu, sink_idx, sink_ok = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _window_backward(dout, q, k, v, out, lse.contiguous(), cu, ctx.max_len, ctx.scale, ctx.window)
        if sink_idx is not None:
            N, H, D = q.shape
            hkv = k.shape[1]
            dq, dk, dv = dq.float(), dk.float(), dv.float()
            for a in range(0, N, SINK_CHUNK):
                b = min(N, a + SINK_CHUNK)
                idx, n = sink_idx[a:b], b - a
                ks, vs = k[idx].float(), v[idx].float()  # [n, S, g, D]
                p = torch.exp(_sink_scores(q[a:b], ks, sink_ok[a:b], ctx.scale)
                              - lse[:, a:b].T.reshape(n, hkv, H // hkv, 1)).nan_to_num(0.0)
                do = dout[a:b].float().view(n, hkv, H // hkv, D)
                delta = (do * out[a:b].float().view(n, hkv, H // hkv, D)).sum(-1, keepdim=True)
                dp = torch.einsum("ngrd,nsgd->ngrs", do, vs)
                ds = p * (dp - delta) * ctx.scale
                dq[a:b] += torch.einsum("ngrs,nsgd->ngrd", ds, ks).reshape(n, H, D)
                dk.index_add_(0, idx.reshape(-1), torch.einsum(
                    "ngrs,ngrd->nsgd", ds, q[a:b].float().view(n, hkv, H // hkv, D)).reshape(-1, hkv, D))
                dv.index_add_(0, idx.reshape(-1), torch.einsum("ngrs,ngrd->nsgd", p, do).reshape(-1, hkv, D))
            dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None


def flash_streaming(q, k, v, sink: int, window: int, scale: float | None = None,
                    doc_pos: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] (fp16/bf16 on CUDA for the real kernels) -> [B, Hq, T, D].
    `doc_pos` [B, T]: packed rows, positions restarting at each document; default: one document per row."""
    B, H, T, D = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    window = min(window, T)
    pos = doc_pos if doc_pos is not None else torch.arange(T, device=q.device).expand(B, T)
    new_doc = torch.ones_like(pos, dtype=torch.bool)
    new_doc[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    starts = new_doc.flatten().nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    sink_idx, sink_ok = _sink_table(pos, min(sink, T), window) if sink > 0 else (None, None)

    def flat(x):
        return x.transpose(1, 2).reshape(B * T, x.shape[1], D).contiguous()

    out = _FlashStreaming.apply(flat(q), flat(k), flat(v), cu, max_len, sink_idx, sink_ok, window, scale)
    return out.view(B, T, H, D).transpose(1, 2)
