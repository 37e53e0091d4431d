"""Our grader beside the graders people trust: lm-evaluation-harness's GSM8K filters and math-verify.

The references run their own code, never a copy of it: lm-eval's filters are built from the task YAMLs that ship
with the installed `lm_eval` (`gsm8k`, `gsm8k_cot`: "strict-match" and "flexible-extract") and scored with its
`exact_match` and the task's own settings; math-verify is called as its README does it (`verify(parse(gold),
parse(output))`). `compare` grades every output both ways and lists the rows where the two disagree;
`benchmarks/grader_agreement.py` prints the tables, and the judged disagreements live in
`tests/fixtures/grader_agreement/judged.json` so that any change in either direction fails a test.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from .grader import Grader

# the lm-eval task files whose filters we compare against, and the filters in each
LM_EVAL_TASKS = {"gsm8k": "gsm8k.yaml", "gsm8k_cot": "gsm8k-cot.yaml"}


@dataclass(frozen=True)
class Row:
    id: str
    output: str
    answer: str          # the reference answer (GSM8K: the full "... #### n" solution where we have it)
    mode: str            # our grading mode: gsm8k, aime or math
    group: str           # where the output came from (for the tables)


def _task_yaml(task: str) -> dict:
    import lm_eval
    import yaml

    path = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", LM_EVAL_TASKS[task])
    with open(path) as f:
        return yaml.safe_load(f)


class LmEvalGSM8K:
    """lm-eval's GSM8K scoring of one output: its task's filter pipeline, then its exact_match with the task's
    `regexes_to_ignore` / `ignore_case` (applied to the prediction and to the reference solution alike)."""

    def __init__(self, task: str, filter_name: str):
        import lm_eval.filters  # noqa: F401  (registers lm-eval's filters)
        from lm_eval.api.registry import get_filter

        cfg = _task_yaml(task)
        spec = next((f for f in cfg["filter_list"] if f["name"] == filter_name), None)
        if spec is None:
            raise ValueError(f"lm-eval task {task!r} has no filter {filter_name!r}")
        self.filters = [get_filter(f["function"])(**{k: v for k, v in f.items() if k != "function"})
                        for f in spec["filter"]]
        self.until = list((cfg.get("generation_kwargs") or {}).get("until") or [])
        metric = next(m for m in cfg["metric_list"] if m["metric"] == "exact_match")
        self.metric_kwargs = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")
                              if k in metric}
        self.name = f"lm-eval {task} {filter_name}"

    def extract(self, output: str) -> str:
        for stop in self.until:  # generation stops there in lm-eval; the filters see the text before it
            output = output.split(stop)[0]
        resps = [[output]]
        for f in self.filters:
            resps = list(f.apply(resps, [{}]))
        got = resps[0]
        return got[0] if isinstance(got, list) else got  # take_first leaves one string per instance

    def grade(self, row: Row) -> bool:
        from lm_eval.api.metrics import exact_match_hf_evaluate

        pred = self.extract(row.output)
        return bool(exact_match_hf_evaluate([pred], [row.answer], **self.metric_kwargs)["exact_match"])


class MathVerify:
    """math-verify's own extraction and check of a whole output against a gold answer (its README's usage)."""

    name = "math-verify parse+verify"

    def grade(self, row: Row) -> bool:
        from math_verify import parse, verify

        gold = parse(f"${row.answer}$")
        pred = parse(row.output)
        return bool(gold) and bool(pred) and bool(verify(gold, pred))


class SourceVerdict:
    """The verdict the output's source stored from its own grader (`source_score` in model_outputs.jsonl); rows
    without one are not compared."""

    name = "source's own grader"

    def __init__(self, verdicts: dict[str, bool]):
        self.verdicts = verdicts

    def grade(self, row: Row) -> bool | None:
        return self.verdicts.get(row.id)


def references(kind: str) -> list:
    """The external graders of one kind: "gsm8k" (lm-eval's three filters) or "math" (math-verify)."""
    if kind == "gsm8k":
        return [LmEvalGSM8K("gsm8k", "strict-match"), LmEvalGSM8K("gsm8k_cot", "strict-match"),
                LmEvalGSM8K("gsm8k", "flexible-extract")]
    if kind == "math":
        return [MathVerify()]
    raise ValueError(f"unknown reference kind {kind!r}; use gsm8k or math")


def compare(rows: list[Row], refs: list, grader: Grader | None = None) -> tuple[dict, list[dict]]:
    """Grade every row with our grader and each reference. Returns the tables {reference: {group: counts}} with
    counts of (ours, theirs) in both/ours only/theirs only/neither, and every disagreement."""
    grader = grader or Grader()
    tables: dict = {}
    disagreements = []
    ours = {r.id: grader.grade(r.output, r.answer, r.mode) for r in rows}
    for ref in refs:
        table = tables.setdefault(ref.name, {})
        for r in rows:
            theirs = ref.grade(r)
            if theirs is None:  # no verdict for this row
                continue
            cell = ("both" if ours[r.id] else "theirs only") if theirs else ("ours only" if ours[r.id] else "neither")
            counts = table.setdefault(r.group, {"both": 0, "ours only": 0, "theirs only": 0, "neither": 0})
            counts[cell] += 1
            if ours[r.id] != theirs:
                disagreements.append({"id": r.id, "reference": ref.name, "ours": ours[r.id], "theirs": theirs})
    return tables, disagreements


def gsm8k_solutions(data_dir: str) -> dict[str, str]:
    """GSM8K test id -> its full "... #### n" solution (what lm-eval's gsm8k task compares against)."""
    with open(os.path.join(data_dir, "gsm8k_test.jsonl")) as f:
        return {d["id"]: d["solution"] for d in map(json.loads, f)}


def shared_rows(data_dir: str, solutions: dict[str, str]) -> tuple[list[Row], list[Row], dict[str, bool]]:
    """The real outputs of `model_outputs.jsonl`: (GSM8K rows, MATH-500 and AIME rows, the sources' own verdicts
    by row id where stored). GSM8K references are the full `solutions`."""
    gsm, math, verdicts = [], [], {}
    with open(os.path.join(data_dir, "model_outputs.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if d.get("source_score") is not None:
                verdicts[d["id"]] = bool(d["source_score"])
            group, bench_id = d["id"].split("/")[0], d["id"].split("/")[1]
            if bench_id.startswith("gsm8k-"):
                gsm.append(Row(d["id"], d["output"], solutions.get(bench_id, d["answer"]), "gsm8k", group))
            else:
                math.append(Row(d["id"], d["output"], d["answer"], "aime" if "aime" in group else "math", group))
    return gsm, math, verdicts


def corpus(data_dir: str, generated_dir: str | None = None) -> tuple[list[Row], list[Row], dict[str, bool]]:
    """(GSM8K rows, MATH/AIME rows, the sources' verdicts): model_outputs.jsonl, plus the outputs our models wrote
    on GSM8K (`<generated_dir>/*_gsm8k.jsonl`, named by the file)."""
    solutions = gsm8k_solutions(data_dir)
    gsm, math, verdicts = shared_rows(data_dir, solutions)
    for path in sorted(glob.glob(os.path.join(generated_dir, "*_gsm8k.jsonl"))) if generated_dir else []:
        gsm += generated_rows(path, solutions, os.path.basename(path)[: -len(".jsonl")])
    return gsm, math, verdicts


def run_all(data_dir: str, generated_dir: str | None = None, with_lm_eval: bool = True) -> tuple[dict, list[dict]]:
    """Every comparison: GSM8K outputs against lm-eval's filters and the sources, MATH/AIME outputs against
    math-verify and the sources. Returns ({title: tables}, disagreements)."""
    gsm, math, verdicts = corpus(data_dir, generated_dir)
    grader = Grader()
    try:
        gsm_refs = (references("gsm8k") if with_lm_eval else []) + [SourceVerdict(verdicts)]
        t1, d1 = compare(gsm, gsm_refs, grader)
        t2, d2 = compare(math, references("math") + [SourceVerdict(verdicts)], grader)
    finally:
        grader.close()
    return {"GSM8K (ours: gsm8k mode)": t1, "MATH-500 and AIME 2024 (ours: math and aime modes)": t2}, d1 + d2


VERDICTS = ("ours right", "theirs right", "both wrong", "ambiguous")


def judged(path: str) -> dict[tuple, dict]:
    """The judged disagreements of a fixture, keyed (id, reference, ours, theirs); each group of ids carries a
    verdict and the reason a person gave after reading the outputs."""
    with open(path) as f:
        groups = json.load(f)["judged"]
    out = {}
    for g in groups:
        if g.get("verdict") not in VERDICTS or not str(g.get("reason", "")).strip() or not g.get("ids"):
            raise ValueError(f"{path}: each judged group needs ids, a verdict in {VERDICTS} and a reason: {g}")
        for i in g["ids"]:
            key = (i, g["reference"], g["ours"], g["theirs"])
            if key in out:
                raise ValueError(f"{path}: {key} is judged twice")
            out[key] = g
    return out


def key(d: dict) -> tuple:
    return d["id"], d["reference"], d["ours"], d["theirs"]


def generated_rows(path: str, solutions: dict[str, str], group: str) -> list[Row]:
    """Outputs our own evaluator wrote on GSM8K (a samples.jsonl, or a fixture of {id, output}), with the
    references of `gsm8k_solutions`."""
    rows = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            pid = d.get("problem", d.get("id"))
            if pid not in solutions:
                raise ValueError(f"{path}: {pid!r} is not a GSM8K test id")
            rows.append(Row(f"{group}/{pid}", d["output"], solutions[pid], "gsm8k", group))
    return rows
