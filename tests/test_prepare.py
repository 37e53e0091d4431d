"""Tokenise-and-cache: cache hits and misses, counts of truncated / dropped examples, real long-CoT data."""
import json
import os

import pytest

from conftest import SHARED_DATA
from lt_train.data.prepare import cache_key, prepare, summary
from lt_train.data.sources import to_examples
from lt_train.models import tiny_tokenizer


def _cfg(**kw):
    d = {"source": "demo", "name": "demo", "num_samples": 6, "seed": 0, "max_length": 1500,
         "length_policy": "truncate", "system_prompt": None}
    d.update(kw)
    return d


def test_prepare_caches_and_reuses(tmp_path):
    tok = tiny_tokenizer()
    ds, stats, path = prepare(_cfg(), tok, "tiny", str(tmp_path))
    assert len(ds) == stats.examples == 6 and os.path.isdir(path)
    assert all(len(x) <= 1500 for x in ds["input_ids"]) and stats.truncated > 0  # char tokens: long
    ds2, stats2, path2 = prepare(_cfg(), tok, "tiny", str(tmp_path))
    assert path2 == path and ds2["input_ids"] == ds["input_ids"] and stats2 == stats
    # any formatting change is a different cache
    assert cache_key(_cfg(max_length=1400), tok, "tiny") != cache_key(_cfg(), tok, "tiny")
    assert cache_key(_cfg(system_prompt="Be brief."), tok, "tiny") != cache_key(_cfg(), tok, "tiny")
    # so is any setting of the embedded recall task (a stale cache would train on other contexts)
    recall = _cfg(source="recall", facts=8, min_chars=1200, max_chars=2000)
    for change in ({"facts": 4}, {"min_chars": 1000}, {"max_chars": 3000}):
        assert cache_key({**recall, **change}, tok, "tiny") != cache_key(recall, tok, "tiny")


def test_drop_policy_counts_drops(tmp_path):
    ds, stats, _ = prepare(_cfg(length_policy="drop", max_length=3500), tiny_tokenizer(), "tiny", str(tmp_path))
    assert stats.dropped_too_long + stats.examples == 6 and stats.truncated == 0 and stats.dropped_too_long > 0
    assert "dropped (too long)" in summary(stats)


def test_everything_dropped_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no examples left after formatting"):
        prepare(_cfg(max_length=50, length_policy="drop"), tiny_tokenizer(), "tiny", str(tmp_path))


def test_changed_file_is_a_new_cache(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "q", "response": "r"}) + "\n")
    cfg = {"source": "jsonl", "path": str(f), "max_length": 100}
    k1 = cache_key(cfg, tiny_tokenizer(), "tiny")
    f.write_text(json.dumps({"question": "q2", "response": "r2"}) + "\n")
    os.utime(f, ns=(1, 1))
    assert cache_key(cfg, tiny_tokenizer(), "tiny") != k1


def test_thinking_column_and_list_values_s1k_style():
    rows = [{"question": "1+1?", "thinking_trajectories": ["so 1+1", "is 2"], "attempt": "\\boxed{2}"}]
    cols = {"question": "question", "thinking": "thinking_trajectories", "response": "attempt"}
    (ex,) = to_examples(rows, cols, "mem")
    assert ex.response == "<think>\nso 1+1\n\nis 2\n</think>\n\n\\boxed{2}"


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "long_cot_sft.jsonl")),
                    reason="../shared/data/long_cot_sft.jsonl is not present")
def test_real_long_cot_file(tmp_path):
    cfg = {"source": "jsonl", "name": "long_cot", "path": os.path.join(SHARED_DATA, "long_cot_sft.jsonl"),
           "columns": {"question": "problem", "response": "response", "answer": "answer", "id": "id"},
           "max_samples": 20, "max_length": 4000, "length_policy": "truncate"}
    ds, stats, _ = prepare(cfg, tiny_tokenizer(), "tiny", str(tmp_path))
    assert stats.rows_read == 291 and stats.examples == 20 and stats.rows_skipped == 0
    assert stats.truncated > 0 and max(stats.lengths) == 4000
