"""The evaluator (launch/eval.py): metrics vs brute force, benchmark loading and its errors, batched generation
vs one-at-a-time generation, crash / torn-write resume vs an uninterrupted run, scripted end-to-end metrics,
hybrid checkpoints, and the full-vs-hybrid comparison."""
import itertools
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from conftest import SHARED_DATA
from train_helpers import torchrun
from hydra import compose, initialize_config_dir

from lt_train.cli import expand_shortcuts
from lt_train.eval import job, runner
from lt_train.eval.benchmarks import load_problems
from lt_train.eval.grader import Grader
from lt_train.eval.grader import _verify_worker as _REAL_VERIFY
from lt_train.eval.metrics import aggregate, majority, mean_se, pass_at_k, problem_metrics
from lt_train.eval.sampling import BatchOutput, GenSettings, build_prompt, gen_settings, generate_batch, plan_batches
from lt_train.hybrid import HybridConfig, convert_to_hybrid
from lt_train.models import tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
TINY = ["model=tiny", "eval=demo", "eval.num_problems=3", "eval.n_samples=2", "eval.max_new_tokens=12",
        "eval.batch_size=4"]


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("evaluate", overrides=expand_shortcuts(overrides, CONF))


def _samples(path):
    return {(r["problem"], r["sample"]): r for r in map(json.loads, open(path, encoding="utf-8"))}


# ---------------------------------------------------------------------------------------------------------
# metrics

def _pass_at_k_brute(n, c, k):
    """Fraction of the k-subsets of n samples (c correct) holding at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_brute_force_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_mean_and_standard_error():
    xs = [1.0, 0.25, 0.0, 0.75, 0.5]
    m, se = mean_se(xs)
    assert m == pytest.approx(statistics.mean(xs))
    assert se == pytest.approx(statistics.stdev(xs) / len(xs) ** 0.5)
    assert mean_se([0.5]) == (0.5, 0.0)


def test_majority_vote_normalises_ties_and_merges_equivalent_math_answers():
    assert majority(["025", "7", "25", None], "aime") == 0        # 025 and 25 vote together
    assert majority(["7", "25", "25", "7"], "aime") == 0          # tie: first to appear
    assert majority([None, None], "aime") is None
    assert majority(["1,000", "1000.0", "12"], "gsm8k") == 0
    g = Grader()
    try:
        answers = ["\\frac{1}{2}", "3", "0.5", "3", "\\dfrac12"]
        assert majority(answers, "math", g.equivalent) == 0       # 1/2 (x3) beats 3 (x2)
        assert majority(answers, "math") == 1                     # without equivalence: "3" has the most
    finally:
        g.close()


def test_aggregate_refuses_incomplete_runs():
    a = problem_metrics([True, False], ["1", "2"], "aime")
    b = problem_metrics([True], ["1"], "aime")
    with pytest.raises(ValueError, match="different sample counts"):
        aggregate([a, b])


# ---------------------------------------------------------------------------------------------------------
# benchmarks and their errors

@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is absent")
@pytest.mark.parametrize("bench,file,count,extra", [
    ("aime24", "aime24.jsonl", 30, []),
    ("aime25", "aime25.jsonl", 30, []),
    ("math500", "math500.jsonl", 500, ["eval.columns.id=id"]),
    ("gsm8k", "gsm8k_test.jsonl", 1319, ["eval.columns.question=problem", "eval.columns.id=id",
                                         "eval.answer_after=null"]),
])
def test_benchmarks_load_from_local_files(bench, file, count, extra):
    path = os.path.join(SHARED_DATA, file)
    problems = load_problems(_cfg([f"eval={bench}", f"eval.path={path}", *extra]).eval)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(problems) == count == len(rows)
    assert [(p.id, p.question, p.answer) for p in problems] == [(r["id"], r["problem"], str(r["answer"]).strip())
                                                                 for r in rows]


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is absent")
def test_gsm8k_answers_cut_from_hub_style_solutions_match_the_answer_column():
    path = os.path.join(SHARED_DATA, "gsm8k_test.jsonl")
    # the hub's GSM8K has only `answer` = solution ending in "#### n"; the local file also keeps the solution
    cut = load_problems(_cfg(["eval=gsm8k", f"eval.path={path}", "eval.columns.question=problem",
                              "eval.columns.answer=solution"]).eval)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert [p.answer for p in cut] == [r["answer"] for r in rows]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows,message", [
    ([{"id": "a", "problem": "1+1?", "answer": "2"}, {"id": "b", "problem": "2+2?"}],
     "row 2: no answer column 'answer'"),
    ([{"id": "a", "problem": "1+1?", "answer": ""}], "row 1: answer column 'answer' is missing or empty"),
    ([{"id": "a", "problem": "1+1?", "answer": None}], "row 1: answer column 'answer' is missing or empty"),
    ([{"id": "a", "problem": "1+1?", "answer": "2"}, {"id": "a", "problem": "3?", "answer": "3"}],
     "duplicate id 'a'"),
    ([{"id": "a", "question": "1+1?", "answer": "2"}], "no question column 'problem'"),
    ([], "has no problems"),
])
def test_bad_benchmark_files_fail_clearly(tmp_path, rows, message):
    path = _write(tmp_path / "bench.jsonl", rows)
    with pytest.raises(ValueError, match=message) as e:
        load_problems(_cfg([f"eval={path}"]).eval)
    assert "bench.jsonl" in str(e.value)


def test_command_line_shortcuts():
    assert expand_shortcuts(["model=Qwen/QwQ-32B", "model=tiny", "eval=aime24"], CONF) == \
        ["model=hub", "model.name=Qwen/QwQ-32B", "model=tiny", "eval=aime24"]
    assert expand_shortcuts(["eval=data/my file.jsonl"], CONF) == ["eval=custom", "eval.path='data/my file.jsonl'",
                                                                   "eval.name='my file'"]
    assert expand_shortcuts(["eval=aime2023"], CONF) == ["eval=aime2023"]  # left for Hydra to report
    assert expand_shortcuts(["model=hub", "model.name=x"], CONF) == ["model=hub", "model.name=x"]


def _launch(args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "eval.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_launcher_errors_unknown_benchmark_and_model_without_weights(tmp_path):
    proc = _launch(["model=tiny", "eval=aime2023", f"output_dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0 and "Could not find 'eval/aime2023'" in proc.stderr and "aime24" in proc.stderr
    empty = tmp_path / "ckpt"
    empty.mkdir()
    tiny_model().config.save_pretrained(empty)
    proc = _launch([f"model={empty}", "eval=demo", f"output_dir={tmp_path}"], tmp_path)
    assert proc.returncode != 0 and "has no *.safetensors weights" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# generation

def test_generation_settings(caplog):
    assert gen_settings({"temperature": 0.6}).n_samples == 8
    g = gen_settings({"greedy": True})
    assert g.n_samples == 1 and g.greedy and g.temperature == 0.0
    assert gen_settings({"temperature": 0}).greedy
    assert gen_settings({"greedy": True, "n_samples": 4}).n_samples == 1
    assert "n_samples=4 ignored" in caplog.text
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        gen_settings({"n_samples": 0})
    with pytest.raises(ValueError, match="top_p"):
        gen_settings({"top_p": 0})
    plan = plan_batches(3, 4, 5)
    assert sorted(x for b in plan for x in b) == [(p, s) for p in range(3) for s in range(4)]
    assert [len(b) for b in plan] == [5, 5, 2]


def test_prompt_uses_the_chat_template_and_instruction():
    tok = tiny_tokenizer()
    assert build_prompt(tok, "What is 2+2?", "Box it.") == "<u>What is 2+2?\nBox it.\n<a>"
    assert build_prompt(tok, "Q", None, "Be brief.") == "<s>Be brief.\n<u>Q\n<a>"


def _greedy(n_new=10, batch=3):
    return GenSettings(1, True, 0.0, 1.0, 0, n_new, batch, 0, None, None)


PROMPTS = ("1+1?", "What is the sum of 17 and 25?", "Compute 3*4-2.")


def _tiny_generator(arch, hybrid, lazy):
    model, tok = tiny_model(arch), tiny_tokenizer()
    if hybrid:
        convert_to_hybrid(model, HybridConfig(lazy, sink_tokens=2, window=6))
    return model, tok, [build_prompt(tok, q) for q in PROMPTS]


def _assert_matches_generate(model, tok, prompts, out, n_new, eos):
    """Each row of a batched `generate_batch` equals transformers' `generate` on that prompt alone."""
    for p, text, n, fin in zip(prompts, out.texts, out.tokens, out.finished):
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        ref = model.generate(ids, max_new_tokens=n_new, do_sample=False, pad_token_id=0, eos_token_id=eos)
        ref = ref[0, ids.shape[1]:]
        stop = torch.isin(ref, torch.tensor(eos)).nonzero()
        ref = ref[: int(stop[0, 0]) + 1] if len(stop) else ref
        assert n == len(ref) and text == tok.decode(ref, skip_special_tokens=True) and fin == bool(len(stop))


@pytest.mark.parametrize("hybrid", [False, True])
def test_batched_generation_equals_one_prompt_at_a_time(hybrid):
    model, tok, prompts = _tiny_generator("qwen2", hybrid, [1, 3])
    out = generate_batch(model, tok, prompts, _greedy(), seeds=[0, 0, 0])
    _assert_matches_generate(model, tok, prompts, out, 10, [2])


def test_kv_bytes_of_a_full_model_match_the_cache_size_formula():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = [build_prompt(tok, q) for q in ("1+1?", "What is 17+25?")]
    out = generate_batch(model, tok, prompts, _greedy(n_new=8), seeds=[0, 0])
    T = max(len(tok(p, add_special_tokens=False).input_ids) for p in prompts) + max(out.tokens) - 1
    c = model.config  # keys + values, every layer, fp32
    assert out.kv_bytes == 2 * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * T * 4


def test_kv_memory_follows_the_tokens_generated_not_max_new_tokens(monkeypatch):
    """A row that ends early holds no memory for tokens it never generates: the hybrid's peak KV bytes are the
    same with max_new_tokens 400 and 1000 when the row stops at its fourth token (buffers grow by at most
    FullLayer.MIN_GROW = 256 tokens, capped by prompt + max_new_tokens: 8 holds less). A buffer sized to prompt +
    max_new_tokens made a hybrid's peak larger than the full model's on long-output runs."""
    from lt_train.eval import sampling

    model, tok, prompts = _tiny_generator("llama", True, [1, 3])
    first = generate_batch(model, tok, prompts[:1], _greedy(8, 1), seeds=[0])
    ids = tok(first.texts[0], add_special_tokens=False).input_ids
    stop = next(t for i, t in enumerate(ids) if i >= 3 and t not in ids[:i])
    monkeypatch.setattr(sampling, "eos_ids", lambda *a: [stop])
    short, long, longer = (generate_batch(model, tok, prompts[:1], _greedy(n, 1), seeds=[0]) for n in (8, 400, 1000))
    assert short.tokens == long.tokens == longer.tokens and longer.finished == [True] and long.tokens[0] < 8
    assert longer.kv_bytes == long.kv_bytes and short.kv_bytes < long.kv_bytes


def test_a_sample_depends_on_its_seed_not_on_its_batch_mates():
    model, tok = tiny_model(), tiny_tokenizer()
    gs = GenSettings(2, False, 1.0, 0.95, 0, 12, 2, 0, None, None)
    a, b = build_prompt(tok, "What is 12+30?"), build_prompt(tok, "Q")
    pair = generate_batch(model, tok, [a, b], gs, [7, 9])
    assert generate_batch(model, tok, [a, b], gs, [7, 9]).texts == pair.texts
    assert generate_batch(model, tok, [a], gs, [7]).texts == pair.texts[:1]     # alone, unpadded
    assert generate_batch(model, tok, [b, a], gs, [9, 7]).texts == pair.texts[::-1]
    assert generate_batch(model, tok, [a, b], gs, [8, 9]).texts[0] != pair.texts[0]


def test_sample_seeds_are_distinct_within_a_run_and_stable():
    from lt_train.eval.sampling import sample_seed

    for n in (8, 1009, 1500):
        seeds = {sample_seed(3, p, s, n) for p in range(4) for s in range(n)}
        assert len(seeds) == 4 * n
    assert sample_seed(0, 2, 3, 8) == 2 * 1009 + 3  # samples already on disk keep their seeds on resume


def _kept(logits, gs, n=400):
    """The tokens `next_tokens` draws over n seeds: the set its warping keeps."""
    from lt_train.eval.sampling import next_tokens

    return {int(next_tokens(logits, gs, [torch.Generator().manual_seed(i)])[0]) for i in range(n)}


def _sampling(temperature=1.0, top_p=1.0, top_k=0):
    return GenSettings(1, False, temperature, top_p, top_k, 1, 1, 0, None, None)


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert _kept(logits, _sampling()) == {0, 1, 2, 3}
    # top-p keeps the most likely tokens whose mass reaches p (0.5 + 0.3 = 0.8), thresholds clear of float ties
    assert _kept(logits, _sampling(top_p=0.78)) == {0, 1}
    assert _kept(logits, _sampling(top_p=0.82)) == {0, 1, 2}
    assert _kept(logits, _sampling(top_p=0.4)) == {0}
    assert _kept(logits, _sampling(top_k=3)) == {0, 1, 2}


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.25, 0.8, 0), (2.0, 0.8, 0), (0.5, 0.9, 3), (0.25, 0.6, 2)])
def test_temperature_comes_before_top_k_and_top_p_as_in_transformers(temperature, top_p, top_k):
    """transformers' warpers (temperature, then top-k, then top-p: the order `generate` builds them in) are the
    reference. Each case keeps another set if the temperature came after top-p: 0.52, 0.3, 0.12, 0.06 at T=0.25
    sharpens to 0.90, 0.09, ... (top-p 0.8 keeps one token, not two), at T=2 flattens to 0.39, 0.30, 0.19, 0.13
    (three, not two), at T=0.5 to 0.71, 0.24, ... (top-p 0.9: two, not three); no cumulative mass sits near p."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.log(torch.tensor([[0.52, 0.3, 0.12, 0.06]]))
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + [TopPLogitsWarper(top_p)])
    reference = set(torch.isfinite(warpers(None, logits.clone())[0]).nonzero().flatten().tolist())
    untempered = TopPLogitsWarper(top_p)(None, logits.clone())  # top-p before the temperature
    wrong_order = set(torch.isfinite(untempered[0]).nonzero().flatten().tolist())
    if top_k:
        wrong_order = {t for t in wrong_order if t < top_k}
    assert reference != wrong_order  # the case can tell the orders apart
    assert _kept(logits, _sampling(temperature, top_p, top_k)) == reference


def test_the_checkpoints_own_generation_defaults_are_not_applied():
    """A checkpoint's generation_config (here top-k 1 and a repetition penalty, as shipped defaults like Qwen's
    top-k 20 / LLaMA's top-p 0.9 are) must not change the protocol's samples: only eval.* settings apply."""
    model, tok = tiny_model(), tiny_tokenizer()
    prompts = [build_prompt(tok, "What is 12+30?"), build_prompt(tok, "Q")]
    gs = GenSettings(2, False, 1.0, 1.0, 0, 12, 2, 0, None, None)
    plain = generate_batch(model, tok, prompts, gs, [3, 4]).texts
    greedy = generate_batch(model, tok, prompts, _greedy(12, 2), [3, 4]).texts
    assert plain != greedy  # top-k 1 would make these samples greedy
    model.generation_config.top_k, model.generation_config.repetition_penalty = 1, 5.0
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.1
    assert generate_batch(model, tok, prompts, gs, [3, 4]).texts == plain


@pytest.mark.parametrize("hybrid", [False, True])
def test_finished_rows_leave_the_batch_and_the_rest_still_match_one_at_a_time(hybrid):
    model, tok, prompts = _tiny_generator("mistral", hybrid, [0, 2])
    free = generate_batch(model, tok, prompts, _greedy(n_new=16), seeds=[0, 0, 0])
    stop = tok(free.texts[0], add_special_tokens=False).input_ids[3]
    model.generation_config.eos_token_id = stop  # row 0 now stops by its 4th token, the others go on
    out = generate_batch(model, tok, prompts, _greedy(n_new=16), seeds=[0, 0, 0])
    assert out.finished[0] and out.tokens[0] <= 4
    _assert_matches_generate(model, tok, prompts, out, 16, [stop, 2])


# ---------------------------------------------------------------------------------------------------------
# the job: resume, scripted metrics, hybrid checkpoints, comparison

def test_crash_and_torn_write_resume_exactly(tmp_path, monkeypatch):
    ref = job.run(_cfg(TINY + [f"output_dir={tmp_path / 'ref'}"]))["tiny"]
    full = _samples(os.path.join(ref["dir"], "samples.jsonl"))
    assert len(full) == 3 * 2

    calls, real = [], runner.generate_batch

    def crashing(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate_batch", crashing)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        job.run(_cfg(TINY + [f"output_dir={out}"]))
    path = out / "tiny" / "samples.jsonl"
    assert len(_samples(path)) == 4  # the first batch survived the crash
    with open(path, "ab") as f:
        f.write(b'{"problem": "demo-10000-2", "sam')  # a torn write
    calls.clear()
    res = job.run(_cfg(TINY + [f"output_dir={out}"]))["tiny"]
    assert len(calls) == 1  # only the missing batch is generated again
    got = _samples(path)
    strip = ("batch_seconds",)
    assert {k: {f: v for f, v in r.items() if f not in strip} for k, r in got.items()} == \
        {k: {f: v for f, v in r.items() if f not in strip} for k, r in full.items()}
    assert res["metrics"]["pass@1"] == ref["metrics"]["pass@1"] and res["torn_lines_dropped"] == 1


def test_resume_with_a_smaller_batch_keeps_the_finished_samples(tmp_path, monkeypatch, caplog):
    real, calls = runner.generate_batch, []

    def crashing(*a, **k):
        calls.append(len(a[2]))
        if calls == [4, 2]:  # the second batch (6 samples in batches of 4) crashes
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate_batch", crashing)
    with pytest.raises(RuntimeError):
        job.run(_cfg(TINY + [f"output_dir={tmp_path}"]))
    first = _samples(tmp_path / "tiny" / "samples.jsonl")
    calls.clear()
    res = job.run(_cfg(TINY + [f"output_dir={tmp_path}", "eval.batch_size=1"]))["tiny"]
    assert calls == [1, 1] and "earlier samples were generated in batches of [4]" in caplog.text
    got = _samples(tmp_path / "tiny" / "samples.jsonl")
    assert len(got) == 6 and all(got[k] == v for k, v in first.items())
    assert res["metrics"]["samples"] == 6


def test_an_out_of_memory_batch_is_halved_and_its_samples_match_an_uninterrupted_run(tmp_path, monkeypatch):
    ref = job.run(_cfg(TINY + [f"output_dir={tmp_path / 'ref'}"]))["tiny"]
    full = _samples(os.path.join(ref["dir"], "samples.jsonl"))
    real, calls = runner.generate_batch, []

    def oom(*a, **k):
        calls.append(len(a[2]))
        if len(a[2]) == 2:  # the second batch (6 samples in batches of 4) does not fit; its halves do
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(runner, "generate_batch", oom)
    res = job.run(_cfg(TINY + [f"output_dir={tmp_path / 'run'}"]))["tiny"]
    assert calls == [4, 2, 1, 1]
    got = _samples(tmp_path / "run" / "tiny" / "samples.jsonl")
    strip = ("batch_seconds", "batch_tokens", "kv_bytes", "oom_splits")
    assert {k: {f: v for f, v in r.items() if f not in strip} for k, r in got.items()} == \
        {k: {f: v for f, v in r.items() if f not in strip} for k, r in full.items()}
    assert sorted(len(r["oom_splits"]) for r in got.values()) == [0, 0, 0, 0, 1, 1]
    assert res["metrics"]["oom_splits"] == 1 and res["metrics"]["pass@1"] == ref["metrics"]["pass@1"]
    summary = json.loads((tmp_path / "run" / "tiny" / "summary.json").read_text())
    assert summary["metrics"]["oom_splits"] == 1


def test_out_of_memory_with_one_row_stops_clearly(tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(runner, "generate_batch", oom)
    with pytest.raises(RuntimeError, match="out of memory generating one sample alone .*eval.max_new_tokens"):
        job.run(_cfg(TINY + [f"output_dir={tmp_path}"]))


def test_a_grader_worker_that_dies_is_restarted_and_the_check_retried_then_counted(tmp_path, monkeypatch):
    """The worker dies during a check: a fresh one retries it; dying again counts as a crash (wrong), and the
    next check still gets a working worker."""
    import lt_train.eval.grader as grader_mod

    g = Grader(timeout=60)
    try:
        monkeypatch.setenv("LT_TEST_DIE_MARKER", str(tmp_path / "die"))
        (tmp_path / "die").write_text("")
        monkeypatch.setattr(grader_mod, "_verify_worker", _die_once)
        assert g.equivalent("\\frac{1}{2}", "0.5") and g.crashes == 0  # died once, retried, right
        assert not (tmp_path / "die").exists()
        monkeypatch.setattr(grader_mod, "_verify_worker", _always_die)
        assert not g.equivalent("\\frac{1}{2}", "0.5") and g.crashes == 1
        monkeypatch.setattr(grader_mod, "_verify_worker", _REAL_VERIFY)
        assert g.equivalent("\\frac{1}{4}", "0.25") and g.crashes == 1
    finally:
        g.close()


def _die_once(gold, target):  # module level: the grader's worker receives it pickled by name
    marker = os.environ["LT_TEST_DIE_MARKER"]
    if os.path.exists(marker):
        os.remove(marker)
        os._exit(9)
    return _REAL_VERIFY(gold, target)


def _always_die(gold, target):
    os._exit(9)


def test_a_different_protocol_is_refused_in_the_same_folder(tmp_path):
    job.run(_cfg(TINY + [f"output_dir={tmp_path}"]))
    with pytest.raises(ValueError, match="temperature"):
        job.run(_cfg(TINY + [f"output_dir={tmp_path}", "eval.temperature=0.9"]))
    res = job.run(_cfg(TINY + [f"output_dir={tmp_path}", "eval.temperature=0.9", "eval.overwrite=true"]))
    assert res["tiny"]["generation"]["temperature"] == 0.9


def test_scripted_outputs_give_the_expected_metrics_and_report(tmp_path, monkeypatch):
    # correctness per (problem, sample) chosen here; the answers are written the way models write them
    script = {0: ["\\boxed{616}", "The final answer is 616.", "\\boxed{0616}", "\\boxed{616}"],
              1: ["\\boxed{7}", "\\boxed{7}", "\\boxed{602}", "no answer"],
              2: ["nothing", "still nothing", "\\boxed{", "x"]}
    problems = load_problems(_cfg(["eval=demo", "eval.num_problems=3"]).eval)

    def scripted(model, tok, prompts, gs, seeds):
        batch = next(rows for rows in plan_batches(3, 4, gs.batch_size)
                     if [runner.sample_seed(gs.seed, p, s, gs.n_samples) for p, s in rows] == seeds)
        texts = [script[p][s].replace("616", problems[p].answer) if p == 0 else
                 script[p][s].replace("602", problems[p].answer) for p, s in batch]
        return BatchOutput(texts, [10] * len(texts), [True] * len(texts), 0.5, 1000)

    monkeypatch.setattr(runner, "generate_batch", scripted)
    res = job.run(_cfg(["model=tiny", "eval=demo", "eval.num_problems=3", "eval.n_samples=4",
                        "eval.batch_size=3", f"output_dir={tmp_path}"]))["tiny"]
    m = res["metrics"]
    per_problem = [4 / 4, 1 / 4, 0 / 4]
    assert m["pass@1"] == pytest.approx(statistics.mean(per_problem))
    assert m["pass@1_se"] == pytest.approx(statistics.stdev(per_problem) / 3 ** 0.5)
    assert m["pass@2"] == pytest.approx((1 + _pass_at_k_brute(4, 1, 2) + 0) / 3)
    assert m["maj@4"] == pytest.approx(1 / 3)  # problem 1's majority answer is the wrong 7
    assert m["no_answer"] == 5 and m["truncated"] == 0 and m["samples"] == 12
    assert m["tokens_per_s"] == pytest.approx(120 / (4 * 0.5))  # 4 batches of 3 rows x 10 tokens, 0.5 s each
    assert [p["maj_answer"] for p in res["problems"]] == [problems[0].answer, "7", None]
    report = open(os.path.join(res["dir"], "report.md"), encoding="utf-8").read()
    assert "| demo-10000-1 | " + problems[1].answer + " | 1/4 | 25.0% | 7 | no |" in report
    assert json.load(open(os.path.join(res["dir"], "summary.json")))["metrics"]["pass@1"] == m["pass@1"]
    assert report.startswith("# demo: tiny\n") and os.path.getsize(os.path.join(res["dir"], "lengths.png")) > 1000


def test_hybrid_checkpoints_load_hybrid_and_generate_as_saved(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    convert_to_hybrid(model, HybridConfig([1, 3], sink_tokens=2, window=6))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    res = job.run(_cfg([f"model={ckpt}", "model.dtype=float32", "eval=demo", "eval.num_problems=2",
                        "eval.greedy=true", "eval.max_new_tokens=12", f"output_dir={tmp_path / 'out'}"]))
    (run,) = res.values()
    assert run["attention"].startswith("hybrid, 2/4 lazy layers [1, 3], S=2 W=6")
    samples = _samples(os.path.join(run["dir"], "samples.jsonl"))
    problems = load_problems(_cfg(["eval=demo", "eval.num_problems=2"]).eval)
    for p in problems:  # the in-memory hybrid model, generating on its own
        ids = tok(build_prompt(tok, p.question), return_tensors="pt", add_special_tokens=False).input_ids
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)[0, ids.shape[1]:]
        assert samples[(p.id, 0)]["output"] == tok.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("hybrid,attention,bound", [
    # 3 of 4 layers keep 2 + 3 slots instead of a sequence of ~200 tokens
    ("hybrid.lazy_layers=[0,1,2]", "hybrid, 3/4 lazy layers [0, 1, 2]", 0.3),
    # online: at most 3 full caches during prefill, then 2 full + 2 streaming layers
    ("hybrid.online_num_lazy=2", "hybrid, 2 of 4 layers lazy per prompt (online)", 0.8),
])
def test_compare_full_and_hybrid_side_by_side(tmp_path, monkeypatch, hybrid, attention, bound):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    res = job.run(_cfg(TINY + ["eval.max_new_tokens=24", hybrid, "hybrid.sink_tokens=2", "hybrid.window=4",
                               "eval.compare_with=tiny", "logging.wandb=true", f"output_dir={tmp_path}"]),
                  conf_dir=CONF)
    hyb, full, c = res["tiny+hybrid"], res["tiny"], res["comparison"]
    assert hyb["attention"].startswith(attention) and full["attention"] == "full attention"
    assert c["kv_memory_ratio"] == pytest.approx(hyb["metrics"]["peak_kv_bytes"] / full["metrics"]["peak_kv_bytes"])
    assert c["kv_memory_ratio"] < bound
    assert c["throughput_ratio"] == pytest.approx(hyb["metrics"]["tokens_per_s"] / full["metrics"]["tokens_per_s"])
    diff = [a["pass@1"] - b["pass@1"] for a, b in zip(hyb["problems"], full["problems"])]
    assert c["pass@1_diff"] == pytest.approx(statistics.mean(diff))
    seeds = lambda r: {k: v["seed"] for k, v in _samples(os.path.join(r["dir"], "samples.jsonl")).items()}  # noqa
    assert seeds(hyb) == seeds(full)
    for f in ("comparison.md", "comparison.json", "passk.png"):
        assert (tmp_path / f).exists()
    from wandb_reader import run_file, summary_keys

    keys = summary_keys(run_file(str(tmp_path)))
    assert {"tiny+hybrid/pass@1", "tiny/peak_kv_bytes", "comparison/kv_memory_ratio"} <= keys


def test_scripted_comparison_gives_the_differences_computed_by_hand(tmp_path, monkeypatch):
    """Both models' outputs scripted per (problem, sample), the answers written as models write them. By hand, with
    4 samples of 3 problems: A (hybrid) gets 3, 1, 1 right, B (full) 4, 2, 1, so the per-problem pass@1 differences
    are -1/4, -1/4, 0: mean -1/6, paired SE = sd / sqrt(3) = sqrt(1/48) / sqrt(3) = 1/12 (the SE of each run alone
    would be larger: the pairing removes what the problems share). maj@4: A's problem 1 votes the wrong 7 twice
    against one right answer, so A 2/3, B 3/3. pass@2 = 1 - C(4-c, 2) / C(4, 2): A (1 + 1/2 + 1/2) / 3 = 2/3,
    B (1 + 5/6 + 1/2) / 3 = 7/9, difference -1/9; pass@4: 1 for both. B's answers are twice as long and its
    batches take half the time: throughput A/B = (120 / 2 s) / (240 / 1 s) = 1/4; KV 1000 / 4000 bytes."""
    R, W, N = "R", "\\boxed{7}", "no answer"  # right (the problem's answer), wrong, none
    script = {True: [[R, R, "The final answer is R.", W], [R, W, W, N], [R, N, N, N]],   # A, the hybrid
              False: [[R, R, R, R], [R, R, W, N], [N, N, R, N]]}                       # B, the full model
    problems = load_problems(_cfg(["eval=demo", "eval.num_problems=3"]).eval)

    def scripted(model, tok, prompts, gs, seeds):
        hybrid = bool(getattr(model.config, "lt_hybrid", None))
        batch = next(rows for rows in plan_batches(3, 4, gs.batch_size)
                     if [runner.sample_seed(gs.seed, p, s, gs.n_samples) for p, s in rows] == seeds)
        texts = [script[hybrid][p][s].replace("R", "\\boxed{%s}" % problems[p].answer) for p, s in batch]
        return BatchOutput(texts, [10 if hybrid else 20] * len(texts), [True] * len(texts),
                           0.5 if hybrid else 0.25, 1000 if hybrid else 4000)

    monkeypatch.setattr(runner, "generate_batch", scripted)
    res = job.run(_cfg(["model=tiny", "eval=demo", "eval.num_problems=3", "eval.n_samples=4", "eval.batch_size=3",
                        "hybrid.lazy_layers=[1,3]", "eval.compare_with=tiny", f"output_dir={tmp_path}"]),
                  conf_dir=CONF)
    c = json.load(open(tmp_path / "comparison.json"))
    assert c == res["comparison"] and (c["model"], c["compare_with"]) == ("tiny+hybrid", "tiny")
    assert [p["correct"] for p in res["tiny+hybrid"]["problems"]] == [3, 1, 1]
    assert [p["correct"] for p in res["tiny"]["problems"]] == [4, 2, 1]
    assert c["pass@1_diff"] == pytest.approx(-1 / 6) and c["pass@1_diff_se"] == pytest.approx(1 / 12)
    assert c["maj@4_diff"] == pytest.approx(-1 / 3)
    assert c["throughput_ratio"] == pytest.approx(1 / 4) and c["kv_memory_ratio"] == pytest.approx(1 / 4)
    assert c["mean_output_tokens_ratio"] == pytest.approx(1 / 2)
    md = open(tmp_path / "comparison.md", encoding="utf-8").read()
    for row in ("| pass@1 | 41.7% ± 16.7% | 58.3% ± 22.0% | -16.7 ± 8.3 points (paired SE) |",
                "| maj@4 | 66.7% | 100.0% | -33.3 points |", "| pass@2 | 66.7% | 77.8% | -11.1 points |",
                "| pass@4 | 100.0% | 100.0% | +0.0 points |", "| generation tokens/s | 60.0 | 240.0 | 0.25x |",
                f"| {problems[1].id} | {problems[1].answer} | 1/4 | 2/4 | -1 |"):
        assert row in md, row


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is absent")
def test_smollm2_full_vs_hybrid_on_gsm8k_from_the_command_line(tmp_path):
    path = os.path.join(SHARED_DATA, "gsm8k_test.jsonl")
    layers = ",".join(str(i) for i in range(1, 30, 2))
    proc = _launch(["model=smollm2-135m", f"eval={path}", "eval.mode=gsm8k", "eval.max_problems=2",
                    "eval.greedy=true", "eval.max_new_tokens=48", f"hybrid.lazy_layers=[{layers}]",
                    "hybrid.window=32", "eval.compare_with=smollm2-135m", f"output_dir={tmp_path}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = json.load(open(tmp_path / "comparison.json"))
    full = json.load(open(tmp_path / "smollm2-135m" / "summary.json"))
    assert c["model"] == "smollm2-135m+hybrid" and 0.4 < c["kv_memory_ratio"] < 0.8
    assert full["metrics"]["samples"] == 2 and full["attention"] == "full attention"
    outputs = [json.loads(line)["output"] for line in open(tmp_path / "smollm2-135m" / "samples.jsonl")]
    assert all(len(o.split()) > 5 for o in outputs)  # real text from the real model


def test_comparing_a_model_with_itself_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is the model under evaluation"):
        job.run(_cfg(TINY + ["eval.compare_with=tiny", f"output_dir={tmp_path}"]), conf_dir=CONF)


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is absent")
def test_hub_code_path_reads_local_copies_of_the_hub_layouts(tmp_path):
    """The real `datasets.load_dataset` path of the aime24 / gsm8k configs, on local copies laid out like the
    hub repositories (HuggingFaceH4/aime_2024: integer ids, extra columns; openai/gsm8k: subset `main`,
    answers that are solutions ending in "#### n")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    aime = [json.loads(line) for line in open(os.path.join(SHARED_DATA, "aime24.jsonl"), encoding="utf-8")]
    (tmp_path / "aime" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"id": 60 + i, "problem": r["problem"], "solution": "...",
                                          "answer": r["answer"], "url": "u", "year": "2024"}
                                         for i, r in enumerate(aime)]),
                   tmp_path / "aime" / "data" / "train-00000-of-00001.parquet")
    got = load_problems(_cfg(["eval=aime24", f"eval.dataset_id={tmp_path / 'aime'}"]).eval)
    assert [(p.id, p.answer) for p in got] == [(str(60 + i), r["answer"]) for i, r in enumerate(aime)]

    gsm = [json.loads(line) for line in open(os.path.join(SHARED_DATA, "gsm8k_test.jsonl"), encoding="utf-8")][:50]
    (tmp_path / "gsm" / "main").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"question": r["problem"], "answer": r["solution"]} for r in gsm]),
                   tmp_path / "gsm" / "main" / "test-00000-of-00001.parquet")
    (tmp_path / "gsm" / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: test\n    path: main/test-*\n---\n")
    got = load_problems(_cfg(["eval=gsm8k", f"eval.dataset_id={tmp_path / 'gsm'}"]).eval)
    assert [(p.id, p.question, p.answer) for p in got] == [(f"gsm8k-{i}", r["problem"], r["answer"])
                                                          for i, r in enumerate(gsm)]


def test_torchrun_processes_share_the_batches_and_match_one_process(tmp_path):
    args = TINY + ["eval.num_problems=5", "eval.batch_size=2"]
    ref = job.run(_cfg(args + [f"output_dir={tmp_path / 'one'}"]))["tiny"]
    cmd = torchrun(2) + [os.path.join(ROOT, "launch", "eval.py"), *args, f"output_dir={tmp_path / 'two'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "two" / "tiny"
    per_rank = [_samples(run_dir / "samples.jsonl"), _samples(run_dir / "samples.rank1.jsonl")]
    assert per_rank[0] and per_rank[1] and not set(per_rank[0]) & set(per_rank[1])
    strip = ("batch_seconds",)
    both = {k: {f: v for f, v in r.items() if f not in strip} for d in per_rank for k, r in d.items()}
    one = {k: {f: v for f, v in r.items() if f not in strip}
           for k, r in _samples(os.path.join(ref["dir"], "samples.jsonl")).items()}
    assert both == one
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["metrics"]["samples"] == 10 and summary["metrics"]["pass@1"] == ref["metrics"]["pass@1"]


def test_trainer_demo_accuracy_grades_each_problem_with_its_own_answer(monkeypatch):
    from lt_train.data import demo_examples
    from lt_train.train import evaluate

    model, tok = tiny_model(), tiny_tokenizer()
    problems = demo_examples(5, seed=3, min_steps=2, max_steps=3)
    right = {build_prompt(tok, p.question): p.answer for i, p in enumerate(problems) if i % 2 == 0}
    batches = []

    def answering(model, tok, prompts, gs, seeds, lockstep=False):  # the even problems right, the odd ones wrong
        batches.append(len(prompts))
        assert gs.greedy and gs.max_new_tokens == 16
        texts = [f"so \\boxed{{{right.get(p, '1000')}}}" for p in prompts]
        return BatchOutput(texts, [5] * len(texts), [True] * len(texts), 0.1, 0)

    monkeypatch.setattr(evaluate, "generate_batch", answering)
    assert evaluate.demo_accuracy(model, tok, problems, max_new_tokens=16, batch_size=2) == pytest.approx(3 / 5)
    assert batches == [2, 2, 1]


def test_hybrid_layers_from_a_selection_file_use_its_sink_and_window(tmp_path):
    good, bad = tmp_path / "lazy_layers.json", tmp_path / "other.json"
    good.write_text(json.dumps({"lazy_layers": [1, 3], "sink_tokens": 8, "recent_tokens": 64}))
    bad.write_text(json.dumps({"layers": [1]}))
    hc = job.hybrid_from_config(_cfg(TINY + [f"hybrid.from_file={good}", "hybrid.window=999"]).hybrid)
    assert (hc.lazy_layers, hc.sink_tokens, hc.window) == ([1, 3], 8, 64)
    with pytest.raises(ValueError, match="hybrid.from_file: .*has no 'lazy_layers'"):
        job.hybrid_from_config(_cfg(TINY + [f"hybrid.from_file={bad}"]).hybrid)
    with pytest.raises(FileNotFoundError, match="hybrid.from_file"):
        job.hybrid_from_config(_cfg(TINY + [f"hybrid.from_file={tmp_path / 'none.json'}"]).hybrid)
    with pytest.raises(ValueError, match="set one of"):
        job.hybrid_from_config(_cfg(TINY + [f"hybrid.from_file={good}", "hybrid.lazy_layers=[1]"]).hybrid)


def test_a_run_stores_and_votes_the_answer_it_grades(tmp_path, monkeypatch):
    """Demo problems (integer answers, graded as aime), four samples each, every one ending "The answer is N."
    (no box): the run grades them right, stores N as each sample's answer, and votes N: pass@1 = maj@4 = 1."""
    problems = load_problems(_cfg(["eval=demo", "eval.num_problems=2"]).eval)

    def phrased(model, tok, prompts, gs, seeds):
        batch = next(rows for rows in plan_batches(2, 4, gs.batch_size)
                     if [runner.sample_seed(gs.seed, p, s, gs.n_samples) for p, s in rows] == seeds)
        texts = [f"Adding up the steps gives it. The answer is {problems[p].answer}." for p, _ in batch]
        return BatchOutput(texts, [10] * len(texts), [True] * len(texts), 0.5, 1000)

    monkeypatch.setattr(runner, "generate_batch", phrased)
    res = job.run(_cfg(["model=tiny", "eval=demo", "eval.num_problems=2", "eval.n_samples=4", "eval.batch_size=4",
                        f"output_dir={tmp_path}"]), conf_dir=CONF)
    m = res["tiny"]["metrics"]
    assert m["pass@1"] == 1.0 and m["maj@4"] == 1.0
    # the DeepSeek-R1 protocol's names beside ours, in summary.json and report.md
    summary = json.load(open(os.path.join(res["tiny"]["dir"], "summary.json")))["metrics"]
    assert (summary["avg@4"], summary["cons@4"], summary["avg@4_se"]) == (1.0, 1.0, summary["pass@1_se"])
    report = open(os.path.join(res["tiny"]["dir"], "report.md"), encoding="utf-8").read()
    assert "avg@4 = pass@1" in report and "cons@4 = maj@4" in report
    samples = [json.loads(line) for line in open(os.path.join(res["tiny"]["dir"], "samples.jsonl"))
               if line.strip().startswith("{\"problem\"")]
    assert len(samples) == 8
    assert all(s["answer"] == str(problems[s["index"]].answer) and s["correct"] for s in samples)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_batched_draw_gives_the_tokens_of_one_multinomial_per_row(dtype):
    """`draw` (B exponential rows from the rows' generators, one batched argmax) against torch.multinomial per row
    with the same seeds, over 200 decode steps of 6 rows (flat and peaked distributions, a vocabulary of 5000):
    every token equal, and the generators left in the same state."""
    from lt_train.eval.sampling import draw

    torch.manual_seed(0)
    ours = [torch.Generator().manual_seed(s) for s in range(6)]
    ref = [torch.Generator().manual_seed(s) for s in range(6)]
    same = 0
    for step in range(200):
        logits = torch.randn(6, 5000) * (1 + step % 5) * 2
        probs = logits.to(dtype).float().softmax(-1)
        got = draw(probs, ours)
        want = torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(ref)])
        assert torch.equal(got, want), step
        same += int((got == probs.argmax(-1)).sum())
    assert same < 6 * 200  # sampled, not greedy
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, ref))
