"""Stages of the benchmark tables: the project's entry points run as a user runs them, each skipped when its
output exists, so a table can be built in parts and a rerun resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.io import atomic_write_json  # noqa: E402


def run_stage(script: str, overrides: list[str], done: str, log_path: str) -> float:
    """`python launch/<script> overrides...`, skipped when `done` exists; returns the seconds it took (0 if skipped).
    The stage's folder (that of `log_path`) records its command in stage.json: a rerun whose command differs (other
    settings for the same row) is refused rather than reusing results made with other settings."""
    record = os.path.join(os.path.dirname(log_path), "stage.json")
    command = [script, *overrides]
    if os.path.exists(done):
        if not os.path.exists(record):  # made before stages recorded their commands: take it as this one
            print(f"  {os.path.dirname(log_path)}: done, no recorded command; recording this one", flush=True)
            atomic_write_json(record, {"command": command})
        with open(record) as f:
            before = json.load(f)["command"]
        if before != command:
            sys.exit(f"{os.path.dirname(log_path)} was made by another command:\n  {' '.join(before)}\nnot\n  "
                     f"{' '.join(command)}\nuse another --out, or delete that folder to redo it")
        return 0.0
    cmd = [sys.executable, os.path.join(ROOT, "launch", script), *overrides]
    print(f"  $ {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        sys.exit(f"{script} failed (exit {rc}); its output: {log_path}")
    atomic_write_json(record, {"command": command})
    took = time.perf_counter() - t0
    print(f"    {took:.0f}s", flush=True)
    return took


def layers_arg(layers: list[int]) -> str:
    return "[" + ",".join(map(str, layers)) + "]"


def write_table(out: str, lines: list[str], t_start: float) -> None:
    """Print the table with this run's wall time and write it to `out`/table.md."""
    lines = lines + [f"\n{time.perf_counter() - t_start:.0f}s this run (stages already done are skipped)"]
    text = "\n".join(lines)
    print("\n" + text)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
