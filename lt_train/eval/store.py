"""Where an evaluation's samples live: `run.json` (what is being run) and `samples.jsonl` (one line per sample).

Samples are appended a batch at a time with one write, flushed and fsynced, so a crash loses at most the batch
in flight. A restarted run reads the file back and skips finished samples; a torn last line (the crash hit
mid-write) is cut off and reported. A run whose settings differ from `run.json` is refused, naming the
differences, so results of two protocols never mix in one file.
"""
from __future__ import annotations

import json
import logging
import os

from ..io import atomic_write_json

log = logging.getLogger(__name__)


class SampleStore:
    def __init__(self, out_dir: str, header: dict, overwrite: bool = False):
        self.dir = out_dir
        self.path = os.path.join(out_dir, "samples.jsonl")
        self.header_path = os.path.join(out_dir, "run.json")
        os.makedirs(out_dir, exist_ok=True)
        if overwrite:
            for p in (self.path, self.header_path):
                if os.path.exists(p):
                    os.remove(p)
        self._check_header(header)
        self.records: dict[tuple[str, int], dict] = {}
        self.torn_lines = 0
        if os.path.exists(self.path):
            self._load()

    def _check_header(self, header: dict) -> None:
        header = json.loads(json.dumps(header))  # the form it has on disk (tuples -> lists, int keys -> str)
        if os.path.exists(self.header_path):
            with open(self.header_path, encoding="utf-8") as f:
                old = json.load(f)
            diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
            if diff:
                details = "; ".join(f"{k}: {old.get(k)!r} -> {header.get(k)!r}" for k in diff)
                raise ValueError(f"{self.dir} holds samples of a different run ({details}). Use another "
                                 "output_dir, or eval.overwrite=true to discard them")
        elif os.path.exists(self.path):
            raise ValueError(f"{self.path} exists without its run.json; cannot tell which run wrote it. "
                             "Use another output_dir, or eval.overwrite=true to discard it")
        else:
            atomic_write_json(self.header_path, header)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if good < len(data):
            self.torn_lines = 1
            log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run; "
                        "its samples will be generated again", self.path, len(data) - good)
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        for n, line in enumerate(data[:good].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (str(rec["problem"]), int(rec["sample"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}, line {n}: not a sample record ({e}); the file was edited or "
                                 "corrupted: fix it, or start over with eval.overwrite=true") from None
            self.records[key] = rec

    def done(self, problem_id: str, sample: int) -> bool:
        return (problem_id, sample) in self.records

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[(str(r["problem"]), int(r["sample"]))] = r
