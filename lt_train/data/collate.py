"""Batching: length-grouped batches, padded collation, and sequence packing.

Packed rows carry `position_ids` restarting at 0 for each document and no attention mask: transformers
then keeps full layers inside documents, and lt_train's streaming layers do the same, with the sinks of
each document being its own first S tokens. The first label of every document is ignored, so no token is
predicted across a document boundary.
"""
from __future__ import annotations

import random
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


def collate_padded(examples: list[EncodedExample], pad_id: int) -> Batch:
    """Right padding; positions count from 0 per row; pads are masked and carry no loss."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = e.input_ids, e.labels, 1
    pos = torch.arange(T).expand(len(examples), T).clone()
    return Batch(ids, labels, pos, mask)


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


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int = 0, mega: int = 50) -> list[list[int]]:
    """Batches of similar lengths (less padding), in a shuffled order. Within shuffled mega-batches of
    `mega * batch_size` examples, examples are sorted by length and cut into batches."""
    rng = random.Random(seed)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    for s in range(0, len(idx), mega * batch_size):
        chunk = sorted(idx[s : s + mega * batch_size], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
