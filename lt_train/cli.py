"""Command-line shortcuts shared by the launchers, applied to sys.argv before Hydra parses it.

Hydra only accepts config names for a group (`model=smollm2-135m`); users also write hub ids and paths:
- `model=<hub id | path>` becomes `model=hub model.name=<...>` (conf/model/hub.yaml);
- `eval=<file.jsonl | .json | .parquet>` becomes `eval=custom eval.path=<file> eval.name=<file stem>`
  (conf/eval/custom.yaml).
A value that names a config of the group is left alone, and so is an unknown `eval=` name that is not a file:
Hydra then reports it with the list of known benchmarks.
"""
from __future__ import annotations

import os
import re

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def _quote(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_./:~+-]+", value) else "'" + value.replace("'", "\\'") + "'"


def expand_shortcuts(argv: list[str], conf_dir: str, groups: tuple[str, ...] = ("model", "eval")) -> list[str]:
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in groups or not value or os.path.isfile(os.path.join(conf_dir, key, value + ".yaml")):
            out.append(arg)
        elif key == "model":
            out += ["model=hub", f"model.name={_quote(value)}"]
        elif key == "eval" and (value.endswith(DATA_SUFFIXES) or os.path.isfile(value)):
            name = os.path.splitext(os.path.basename(value))[0] or "custom"
            out += ["eval=custom", f"eval.path={_quote(value)}", f"eval.name={_quote(name)}"]
        else:
            out.append(arg)
    return out
