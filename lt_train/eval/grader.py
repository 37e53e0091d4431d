"""Answer extraction. Model output is only ever parsed as text: never passed to eval/exec."""
from __future__ import annotations

import re

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...}, nested braces handled; None when there is none or it
    is unbalanced."""
    starts = [m.end() for m in _BOX.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start : i - 1].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The last boxed answer, else a 'final answer is ...' phrase; None when there is none (never the text)."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    m = re.findall(r"final answer is[:\s]*\$?([^\n$]{1,64}?)\$?\s*(?:\.|\n|$)", text, flags=re.IGNORECASE)
    return m[-1].strip() if m else None


def grade_integer(output: str, reference: str) -> bool:
    """AIME / demo style: the extracted answer is the reference integer (leading zeros, commas allowed)."""
    ans = extract_answer(output)
    if ans is None:
        return False
    ans = re.sub(r"\\text\{([^}]*)\}", r"\1", ans).replace(",", "").replace("^\\circ", "").strip().rstrip(".")
    if not re.fullmatch(r"-?\d{1,12}", ans):
        return False
    try:
        return int(ans) == int(reference)
    except ValueError:
        return False
