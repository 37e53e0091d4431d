"""Token losses with the LM head applied in chunks (no T x vocab logits): for evaluation and for training."""
from __future__ import annotations

import torch
import torch.nn.functional as F

HEAD_CHUNK = 1024  # tokens per LM-head call: a chunk's logits are HEAD_CHUNK x vocab, never T x vocab


def decoder_of(model):
    """The decoder stack of a causal LM (also through peft and DeepSpeed wrappers): hidden states only."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def _targets(hidden: torch.Tensor, labels: torch.Tensor, shifted: bool):
    """(states, the token each one predicts): labels are shifted here unless already (`shift_labels` of a
    sequence-parallel shard, whose last target lives on the next shard)."""
    return (hidden, labels) if shifted else (hidden[:, :-1], labels[:, 1:])


def lm_head_loss_sum(model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = HEAD_CHUNK,
                     shifted: bool = False, n_chunks: int | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropies for decoder states `hidden` [B, T, H] and `labels` [B, T] (-100
    ignored; `shifted`: labels[t] is the target of state t). With gradients, each chunk is checkpointed so that
    its logits are not kept for backward (under ZeRO-3 use `zero3_head_loss_sum`: re-running the head in backward
    would meet its weight partitioned again). `n_chunks`: exactly that many head calls, whatever the length (under
    ZeRO-3 each call gathers the head's weight, a collective: ranks evaluating rows of different lengths must
    make as many)."""
    head = model.get_output_embeddings()
    hidden, targets = _targets(hidden, labels, shifted)

    def part(h, t):
        logits = head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100,
                               reduction="sum")

    return chunked_sum(part, (hidden, targets), chunk, n_chunks)


def chunked_sum(part, tensors: tuple, chunk: int, n_chunks: int | None = None) -> torch.Tensor:
    """Sum of `part(*pieces)` over the tensors cut along dim 1 in chunks of `chunk` (or exactly `n_chunks`
    pieces); with gradients each call is checkpointed, so its logits are not kept for backward."""
    pieces = (zip(*(t.tensor_split(n_chunks, dim=1) for t in tensors)) if n_chunks
              else (tuple(t[:, s : s + chunk] for t in tensors) for s in range(0, tensors[0].shape[1], chunk)))
    total = tensors[0].new_zeros((), dtype=torch.float32)
    for args in pieces:
        total = total + (torch.utils.checkpoint.checkpoint(part, *args, use_reentrant=False)
                         if torch.is_grad_enabled() else part(*args))
    return total


def tiled_shards(chunk: int, length: int | None, *tensors):
    """(shards, tensors padded along dim 1) for DeepSpeed's tiled loss. Each shard's head call gathers the head's
    weight (a collective): with `length` (the longest row any rank can hold) every rank pads to the same length and
    makes the same number of shards, whatever its row's length. A tensor may come as (tensor, pad value)."""
    pairs = [t if isinstance(t, tuple) else (t, 0) for t in tensors]
    n = max(length or 0, pairs[0][0].shape[1])
    shards = max(1, -(-n // chunk))
    padded = shards * -(-n // shards)  # torch.chunk (inside the tiled loss) then makes exactly `shards` pieces
    out = []
    for t, value in pairs:
        if padded > t.shape[1]:
            t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, padded - t.shape[1]), value=value)
        out.append(t)
    return (shards, *out)


def zero3_head_loss_sum(model, hidden: torch.Tensor, labels: torch.Tensor, scale: float,
                        chunk: int = HEAD_CHUNK, shifted: bool = False, length: int | None = None) -> torch.Tensor:
    """`lm_head_loss_sum` x `scale` under DeepSpeed ZeRO-3, through DeepSpeed's own tiled loss
    (`TiledFusedLogitsLoss`, ALST): chunk by chunk, the head runs forward and backward at once while ZeRO-3 holds
    its weight gathered, so neither the T x vocab logits nor a re-run of the head in backward (which would meet
    its weight partitioned again) ever happens. The head's weight gradient is produced inside this call, so the
    loss scale of the step (world size / target tokens) is applied here, not to the returned value."""
    x, y = _targets(hidden, labels, shifted)
    shards, x, y = tiled_shards(chunk, length, x, (y, -100))

    def fn(head_module, xs, ys):
        logits = head_module(xs).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1), ignore_index=-100,
                               reduction="sum") * scale

    return tiled_head_loss(model, fn, x, y, None, shards)


def tiled_head_loss(model, fn, x, y, mask, shards: int) -> torch.Tensor:
    """DeepSpeed's `TiledFusedLogitsLoss` of `fn(head, x_shard, y_shard[, mask_shard])` over the model's LM head."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

    head = model.get_output_embeddings()
    w = head.weight
    if w is not model.get_input_embeddings().weight:
        return TiledFusedLogitsLoss.apply(fn, head, x, y, mask, shards, [w], "sum")
    # Tied embeddings: the weight's gradient is complete only after the embedding's backward, so ZeRO-3 must not
    # reduce it when the tiled loss finishes (it would reduce the same parameter twice): hold it back here and let
    # the main backward's embedding gradient release it.
    w.ds_grad_is_ready = False
    try:
        return TiledFusedLogitsLoss.apply(fn, head, x, y, mask, shards, [], "sum")
    finally:
        w.ds_grad_is_ready = True


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, chunk: int = HEAD_CHUNK,
              n_chunks: int | None = None) -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens). `labels` default to `input_ids`; -100 is ignored,
    as is padding. Positions are counted over real tokens, as `generate()` does."""
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = input_ids if labels is None else labels
    labels = labels.masked_fill(attention_mask == 0, -100)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                               use_cache=False).last_hidden_state
    total = lm_head_loss_sum(model, hidden, labels, chunk, n_chunks=n_chunks)
    return total.item(), int((labels[:, 1:] != -100).sum())


def mean_nll(model, samples: list[torch.Tensor], labels: list[torch.Tensor] | None = None) -> float:
    """Token-weighted mean NLL over 1-D token-id tensors (optionally with their labels, -100 ignored)."""
    dev = next(model.parameters()).device
    total = count = 0
    for n, ids in enumerate(samples):
        lab = None if labels is None else labels[n][None].to(dev)
        t, c = token_nll(model, ids.to(dev), labels=lab)
        total, count = total + t, count + c
    return total / max(count, 1)
