"""`--model lt_hybrid` in lm-evaluation-harness: its greedy generations equal the evaluator's (launch/eval.py's
pipeline) on a local task, its loglikelihoods equal the hybrid model's own forward, and the hybrid settings
change both (so the equalities are not those of two full models). lm-eval is an optional extra: without it these
tests skip."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import SHARED_DATA  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.eval import job  # noqa: E402
from lt_train.eval.harness import HybridLM, parse_layers  # noqa: E402
from lt_train.hybrid import HybridConfig, convert_to_hybrid  # noqa: E402
from lt_train.models import tiny_model, tiny_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HYBRID = dict(lazy_layers="1;3", sink_tokens=2, window=8)


def _task(dir_, data, max_gen_toks, name="local_gsm"):
    """A generate_until task over a local JSONL, with the evaluator's prompt (question, then the instruction)."""
    path = os.path.join(dir_, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {json.dumps(str(data))}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{problem}}}}\\n{INSTRUCTION.replace(chr(92), chr(92) * 2)}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["</s>"], do_sample: false, max_gen_toks: {max_gen_toks}}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
""")
    return name


def _problems(path, n=4):
    rows = [{"id": f"p{i}", "problem": f"Tom has {3 + i} apples and buys {i * 7 + 2} more. How many now?",
             "answer": str(5 + 8 * i)} for i in range(n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def _evaluator_outputs(tmp_path, data, model, hybrid_args, max_new):
    """launch/eval.py's pipeline (greedy, one prompt per batch) on the same file; {id: output}."""
    over = [f"model={model}", "eval=custom", f"eval.path={data}", "eval.mode=gsm8k", "eval.greedy=true",
            f"eval.max_new_tokens={max_new}", "eval.batch_size=1", f"output_dir={tmp_path}/ours",
            "logging.wandb=false", "eval.columns={question: problem, answer: answer, id: id}"]
    if hybrid_args:
        over += [f"hybrid.lazy_layers=[{hybrid_args['lazy_layers'].replace(';', ',')}]",
                 f"hybrid.sink_tokens={hybrid_args['sink_tokens']}", f"hybrid.window={hybrid_args['window']}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=expand_shortcuts(over, CONF))
    (run,) = job.run(cfg).values()
    samples = os.path.join(run["dir"], "samples.jsonl")
    return {r["problem"]: r["output"] for r in map(json.loads, open(samples))}


def _harness_outputs(tmp_path, data, lm, max_new):
    name = _task(tmp_path, data, max_new)
    res = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(tmp_path)),
                          log_samples=True, apply_chat_template=True)
    return {s["doc"]["id"]: s["resps"][0][0] for s in res["samples"][name]}


def test_lt_hybrid_greedy_generations_equal_the_evaluators(tmp_path):
    data = tmp_path / "problems.jsonl"
    _problems(data)
    lm = HybridLM(pretrained="tiny", batch_size=1, **HYBRID)
    theirs = _harness_outputs(tmp_path, data, lm, 24)
    ours = _evaluator_outputs(tmp_path, data, "tiny", HYBRID, 24)
    assert set(theirs) == set(ours) and len(ours) == 4
    assert theirs == ours
    # the control: the same harness on the full model writes other text, so the hybrid settings were applied
    (tmp_path / "full").mkdir()
    full = _harness_outputs(tmp_path / "full", data, HybridLM(pretrained="tiny", batch_size=1), 24)
    assert full != theirs


def _instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _own_logprob(model, tok, context, continuation, prefix=None):
    """Sum of log p(continuation | context) from one forward of `model` (the reference)."""
    ctx = ([prefix] if prefix is not None else []) + tok(context, add_special_tokens=False).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits.float().log_softmax(-1)[0]
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_lt_hybrid_loglikelihoods_equal_the_hybrid_models_own_forward():
    lm = HybridLM(pretrained="tiny", batch_size=2, **HYBRID)
    tok = tiny_tokenizer()
    hybrid = convert_to_hybrid(tiny_model("llama", 4, 0), HybridConfig([1, 3], 2, 8))
    full = tiny_model("llama", 4, 0)
    # lm-eval moves a context's trailing space to the continuation: written here where it ends up
    pairs = [("Tom has 3 apples and buys 9 more. How many now?", " 12 apples"),
             ("Short:", " yes"), ("A much longer context, far past the window of eight tokens.", " The end.")]
    got = [ll for ll, _ in lm.loglikelihood(_instances("loglikelihood", pairs))]
    want = [_own_logprob(hybrid, tok, c, x) for c, x in pairs]
    assert got == pytest.approx(want, abs=1e-4)
    # streaming changed it (a random tiny model is near uniform: a small change, still 30x the tolerance above)
    assert abs(got[2] - _own_logprob(full, tok, *pairs[2])) > 3e-3

    texts = ["One rolling text that is longer than the window of eight tokens, scored whole."]
    rolling = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(t,) for t in texts]))
    prefix = lm.prefix_token_id  # lm-eval scores the first token after its prefix token
    assert rolling == pytest.approx([_own_logprob(hybrid, tok, "", texts[0], prefix=prefix)], abs=1e-4)


def test_lt_hybrid_arguments_and_registration():
    assert parse_layers("1;3;5") == [1, 3, 5] and parse_layers(2) == [2] and parse_layers(None) is None
    with pytest.raises(ValueError, match="separated by ';'"):
        parse_layers("1-3")
    from lm_eval.api.registry import get_model

    assert get_model("lt_hybrid") is HybridLM
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == "lt_hybrid"]
    assert ep.load() is HybridLM  # releases of lm-eval that read entry points find it without our launcher
    with pytest.raises(ValueError, match="one of lazy_layers, from_file, online_num_lazy"):
        HybridLM(pretrained="tiny", lazy_layers="1", online_num_lazy=1)
    with pytest.raises(ValueError, match="out of range|layer"):
        HybridLM(pretrained="tiny", lazy_layers="7")
    with pytest.raises(ValueError, match=r"does not take \['lazy_layer', 'peft'\]"):  # a typo, an unused HFLM arg
        HybridLM(pretrained="tiny", lazy_layer="1;3", peft="adapter/")
    with pytest.raises(ValueError, match="make no hybrid alone"):
        HybridLM(pretrained="tiny", window=64)


@pytest.mark.slow
def test_lt_lm_eval_command_on_smollm2_matches_launch_eval_on_gsm8k(tmp_path):
    """The command users type (`lt-lm-eval run --model lt_hybrid ...`) on real GSM8K problems and SmolLM2, against
    `python launch/eval.py` on the same problems: the same greedy text, sample for sample."""
    src = os.path.join(SHARED_DATA, "gsm8k_test.jsonl")
    if not os.path.exists(src):
        pytest.skip(f"{src} is absent (the shared benchmark files sit beside the project)")
    data = tmp_path / "gsm.jsonl"
    with open(src) as f, open(data, "w") as out:
        out.writelines(next(f) for _ in range(3))
    hybrid = dict(lazy_layers="1;5;9;13;17;21;25;29", sink_tokens=4, window=32)
    name = _task(tmp_path, data, 48)
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    cmd = [os.path.join(os.path.dirname(sys.executable), "lt-lm-eval"), "run", "--model", "lt_hybrid",
           "--model_args", "pretrained=smollm2-135m," + ",".join(f"{k}={v}" for k, v in hybrid.items()),
           "--tasks", name, "--include_path", str(tmp_path), "--apply_chat_template", "--batch_size", "1",
           "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "harness")]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True)
    (logged,) = list((tmp_path / "harness").rglob(f"samples_{name}_*.jsonl"))
    theirs = {s["doc"]["id"]: s["resps"][0][0] for s in map(json.loads, open(logged))}
    ours = _evaluator_outputs(tmp_path, data, "smollm2-135m", hybrid, 48)
    assert len(ours) == 3 and theirs == ours
