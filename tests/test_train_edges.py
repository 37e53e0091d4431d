"""The training job at its edges: the logged losses against an independent cross-entropy, the settings a
selection file carries, runs that cannot train, a resume with another step size, and `lazy.*` checked before
anything loads."""
import json
import os

import pytest
import torch

from train_helpers import ROOT, TINY, losses, run_train, run_two_nodes


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("train", overrides=TINY + list(overrides))


def _log(out) -> dict[int, dict]:
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _weights_after(out, step: int, nproc: int) -> dict:
    """The trained weights saved by the checkpoint of `step`: the plain engine's trainable.safetensors, or the
    module state DeepSpeed (ZeRO-2) writes whole."""
    d = os.path.join(out, "checkpoints", f"step_{step:07d}")
    if nproc == 1:
        from safetensors.torch import load_file

        return load_file(os.path.join(d, "trainable.safetensors"))
    return torch.load(os.path.join(d, "mp_rank_00_model_states.pt"), weights_only=False)["module"]


def _reference_step(cfg, weights: dict, rows: list[list[int]], examples) -> tuple[float, float]:
    """(loss, gradient norm) of one optimizer step computed outside the trainer: the model built afresh with the
    given weights, every row of the step through the plain forward (full logits), summed token cross-entropy over
    the step's target tokens divided by their count, and the global norm of its gradient."""
    from lt_train.data.collate import collate_packed
    from lt_train.hybrid import HybridConfig, convert_to_hybrid
    from lt_train.models import tiny_model, tiny_tokenizer

    model = tiny_model(cfg.model.arch, int(cfg.model.num_layers), int(cfg.model.get("seed", 0)))
    convert_to_hybrid(model, HybridConfig(list(cfg.lazy.layers), cfg.lazy.sink_tokens, cfg.lazy.window))
    if cfg.train.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=0.0,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    unknown = set(weights) - set(model.state_dict())
    assert not unknown, sorted(unknown)[:3]
    model.load_state_dict(weights, strict=False)
    model.train()
    pad = tiny_tokenizer().pad_token_id
    total, count = 0.0, 0
    for row in rows:
        b = collate_packed([[examples[i] for i in row]], pad)
        logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
        target = b.labels[:, 1:]
        total = total + torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(),
                                                          ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    loss = total / count
    loss.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(norm)


@pytest.mark.parametrize("mode,nproc", [("full", 1), ("lora", 1), ("full", 2), ("lora", 2)])
def test_logged_losses_and_gradient_norms_equal_an_independent_cross_entropy(tmp_path, mode, nproc):
    """Steps 2 and 3 of a run (two packed rows of different target counts per step), each from the weights the
    previous step's checkpoint holds: the trainer's logged loss is the mean token cross-entropy over all the
    step's target tokens, and its logged gradient norm (before clipping) is that mean's. A trainer that divides
    by another count (per micro-batch, per rank, a wrong engine divisor) logs another gradient norm."""
    from lt_train.data.prepare import prepare
    from lt_train.models import tiny_tokenizer
    from lt_train.train.loop import plan_rows

    args = [f"train={mode}", "train.lr=1e-3", "train.max_steps=3", "train.save_every=1", "train.keep_checkpoints=3",
            "validation.enabled=false", "train.global_batch=2"] + (["train.lora.dropout=0.0"] if mode == "lora" else [])
    if nproc > 1:
        args.append("deepspeed=zero2")
    out = tmp_path / "run"
    _ok(run_train(out, args, nproc=nproc))
    cfg = _compose(args)
    ds, _, _ = prepare(cfg.data, tiny_tokenizer(), cfg.model.name, str(out / "cache"))
    from lt_train.data.format import EncodedExample

    examples = [EncodedExample(torch.tensor(r["input_ids"]), torch.tensor(r["labels"])) for r in ds][:-2]
    rows = plan_rows([len(e.input_ids) for e in examples], cfg.train.pack_length, 0, 1)
    log = _log(out)
    for step in (2, 3):
        step_rows = rows[(step - 1) * 2: step * 2]
        loss, norm = _reference_step(cfg, _weights_after(out, step - 1, nproc), step_rows, examples)
        assert log[step]["loss"] == pytest.approx(loss, rel=2e-5), step
        assert log[step]["grad_norm"] == pytest.approx(norm, rel=1e-4), step
    targets = [sum(int((examples[i].labels[1:] != -100).sum()) for i in r) for r in rows[2:6]]
    assert targets[0] != targets[1] and targets[2] != targets[3], targets  # each step: rows of unequal weight


def test_a_selection_file_brings_its_sinks_and_window(tmp_path):
    """lazy.from_file written with S=0 (the config's default is 4): the run plans, trains and exports S=0; a
    command-line value that contradicts the file (the test runs pass lazy.window=64; here a file written
    with W=16, and lazy.sink_tokens=4 against S=0) is refused before training, naming both. The files are written
    with the window's former key, recent_tokens, as files from earlier releases are."""
    from lt_train import load_hybrid
    from lt_train.hybrid import HybridConfig

    def selection(name, S, W):
        path = tmp_path / name
        path.write_text(json.dumps({"lazy_layers": [0, 2], "sink_tokens": S, "recent_tokens": W}))
        return ["lazy.layers=null", f"lazy.from_file={path}", "train=full", "train.max_steps=1",
                "train.save_every=0", "validation.enabled=false"]

    proc = run_train(tmp_path / "a", selection("s0.json", 0, 64))
    _ok(proc)
    assert "S=0, W=64" in proc.stdout
    hc = HybridConfig.from_model_config(load_hybrid(str(tmp_path / "a" / "model")).config)
    assert (hc.lazy_layers, hc.sink_tokens, hc.window) == ([0, 2], 0, 64)
    with open(tmp_path / "a" / "plan.json", encoding="utf-8") as f:
        planned = json.load(f)["settings"]
    assert (planned["sink_tokens"], planned["window"], planned["lazy_layers"]) == (0, 64, 2)
    for name, args, said in [("w16.json", selection("w16.json", 4, 16), ("lazy.window=64", "window=16")),
                             ("s4.json", selection("s0.json", 0, 64) + ["lazy.sink_tokens=4"],
                              ("lazy.sink_tokens=4", "sink_tokens=0"))]:
        bad = run_train(tmp_path / f"run-{name}", args)
        assert bad.returncode != 0
        assert f"{said[0]} on the command line" in bad.stderr and f"selected with {said[1]}" in bad.stderr
        assert not (tmp_path / f"run-{name}" / "train_log.jsonl").exists()


def test_a_run_that_would_train_no_step_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from lt_train.train import loop

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(loop, "load_from_config", no_load)
    cfg = _compose(["train.max_steps=null", "train.epochs=1", "train.global_batch=64", f"output_dir={tmp_path}",
                    f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match=r"22 training examples pack into 22 rows .* one optimizer step takes "
                                         r"\(64 rows"):
        loop.train(cfg)
    assert not (tmp_path / "train_log.jsonl").exists()


def test_resuming_with_another_step_size_is_refused_and_the_same_size_resumes(tmp_path):
    args = ["train=full", "train.max_steps=4", "train.save_every=2", "validation.enabled=false"]
    _ok(run_train(tmp_path, args + ["train.max_steps=2", "train.save_every=1"]))
    bad = run_train(tmp_path, args + ["train.grad_accum=2"])
    assert bad.returncode != 0
    assert "written after 1 packed rows in 1 steps (1 rows per step); this run takes 2 rows per step" in bad.stderr
    _ok(run_train(tmp_path, args))
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


@pytest.mark.parametrize("override,message", [
    ("lazy.strategy=nl", "lazy.strategy='nl' is not one of"),
    ("lazy.num_lazy=7", "num_lazy=7 is out of range for a model with 4 layers"),
    ("lazy.num_lazy=1.5", "num_lazy as a fraction must be in (0, 1]"),
    ("lazy.sink_tokens=-1", "lazy.sink_tokens must be an integer >= 0, got -1"),
    ("lazy.window=0", "lazy.window must be an integer >= 1, got 0"),
    ("lazy.recent_tokens=0", "lazy.window must be an integer >= 1, got 0"),  # the former name, still read
    ("lazy.last_queries=0", "lazy.last_queries must be an integer >= 1"),
    ("lazy.nll_samples=0", "lazy.nll_samples must be an integer >= 1"),
    ("distributed.timeout_minutes=0", "distributed.timeout_minutes must be > 0"),
    ("lazy.num_lazy=null", "lazy.num_lazy is not set"),
    ("validation.heldout=0", "validation.heldout=0: the evaluations need at least one held-out example"),
])
def test_every_lazy_setting_is_checked_before_anything_loads(override, message):
    from lt_train.train.config import validate

    cfg = _compose(["lazy.layers=null", override])
    with pytest.raises(ValueError) as e:
        validate(cfg, 1)
    assert message in str(e.value)


def test_distillation_without_a_lazy_layer_is_refused(tmp_path):
    """With no lazy layer the student is the teacher: the loss is 0 at every step and nothing trains."""
    from lt_train.train.config import check_distill_has_lazy, validate

    empty = tmp_path / "lazy_layers.json"  # a selection file that names no layer
    empty.write_text(json.dumps({"lazy_layers": [], "sink_tokens": 4, "window": 64}))
    with pytest.raises(ValueError, match="train.objective=distill with no lazy layers"):
        validate(_compose(["train=lora", "train.objective=distill", "lazy.layers=null", f"lazy.from_file={empty}"]), 1)

    cfg = _compose(["train=lora", "train.objective=distill", "lazy.layers=[]"])
    with pytest.raises(ValueError, match="train.objective=distill with no lazy layers"):
        validate(cfg, 1)
    with pytest.raises(ValueError, match="train.objective=distill with no lazy layers"):
        validate(_compose(["train=lora", "train.objective=distill", "lazy.layers=null", "lazy.num_lazy=0"]), 1)
    validate(_compose(["train=lora", "train.objective=sft", "lazy.layers=[]"]), 1)  # the full model's SFT: fine
    validate(_compose(["train=lora", "train.objective=distill"]), 1)  # lazy.layers=[1,3]: fine
    with pytest.raises(ValueError, match="no lazy layers"):  # a selection that chose none, caught after it
        check_distill_has_lazy(cfg.train, [])
    check_distill_has_lazy(cfg.train, [1])


def test_the_windows_former_name_is_read_with_a_deprecation_message(capsys):
    from lt_train.train.config import validate

    cfg = _compose(["lazy.layers=null", "lazy.recent_tokens=32"])
    validate(cfg, 1)
    assert cfg.lazy.window == 32 and cfg.lazy.recent_tokens is None
    assert "lazy.recent_tokens is deprecated: it is now lazy.window" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_zero3_selects_evaluates_and_exports_without_gathering_more_than_a_layer(tmp_path, mode):
    """Two ZeRO-3 processes with `nll` selection (3 samples and 5 layers shared unevenly over 2 ranks) and
    validation on (held-out NLL and demo answers: 3 rows and 3 batches), against one plain process with the same
    rows per step: the same selection statistics, the same evaluations before and after training, and an
    exported model with the same logits, and the same per-step losses on training rows of different lengths
    (every rank pads to pack_length for the head's chunks). With no parameter kept gathered, every module call
    is a collective: ranks out of step hang. No rank ever holds more parameter elements gathered at once than
    one decoder layer has (counted around every `GatheredParameters`); before, selection and the evaluations
    gathered the whole model on every rank, and the export gathered all trainable weights."""
    from lt_train import load_hybrid
    from lt_train.models import tiny_model, tiny_tokenizer

    ckpt = tmp_path / "tiny"  # a checkpoint, so zero.Init loads the same weights as the plain process
    tiny_model("llama", num_layers=5).save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    # rows of 1690, 1805 and 2200 tokens: two or three LM-head chunks per row
    common = [f"model={ckpt}", f"train={mode}", "train.max_steps=3", "train.save_every=0", "train.lr=1e-3",
              "data.max_length=2200", "train.pack_length=2300", "lazy.layers=null", "lazy.strategy=nll", "lazy.num_lazy=2", "lazy.max_samples=3", "lazy.nll_samples=3",
              "validation.heldout=3", "validation.accuracy_problems=3", "validation.batch_size=1",
              "validation.max_new_tokens=12"]
    _ok(run_train(tmp_path / "plain", common + ["train.grad_accum=2"]))
    probe = tmp_path / "probe"
    probe.mkdir()
    env = {"LT_GATHER_PROBE": str(probe), "PYTHONPATH": os.pathsep.join(
        [os.path.join(ROOT, "tests", "fixtures", "gather_probe"), os.environ.get("PYTHONPATH", "")])}
    # every parameter partitioned (no small ones kept gathered), so every module call is a gather
    _ok(run_train(tmp_path / "z3", common + ["deepspeed=zero3", "train.grad_accum=1",
                                             "deepspeed.param_persistence_threshold=0"], nproc=2, env=env,
                  timeout=300))  # ranks out of step hang at a gather

    def results(d):
        with open(d / "summary.json", encoding="utf-8") as f:
            return json.load(f)["results"]
    def selection(d):
        with open(d / "lazy_layers.json", encoding="utf-8") as f:
            return json.load(f)
    assert selection(tmp_path / "z3")["delta_nll"] == pytest.approx(selection(tmp_path / "plain")["delta_nll"],
                                                                    rel=1e-5, abs=1e-7)
    assert selection(tmp_path / "z3")["lazy_layers"] == selection(tmp_path / "plain")["lazy_layers"]
    assert losses(tmp_path / "z3") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    plain, z3 = results(tmp_path / "plain"), results(tmp_path / "z3")
    assert set(z3) == {"full, before", "hybrid, before", "full, after", "hybrid, after"}
    for k in plain:
        assert z3[k]["heldout_nll"] == pytest.approx(plain[k]["heldout_nll"], abs=2e-4), k
        assert z3[k]["demo_accuracy"] == plain[k]["demo_accuracy"], k
    x = torch.randint(3, 128, (2, 300))
    with torch.no_grad():
        want = load_hybrid(str(tmp_path / "plain" / "model"))(x).logits
        got = load_hybrid(str(tmp_path / "z3" / "model"))(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    layer = sum(p.numel() for p in tiny_model("llama").model.layers[0].parameters())
    for rank in (0, 1):
        with open(probe / f"rank{rank}.json", encoding="utf-8") as f:
            seen = json.load(f)
        assert seen["gathers"] > 10, seen  # the export gathered module by module
        assert 0 < seen["max_gathered"] <= layer, (rank, seen, layer)


def test_two_nodes_with_their_own_caches_train_like_one_node_and_resume_a_preempted_run_exactly(tmp_path):
    """Two torchrun "nodes" of one process each (c10d rendezvous on this machine), ZeRO-3, each node's local rank
    0 building the tokenised data in its own cache_dir: the losses of one node with two processes. SIGTERM to
    node 0 during step 2 stops both nodes after that step with a checkpoint; the rerun repeats the losses."""
    from lt_train.models import tiny_model, tiny_tokenizer
    from lt_train.train.preemption import PREEMPTED_EXIT

    ckpt = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    args = [f"model={ckpt}", "deepspeed=zero3", "train=full", "train.lr=1e-3", "train.max_steps=3",
            "train.save_every=0", "validation.enabled=false"]
    _ok(run_train(tmp_path / "one", args, nproc=2))
    caches = [tmp_path / "cache0", tmp_path / "cache1"]
    for node in run_two_nodes(tmp_path / "two", args, caches):
        _ok(node)
    assert all(any(c.iterdir()) for c in caches)  # each node built its own
    one = losses(tmp_path / "one")
    assert losses(tmp_path / "two") == pytest.approx(one, rel=1e-6)
    stopped = run_two_nodes(tmp_path / "pre", args, caches, faults={"signal_at_step": 2})
    assert all(n.returncode != 0 for n in stopped)
    assert f"exitcode  : {PREEMPTED_EXIT}" in stopped[0].stderr + stopped[1].stderr
    assert sorted(losses(tmp_path / "pre")) == [1, 2]
    for node in run_two_nodes(tmp_path / "pre", args, caches):
        _ok(node)
    assert losses(tmp_path / "pre") == pytest.approx(one, rel=1e-6)


@pytest.mark.parametrize("epochs,max_steps,per_step", [(1, 30, 1), (2, 30, 1), (3, 7, 4), (2, None, 3)])
def test_the_schedule_holds_a_row_for_every_step_of_every_rank(epochs, max_steps, per_step):
    """More steps than the configured epochs hold: the rows go on cycling through whole new epochs (each a
    reshuffle of the same packing), so every step finds its rows; with train.epochs alone, whole steps only."""
    from omegaconf import OmegaConf

    from lt_train.train.loop import schedule_rows

    lengths = [300, 700, 200, 900, 400, 500, 100, 800, 650, 350] * 2  # 10 rows of 1000 tokens per epoch
    tr = OmegaConf.create({"epochs": epochs, "max_steps": max_steps, "pack_length": 1000})
    rows, steps = schedule_rows(tr, lengths, 0, per_step)
    assert steps == (max_steps or (10 * epochs) // per_step)
    assert len(rows) >= steps * per_step and len(rows) % 10 == 0
    one = sorted(map(sorted, rows[:10]))
    assert all(sorted(map(sorted, rows[e * 10:(e + 1) * 10])) == one for e in range(len(rows) // 10))


@pytest.mark.parametrize("lora", [False, True])
def test_the_export_writes_shards_that_load_as_peft_merges_them_and_replaces_an_older_export(tmp_path, lora):
    """write_model with 40 KB shards (several files and transformers' index) into a folder that holds an older
    single-file export: transformers loads exactly the model's weights (LoRA: what peft's merge_and_unload gives),
    and nothing of the older export is left to shadow them."""
    import copy

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from lt_train.models import tiny_model, tiny_tokenizer
    from lt_train.train.final_weights import saved_names, write_model

    model = tiny_model("qwen2")  # q/k/v biases, untied head
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
        reference = copy.deepcopy(model).merge_and_unload()
    else:
        reference = model
    out = tmp_path / "model"
    out.mkdir()
    save_file({"model.norm.weight": torch.zeros(64)}, str(out / "model.safetensors"))  # an older export
    write_model(model, str(out), 0, 0, zero3=False, tokenizer=tiny_tokenizer(), shard_bytes=40_000)
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) > 3 and "tokenizer.json" in files
    assert not [p for p in tmp_path.iterdir() if p.name != "model"]  # no partial or old folder left
    want = reference.state_dict()
    assert saved_names(str(out)) == sorted(want)
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)


def test_a_lora_run_can_save_the_adapter_alone(tmp_path):
    from peft import PeftModel

    from lt_train.models import tiny_model

    _ok(run_train(tmp_path, ["train=lora", "train.max_steps=1", "train.save_every=0", "validation.enabled=false",
                             "train.save_merged=false"]))
    assert not (tmp_path / "model").exists() and (tmp_path / "adapter" / "adapter_config.json").exists()
    PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "adapter"))  # loads onto the base


GROUP_TIMEOUT = r"""
import datetime, sys, torch, torch.distributed as dist
from lt_train.distributed import set_group_timeout
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1,
                        timeout=datetime.timedelta(minutes=77))
before = dist.new_group([0])  # as DeepSpeed makes its groups: no timeout of their own
set_group_timeout(datetime.timedelta(minutes=77))
after = dist.new_group([0])
print([g._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60 for g in (before, after)])
"""


def test_groups_created_after_start_up_wait_as_long_as_the_world_group(tmp_path):
    """DeepSpeed creates its ZeRO and sequence-parallel groups with new_group(ranks): without set_group_timeout
    they would wait torch's default (30 min gloo, 10 min NCCL), not distributed.timeout_minutes."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", GROUP_TIMEOUT, str(tmp_path / "store")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after == 77 and before != 77  # the control: a group made before the call keeps torch's default
