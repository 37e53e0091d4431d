"""Streaming attention with flash-attn (optional, CUDA only).

The window part is flash-attn's sliding window (`window_size=(W-1, 0)`); the S sink keys that lie outside
a query's window are attended separately (S is small) and the two parts are merged through their
log-sum-exps. flash-attn does not propagate gradients through its returned log-sum-exp, so the backward
pass is written out: the window part calls flash-attn's own backward with the *merged* output and
log-sum-exp (which yields exactly the gradient of the merged softmax restricted to window keys), and the
sink part is computed by hand. Padded batches are not handled here: the dispatcher sends them to `sdpa`.

This file cannot be exercised without a CUDA GPU and flash-attn; its test skips elsewhere.
"""
from __future__ import annotations

import inspect
import math

import torch


def is_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _sink_scores(q, ks, scale, sink, window):
    """q [B, T, H, D], ks [B, S, H, D] -> masked scores [B, H, T, S] in fp32."""
    T = q.shape[1]
    s = torch.einsum("bthd,bshd->bhts", q.float(), ks.float()) * scale
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(sink, device=q.device)[None, :]
    allowed = (j <= i) & (i - j >= window)
    return s.masked_fill(~allowed, float("-inf"))


def _flash_backward(dout, q, k, v, out, lse, dq, dk, dv, scale, window):
    from flash_attn import flash_attn_interface as fai

    fn = getattr(fai, "_flash_attn_backward")
    params = inspect.signature(fn).parameters
    kw = dict(dropout_p=0.0, softmax_scale=scale, causal=True, alibi_slopes=None, deterministic=False,
              rng_state=None, softcap=0.0)
    if "window_size_left" in params:
        kw.update(window_size_left=window - 1, window_size_right=0)
    else:
        kw.update(window_size=(window - 1, 0))
    kw = {n: val for n, val in kw.items() if n in params}
    fn(dout, q, k, v, out, lse, dq, dk, dv, **kw)


class _FlashStreaming(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, window, scale):
        from flash_attn import flash_attn_func

        out_w, lse_w, _ = flash_attn_func(
            q, k, v, softmax_scale=scale, causal=True, window_size=(window - 1, 0), return_attn_probs=True
        )
        lse = lse_w.float()  # [B, H, T]
        out = out_w.float()
        if sink > 0:
            rep = q.shape[2] // k.shape[2]
            ks = k[:, :sink].repeat_interleave(rep, dim=2)
            vs = v[:, :sink].repeat_interleave(rep, dim=2)
            s = _sink_scores(q, ks, scale, sink, window)
            lse_s = torch.logsumexp(s, dim=-1)
            lse_all = torch.logaddexp(lse, lse_s)
            p_s = torch.exp(s - lse_all[..., None]).nan_to_num(0.0)
            out = out * torch.exp(lse - lse_all).transpose(1, 2)[..., None] + torch.einsum(
                "bhts,bshd->bthd", p_s, vs.float()
            )
            lse = lse_all
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sink, ctx.window, ctx.scale = sink, window, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        sink, window, scale = ctx.sink, ctx.window, ctx.scale
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _flash_backward(dout, q, k, v, out, lse.contiguous(), dq, dk, dv, scale, window)
        if sink > 0:
            rep = q.shape[2] // k.shape[2]
            ks = k[:, :sink].repeat_interleave(rep, dim=2).float()
            vs = v[:, :sink].repeat_interleave(rep, dim=2).float()
            p = torch.exp(_sink_scores(q, ks, scale, sink, window) - lse[..., None]).nan_to_num(0.0)
            do = dout.float()
            delta = (do * out.float()).sum(-1).transpose(1, 2)  # [B, H, T]
            dp = torch.einsum("bthd,bshd->bhts", do, vs)
            ds = p * (dp - delta[..., None]) * scale
            dq = dq + torch.einsum("bhts,bshd->bthd", ds, ks).to(dq.dtype)
            dks = torch.einsum("bhts,bthd->bshd", ds, q.float())
            dvs = torch.einsum("bhts,bthd->bshd", p, do)
            B, S, H, D = dks.shape
            hk = k.shape[2]
            dk[:, :sink] += dks.view(B, S, hk, rep, D).sum(3).to(dk.dtype)
            dv[:, :sink] += dvs.view(B, S, hk, rep, D).sum(3).to(dv.dtype)
        return dq, dk, dv, None, None, None


def flash_streaming(q, k, v, sink: int, window: int, scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, T, D] (fp16/bf16, CUDA) -> [B, Hq, T, D]; no padding."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    T = q.shape[2]
    window = min(window, T)
    out = _FlashStreaming.apply(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
        min(sink, T), window, scale,
    )
    return out.transpose(1, 2)
