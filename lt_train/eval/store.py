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


def _same_header(header_path: str, header: dict, where: str) -> None:
    with open(header_path, encoding="utf-8") as f:
        old = json.load(f)
    header = json.loads(json.dumps(header))  # the form it has on disk (tuples -> lists, int keys -> str)
    diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {header.get(k)!r}" for k in diff)
        raise ValueError(f"{where} holds samples of a different run ({details}). Use another output_dir, or "
                         "eval.overwrite=true to discard them")


class SampleStore:
    """The samples of one model's run. Under torchrun every rank appends to its own file (rank 0:
    samples.jsonl, rank r: samples.rank<r>.jsonl) and reads them all, so a run can resume with any number of
    processes. Call `SampleStore.init_dir` on one process first (it checks or writes run.json)."""

    def __init__(self, out_dir: str, header: dict, rank: int = 0):
        self.dir = out_dir
        self.path = os.path.join(out_dir, "samples.jsonl" if rank == 0 else f"samples.rank{rank}.jsonl")
        header_path = os.path.join(out_dir, "run.json")
        if not os.path.exists(header_path):
            raise FileNotFoundError(f"{header_path} is missing: SampleStore.init_dir was not called")
        _same_header(header_path, header, out_dir)
        self.torn_lines = 0
        self.reload()

    @staticmethod
    def init_dir(out_dir: str, header: dict, overwrite: bool = False) -> None:
        """Check run.json against `header` (or write it); `overwrite` discards earlier samples first."""
        os.makedirs(out_dir, exist_ok=True)
        header_path = os.path.join(out_dir, "run.json")
        files = _sample_files(out_dir)
        if overwrite:
            for p in files + [header_path]:
                if os.path.exists(p):
                    os.remove(p)
            files = []
        if os.path.exists(header_path):
            _same_header(header_path, header, out_dir)
        elif files:
            raise ValueError(f"{files[0]} exists without its run.json; cannot tell which run wrote it. "
                             "Use another output_dir, or eval.overwrite=true to discard it")
        else:
            atomic_write_json(header_path, header)

    def reload(self) -> None:
        """Read every process's sample file (a torn tail is cut from this process's own file only)."""
        self.records: dict[tuple[str, int], dict] = {}
        for path in _sample_files(self.dir):
            self._load(path, own=path == self.path)

    def _load(self, path: str, own: bool) -> None:
        with open(path, "rb") as f:
            data = f.read()
        good = data.rfind(b"\n") + 1  # everything after the last newline is a torn write
        if good < len(data):
            self.torn_lines += 1
            log.warning("%s: a torn last line (%d bytes) left by an interrupted run is %s; its samples will be "
                        "generated again", path, len(data) - good, "dropped" if own else "ignored")
            if own:
                with open(path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
        for n, line in enumerate(data[:good].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (str(rec["problem"]), int(rec["sample"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}, line {n}: not a sample record ({e}); the file was edited or "
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


def _sample_files(out_dir: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(out_dir, "samples*.jsonl")))
