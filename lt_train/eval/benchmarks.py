"""Benchmark problems (question, reference answer, id) from the hub, a local file, or the embedded demo.

Every benchmark is a config in conf/eval/: where the rows come from, which columns hold the question, the
answer and the id, and how answers are graded. Rows without an answer, duplicate ids and empty datasets are
errors that name the file or dataset and the row: an evaluation must never quietly score fewer problems.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..data.sources import LoadReport, read_hub, read_rows, recall_examples_from
from .grader import MODES, NUMERIC, reference_key



@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str


def _where(ecfg) -> str:
    if ecfg.get("path"):
        return str(ecfg["path"])
    return f"hub:{ecfg.get('dataset_id')}" + (f"[{ecfg['subset']}]" if ecfg.get("subset") else "") + \
        f"/{ecfg.get('split', 'train')}"


def _rows(ecfg) -> list[dict]:
    if ecfg.get("path"):  # a local file always wins over the hub (offline machines, tests)
        return read_rows(str(ecfg["path"]), "raise", LoadReport(str(ecfg["path"])))
    if ecfg.get("source") != "hub" or not ecfg.get("dataset_id"):
        raise ValueError(f"benchmark {ecfg.get('name')!r} names neither a file (eval.path) nor a hub dataset "
                         "(eval.source=hub with eval.dataset_id)")
    return read_hub(ecfg["dataset_id"], ecfg.get("split", "train"), ecfg.get("revision"), ecfg.get("subset"))


def to_problems(rows: list[dict], columns: dict, where: str, name: str, answer_after: str | None = None
                ) -> list[Problem]:
    """Map rows to `Problem`s; `columns` names the question, answer and (optional) id columns."""
    qcol, acol, idcol = columns.get("question"), columns.get("answer"), columns.get("id")
    if not qcol or not acol:
        raise ValueError(f"eval.columns must name the 'question' and 'answer' columns, got {dict(columns)}")
    out, seen = [], {}
    for n, row in enumerate(rows, 1):
        for key, col in (("question", qcol), ("answer", acol), ("id", idcol)):
            if col and col not in row:
                raise ValueError(f"{where}, row {n}: no {key} column {col!r} (columns: {sorted(row)}); "
                                 f"set eval.columns.{key}")
        q, a = row[qcol], row[acol]
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{where}, row {n}: question column {qcol!r} is empty or not text")
        if a is None or isinstance(a, (dict, list)) or not str(a).strip():
            raise ValueError(f"{where}, row {n}: answer column {acol!r} is missing or empty ({a!r})")
        a = str(a)
        if answer_after:
            if answer_after not in a:
                raise ValueError(f"{where}, row {n}: answer has no {answer_after!r} marker (eval.answer_after)")
            a = a.split(answer_after)[-1]
        pid = str(row[idcol]) if idcol else f"{name}-{n - 1}"
        if pid in seen:
            raise ValueError(f"{where}: duplicate id {pid!r} in rows {seen[pid]} and {n}; ids must be unique "
                             "(results are keyed by id)")
        seen[pid] = n
        out.append(Problem(pid, q, a.strip()))
    return out


def load_problems(ecfg) -> list[Problem]:
    """The problems of an eval config (conf/eval/*.yaml); `max_problems` keeps the first ones."""
    mode = ecfg.get("mode")
    if mode not in MODES:
        raise ValueError(f"eval.mode must be one of {MODES}, got {mode!r}")
    name = str(ecfg.get("name", "custom"))
    if ecfg.get("source") == "demo" and not ecfg.get("path"):
        from ..data.demo import demo_examples

        where = "demo"
        problems = [Problem(e.id, e.question, e.answer) for e in
                    demo_examples(int(ecfg.get("num_problems", 16)), int(ecfg.get("demo_seed", 10_000)),
                                  int(ecfg.get("min_steps", 2)), int(ecfg.get("max_steps", 4)))]
    elif ecfg.get("source") == "recall" and not ecfg.get("path"):
        where = "recall"
        problems = [Problem(e.id, e.question, e.answer) for e in
                    recall_examples_from(ecfg, int(ecfg.get("num_problems", 64)), int(ecfg.get("seed", 10_000)))]
    else:
        where = _where(ecfg)
        problems = to_problems(_rows(ecfg), dict(ecfg.get("columns") or {}), where, name,
                               ecfg.get("answer_after"))
    limit = ecfg.get("max_problems")
    if limit:
        problems = problems[: int(limit)]
    if not problems:
        raise ValueError(f"benchmark {name!r} ({where}) has no problems")
    if mode in NUMERIC:  # a reference that names no number is an error in the data: say which, before generating
        for p in problems:
            try:
                reference_key(p.answer, mode)
            except ValueError as e:
                raise ValueError(f"benchmark {name!r} ({where}), problem {p.id!r}: {e}") from None
    return problems


def fingerprint(problems: list[Problem]) -> str:
    """A hash of the problem set: a resumed run must be scoring the same problems."""
    blob = json.dumps([asdict(p) for p in problems], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
