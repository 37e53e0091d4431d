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


def test_json_and_parquet_files_give_the_rows_jsonl_gives(tmp_path):
    """The three file readers agree: a .json list, a .json {'data': [...]} object and a .parquet table of the
    same rows give the same examples as the .jsonl file; a damaged .json names the file and line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"problem": f"{i}+1?", "sol": f"{i + 1}", "n": i} for i in range(4)]
    cols = {"source": "jsonl", "columns": {"question": "problem", "response": "sol"}}
    jl = _write(tmp_path / "d.jsonl", [json.dumps(r).encode() + b"\n" for r in rows])
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "obj.json").write_text(json.dumps({"data": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    ref = [(e.question, e.response) for e in load_examples({**cols, "path": jl})[0]]
    assert ref == [(r["problem"], r["sol"]) for r in rows]
    for name, source in (("list.json", "json"), ("obj.json", "json"), ("d.parquet", "parquet")):
        ex, report = load_examples({**cols, "source": source, "path": str(tmp_path / name)})
        assert [(e.question, e.response) for e in ex] == ref and report.rows == 4, name
    (tmp_path / "bad.json").write_text('[{"problem": "1?",\n "sol": }]')
    with pytest.raises(ValueError, match="bad.json, line 2: malformed JSON"):
        load_examples({**cols, "source": "json", "path": str(tmp_path / "bad.json")})


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


def test_recall_states_the_answer_only_in_the_register_at_the_start():
    """The long-range task: the asked code is in the register (first sentences) and nowhere after it, so a
    window over the end of the context cannot copy it; deterministic; loadable as data and as a benchmark."""
    import re

    from lt_train.data.recall import recall_examples
    from lt_train.eval.benchmarks import load_problems

    a = recall_examples(12, seed=2, facts=5, min_chars=1500, max_chars=2500)
    assert [e.question for e in a] == [e.question for e in recall_examples(12, seed=2, facts=5, min_chars=1500,
                                                                            max_chars=2500)]
    for e in a:
        register, rest = e.question.split("\n\nWorked notes follow.", 1)
        asked = re.search(r"what is the code of (the \w+ \w+),", rest).group(1)
        codes = dict(re.findall(r"The code of (the \w+ \w+) is (\d+)\.", register))
        assert len(codes) == 5 and codes[asked] == e.answer and 100 <= int(e.answer) <= 999
        # the notes never state a registered code (a window could copy it), nor any boxed answer
        assert not re.search(r"\b(" + "|".join(codes.values()) + r")\b", rest) and "boxed" not in rest
        assert len(rest) >= 1500 and e.response.endswith(f"\\boxed{{{e.answer}}}.")
    ex, report = load_examples({"source": "recall", "num_samples": 3, "min_chars": 100, "max_chars": 200})
    assert len(ex) == 3 and report.source == "recall"
    probs = load_problems({"source": "recall", "mode": "aime", "num_problems": 4, "seed": 7})
    assert [p.id for p in probs] == [f"recall-7-{i}" for i in range(4)]
    with pytest.raises(ValueError, match="min_chars"):
        recall_examples(1, min_chars=10, max_chars=5)
    with pytest.raises(ValueError, match="between 1 and 32"):
        recall_examples(1, facts=33)


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
