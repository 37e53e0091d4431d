"""DeepSpeed ZeRO-2 / ZeRO-3, LoRA and full, under `torchrun --nproc_per_node=2` on CPU (gloo): the loss
decreases, a checkpoint written mid-run resumes to the same per-step losses as an uninterrupted run, and
the exported model loads with `load_hybrid`. Slow (about a minute per combination): marked `slow`."""
import json

import pytest

from lt_train import load_hybrid
from train_helpers import learns_and_resumes_exactly, losses, run_train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_deepspeed_two_processes_learn_and_resume_exactly(tmp_path, stage, mode):
    lr = "train.lr=1e-3" if mode == "full" else "train.lr=2e-3"
    args = [f"deepspeed={stage}", f"train={mode}", lr, "train.max_steps=6", "train.save_every=2"]
    learns_and_resumes_exactly(tmp_path, args, nproc=2)
    model = load_hybrid(str(tmp_path / "a" / "model"))
    assert model.config.lt_hybrid["lazy_layers"] == [1, 3]


def test_zero3_cpu_offload_with_bf16(tmp_path):
    proc = run_train(tmp_path, ["deepspeed=zero3_offload", "train=full", "train.lr=1e-3", "train.bf16=true",
                                "train.max_steps=4", "train.save_every=2", "validation.enabled=false"], nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # read from DeepSpeed's own objects after initialize (engine.placement). The tiny model's config says float32:
    # DeepSpeed would train that partition in fp32 under ZeRO-3 (it casts no zero.Init weights), so train.bf16
    # loads the weights in bfloat16
    out = proc.stdout + proc.stderr
    assert "weights load in bfloat16 (model.dtype=float32 set aside" in out
    assert ("DeepSpeed ZeRO-3: parameters torch.bfloat16, optimizer state offloaded to cpu "
            "(DeepSpeedZeroOptimizer_Stage3)") in out
    ls = losses(tmp_path)
    assert len(ls) == 4 and ls[4] < ls[1]
    assert load_hybrid(str(tmp_path / "model")).config.lt_hybrid["lazy_layers"] == [1, 3]


@pytest.mark.parametrize("mode,tied,per_rank", [("full", False, 1), ("lora", False, 1), ("full", True, 1),
                                                ("full", False, 2), ("full", True, 2)])
def test_zero3_loads_partitioned_and_its_tiled_loss_equals_the_plain_engine(tmp_path, monkeypatch, mode, tied,
                                                                            per_rank):
    """Two ZeRO-3 processes (the model built inside zero.Init from a saved checkpoint, the LM head through
    DeepSpeed's tiled loss) against one plain process with the same rows per step: equal per-step losses and
    gradient norms, and each rank holds half of the model after loading. `tied`: the head shares the input
    embedding's weight (SmolLM2, Qwen2.5-1.5B), whose gradient comes from both ends of the model. `per_rank=2`:
    gradient accumulation over two rows per process (a forward that bypassed engine.forward kept only the last
    micro-step's gradient under ZeRO-3)."""
    import re

    import train_helpers
    from lt_train.models import tiny_model, tiny_tokenizer

    ckpt = tmp_path / "tiny"
    tiny_model("llama", tie_word_embeddings=tied).save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    monkeypatch.setattr(train_helpers, "TINY", [a for a in train_helpers.TINY if not a.startswith("model=")]
                        + [f"model={ckpt}"])
    common = [f"train={mode}", "train.max_steps=3", "train.save_every=0", "validation.enabled=false",
              "train.lr=1e-3"]  # LoRA keeps its dropout (0.05): masks are drawn per packed row, not per rank
    plain = train_helpers.run_train(tmp_path / "plain", common + [f"train.grad_accum={2 * per_rank}"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    z3 = train_helpers.run_train(tmp_path / "z3", common + ["deepspeed=zero3", f"train.grad_accum={per_rank}"],
                                 nproc=2)
    assert z3.returncode == 0, z3.stdout[-3000:] + z3.stderr[-3000:]
    shares = re.findall(r"rank (\d): holds ([\d.]+)% of the model", z3.stdout)
    assert sorted(r for r, _ in shares) == ["0", "1"] and all(abs(float(s) - 50) < 1 for _, s in shares)

    def log(d):
        return [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]

    for a, b in zip(log(tmp_path / "plain"), log(tmp_path / "z3"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_preemption_of_one_rank_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    """ZeRO-2, two processes: rank 0 alone gets SIGTERM during step 3 (save_every=4); both ranks finish the step,
    write checkpoint 3 together and exit; the rerun repeats the uninterrupted run's losses."""
    args = ["deepspeed=zero2", "train=lora", "train.lr=2e-3", "train.max_steps=5", "train.save_every=4",
            "validation.enabled=false"]
    a = run_train(tmp_path / "a", args, nproc=2)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    pre = run_train(tmp_path / "b", args, nproc=2, faults={"signal_at_step": 3})
    assert pre.returncode != 0 and "preempted at step 3" in pre.stdout, pre.stdout[-3000:] + pre.stderr[-3000:]
    assert "exitcode  : 143" in pre.stderr, pre.stderr[-3000:]  # torchrun's report of the ranks' exit code
    ck = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_0000003"]
    assert {p.name for p in (ck / "step_0000003").iterdir()} >= {"rng_rank0.pt", "rng_rank1.pt", "trainer_state.json"}
    resumed = run_train(tmp_path / "b", args, nproc=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in range(1, 6):
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6)


def test_two_zero2_processes_log_the_losses_of_one_process_with_dropout_and_checkpointing(tmp_path):
    """The same rows per step on one process (grad_accum=2) and on two ZeRO-2 processes (one row each), LoRA with
    its default dropout and gradient checkpointing on: equal per-step losses and gradient norms. Dropout masks
    come from a stream seeded by (train.seed, packed row), so which rank runs a row does not matter; before,
    each rank drew from its own stream and the losses differed from step 2 on."""
    common = ["train=lora", "train.max_steps=3", "train.save_every=0", "validation.enabled=false", "train.lr=2e-3",
              "train.gradient_checkpointing=true"]
    plain = run_train(tmp_path / "plain", common + ["train.grad_accum=2"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    z2 = run_train(tmp_path / "z2", common + ["deepspeed=zero2", "train.grad_accum=1"], nproc=2)
    assert z2.returncode == 0, z2.stdout[-3000:] + z2.stderr[-3000:]

    def log(d):
        return [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]

    a, b = log(tmp_path / "plain"), log(tmp_path / "z2")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
