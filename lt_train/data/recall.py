"""The embedded long-range task: codes registered at the start of a long context, asked for at its end.

A problem opens with a register of `facts` codes ("The code of the amber falcon is 417."), then a worked log
of step-by-step arithmetic (the demo's text, not needed for the answer) until the context reaches about
`context_chars` characters, then asks for the code of one registered name. The code is written nowhere but
in the register, so a model that sees only the last W tokens of the context can only guess (about one in a
thousand); a model that attends to the start copies it. The answer is graded like AIME (`\\boxed{n}`, 0..999).
Deterministic in (seed, index).
"""
from __future__ import annotations

import random
import re

from .demo import arithmetic_problem
from .example import Example

_ADJECTIVES = ("amber", "brisk", "coral", "dusty", "early", "faint", "gentle", "hollow", "ivory", "jolly",
               "keen", "lunar", "mellow", "noble", "olive", "proud", "quiet", "rusty", "silver", "tidal")
MAX_FACTS = 32
_NOUNS = ("falcon", "harbor", "lantern", "meadow", "orchard", "pebble", "quarry", "river", "saddle", "tower",
          "anchor", "beacon", "canyon", "dagger", "ember", "fiddle", "glacier", "hammer", "island", "jasper")


def _recall_problem(rng: random.Random, facts: int, context_chars: int) -> tuple[str, str, int]:
    names = rng.sample([f"the {a} {n}" for a in _ADJECTIVES for n in _NOUNS], facts)
    codes = [rng.randint(100, 999) for _ in names]
    register = " ".join(f"The code of {name} is {code}." for name, code in zip(names, codes))
    stated = re.compile(r"\b(" + "|".join(map(str, codes)) + r")\b")
    log = []
    size = 0
    while size < context_chars:  # filler: worked arithmetic, as a long reasoning trace would have
        _, steps, _ = arithmetic_problem(rng, rng.randint(4, 12))
        steps = steps.rsplit("\n", 1)[0]  # without its boxed answer: the only answer asked for is a code
        if stated.search(steps):  # a code written again in the notes could be copied from the window
            continue
        log.append(steps)
        size += len(steps)
    asked = rng.randrange(facts)
    question = (f"Remember this register; one of its codes is asked for at the end. {register}\n\n"
                f"Worked notes follow.\n{chr(10).join(log)}\n\n"
                f"Question: what is the code of {names[asked]}, as given in the register at the start?")
    response = (f"The register at the start gives the code of {names[asked]}: {codes[asked]}.\n"
                f"The final answer is \\boxed{{{codes[asked]}}}.")
    return question, response, codes[asked]


def recall_examples(n: int = 256, seed: int = 0, facts: int = 8, min_chars: int = 2000,
                    max_chars: int = 4000) -> list[Example]:
    """`n` recall problems with contexts of about `min_chars`..`max_chars` characters (SmolLM2 reads about
    2.2 characters per token of this text); the same arguments always give the same problems."""
    # Notes that state a registered code are drawn again: with many codes almost every draw would, and the
    # generator would not finish; 32 codes leave most draws usable.
    if not 1 <= facts <= MAX_FACTS:
        raise ValueError(f"recall facts must be between 1 and {MAX_FACTS}, got {facts}")
    if not 0 <= min_chars <= max_chars:
        raise ValueError(f"recall needs 0 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
    out = []
    for i in range(n):
        rng = random.Random(f"lt_train-recall-{seed}-{i}")
        q, r, ans = _recall_problem(rng, facts, rng.randint(min_chars, max_chars))
        out.append(Example(question=q, response=r, answer=str(ans), id=f"recall-{seed}-{i}"))
    return out
