"""Teacher-forced negative log-likelihood, with the LM head applied in chunks (no T x vocab logits)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, chunk: int = 1024) -> tuple[float, int]:
    """(sum of token NLLs, number of predicted tokens). `labels` default to `input_ids`; -100 is ignored,
    as is padding. Positions are counted over real tokens, as `generate()` does."""
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    labels = input_ids if labels is None else labels
    labels = labels.masked_fill(attention_mask == 0, -100)
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                     use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    targets = labels[:, 1:]
    total, count = 0.0, 0
    for s in range(0, targets.shape[1], chunk):
        logits = head(hidden[:, :-1][:, s : s + chunk]).float()
        t = targets[:, s : s + chunk]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100,
                                 reduction="sum").item()
        count += int((t != -100).sum())
    return total, count


def mean_nll(model, samples: list[torch.Tensor]) -> float:
    """Token-weighted mean NLL over a list of 1-D token-id tensors."""
    total = count = 0
    for ids in samples:
        t, c = token_nll(model, ids.to(model.device))
        total, count = total + t, count + c
    return total / max(count, 1)
