"""Tokenise a dataset once and cache it (datasets Arrow format), with statistics and a length histogram.

The cache key covers the source (path + size + mtime, or hub id + revision + split), the column mapping,
the tokenizer (name + vocabulary hash + chat template) and every formatting setting, so a change to any of
them builds a new cache instead of reusing a stale one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field

from ..io import atomic_write_json, pyplot, save_figure
from .format import encode_example
from .sources import load_examples


@dataclass
class PrepareStats:
    source: str
    rows_read: int = 0
    rows_skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    target_tokens: int = 0
    lengths: list[int] = field(default_factory=list)


def _source_fingerprint(dcfg) -> dict:
    d = {k: dcfg.get(k) for k in ("source", "path", "dataset_id", "split", "revision", "subset", "num_samples",
                                  "seed", "max_samples", "on_error",
                                  "facts", "min_chars", "max_chars")}  # the last three: the recall task's
    d["columns"] = json.dumps(_plain(dcfg.get("columns")), sort_keys=True)
    path = dcfg.get("path")
    if path and os.path.isfile(path):
        st = os.stat(path)
        d["file"] = [os.path.abspath(path), st.st_size, st.st_mtime_ns]
    return d


def _plain(x):
    try:
        from omegaconf import OmegaConf

        return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x
    except ImportError:  # pragma: no cover
        return x


def _tokenizer_fingerprint(tokenizer, name: str) -> dict:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"name": name, "vocab": hashlib.sha256(vocab.encode()).hexdigest()[:16],
            "template": hashlib.sha256(str(getattr(tokenizer, "chat_template", "")).encode()).hexdigest()[:16],
            "eos": tokenizer.eos_token_id}


def cache_key(dcfg, tokenizer, tokenizer_name: str) -> str:
    fmt = {k: dcfg.get(k) for k in ("system_prompt", "max_length", "length_policy", "loss_on_prompt")}
    blob = json.dumps({"src": _source_fingerprint(dcfg), "tok": _tokenizer_fingerprint(tokenizer, tokenizer_name),
                       "fmt": fmt, "version": 1}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def encode_all(dcfg, tokenizer, progress: bool = False):
    """(list of EncodedExample, PrepareStats) for a data config."""
    from tqdm.auto import tqdm

    examples, report = load_examples(dcfg)
    stats = PrepareStats(report.source, report.rows, len(report.skipped), report.skipped[:20])
    out = []
    policy = dcfg.get("length_policy", "truncate")
    for ex in tqdm(examples, desc="tokenising", disable=not progress):
        enc = encode_example(tokenizer, ex, dcfg.get("system_prompt"), dcfg.get("max_length"), policy,
                             bool(dcfg.get("loss_on_prompt", False)))
        if enc is None:
            stats.dropped_too_long += 1
            continue
        stats.truncated += int(enc.truncated)
        stats.tokens += len(enc.input_ids)
        stats.target_tokens += int((enc.labels != -100).sum())
        stats.lengths.append(len(enc.input_ids))
        out.append(enc)
    stats.examples = len(out)
    if not out:
        raise ValueError(f"no examples left after formatting {report.source}: {stats.dropped_too_long} longer than "
                         f"max_length={dcfg.get('max_length')} with length_policy={policy}, "
                         f"{stats.rows_skipped} rows skipped")
    return out, stats


def prepare(dcfg, tokenizer, tokenizer_name: str, cache_root: str, progress: bool = False):
    """(datasets.Dataset with input_ids / labels, PrepareStats, cache path): built once, then loaded."""
    import datasets

    path = os.path.join(cache_root, cache_key(dcfg, tokenizer, tokenizer_name))
    stats_path = os.path.join(path, "lt_stats.json")
    if os.path.exists(stats_path):
        with open(stats_path, encoding="utf-8") as f:
            stats = PrepareStats(**json.load(f))
        return datasets.load_from_disk(path), stats, path
    encoded, stats = encode_all(dcfg, tokenizer, progress)
    ds = datasets.Dataset.from_dict({"input_ids": [e.input_ids.tolist() for e in encoded],
                                     "labels": [e.labels.tolist() for e in encoded],
                                     "truncated": [e.truncated for e in encoded]})
    # one writer per node may build the same cache on a shared file system: each writes its own temporary folder
    # (host and process in the name), the first to finish publishes it, a later one keeps the first's
    tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(tmp)
    atomic_write_json(os.path.join(tmp, "lt_stats.json"), asdict(stats))
    os.makedirs(cache_root, exist_ok=True)
    try:
        os.replace(tmp, path)  # the cache appears complete or not at all
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(stats_path):  # not another writer's cache: something else is in the way
            raise RuntimeError(f"the tokenised data cache {path} exists but is incomplete (no lt_stats.json); "
                               "delete that folder and rerun") from e
        # another writer published the same cache first: keep theirs
    return datasets.load_from_disk(path), stats, path


def plot_lengths(path: str, stats: PrepareStats, max_length: int | None, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(stats.lengths, bins=40, color="tab:blue")
    if max_length:
        ax.axvline(max_length, color="tab:red", linestyle="--", label=f"max_length={max_length}")
        ax.legend()
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title(f"{title}: {stats.examples} examples, {stats.truncated} truncated, "
                 f"{stats.dropped_too_long} dropped")
    fig.tight_layout()
    save_figure(fig, path)


def summary(stats: PrepareStats) -> str:
    import statistics

    L = stats.lengths
    return (f"source: {stats.source}\nrows read: {stats.rows_read}, skipped: {stats.rows_skipped}\n"
            f"examples: {stats.examples}, truncated: {stats.truncated}, dropped (too long): {stats.dropped_too_long}\n"
            f"tokens: {stats.tokens} (loss on {stats.target_tokens}); length min/median/max: "
            f"{min(L)}/{int(statistics.median(L))}/{max(L)}; >= 1500 tokens: {sum(n >= 1500 for n in L)}")
