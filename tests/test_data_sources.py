"""Data sources: local files, column mapping, bad input, the demo set, formatting."""
import json

import pytest

from lt_train.data import demo_examples, encode_example
from lt_train.data.sources import LoadReport, load_examples, read_rows, to_examples
from lt_train.models import tiny_tokenizer


def _write(path, lines):
    path.write_bytes(b"".join(lines))
    return str(path)


def test_jsonl_rows_and_column_mapping(tmp_path):
    p = _write(tmp_path / "d.jsonl", [json.dumps({"problem": "1+1?", "sol": "2", "x": 1}).encode() + b"\n"] * 3)
    ex, report = load_examples({"source": "jsonl", "path": p, "columns": {"question": "problem", "response": "sol"}})
    assert len(ex) == 3 and ex[0].question == "1+1?" and ex[0].response == "2" and report.rows == 3


def test_malformed_line_names_file_and_line_or_is_counted(tmp_path):
    good = json.dumps({"question": "q", "response": "r"}).encode() + b"\n"
    p = _write(tmp_path / "d.jsonl", [good, b"{not json\n", good])
    with pytest.raises(ValueError, match=r"d.jsonl, line 2: malformed JSON"):
        read_rows(p)
    report = LoadReport(p)
    rows = read_rows(p, on_error="skip", report=report)
    assert len(rows) == 2 and len(report.skipped) == 1 and "line 2" in report.skipped[0]


def test_non_utf8_is_a_clear_error(tmp_path):
    p = _write(tmp_path / "d.jsonl", [b'{"question": "caf\xe9", "response": "r"}\n'])
    with pytest.raises(ValueError, match=r"line 1: not valid UTF-8"):
        read_rows(p)


def test_missing_columns_list_the_available_ones(tmp_path):
    p = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "q", "completion": "r"}).encode() + b"\n"])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['question'\]; available: \['completion', 'prompt'\]"):
        load_examples({"source": "jsonl", "path": p, "columns": {"question": "question", "response": "completion"}})


def test_empty_result_is_an_error(tmp_path):
    p = _write(tmp_path / "d.jsonl", [b"{broken\n"])
    with pytest.raises(ValueError, match=r"no examples left .* 1 skipped"):
        load_examples({"source": "jsonl", "path": p, "on_error": "skip"})


def test_rows_with_empty_fields_raise_or_are_counted():
    rows = [{"question": "q", "response": ""}, {"question": "q", "response": "r"}]
    with pytest.raises(ValueError, match="row 1"):
        to_examples(rows, {"question": "question", "response": "response"}, "mem")
    report = LoadReport("mem")
    assert len(to_examples(rows, {"question": "question", "response": "response"}, "mem", "skip", report)) == 1
    assert len(report.skipped) == 1


def test_demo_is_deterministic_and_correct():
    a, b = demo_examples(5, seed=3), demo_examples(5, seed=3)
    assert [e.response for e in a] == [e.response for e in b]
    assert demo_examples(5, seed=4)[0].question != a[0].question
    for e in a:
        assert e.response.endswith(f"\\boxed{{{e.answer}}}.") and 0 <= int(e.answer) <= 999
        # replay the operations from the question and check the stated answer
        start = int(e.question.split("Start with ")[1].split(".")[0])
        ops = e.question.split(": ", 1)[1].rsplit(". What", 1)[0].split("; ")
        v = start
        for op in ops:
            *words, n = op.split()
            n = int(n)
            v = (v + n if words == ["add"] else v - n if words == ["subtract"] else v * n) % 1000
        assert v == int(e.answer)


def test_encode_masks_the_prompt_and_applies_the_length_policy():
    tok = tiny_tokenizer()
    ex = demo_examples(1)[0]
    enc = encode_example(tok, ex)
    n_prompt = int((enc.labels == -100).sum())
    assert tok.decode(enc.input_ids[n_prompt:-1]) == ex.response and enc.input_ids[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[:n_prompt]).startswith("<u>" + ex.question)
    short = encode_example(tok, ex, max_length=n_prompt + 10)
    assert short.truncated and len(short.input_ids) == n_prompt + 10 and (short.labels != -100).sum() == 10
    assert encode_example(tok, ex, max_length=n_prompt + 10, policy="drop") is None
