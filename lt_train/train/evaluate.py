"""Evaluation used by the training job: held-out NLL on response tokens, and demo-task accuracy.

Every rank takes part: the rows (problems) are shared out round-robin and the sums reduced, so no rank waits at
a collective while another evaluates alone. `lockstep` (a ZeRO-3 partitioned model, whose every module call
gathers its weights, a collective): each rank makes the same number of forwards with the same number of LM-head
calls, a rank with fewer rows repeating one and discarding it.
"""
from __future__ import annotations

import math

from ..data import Example
from ..distributed import all_reduce_sum, share
from ..eval.grader import grade_integer
from ..eval.sampling import GenSettings, build_prompt, generate_batch
from ..nll import token_nll

HEAD_CHUNK = 1024  # tokens per LM-head call in the NLL (no T x vocab logits)


def heldout_nll(model, encoded, rank: int = 0, world: int = 1, lockstep: bool = False) -> float:
    """Mean NLL on the response tokens of encoded examples (token-weighted over all of them)."""
    dev = next(model.parameters()).device
    n_chunks = math.ceil(max(len(e.input_ids) for e in encoded) / HEAD_CHUNK) if lockstep else None
    total = count = 0.0
    for i, counted in share(len(encoded), rank, world, lockstep):
        e = encoded[i]
        t, c = token_nll(model, e.input_ids.to(dev), labels=e.labels[None].to(dev), chunk=HEAD_CHUNK,
                         n_chunks=n_chunks)
        if counted:
            total, count = total + t, count + c
    return all_reduce_sum(total, dev) / max(all_reduce_sum(count, dev), 1)


def demo_accuracy(model, tokenizer, problems: list[Example], max_new_tokens: int, batch_size: int = 8,
                  rank: int = 0, world: int = 1, lockstep: bool = False) -> float:
    """Greedy answers to demo problems (prompt through the chat template), graded on the boxed integer; batches
    shared out over the ranks."""
    if not problems:
        return float("nan")
    dev = next(model.parameters()).device
    gs = GenSettings(1, True, 0.0, 1.0, 0, max_new_tokens, batch_size, 0, None, None)
    batches = [problems[s : s + batch_size] for s in range(0, len(problems), batch_size)]
    correct = 0
    for b, counted in share(len(batches), rank, world, lockstep):
        chunk = batches[b]
        out = generate_batch(model, tokenizer, [build_prompt(tokenizer, p.question) for p in chunk], gs,
                             seeds=[0] * len(chunk), lockstep=lockstep)
        if counted:
            correct += sum(grade_integer(t, p.answer) for t, p in zip(out.texts, chunk))
    return all_reduce_sum(correct, dev) / len(problems)
