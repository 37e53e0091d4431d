"""The training job on one process: learning, exact resume, export, tracking, and config errors."""
import json
import os
import signal

import pytest
import torch

from lt_train import load_hybrid
from train_helpers import losses, run_train


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _same_losses(run_a, run_b, steps):
    a, b = losses(run_a), losses(run_b)
    for step in steps:
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    _ok(run_train(out, ["train=full", "train.lr=1e-3", "train.max_steps=8", "train.save_every=4"]))
    return out


def test_loss_decreases_and_summary_is_written(full_run):
    ls = losses(full_run)
    assert len(ls) == 8 and ls[8] < ls[1] - 0.1
    summary = json.loads((full_run / "summary.json").read_text())
    assert set(summary["results"]) == {"full, before", "hybrid, before", "hybrid, after", "full, after"}
    assert summary["results"]["hybrid, after"]["heldout_nll"] < summary["results"]["hybrid, before"]["heldout_nll"]
    assert "| hybrid, after |" in (full_run / "summary.md").read_text()


def test_learning_rate_follows_linear_warmup_then_cosine_to_zero(full_run):
    """The logged learning rate of each step against the schedule written out by hand: lr 1e-3, 8 steps,
    warmup_ratio 0.1 (int(0.8) = 0 warmup steps, so the cosine starts at the peak)."""
    import math

    logged = [json.loads(line)["lr"] for line in (full_run / "train_log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)], rel=1e-9)
    from lt_train.train.loop import lr_lambda

    f = lr_lambda(3, 10)  # with warmup: 1/3, 2/3, 1 of the peak, then the cosine from the peak over 7 steps
    assert [f(s) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 7))])
    assert f(10) == pytest.approx(0.0, abs=1e-12)


def test_exported_model_is_the_trained_hybrid(full_run):
    model = load_hybrid(str(full_run / "model"))
    assert model.config.lt_hybrid["lazy_layers"] == [1, 3]
    from lt_train.train.evaluate import heldout_nll
    from lt_train.data.prepare import prepare
    from lt_train.models import tiny_tokenizer
    from lt_train.data.format import EncodedExample

    cfg = {"source": "demo", "name": "demo", "num_samples": 24, "seed": 0, "max_length": 1500,
           "length_policy": "truncate", "system_prompt": None}
    ds, _, _ = prepare(cfg, tiny_tokenizer(), "tiny", str(full_run / "cache"))
    held = [EncodedExample(torch.tensor(r["input_ids"]), torch.tensor(r["labels"])) for r in ds][-2:]
    summary = json.loads((full_run / "summary.json").read_text())
    hybrid_nll = heldout_nll(model, held)
    assert abs(hybrid_nll - summary["results"]["hybrid, after"]["heldout_nll"]) < 1e-3
    # the lazy layers matter here (W=64 on ~1500-token rows): the same weights without them score otherwise
    from lt_train import HybridConfig, set_lazy_layers

    set_lazy_layers(model, HybridConfig([], 4, 64))
    assert abs(heldout_nll(model, held) - hybrid_nll) > 1e-3
    assert abs(heldout_nll(model, held) - summary["results"]["full, after"]["heldout_nll"]) < 1e-3


def test_lora_export_is_the_base_with_the_trained_adapter_merged(tmp_path):
    """`model/` of a LoRA run equals the base model with `adapter/` loaded by peft, as the same hybrid; and the
    adapter did change the model."""
    from peft import PeftModel

    from lt_train import HybridConfig, convert_to_hybrid
    from lt_train.models import tiny_model

    _ok(run_train(tmp_path, ["train=lora", "train.max_steps=2", "train.save_every=0", "validation.enabled=false",
                             "train.lr=1e-2"]))
    exported = load_hybrid(str(tmp_path / "model")).eval()
    hc = HybridConfig([1, 3], 4, 64)
    base = tiny_model("llama", 4, 0)
    convert_to_hybrid(base, hc)
    ids = torch.randint(3, 100, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
        merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()(ids).logits
        after = exported(ids).logits
    torch.testing.assert_close(after, merged, atol=1e-5, rtol=1e-4)
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_killed_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path, mode):
    args = [f"train={mode}", "train.max_steps=6", "train.save_every=2", "validation.enabled=false"]
    _ok(run_train(tmp_path / "a", args))
    killed = run_train(tmp_path / "b", args, faults={"exit_after_step": 5})
    assert killed.returncode == 3  # stopped abruptly after step 5; the last checkpoint is step 4
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "step_0000004")
    resumed = run_train(tmp_path / "b", args)
    _ok(resumed)
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    _same_losses(tmp_path / "a", tmp_path / "b", (5, 6))


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    from lt_train.train import checkpoint as ckpt

    root = tmp_path / "ck"
    (root / ".partial-step_0000002").mkdir(parents=True)
    (root / ".partial-step_0000002" / "x").write_text("1")
    ckpt.publish(str(root), str(root / ".partial-step_0000002"), 2)
    (root / ".partial-step_0000004").mkdir()

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.publish(str(root), str(root / ".partial-step_0000004"), 4)
    monkeypatch.undo()
    assert ckpt.latest(str(root)).endswith("step_0000002")


def test_wandb_offline_run_holds_the_metrics(tmp_path):
    _ok(run_train(tmp_path, ["train.max_steps=3", "logging.wandb=true", "validation.enabled=false"],
                  env={"WANDB_MODE": "offline", "WANDB_API_KEY": ""}))
    from wandb_reader import logged_keys, run_file

    history, config = logged_keys(run_file(str(tmp_path)))
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_mb"} <= history
    assert "lazy_layers" in config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train=foo"], "Could not find 'train/foo'"),
        (["lazy.layers=[1,9]"], "out of range for a model with 4 layers"),
        (["data.source=jsonl", "+data.path=/nonexistent.jsonl"], "does not exist"),
        (["deepspeed=zero3", "train.gradient_checkpointing=true"], "ZeRO-3 with LoRA and gradient checkpointing"),
        (["+train.fp16=true"], "fp16 is not supported"),
        (["lazy.from_file=/nonexistent.json"], "lazy.from_file"),
    ],
)
def test_bad_config_fails_early_naming_the_problem(tmp_path, overrides, message):
    proc = run_train(tmp_path, overrides, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "train_log.jsonl").exists()


def test_config_errors_that_need_no_run():
    """`validate` (run before anything loads): several processes without DeepSpeed, no length of training."""
    from hydra import compose, initialize_config_dir

    from lt_train.train.config import validate

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf"),
                               version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny"])
        no_length = compose("train", overrides=["model=tiny", "train.max_steps=null", "train.epochs=null"])
    validate(cfg, 1)
    with pytest.raises(ValueError, match="2 processes need DeepSpeed: add deepspeed=zero2"):
        validate(cfg, 2)
    with pytest.raises(ValueError, match="set train.max_steps or train.epochs"):
        validate(no_length, 1)


def test_epochs_repeat_every_packed_row_once_in_a_new_seeded_order():
    from lt_train.train.loop import plan_rows

    lengths = [300, 700, 200, 900, 400, 500, 100, 800] * 3
    rows = plan_rows(lengths, 1000, seed=0, epochs=3)
    n = len(rows) // 3
    epochs = [rows[i * n:(i + 1) * n] for i in range(3)]
    assert all(sorted(map(sorted, e)) == sorted(map(sorted, epochs[0])) for e in epochs)  # same rows each epoch
    assert sorted(i for row in epochs[0] for i in row) == list(range(len(lengths)))  # every example once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled
    assert plan_rows(lengths, 1000, seed=0, epochs=3) == rows and plan_rows(lengths, 1000, 1, 3) != rows


def test_step_loss_is_normalised_by_target_tokens_not_by_batches():
    """Two micro-batches with different numbers of target tokens: the accumulated gradient equals the gradient
    of (all token losses) / (all target tokens), which a mean of per-batch means would not give."""
    from lt_train.data import demo_examples, encode_example
    from lt_train.data.collate import collate_packed
    from lt_train.models import tiny_model, tiny_tokenizer
    from lt_train.train.loop import token_loss_sum

    tok = tiny_tokenizer()
    enc = [encode_example(tok, e, max_length=n) for e, n in zip(demo_examples(2), (1500, 1000))]
    batches = [collate_packed([[e]], tok.pad_token_id) for e in enc]
    counts = [b.num_target_tokens for b in batches]
    assert counts[0] != counts[1]

    def grads(loss_fn):
        model = tiny_model("llama")
        loss_fn(model).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def ours(model):  # what the training loop does: per micro-batch sum / global count, accumulated
        return sum(token_loss_sum(model, b.model_inputs()) / sum(counts) for b in batches)

    def reference(model):
        losses = [model(**b.model_inputs()).loss for b in batches]  # transformers: mean per batch
        return sum(l * n for l, n in zip(losses, counts)) / sum(counts)

    def mean_of_means(model):
        return sum(model(**b.model_inputs()).loss for b in batches) / len(batches)

    g = grads(ours)
    torch.testing.assert_close(g, grads(reference), atol=1e-6, rtol=1e-4)
    assert (g - grads(mean_of_means)).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    args = ["train=full", "train.max_steps=3", "train.save_every=0", "validation.enabled=false"]
    _ok(run_train(tmp_path / "a", args))
    _ok(run_train(tmp_path / "b", args + ["train.gradient_checkpointing=true"]))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a.keys() == b.keys() == {1, 2, 3}
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_gradient_checkpointing_recomputes_every_layer_and_replays_dropout(mode):
    """What the trainer's `train.gradient_checkpointing` sets up (`_wrap_trainable`) really recomputes: each
    decoder layer runs twice per forward + backward (once without), and the recomputation replays the dropout
    masks of the row's seed, so LoRA's gradients (dropout 0.5 here) equal the run without checkpointing."""
    from omegaconf import OmegaConf

    from lt_train.models import tiny_model
    from lt_train.train.loop import _wrap_trainable, row_seed

    def run(gc: bool):
        cfg = OmegaConf.create({"train": {"mode": mode, "gradient_checkpointing": gc, "lora": {
            "r": 4, "alpha": 8, "dropout": 0.5, "target_modules": ["q_proj", "v_proj", "down_proj"]}}})
        model = _wrap_trainable(cfg, tiny_model("llama", num_layers=2))
        model.train()
        calls = []
        for layer in model.get_base_model().model.layers if mode == "lora" else model.model.layers:
            # inside the layer (transformers checkpoints `forward`, keeping the layer's own hooks outside), and a
            # pre-hook: the recomputation stops as soon as the last saved tensor is rebuilt, inside the MLP
            layer.mlp.register_forward_pre_hook(lambda *a: calls.append(1))
        ids = torch.randint(5, 100, (1, 40), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(row_seed(0, 7))
        model(input_ids=ids, labels=ids).loss.backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    (plain_calls, plain), (gc_calls, gc) = run(False), run(True)
    assert plain_calls == 2 and gc_calls == 4
    assert plain.keys() == gc.keys()
    for n in plain:
        torch.testing.assert_close(gc[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)


def test_row_seed_depends_on_the_seed_and_row_only():
    from lt_train.train.loop import row_seed

    assert row_seed(0, 5) == row_seed(0, 5) and len({row_seed(0, r) for r in range(100)}) == 100
    assert row_seed(1, 5) != row_seed(0, 5) and 0 <= row_seed(0, 5) < 2**63


def test_preempted_run_checkpoints_the_step_in_flight_and_resumes_exactly(tmp_path):
    """SIGTERM during step 3 (save_every=4, so no regular checkpoint there): the step finishes, step 3 is saved,
    the run exits with the preemption code; the rerun continues from step 3 to the uninterrupted losses."""
    from lt_train.train.preemption import PREEMPTED_EXIT

    args = ["train=lora", "train.max_steps=6", "train.save_every=4", "validation.enabled=false"]
    _ok(run_train(tmp_path / "a", args))
    pre = run_train(tmp_path / "b", args, faults={"signal_at_step": 3})
    assert pre.returncode == PREEMPTED_EXIT, pre.stdout[-2000:] + pre.stderr[-2000:]
    assert "preempted at step 3" in pre.stdout and "received SIGTERM" in pre.stderr
    assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["latest", "step_0000003"]
    assert max(losses(tmp_path / "b")) == 3  # the step in flight was finished and logged, no later one
    resumed = run_train(tmp_path / "b", args)
    _ok(resumed)
    assert "resumed from" in resumed.stdout and "step_0000003" in resumed.stdout
    _same_losses(tmp_path / "a", tmp_path / "b", range(1, 7))


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """keep_checkpoints=2 keeps steps 3 and 4 of a run saved every step and stopped after step 4; a truncated file
    in `latest` (step 4) is reported and step 3 resumes, to the losses of an uninterrupted run. With every
    checkpoint damaged: a clear error, not a fresh start."""
    args = ["train=lora", "train.save_every=1", "train.keep_checkpoints=2", "validation.enabled=false",
            "train.max_steps=5"]
    _ok(run_train(tmp_path / "a", args))
    assert run_train(tmp_path / "b", args, faults={"exit_after_step": 4}).returncode == 3
    root = tmp_path / "b" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_0000003", "step_0000004"]  # rotation
    f = root / "step_0000004" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    resumed = run_train(tmp_path / "b", args)
    _ok(resumed)
    assert "step_0000004 does not load" in resumed.stderr and "step_0000003 at step 3" in resumed.stdout
    _same_losses(tmp_path / "a", tmp_path / "b", (4, 5))
    for d in os.listdir(root):
        if d.startswith("step_"):
            (root / d / "trainer_state.json").unlink()
    failed = run_train(tmp_path / "b", args)
    assert failed.returncode != 0 and "no usable checkpoint" in failed.stderr


def test_a_full_disk_during_save_keeps_the_previous_checkpoint(tmp_path):
    import errno

    from lt_train.train import checkpoint as ckpt
    from lt_train.train.engine import save_checkpoint

    class Engine:
        rank, fail = 0, False

        def save(self, d):
            os.makedirs(d, exist_ok=True)
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            (tmp_path / "x").write_text("1")

    eng, root = Engine(), str(tmp_path / "ck")
    save_checkpoint(eng, root, 2, {"step": 2})
    eng.fail = True
    with pytest.raises(RuntimeError, match="step 4 could not be written .*No space left.*step_0000002 stays"):
        save_checkpoint(eng, root, 4, {"step": 4})
    assert ckpt.latest(root).endswith("step_0000002") and sorted(os.listdir(root)) == ["latest", "step_0000002"]


def test_keep_checkpoints_must_be_positive(tmp_path):
    proc = run_train(tmp_path, ["train.keep_checkpoints=0", "train.max_steps=1"])
    assert proc.returncode != 0 and "keep_checkpoints must be >= 1" in proc.stderr


def test_plain_engine_skips_a_non_finite_step_leaving_weights_optimizer_and_schedule_unchanged():
    import copy
    import math

    from lt_train.train.engine import PlainEngine

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    eng = PlainEngine(model, opt, sched, 1.0, 1)
    model(torch.randn(3, 4)).sum().backward()
    assert math.isfinite(eng.step())  # a real step first: the optimizer has state
    weights, state, lr = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), sched.get_last_lr()
    (model(torch.randn(3, 4)).sum() * float("nan")).backward()
    assert math.isnan(eng.step())
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = opt.state_dict()["state"]
    for i, s in state["state"].items():
        assert all(torch.equal(s[k], after[i][k]) for k in s)
    assert sched.get_last_lr() == lr and all(p.grad is None for p in model.parameters())


def _records(out_dir):
    with open(os.path.join(out_dir, "train_log.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_an_injected_nan_step_is_skipped_logged_and_the_run_goes_on(tmp_path):
    _ok(run_train(tmp_path, ["train=lora", "train.max_steps=4", "train.save_every=0", "validation.enabled=false"],
                  faults={"nan_at_step": 2}))
    recs = _records(tmp_path)
    assert recs[2]["skipped"] and recs[2]["skipped_total"] == 1 and recs[2]["loss"] != recs[2]["loss"]  # NaN
    # each record holds the rate its step used: the schedule did not advance on the skipped step 2
    assert recs[1]["lr"] != recs[2]["lr"] == recs[3]["lr"] != recs[4]["lr"]
    assert not recs[3]["skipped"] and all(recs[s]["loss"] == recs[s]["loss"] for s in (1, 3, 4))
    assert (tmp_path / "model").is_dir()


def test_an_absurd_learning_rate_stops_after_max_bad_steps_without_an_export(tmp_path):
    proc = run_train(tmp_path, ["train=full", "train.lr=1e12", "train.max_steps=8", "train.save_every=1",
                                "validation.enabled=false", "train.max_bad_steps=2"])
    assert proc.returncode != 0
    assert "2 steps in a row" in proc.stderr and "non-finite loss or gradient norm" in proc.stderr, proc.stderr[-2000:]
    assert "Last good checkpoint:" in proc.stderr and not (tmp_path / "model").exists()


def test_a_run_that_fails_leaves_the_signal_handlers_it_found(tmp_path):
    from lt_train.train.preemption import SIGNALS

    def mine(signum, frame):  # a handler of the program that calls the trainer
        pass
    before = {sig: signal.signal(sig, mine) for sig in SIGNALS}
    try:
        with pytest.raises(RuntimeError, match="2 steps in a row"):
            _in_process_run(tmp_path / "run", ["train=full", "train.lr=1e12", "train.max_steps=4",
                                               "validation.enabled=false", "train.max_bad_steps=2"], tmp_path / "c")
        assert all(signal.getsignal(sig) is mine for sig in SIGNALS)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class _Killed(BaseException):
    """A kill: not an Exception, so no `except Exception` in the trainer or DeepSpeed turns it into a clean exit."""


def _in_process_run(out, overrides, cache):
    from hydra import compose, initialize_config_dir

    from lt_train.train.loop import train
    from train_helpers import TINY

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf"),
                               version_base="1.3"):
        cfg = compose("train", overrides=TINY + list(overrides) + [f"output_dir={out}", f"cache_dir={cache}"])
    train(cfg)


def _kill_at(monkeypatch, target: int | None) -> list[str]:
    """Count the file-system operations of every checkpoint save (each write, rename and deletion, down to the
    single files `rmtree` unlinks) and, when `target` is given, kill the process at that operation of the save
    of step 3: a rename or deletion never happens; a write leaves half its bytes (a torn file)."""
    import safetensors.torch

    from lt_train.train import loop

    ops, active = [], [False]

    def kill_or_run(name, fn, write=False):
        def wrapped(*args, **kwargs):
            if not active[0]:
                return fn(*args, **kwargs)
            ops.append(name + "".join(f" {os.path.basename(a)}" for a in args[:2] if isinstance(a, str)))
            if len(ops) - 1 != target:
                return fn(*args, **kwargs)
            if write:  # the bytes before the kill reach the disk: torch.save(obj, path), save_file(tensors, path)
                fn(*args, **kwargs)
                os.truncate(args[1], os.path.getsize(args[1]) // 2)
            raise _Killed(ops[-1])
        return wrapped

    import builtins
    real_open = builtins.open

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if active[0] and isinstance(file, str) and any(c in mode for c in "wax"):
            ops.append(f"write {os.path.basename(file)}")
            if len(ops) - 1 == target:
                close = f.close

                def torn_close():
                    close()
                    os.truncate(file, os.path.getsize(file) // 2)
                    raise _Killed(ops[-1])
                f.close = torn_close  # the kill lands once the writer is done with the file
        return f

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(safetensors.torch, "save_file", kill_or_run("save_file", safetensors.torch.save_file, True))
    monkeypatch.setattr(torch, "save", kill_or_run("torch.save", torch.save, True))  # writes from C++, not open()
    for name in ("replace", "unlink", "rmdir", "remove"):
        monkeypatch.setattr(os, name, kill_or_run(f"os.{name}", getattr(os, name)))
    real_save = loop.save_checkpoint

    def save(engine, root, step, state, keep=2):
        active[0] = step == 3
        try:
            return real_save(engine, root, step, state, keep)
        finally:
            active[0] = False
    monkeypatch.setattr(loop, "save_checkpoint", save)
    return ops


def test_a_kill_at_any_operation_of_a_save_leaves_a_loadable_latest_and_resumes_exactly(tmp_path, monkeypatch):
    """A save (keep_checkpoints=2, so the save of step 3 also deletes step 1) is killed at each of its file-system
    operations in turn, on the same process: `latest` still names a complete checkpoint that loads, and the resumed
    run logs the losses of the uninterrupted one."""
    from safetensors.torch import load_file

    from lt_train.train import checkpoint as ckpt
    from lt_train.train.preemption import SIGNALS

    args = ["train=lora", "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=2",
            "validation.enabled=false"]
    ops = _kill_at(monkeypatch, None)
    _in_process_run(tmp_path / "a", args, tmp_path / "cache")
    reference = losses(tmp_path / "a")
    # the save of step 3: model, optimizer, rng, state written; renamed; `latest` written and renamed; step 1 deleted
    names = " | ".join(ops)
    for op in ("save_file", "torch.save optimizer.pt", "torch.save rng_rank0.pt", "write trainer_state.json",
               "os.replace .partial-step_0000003 step_0000003", "latest", "os.rmdir step_0000001"):
        assert op in names, names
    for target in range(len(ops)):
        run = tmp_path / f"kill{target}"
        _kill_at(monkeypatch, target)
        handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
        with pytest.raises(_Killed):
            _in_process_run(run, args, tmp_path / "cache")
        monkeypatch.undo()
        # the trainer puts the handlers it replaced back however its loop ends, a kill included
        assert {sig: signal.getsignal(sig) for sig in SIGNALS} == handlers
        root = str(run / "checkpoints")
        last = ckpt.latest(root)
        assert last is not None and os.path.basename(last) in ("step_0000002", "step_0000003"), (target, ops[target])
        state, _ = ckpt.read_state(last)
        assert state["step"] == int(last[-7:])
        load_file(os.path.join(last, "trainable.safetensors"))
        _in_process_run(run, args, tmp_path / "cache")
        resumed = losses(run)
        assert resumed.keys() == reference.keys()
        for step in reference:
            assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), (target, ops[target], step)
