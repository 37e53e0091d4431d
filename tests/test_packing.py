"""Packed batches: attention stays inside documents, each document has its own sinks, and the loss equals
the token-weighted loss of the documents run one by one."""

import pytest
import torch

from lt_train import HybridConfig, convert_to_hybrid
from lt_train.attention import streaming_attention
from lt_train.data import demo_examples, encode_example
from lt_train.data.collate import collate_packed, pack_bins
from lt_train.models import tiny_model, tiny_tokenizer
from reference import dense_streaming_reference

DOCS = [[100, 3, 150, 47], [10, 2, 1, 287]]


def _packed_positions():
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCS])


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("sink,window", [(4, 50), (0, 20), (8, 7), (3, 1), (4, 500)])
def test_packed_attention_matches_reference(backend, sink, window):
    pos = _packed_positions()
    B, T = pos.shape
    grad = backend == "sdpa"
    q = torch.randn(B, 6, T, 16, requires_grad=grad)
    k = torch.randn(B, 2, T, 16, requires_grad=grad)
    v = torch.randn(B, 2, T, 16, requires_grad=grad)
    out = streaming_attention(q, k, v, sink, window, backend=backend, doc_pos=pos)
    idx = torch.arange(T).expand(B, T)
    ref = dense_streaming_reference(q, k, v, sink, window, pos, pos, idx, idx, torch.ones(B, T, dtype=torch.bool))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if grad:
        g = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _peaky(model):
    """Random tiny models attend almost uniformly; sharpen the attention so that which keys a query sees
    changes the loss clearly."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "q_proj"):
                m.q_proj.weight.mul_(6.0)
                m.k_proj.weight.mul_(6.0)
    return model


def _encoded(n=5):
    tok = tiny_tokenizer()
    return [encode_example(tok, e, max_length=1000 + 37 * i) for i, e in enumerate(demo_examples(n))], tok


@pytest.mark.parametrize("lazy", [[], [0, 2]])
def test_packed_loss_equals_token_weighted_loss_of_single_documents(lazy):
    model = _peaky(tiny_model("qwen2"))
    convert_to_hybrid(model, HybridConfig(lazy, sink_tokens=4, window=64))
    enc, tok = _encoded()
    bins = pack_bins([len(e.input_ids) for e in enc], 2500)
    assert len(bins) < len(enc)  # something was really packed
    batch = collate_packed([[enc[i] for i in b] for b in bins], tok.pad_token_id)
    packed = model(**batch.model_inputs()).loss
    total = count = 0
    for e in enc:
        ids = e.input_ids[None]
        labels = e.labels[None]
        n = int((labels[:, 1:] != -100).sum())
        total = total + model(input_ids=ids, labels=labels).loss * n
        count += n
    assert batch.num_target_tokens == count
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=1e-5)


def test_packed_streaming_differs_from_unseparated_streaming():
    """The check above could not pass if documents leaked into each other: packing without the document
    boundaries gives another loss."""
    model = _peaky(tiny_model("llama"))
    convert_to_hybrid(model, HybridConfig([0, 1, 2, 3], sink_tokens=4, window=64))
    enc, tok = _encoded(3)
    batch = collate_packed([enc], tok.pad_token_id)
    leaky = torch.arange(batch.input_ids.shape[1])[None]
    a = model(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids).loss
    b = model(input_ids=batch.input_ids, labels=batch.labels, position_ids=leaky).loss
    assert abs(a.item() - b.item()) > 3e-4  # vs the ~6e-5 tolerance of the equality test above


def test_pack_bins_refuses_overlong_examples():
    with pytest.raises(ValueError, match="longer than the packing length 10"):
        pack_bins([5, 11], 10)
    bins = pack_bins([6, 5, 4, 3, 2], 10)
    assert sorted(i for b in bins for i in b) == list(range(5))
    assert all(sum([6, 5, 4, 3, 2][i] for i in b) <= 10 for b in bins)


# ---------------------------------------------------------------------------------------------------------
# flash-attn backend: its merge of window and sinks, its sink gathering and its hand-written backward run on
# CPU with the two flash-attn kernels replaced by dense math; the real kernels are tested on GPU only.

def _dense_window_forward(q, k, v, cu, max_len, scale, window):
    N, H, D = q.shape
    doc = torch.zeros(N, dtype=torch.long)
    doc[cu[1:-1].long()] = 1
    doc = doc.cumsum(0)
    i = torch.arange(N)
    allowed = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
    kk = k.repeat_interleave(H // k.shape[1], 1).float()
    s = torch.einsum("nhd,mhd->hnm", q.float(), kk) * scale
    s = s.masked_fill(~allowed[None], float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("hnm,mhd->nhd", p, v.repeat_interleave(H // v.shape[1], 1).float())
    return out.to(q.dtype), lse, (allowed, kk)


def _fake_forward(q, k, v, cu, max_len, scale, window):
    out, lse, _ = _dense_window_forward(q, k, v, cu, max_len, scale, window)
    return out, lse


def _fake_backward(dout, q, k, v, out, lse, cu, max_len, scale, window):
    """flash-attn's backward contract: gradients of softmax attention restricted to the window keys, using the
    given (merged) output and log-sum-exp."""
    N, H, D = q.shape
    g = H // k.shape[1]
    _, _, (allowed, kk) = _dense_window_forward(q, k, v, cu, max_len, scale, window)
    vv = v.repeat_interleave(g, 1).float()
    s = torch.einsum("nhd,mhd->hnm", q.float(), kk) * scale
    p = torch.exp(s - lse[..., None]).masked_fill(~allowed[None], 0.0)
    delta = (dout.float() * out.float()).sum(-1).T  # [H, N]
    dv = torch.einsum("hnm,nhd->mhd", p, dout.float())
    dp = torch.einsum("nhd,mhd->hnm", dout.float(), vv)
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("hnm,mhd->nhd", ds, kk)
    dk = torch.einsum("hnm,nhd->mhd", ds, q.float())
    fold = lambda x: x.view(N, k.shape[1], g, D).sum(2)  # noqa: E731
    return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("sink,window", [(4, 50), (8, 7), (0, 20)])
def test_flash_backend_logic_with_dense_kernels(monkeypatch, packed, sink, window):
    from lt_train.attention import flash

    monkeypatch.setattr(flash, "_window_forward", _fake_forward)
    monkeypatch.setattr(flash, "_window_backward", _fake_backward)
    monkeypatch.setattr(flash, "SINK_CHUNK", 97)  # exercise the chunking
    pos = _packed_positions() if packed else torch.arange(300).expand(2, 300)
    B, T = pos.shape
    q = torch.randn(B, 6, T, 16, requires_grad=True)
    k = torch.randn(B, 2, T, 16, requires_grad=True)
    v = torch.randn(B, 2, T, 16, requires_grad=True)
    out = flash.flash_streaming(q, k, v, sink, window, doc_pos=pos if packed else None)
    idx = torch.arange(T).expand(B, T)
    ref = dense_streaming_reference(q, k, v, sink, window, pos, pos, idx, idx, torch.ones(B, T, dtype=torch.bool))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no backward pass on CPU (torch 2.13)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sink,window", [(4, 50), (0, 20), (8, 7), (3, 1), (4, 500)])
def test_flex_backward_on_packed_documents_gpu(dtype, sink, window):
    """The default GPU training path without flash-attn: packed rows through FlexAttention, forward and backward
    against the dense reference (each document its own sinks, nothing crosses a document boundary)."""
    pos = _packed_positions().cuda()
    B, T = pos.shape
    q, k, v = (torch.randn(B, h, T, 16, device="cuda", dtype=dtype, requires_grad=True) for h in (6, 2, 2))
    out = streaming_attention(q, k, v, sink, window, backend="flex", doc_pos=pos)
    idx = torch.arange(T, device="cuda").expand(B, T)
    ref = dense_streaming_reference(q, k, v, sink, window, pos, pos, idx, idx,
                                    torch.ones(B, T, dtype=torch.bool, device="cuda"))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a.float(), b.float(), atol=10 * tol, rtol=10 * tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn kernels need a CUDA GPU")
def test_flash_backend_packed_on_gpu():
    from lt_train.attention import flash

    if not flash.is_available():
        pytest.skip("flash-attn is not installed")
    pos = _packed_positions().cuda()
    B, T = pos.shape
    q, k, v = (torch.randn(B, h, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (6, 2, 2))
    out = streaming_attention(q, k, v, 4, 50, backend="flash_attn", doc_pos=pos)
    idx = torch.arange(T, device="cuda").expand(B, T)
    ref = dense_streaming_reference(q, k, v, 4, 50, pos, pos, idx, idx, torch.ones(B, T, dtype=torch.bool, device="cuda"))
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=5e-2)
