"""Batching: sequence packing (first-fit bins, one packed row per micro-batch).

Packed rows carry `position_ids` restarting at 0 for each document and no attention mask: transformers
then keeps full layers inside documents, and lt_train's streaming layers do the same, with the sinks of
each document being its own first S tokens. The first label of every document is ignored, so no token is
predicted across a document boundary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import EncodedExample


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None for packed rows

    def model_inputs(self) -> dict:
        # use_cache=False: transformers detects packed rows only when no cache is being built
        d = {"input_ids": self.input_ids, "labels": self.labels, "position_ids": self.position_ids,
             "use_cache": False}
        if self.attention_mask is not None:
            d["attention_mask"] = self.attention_mask
        return d

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


def pack_bins(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into rows of at most `max_tokens` tokens."""
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) are longer than the packing length {max_tokens} "
                         f"(e.g. #{too_long[0]} with {lengths[too_long[0]]} tokens): raise the packing length "
                         "or lower data.max_length")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def collate_packed(rows: list[list[EncodedExample]], pad_id: int, multiple: int = 1) -> Batch:
    """Each row: its documents back to back, then padding as one more (loss-free) document, up to the longest
    row rounded up to a multiple of `multiple` (sequence parallelism shares a row out in equal shards)."""
    T = max(sum(len(e.input_ids) for e in row) for row in rows)
    T = -(-T // multiple) * multiple
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    pos = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        t = 0
        for e in row:
            n = len(e.input_ids)
            ids[b, t : t + n] = e.input_ids
            labels[b, t : t + n] = e.labels
            labels[b, t] = -100  # never predict a document's first token from the previous document
            pos[b, t : t + n] = torch.arange(n)
            t += n
        pos[b, t:] = torch.arange(T - t)
    return Batch(ids, labels, pos, None)
