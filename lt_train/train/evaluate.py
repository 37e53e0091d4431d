"""Evaluation used by the training job: held-out NLL on response tokens, and demo-task accuracy."""
from __future__ import annotations

import torch

from ..data import Example
from ..eval.grader import grade_integer
from ..nll import mean_nll


def heldout_nll(model, encoded) -> float:
    """Mean NLL on the response tokens of encoded examples."""
    return mean_nll(model, [e.input_ids for e in encoded], [e.labels for e in encoded])


@torch.no_grad()
def demo_accuracy(model, tokenizer, problems: list[Example], max_new_tokens: int, batch_size: int = 8) -> float:
    """Greedy answers to demo problems (prompt through the chat template), graded on the boxed integer."""
    if not problems:
        return float("nan")
    dev = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    try:
        for s in range(0, len(problems), batch_size):
            chunk = problems[s : s + batch_size]
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p.question}],
                                                     add_generation_prompt=True, tokenize=False) for p in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            correct += sum(grade_integer(t, p.answer) for t, p in zip(texts, chunk))
    finally:
        tokenizer.padding_side = side
    return correct / len(problems)
