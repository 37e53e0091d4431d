"""The embedded demo dataset: multi-step arithmetic with long step-by-step solutions, generated in code.

Each problem is a chain of operations on a running value, reduced modulo 1000 at every step, so the final
answer is an integer in 0..999 (AIME style) written as `\\boxed{n}`. Chains are long (12-50 steps, about 700-3000 SmolLM2 tokens), so many
samples exceed 1500 tokens: long enough that streaming layers matter. Deterministic in (seed, index).
"""
from __future__ import annotations

import random

from .example import Example

_OPS = ("add", "subtract", "multiply by")


def arithmetic_problem(rng: random.Random, steps: int) -> tuple[str, str, int]:
    """One chain of modular arithmetic: (question, worked solution ending in a boxed answer, answer)."""
    value = rng.randint(1, 999)
    ops = [(rng.choice(_OPS), rng.randint(2, 99)) for _ in range(steps)]
    listing = "; ".join(f"{op} {n}" for op, n in ops)
    question = (f"Start with {value}. Apply the following {steps} operations in order, and after each one "
                f"replace the running value by its remainder modulo 1000: {listing}. What is the final value?")
    lines = [f"We start from {value} and apply the {steps} operations one at a time, reducing modulo 1000."]
    for i, (op, n) in enumerate(ops, 1):
        if op == "add":
            raw = value + n
            text = f"{value} + {n} = {raw}"
        elif op == "subtract":
            raw = value - n
            text = f"{value} - {n} = {raw}"
        else:
            raw = value * n
            text = f"{value} * {n} = {raw}"
        new = raw % 1000
        reduce = f", and {raw} mod 1000 = {new}" if new != raw else ", which is already between 0 and 999"
        lines.append(f"Step {i}: we {op} {n}. {text}{reduce}. The running value is now {new}.")
        value = new
    lines.append(f"After all {steps} operations the running value is {value}.")
    lines.append(f"The final answer is \\boxed{{{value}}}.")
    return question, "\n".join(lines), value


def demo_examples(n: int = 256, seed: int = 0, min_steps: int = 12, max_steps: int = 50) -> list[Example]:
    """`n` demo problems; the same (n, seed, steps) always give the same problems."""
    out = []
    for i in range(n):
        rng = random.Random(f"lt_train-demo-{seed}-{i}")
        q, r, ans = arithmetic_problem(rng, rng.randint(min_steps, max_steps))
        out.append(Example(question=q, response=r, answer=str(ans), id=f"demo-{seed}-{i}"))
    return out
