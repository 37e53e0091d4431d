"""Activations one decoder layer saves for backward, measured by running it on meta tensors under
`saved_tensors_hooks`, attention replaced by a stand-in that saves what the real kernel saves."""
from __future__ import annotations

import torch

SDPA_BLOCK = 256                     # query block of the chunked streaming SDPA (attention/sdpa.py)


class _SavedLike(torch.autograd.Function):
    """Returns an empty tensor like `out` and saves `tensors` for backward, as a fused kernel would."""

    @staticmethod
    def forward(ctx, out, *tensors):
        ctx.save_for_backward(*tensors)
        return out.new_empty(out.shape)

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (meta planning only)
        return (g,) + (None,) * len(ctx.saved_tensors)


def _plan_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention stand-in for the trace: saves what the real kernel saves. Full layers (and streaming layers
    on flex / flash-attn): q, k, v, out, lse. Chunked streaming SDPA: q, k, v and the first W queries' output
    and lse (the blocked part is recomputed in backward); see attention/sdpa.py.
    Under sequence parallelism (`module.lt_plan_sp` = N) the layer holds T/N tokens and the kernel runs on what
    Ulysses' all-to-all hands it: all T tokens of Hq/N query heads and Hkv/N key-value heads (at least one:
    DeepSpeed replicates KV heads when N exceeds them)."""
    n = getattr(module, "lt_plan_sp", 1)
    local = query
    if n > 1:
        B, Hq, t, D = query.shape
        hkv = max(1, key.shape[1] // n)
        # new storages in the graph (what the kernel saves is the all-to-all's output, not this rank's q, k, v)
        query = query.new_empty(B, Hq // n, t * n, D) + query.sum() * 0
        key = key.new_empty(B, hkv, t * n, D) + key.sum() * 0
        value = value.new_empty(B, hkv, t * n, D) + value.sum() * 0
    out = _kernel_saves(module, query, key, value)
    if n > 1:  # back to this rank's tokens, all heads (the all-to-all itself saves nothing)
        out = local + out.sum() * 0
    return out.transpose(1, 2), None


def _kernel_saves(module, query, key, value):
    B, Hq, T, D = query.shape
    spec = getattr(module, "lt_plan", None)  # (sink, window, backend) on lazy layers
    if spec is None or spec[2] != "sdpa" or spec[1] >= T:
        lse = query.new_empty(B, Hq, T, dtype=torch.float32)
        out = _SavedLike.apply(query, query, key, value, lse)
    else:
        # On the GPUs this plans for, the blocked part is recomputed in backward (torch.utils.checkpoint,
        # attention/sdpa.py): it keeps only q, k and v (on CPU it keeps its output and lse too, as dense does).
        # The first W queries go to the fused causal kernel, which keeps its output and lse.
        W = spec[1]
        oh = query.new_empty(B, Hq, W, D)
        lse = query.new_empty(B, Hq, W, dtype=torch.float32)
        out = _SavedLike.apply(query, query, key, value, oh, lse)
        out = out + query * 0  # keep the graph connected to q, k, v
    return out


def _register_plan_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("lt_plan", _plan_attention)
    AttentionMaskInterface.register("lt_plan", sdpa_mask)
    return "lt_plan"


def saved_bytes(fn) -> tuple[int, dict]:
    """Bytes of the distinct storages autograd saves while `fn` runs, and the storage keys with their sizes."""
    seen: dict = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s._cdata] = max(seen.get(s._cdata, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), seen


def layer_activations(model, tokens: int, lazy_spec: tuple | None, sequence_parallel: int = 1) -> int:
    """Bytes one decoder layer saves for backward on a row of `tokens` tokens (batch 1), traced on meta, on one
    of `sequence_parallel` processes sharing the row (tokens / N each). `lazy_spec` = (sink, window, backend)
    makes it a streaming layer. Excludes storages shared by all layers (the rotary tables)."""
    from ..nll import decoder_of

    dec = decoder_of(model)
    layer = dec.layers[0]
    attn = layer.self_attn
    attn.lt_plan = lazy_spec
    attn.lt_plan_sp = sequence_parallel
    dtype = next(model.parameters()).dtype
    H = model.config.get_text_config(decoder=True).hidden_size
    local = tokens // sequence_parallel
    x = torch.empty(1, local, H, device="meta", dtype=dtype, requires_grad=True)
    pos = torch.arange(local, device="meta")[None]
    pe = dec.rotary_emb(x, pos)
    shared = {t.untyped_storage()._cdata for t in pe}
    configs = {id(c): c for c in (model.config, attn.config, model.config.get_text_config(decoder=True))}
    before = {k: c._attn_implementation for k, c in configs.items()}
    name = _register_plan_attention()
    for c in configs.values():
        c._attn_implementation = name
    try:
        _, seen = saved_bytes(lambda: layer(x, position_embeddings=pe, position_ids=pos, attention_mask=None))
    finally:
        attn.lt_plan = None
        attn.lt_plan_sp = 1
        for k, c in configs.items():
            c._attn_implementation = before[k]
    # parameters saved by matmuls are weights, not activations
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in shared and k not in params)
