"""Where examples come from: local JSONL / JSON / Parquet files, hub datasets, the embedded demo.

Every row is mapped to an `Example` through a column mapping. Bad input fails with the file, line and
problem, or is skipped and counted when the caller asks for `on_error="skip"`; nothing is dropped silently.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .example import Example


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    skipped: list[str] = field(default_factory=list)  # one reason per skipped row


def _read_jsonl(path: str, on_error: str, report: LoadReport) -> list[dict]:
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                msg = f"{path}, line {n}: not valid UTF-8 ({e.reason} at byte {e.start})"
                if on_error != "skip":
                    raise ValueError(msg) from None
                report.skipped.append(msg)
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                msg = f"{path}, line {n}: malformed JSON ({e})"
                if on_error != "skip":
                    raise ValueError(msg + "; set data.on_error=skip to skip and count such lines") from None
                report.skipped.append(msg)
                continue
            rows.append(row)
    return rows


def read_rows(path: str, on_error: str = "raise", report: LoadReport | None = None) -> list[dict]:
    """Rows of a local .jsonl, .json (a list of objects) or .parquet file."""
    report = report if report is not None else LoadReport(path)
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    if path.endswith(".jsonl"):
        rows = _read_jsonl(path, on_error, report)
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of objects (or {{'data': [...]}})")
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"{path}: unsupported file type; use .jsonl, .json or .parquet")
    report.rows = len(rows)
    return rows


def read_hub(dataset_id: str, split: str = "train", revision: str | None = None, subset: str | None = None
             ) -> list[dict]:
    """Rows of a hub dataset (needs network access to the hub)."""
    import datasets

    return list(datasets.load_dataset(dataset_id, subset, split=split, revision=revision))


def _text(row: dict, column):
    """A column's value; a list of columns is joined with blank lines, a list value (s1K) likewise."""
    if isinstance(column, (list, tuple)):
        parts = [_text(row, c) for c in column]
        return "\n\n".join(p for p in parts if p) if all(isinstance(p, str) for p in parts) else None
    v = row.get(column)
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return "\n\n".join(v)
    return v


def to_examples(rows: list[dict], columns: dict, source: str, on_error: str = "raise",
                report: LoadReport | None = None) -> list[Example]:
    """Map rows to `Example`s; `columns` maps question / response / thinking / system / answer / id to column
    names (a list of names joins those columns)."""
    need = {k: columns[k] for k in ("question", "response") if columns.get(k)}
    if len(need) < 2:
        raise ValueError(f"data.columns must name the 'question' and 'response' columns, got {dict(columns)}")
    if rows:
        named = [c for v in columns.values() if v for c in (v if isinstance(v, (list, tuple)) else [v])]
        missing = [c for c in named if c not in rows[0]]
        if missing:
            raise ValueError(f"{source}: missing column(s) {missing}; available: {sorted(rows[0])}")
    out = []
    for n, row in enumerate(rows, 1):
        vals = {k: _text(row, c) for k, c in columns.items() if c}
        if vals.get("thinking"):  # a separate reasoning column goes inside <think> tags, as QwQ / R1 write it
            vals["response"] = f"<think>\n{vals['thinking']}\n</think>\n\n{vals.get('response') or ''}"
        bad = [columns[k] for k in ("question", "response") if not isinstance(vals.get(k), str) or not vals[k]]
        if bad:
            msg = f"{source}, row {n}: column(s) {bad} missing, empty or not text"
            if on_error != "skip":
                raise ValueError(msg)
            if report is not None:
                report.skipped.append(msg)
            continue
        out.append(Example(question=vals["question"], response=vals["response"], system=vals.get("system"),
                           answer=None if vals.get("answer") is None else str(vals["answer"]),
                           id=None if vals.get("id") is None else str(vals["id"])))
    return out


def load_examples(cfg) -> tuple[list[Example], LoadReport]:
    """Examples from a data config: `source` is 'demo' or 'recall' (the embedded tasks), 'jsonl' / 'json' /
    'parquet' (with `path`) or 'hub' (with `dataset_id`). Raises when nothing is left."""
    source = cfg.get("source", "demo")
    on_error = cfg.get("on_error", "raise")
    if source in ("demo", "recall"):
        report = LoadReport(source)
        examples = (demo_examples_from(cfg) if source == "demo"
                    else recall_examples_from(cfg, int(cfg.get("num_samples", 256)), int(cfg.get("seed", 0))))
        report.rows = len(examples)
    else:
        columns = dict(cfg.get("columns") or {"question": "question", "response": "response"})
        if source == "hub":
            name = cfg["dataset_id"]
            report = LoadReport(f"hub:{name}")
            rows = read_hub(name, cfg.get("split", "train"), cfg.get("revision"), cfg.get("subset"))
            report.rows = len(rows)
        elif source in ("jsonl", "json", "parquet", "file"):
            name = cfg["path"]
            report = LoadReport(name)
            rows = read_rows(name, on_error, report)
        else:
            raise ValueError(f"unknown data source {source!r}; use demo, recall, jsonl, json, parquet or hub")
        examples = to_examples(rows, columns, report.source, on_error, report)
    limit = cfg.get("max_samples")
    if limit:
        examples = examples[: int(limit)]
    if not examples:
        raise ValueError(f"no examples left from {report.source} ({report.rows} rows read, "
                         f"{len(report.skipped)} skipped)")
    return examples, report


def demo_examples_from(cfg) -> list[Example]:
    from .demo import demo_examples

    return demo_examples(int(cfg.get("num_samples", 256)), int(cfg.get("seed", 0)))


def recall_examples_from(cfg, n: int, seed: int) -> list[Example]:
    """The embedded long-range task (data/recall.py) with a config's `facts`, `min_chars`, `max_chars`."""
    from .recall import recall_examples

    return recall_examples(n, seed, int(cfg.get("facts", 8)), int(cfg.get("min_chars", 2000)),
                           int(cfg.get("max_chars", 4000)))
