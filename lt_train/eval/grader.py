"""Answer extraction and grading. Model output is only ever parsed as text, never passed to eval/exec.

`extract_answer(text, mode)` finds the last \\boxed{...} / \\fbox{...} (nested braces handled), then falls
back to "final answer is ..." and "#### n" lines, for numeric modes (aime, gsm8k) to the number after a closing
"The answer is" / "Answer:" / "**Answer:**", then to an "A: n" line; it returns None when there is none, never
the whole text. `grade(output, reference, mode)` with mode "aime" (an integer 0-999), "gsm8k" (a number) or
"math" (symbolic or numeric equivalence through math-verify). In the numeric modes an answer is its
`answer_key` (the number it names: units, `\\text{}`, `$` and `%` set aside, commas only as thousands groups),
and `grade` is key equality: the stored answer, the majority vote and pass@k all read the same extraction. math-verify's own timeouts use `signal.alarm`, which fails off
the main thread; here its checks run without them in a worker process that is killed when a check overruns,
so a timeout works from any thread and counts as wrong (`Grader.timeouts`).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
import threading

MAX_ANSWER_CHARS = 2000  # longer "answers" are not answers; also bounds the work on pathological outputs

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
MODES = ("aime", "math", "gsm8k")
NUMERIC = ("aime", "gsm8k")
_FALLBACKS = [
    re.compile(r"final answer is[:\s]*\$*\s*([^\n$]{1,200}?)\s*\$*\s*(?:\.\s*)?(?:\n|$)", re.IGNORECASE),
    re.compile(r"^####\s*(.{1,200}?)\s*$", re.MULTILINE),
]
_A_LINE = re.compile(r"^A:\s*(.{1,200}?)\s*$", re.MULTILINE)  # the few-shot "Q: ... A: ..." format


def extract_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...} / \\fbox{...}; None when there is none."""
    for m in reversed(list(_BOX.finditer(text))[-20:]):  # the last few only: bounded work on junk
        depth, i = 1, m.end()
        end = min(len(text), m.end() + MAX_ANSWER_CHARS)
        while i < end and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[m.end() : i - 1].strip()
    return None


# "The answer is 18", "Answer: 18", "**Answer:** 18", "the answer is: $18$": a number right after the phrase
_PHRASED = re.compile(
    r"(?:\banswer\s+is\s*:?|\banswer\s*\**\s*:\s*\**)\s*\**\s*\$?\s*([-+]?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_DIGIT = re.compile(r"\d")


def extract_phrased(text: str) -> str | None:
    """The number after the last "the answer is" / "Answer:" / "**Answer:**", when no digit follows it in the
    text (a later number would be a correction or more working, so the phrase is not the final answer)."""
    matches = list(_PHRASED.finditer(text[-20_000:]))  # bounded work on long outputs
    if not matches:
        return None
    last = matches[-1]
    if _DIGIT.search(text[-20_000:], last.end()):
        return None
    return last.group(1)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown grading mode {mode!r}; use one of {MODES}")
    return mode


def extract_answer(text: str, mode: str) -> str | None:
    """The answer `grade` compares for `mode`: the last box; else the "final answer is" / "#### n" lines; else
    (numeric modes) the number after a closing "the answer is" / "Answer:"; else an "A: ..." line. The phrase
    comes before "A:" so that "A: She sold 48/2 = 24 clips. The answer is 72." answers 72."""
    check_mode(mode)
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in _FALLBACKS:
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    if mode in NUMERIC:
        phrased = extract_phrased(text)
        if phrased is not None:
            return phrased
    found = _A_LINE.findall(text)
    return found[-1].strip() if found else None


def _clean(ans: str) -> str:
    ans = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", ans)
    ans = re.sub(r"\\(?:left|right|!|,|;|:|quad|qquad)", "", ans)
    ans = ans.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\$", "").replace("$", "")
    ans = ans.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return ans.strip().rstrip(".").strip()


# a number: digits with commas only between thousands groups ("12,345", not "1,2" or "2, 5"), a decimal part
_NUM = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d{1,15})?(?:\.\d{0,15})?"
# what may stand after a number and is set aside: a percent sign, then unit words ("dollars", "km/h", "cm^2")
_UNITS = r"(?:\s*%)?(?:\s*[A-Za-z]{1,12}(?:[./][A-Za-z]{1,12})*(?:\^[23])?){0,3}"


def _numeric_text(ans: str) -> str | None:
    """The number an answer names, as text without grouping commas; None when it names no single number."""
    ans = _clean(ans).replace("{", "").replace("}", "").replace("\\%", "%").strip()
    m = re.fullmatch(rf"({_NUM})\s*{_UNITS}\s*\.?", ans)
    if not m or not re.search(r"\d", m.group(1)):
        return None
    return m.group(1).replace(",", "")


def _integer(ans: str) -> int | None:
    num = _numeric_text(ans)
    if num is None or not re.fullmatch(r"[+-]?\d{1,12}(?:\.0*)?", num):
        return None
    return int(num.split(".")[0])


def _number(ans: str) -> float | None:
    num = _numeric_text(ans)
    return None if num is None else float(num)


def answer_key(answer: str | None, mode: str) -> str | None:
    """A canonical form of an extracted answer: equal keys mean the same answer (voting; numeric grading)."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    if mode == "aime":
        v = _integer(answer)
        return None if v is None else str(v)
    if mode == "gsm8k":
        v = _number(answer)
        return None if v is None else repr(round(v, 6))
    return re.sub(r"\s+", "", _clean(answer)) or None


def reference_key(reference, mode: str) -> str:
    """The key of a reference answer (GSM8K's "... #### n" solutions read after the marker); a reference that
    names no number in a numeric mode is an error in the data, not a wrong answer."""
    ref = str(reference).strip()
    key = answer_key(ref.split("####")[-1].strip() if mode == "gsm8k" else ref, mode)
    if key is None:
        raise ValueError(f"reference answer {ref[:80]!r} is not {'an integer' if mode == 'aime' else 'a number'} "
                         f"({mode} mode)")
    return key


def _warm_worker() -> bool:
    import math_verify  # noqa: F401  (sympy and the parsers load once, outside any check's time limit)

    return True


def _verify_worker(gold: str, target: str) -> bool:
    from math_verify import parse, verify

    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    t = parse(f"\\boxed{{{target}}}", parsing_timeout=None)
    return bool(g) and bool(t) and bool(verify(g, t, timeout_seconds=None))


class Grader:
    """Grades outputs; math checks run in a worker process with a wall-clock limit per check."""

    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout
        self.timeouts = 0
        self.crashes = 0  # checks whose worker died twice (counted wrong)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _submit(self, gold: str, target: str) -> bool:
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
            for attempt in (1, 2):
                fut = self._pool.submit(_verify_worker, gold, target)
                try:
                    return fut.result(timeout=self.timeout)
                except cf.TimeoutError:
                    self.timeouts += 1
                    self._kill()
                    return False
                except cf.process.BrokenProcessPool:  # the worker died (killed, out of memory, a crash in sympy)
                    self._kill()
                    self._pool = self._new_pool()
                    if attempt == 2:
                        self.crashes += 1  # died twice on this check: counted wrong, and a fresh worker for the next
                        return False
                except Exception:  # a parse or sympy failure on odd output: not equivalent
                    return False
            return False  # pragma: no cover

    @staticmethod
    def _new_pool() -> cf.ProcessPoolExecutor:
        # fork where there is one: spawn would re-import a __main__ that may not be importable
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context(method))
        pool.submit(_warm_worker).result(timeout=120)
        return pool

    def _kill(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for p in list(getattr(pool, "_processes", {}).values()):
                p.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            self._kill()

    def equivalent(self, a: str, b: str) -> bool:
        """Are two extracted answers the same math object? (majority voting in "math" mode)"""
        a, b = _clean(a), _clean(b)
        if re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b):
            return True
        if max(len(a), len(b)) > MAX_ANSWER_CHARS:
            return False
        return self._submit(a, b)

    def grade(self, output: str, reference: str, mode: str) -> bool:
        ans = extract_answer(output, mode)
        if mode in NUMERIC:
            want = reference_key(reference, mode)
            return answer_key(ans, mode) == want
        if ans is None or len(ans) > MAX_ANSWER_CHARS:
            return False
        reference = str(reference).strip()
        # math: identical after light normalisation, else math-verify
        a, r = _clean(ans), _clean(reference)
        if re.sub(r"\s+", "", a) == re.sub(r"\s+", "", r):
            return True
        ref_percent = "%" in r
        if "%" in a and not ref_percent:
            a = a.replace("\\%", "").replace("%", "")  # "50%" may match "50", never "0.5"
        if ref_percent:
            a, r = a.replace("\\%", "").replace("%", ""), r.replace("\\%", "").replace("%", "")
        return self._submit(r, a)


_DEFAULT = Grader()


def grade(output: str, reference: str, mode: str) -> bool:
    """Is the answer in `output` equal to `reference`? (see `Grader`)"""
    return _DEFAULT.grade(output, reference, mode)


def grade_integer(output: str, reference: str) -> bool:
    """Demo / AIME style integer answers."""
    return _DEFAULT.grade(output, reference, "aime")
