"""Our grader against lm-evaluation-harness's GSM8K filters, math-verify and the sources' own graders.

    python benchmarks/grader_agreement.py [--data ../shared/data] [--json disagreements.json]

Corpus: the real outputs of `model_outputs.jsonl` (GSM8K, MATH-500, AIME; written by ToRA, GPT-3, Qwen2.5-Math,
Gemini and long-CoT checkpoints) and the outputs the built-in models wrote on GSM8K with our evaluator
(`tests/fixtures/grader_agreement/*_gsm8k.jsonl`). Prints one table per reference (rows: where the outputs came
from; cells: both right / ours only / theirs only / neither) and every disagreement with its judged verdict from
`tests/fixtures/grader_agreement/judged.json`; a disagreement not judged there is printed as NEW.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lt_train.eval.agreement import judged, key, run_all  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "grader_agreement")


def markdown(tables: dict) -> str:
    lines = []
    for title, by_ref in tables.items():
        lines += [f"### {title}", "", "| reference | outputs | n | both right | ours only | theirs only | neither | agree |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for ref, groups in by_ref.items():
            for group, c in groups.items():
                n = sum(c.values())
                lines.append(f"| {ref} | {group} | {n} | {c['both']} | {c['ours only']} | {c['theirs only']} | "
                             f"{c['neither']} | {(c['both'] + c['neither']) / n:.1%} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data"))
    ap.add_argument("--json", help="write every disagreement here")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.data, "model_outputs.jsonl")):
        sys.exit(f"{args.data} holds no model_outputs.jsonl: give --data the shared benchmark folder")
    t0 = time.perf_counter()
    tables, disagreements = run_all(args.data, FIXTURES)
    print(markdown(tables))
    known = judged(os.path.join(FIXTURES, "judged.json"))
    print("### disagreements\n\n| id | reference | ours | theirs | verdict | reason |\n|---|---|---|---|---|---|")
    for d in disagreements:
        g = known.get(key(d))
        verdict, reason = (g["verdict"], g["reason"]) if g else ("NEW", "not judged yet")
        print(f"| {d['id']} | {d['reference']} | {d['ours']} | {d['theirs']} | {verdict} | {reason} |")
    new = sum(key(d) not in known for d in disagreements)
    gone = len(set(known) - {key(d) for d in disagreements})
    print(f"\n{len(disagreements)} disagreements, {new} not judged, {gone} judged ones no longer seen; "
          f"{time.perf_counter() - t0:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(disagreements, f, indent=1)


if __name__ == "__main__":
    main()
