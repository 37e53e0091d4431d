"""Reads the records of an offline W&B run file (`run-*.wandb`): a LevelDB-style log of protobuf records.

Newer wandb releases ship no reader, so this follows the format: a 7-byte header (':W&B', magic 0xBEE1,
version 0), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full,
2 first, 3 middle, 4 last)."""
import glob
import os
import struct

BLOCK = 32768


def run_file(output_dir: str) -> str:
    """The one offline run file under `output_dir`, complete. `run.finish()` returns before wandb's service has
    written the run's last records (a file read at once can hold only its 7-byte header: seen in CI), so a run
    made in this process is read after `wandb.teardown()`, which waits for the service to close its files."""
    import wandb

    wandb.teardown()
    (path,) = glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb"))
    return path


def records(path: str):
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - (pos % BLOCK)
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - (pos % BLOCK) if pos % BLOCK else 0
            continue
        parts.append(chunk)
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def logged_keys(path: str) -> tuple[set, set]:
    """(history keys, config keys) of a run file."""
    hist, cfg = set(), set()
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            hist |= {i.key or "/".join(i.nested_key) for i in r.history.item}
        elif kind == "config":
            cfg |= {i.key or "/".join(i.nested_key) for i in r.config.update}
    return hist, cfg


def summary_keys(path: str) -> set:
    """Keys of the run summary (`run.summary[...]`) recorded in a run file."""
    keys = set()
    for r in records(path):
        if r.WhichOneof("record_type") == "summary":
            keys |= {i.key or "/".join(i.nested_key) for i in r.summary.update}
    return keys
