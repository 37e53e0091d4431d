"""Accuracy metrics over n samples per problem: pass@1 (mean, standard error), unbiased pass@k, maj@n.

pass@1 is the mean correctness over all n samples of a problem, averaged over problems (not the first sample
only, a pitfall of some harnesses). Its standard error is taken over problems (samples of one problem are not
independent), so it shrinks with more problems, not with more samples of the same problems.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from .grader import answer_key


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def ks_for(n: int) -> list[int]:
    """The k reported for n samples: powers of two up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks if ks[-1] == n else ks + [n]


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(count)); SE is 0 for one value."""
    m = len(values)
    if m == 0:
        return float("nan"), float("nan")
    mean = sum(values) / m
    if m == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (m - 1)
    return mean, math.sqrt(var / m)


def majority(answers: Sequence[str | None], mode: str,
             equivalent: Callable[[str, str], bool] | None = None) -> int | None:
    """Index of a sample holding the majority answer, or None when no sample has an answer.

    Answers are grouped by `answer_key`; in "math" mode, groups whose answers `equivalent` judges equal are
    merged (so "1/2" and "\\frac{1}{2}" vote together). Ties go to the answer that appeared first."""
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(answers):
        key = answer_key(a, mode)
        if key is not None:
            groups.setdefault(key, []).append(i)
    if not groups:
        return None
    clusters = [list(v) for v in groups.values()]  # insertion order = first appearance
    if mode == "math" and equivalent is not None and len(clusters) > 1:
        clusters.sort(key=lambda c: -len(c))
        clusters = clusters[:16]  # the largest groups only: bounded work on diverse junk
        merged: list[list[int]] = []
        for c in clusters:
            for m in merged:
                if equivalent(answers[m[0]], answers[c[0]]):
                    m.extend(c)
                    break
            else:
                merged.append(c)
        clusters = merged
    best = max(clusters, key=lambda c: (len(c), -min(c)))
    return min(best)


def problem_metrics(correct: Sequence[bool], answers: Sequence[str | None], mode: str,
                    equivalent: Callable[[str, str], bool] | None = None) -> dict:
    """Per-problem numbers from its samples (in sample order)."""
    n, c = len(correct), int(sum(correct))
    maj = majority(answers, mode, equivalent)
    return {"n": n, "correct": c, "pass@1": c / n if n else float("nan"),
            "pass@k": {k: pass_at_k(n, c, k) for k in ks_for(n)} if n else {},
            "maj_answer": None if maj is None else answers[maj],
            "maj_correct": bool(maj is not None and correct[maj])}


def aggregate(per_problem: Sequence[dict]) -> dict:
    """Benchmark-level accuracy from `problem_metrics` rows (all with the same n)."""
    if not per_problem:
        raise ValueError("no problems to aggregate")
    ns = {p["n"] for p in per_problem}
    if len(ns) != 1:
        raise ValueError(f"problems have different sample counts {sorted(ns)}; the run is incomplete")
    n = ns.pop()
    p1, se = mean_se([p["pass@1"] for p in per_problem])
    maj = sum(p["maj_correct"] for p in per_problem) / len(per_problem)
    out = {"problems": len(per_problem), "n_samples": n, "pass@1": p1, "pass@1_se": se, f"maj@{n}": maj,
           # the same figures under the DeepSeek-R1 protocol's names: avg@n (its "pass@1", the mean accuracy
           # over n samples) and cons@n (the majority answer's accuracy)
           f"avg@{n}": p1, f"avg@{n}_se": se, f"cons@{n}": maj}
    for k in ks_for(n)[1:]:  # pass@1 (unbiased, k=1) is c/n: the mean above
        out[f"pass@{k}"] = sum(p["pass@k"][k] for p in per_problem) / len(per_problem)
    return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of per-problem differences a - b (the same problems in both runs)."""
    if len(a) != len(b):
        raise ValueError(f"paired runs cover different problem counts ({len(a)} vs {len(b)})")
    return mean_se([x - y for x, y in zip(a, b)])
