"""Every streaming backend against the dense masked reference (tests/reference.py)."""
import pytest
import torch

from lt_train.attention import check_backend, positional_streaming_sdpa, streaming_attention
from lt_train.attention import flash as flash_backend
from reference import dense_streaming_reference, reference_layout

HQ, HKV, D = 6, 2, 16


def _qkv(B, T, dtype=torch.float32, requires_grad=True):
    q = torch.randn(B, HQ, T, D, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(B, HKV, T, D, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(B, HKV, T, D, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def _reference(q, k, v, sink, window, pads):
    B, T = q.shape[0], q.shape[2]
    pos, idx, valid = reference_layout(B, T, pads)
    return dense_streaming_reference(q, k, v, sink, window, pos, pos, idx, idx, valid), valid


def _check(backend, B, T, sink, window, pads, dtype=torch.float32, backward=True, atol=1e-5):
    q, k, v = _qkv(B, T, dtype, requires_grad=backward)
    pad = torch.tensor(pads) if any(pads) else None
    out = streaming_attention(q, k, v, sink, window, backend=backend, pad=pad, offset=pad)
    ref, valid = _reference(q, k, v, sink, window, pads)
    m = valid[:, None, :, None]  # compare real query rows only
    torch.testing.assert_close(out * m, ref * m, atol=atol, rtol=atol if dtype == torch.float32 else 2e-2)
    if backward:
        g = torch.randn_like(out) * m
        grads = torch.autograd.grad(out, (q, k, v), g)
        ref_grads = torch.autograd.grad(ref, (q, k, v), g)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=atol * 10, rtol=1e-4)


CASES = [  # (B, T, sink, window, left pads per row)
    (1, 300, 4, 50, [0]),  # T not a multiple of the 256-query block
    (2, 300, 0, 50, [0, 0]),  # no sinks
    (1, 200, 4, 500, [0]),  # window longer than the sequence
    (3, 333, 4, 64, [0, 17, 120]),  # batch with left padding
    (2, 280, 128, 96, [0, 31]),  # the authors' large sink count, S > W
    (2, 260, 3, 1, [0, 5]),  # window of one: sinks and the query itself
    (2, 280, 128, 96, [0, 0]),  # S > W without padding (causal head + streaming tail)
    (1, 260, 3, 1, [0]),  # window of one without padding
    (1, 700, 4, 100, [0]),  # a tail of 600 queries: three 256-query blocks, the last one partial
    (1, 101, 4, 100, [0]),  # W < T < W + S: every query sees every earlier key (plain causal)
    (1, 105, 4, 100, [0]),  # a tail of one query (the causal head is W + S queries)
    (2, 1100, 4, 100, [0, 0]),  # a tail of four blocks sharing one broadcast mask
]


@pytest.mark.parametrize("B,T,sink,window,pads", CASES + [
    (1, 2000, 4, 16, [0]),  # small window, long rows: the backward goes several query blocks at a time
    (2, 1500, 4, 32, [0, 100]),  # the same with padding (the general blocked path)
])
def test_sdpa_matches_reference_fp32(B, T, sink, window, pads):
    _check("sdpa", B, T, sink, window, pads)


@pytest.mark.parametrize("B,T,sink,window,pads", [CASES[0], CASES[3]])
def test_sdpa_matches_reference_bf16(B, T, sink, window, pads):
    _check("sdpa", B, T, sink, window, pads, dtype=torch.bfloat16, atol=2e-2)


@pytest.mark.parametrize("B,T,sink,window,pads", [(1, 300, 4, 50, [0]), (3, 300, 0, 64, [0, 17, 120]),
                                                  (1, 300, 4, 500, [0])])
def test_flex_forward_matches_reference(B, T, sink, window, pads):
    _check("flex", B, T, sink, window, pads, backward=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward pass on CPU (torch 2.13)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_backward_matches_reference_gpu(dtype):
    torch.set_default_device("cuda")
    try:
        for B, T, sink, window, pads in CASES:
            _check("flex", B, T, sink, window, pads, dtype=dtype, atol=1e-5 if dtype == torch.float32 else 2e-2)
    finally:
        torch.set_default_device("cpu")


def test_flex_backward_on_cpu_is_refused_clearly():
    q, k, v = _qkv(1, 64)
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        streaming_attention(q, k, v, 4, 16, backend="flex")


@pytest.mark.skipif(not flash_backend.is_available(), reason="flash-attn needs a CUDA GPU and the flash-attn package")
@pytest.mark.parametrize("B,T,sink,window", [(1, 300, 4, 50), (2, 300, 0, 50), (1, 200, 4, 500), (2, 777, 16, 128)])
def test_flash_matches_reference_bf16(B, T, sink, window):
    torch.set_default_device("cuda")
    try:
        _check("flash_attn", B, T, sink, window, [0] * B, dtype=torch.bfloat16, atol=2e-2)
    finally:
        torch.set_default_device("cpu")


def test_positional_path_matches_reference():
    """The decode path: keys in arbitrary slot order with their own positions, validity and indices."""
    B, Q, K = 2, 3, 40
    q = torch.randn(B, HQ, Q, D, requires_grad=True)
    k = torch.randn(B, HKV, K, D, requires_grad=True)
    v = torch.randn(B, HKV, K, D, requires_grad=True)
    perm = torch.randperm(K)
    k_idx = torch.arange(100, 100 + K)[perm].expand(B, K).clone()
    k_pos = k_idx - torch.tensor([[0], [7]])
    k_valid = torch.rand(B, K) > 0.2
    q_idx = torch.arange(100 + K - Q, 100 + K).expand(B, Q)
    q_pos = q_idx - torch.tensor([[0], [7]])
    out = positional_streaming_sdpa(q, k, v, 4, 10, q_pos, k_pos, q_idx, k_idx, k_valid, q_chunk=2)
    ref = dense_streaming_reference(q, k, v, 4, 10, q_pos, k_pos, q_idx, k_idx, k_valid)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_backend_errors_are_clear():
    q, k, v = _qkv(1, 32, requires_grad=False)
    with pytest.raises(ValueError, match="unknown streaming attention backend"):
        streaming_attention(q, k, v, 4, 8, backend="xformers")
    with pytest.raises(ValueError, match="window >= 1"):
        streaming_attention(q, k, v, 4, 0)
    with pytest.raises(ValueError, match="sink >= 0"):
        streaming_attention(q, k, v, -1, 8)
    if not flash_backend.is_available():
        with pytest.raises(ImportError, match="flash-attn"):
            check_backend("flash_attn")


@pytest.mark.parametrize("pads", [[0, 0], [0, 40]])
def test_streaming_backward_keeps_no_more_than_dense_causal(pads):
    """The blocked keys and values are recomputed in backward, not kept: what autograd saves for the streaming
    attention (inputs, output, softmax statistics) is at most what the fused dense causal kernel saves, although
    each blocked copy is (S + block + W - 1) / block times the size of k."""
    from lt_train.attention.sdpa import chunked_streaming_sdpa

    def saved_bytes(fn):
        q, k, v = _qkv(2, 1500)
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q, k, v).sum()
        for t in (q, k, v):  # the inputs are kept by the projections that made them anyway
            seen.pop(t.untyped_storage().data_ptr(), None)
        return sum(seen.values())

    pad = torch.tensor(pads) if any(pads) else None
    dense = saved_bytes(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))
    streaming = saved_bytes(lambda q, k, v: chunked_streaming_sdpa(q, k, v, 4, 200, pad=pad, offset=pad))
    assert streaming <= dense


@pytest.mark.parametrize("B,T,sink,window,pads", [CASES[0], CASES[3], CASES[8]])
def test_sdpa_recompute_fallback_matches_reference(monkeypatch, B, T, sink, window, pads):
    """Where the CPU flash kernel's backward is not available (CUDA, other devices) backward recomputes the
    blocked call instead (torch.utils.checkpoint): same values and gradients as the dense reference."""
    from lt_train.attention import sdpa

    monkeypatch.setattr(sdpa, "_FLASH_CPU_BACKWARD", None)
    called = []
    monkeypatch.setattr(sdpa, "checkpoint", lambda *a, **kw: called.append(1) or torch.utils.checkpoint.checkpoint(*a, **kw))
    _check("sdpa", B, T, sink, window, pads)
    assert called


def test_flash_backward_keywords_refuse_an_unknown_window_argument():
    """A flash-attn whose backward renamed its window argument is refused, not called without a window."""
    import inspect

    from lt_train.attention.flash import backward_keywords

    def new_style(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, mq, mk, dropout_p, softmax_scale, causal,
                  window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False,
                  rng_state=None):
        pass

    def old_style(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, mq, mk, dropout_p, softmax_scale, causal,
                  window_size=(-1, -1), alibi_slopes=None, deterministic=False, rng_state=None):
        pass

    def renamed(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, mq, mk, dropout_p, softmax_scale, causal,
                local_window=(-1, -1)):
        pass

    kw = backward_keywords(inspect.signature(new_style).parameters, 0.5, 8)
    assert kw["window_size_left"] == 7 and kw["window_size_right"] == 0 and kw["softcap"] == 0.0
    kw = backward_keywords(inspect.signature(old_style).parameters, 0.5, 8)
    assert kw["window_size"] == (7, 0) and "softcap" not in kw and kw["softmax_scale"] == 0.5
    with pytest.raises(TypeError, match="no window argument"):
        backward_keywords(inspect.signature(renamed).parameters, 0.5, 8)


def test_auto_does_not_pick_unverified_flash(monkeypatch):
    from lt_train import attention
    from lt_train.attention import flash

    monkeypatch.setattr(flash, "is_available", lambda: True)
    q = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert attention.resolve_backend("auto", q, padded=False) == "sdpa"
    monkeypatch.setattr(attention, "FLASH_VERIFIED", True)
    assert attention.resolve_backend("auto", q, padded=False) == "flash_attn"
