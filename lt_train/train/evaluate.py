"""Evaluation used by the training job: held-out NLL on response tokens, and demo-task accuracy."""
from __future__ import annotations

from ..data import Example
from ..eval.grader import grade_integer
from ..eval.sampling import GenSettings, build_prompt, generate_batch
from ..nll import mean_nll


def heldout_nll(model, encoded) -> float:
    """Mean NLL on the response tokens of encoded examples."""
    return mean_nll(model, [e.input_ids for e in encoded], [e.labels for e in encoded])


def demo_accuracy(model, tokenizer, problems: list[Example], max_new_tokens: int, batch_size: int = 8) -> float:
    """Greedy answers to demo problems (prompt through the chat template), graded on the boxed integer."""
    if not problems:
        return float("nan")
    gs = GenSettings(1, True, 0.0, 1.0, 0, max_new_tokens, batch_size, 0, None, None)
    correct = 0
    for s in range(0, len(problems), batch_size):
        chunk = problems[s : s + batch_size]
        out = generate_batch(model, tokenizer, [build_prompt(tokenizer, p.question) for p in chunk], gs, seeds=[0] * len(chunk))
        correct += sum(grade_integer(t, p.answer) for t, p in zip(out.texts, chunk))
    return correct / len(problems)
