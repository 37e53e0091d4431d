"""Self-distillation (`train.objective=distill`): the loss against a dense reference built from a separate copy of
the original model, its gradient, the teacher's settings, and equal losses on one and on two processes."""
import copy
import json

import pytest
import torch

from lt_train.distill import DistillSettings, teacher_states
from lt_train.hybrid import HybridConfig, convert_to_hybrid
from lt_train.models import tiny_model
from lt_train.train.config import distill_settings
from lt_train.train.loop import token_loss_sum


def _lora(model, seed=1):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                         target_modules=["q_proj", "v_proj", "gate_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # adapters that change the model (B = 0 at initialisation would change nothing)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _row(T=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (1, T), generator=g)
    labels = ids.clone()
    labels[:, :20] = -100  # a prompt without targets
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T)[None]}


def _dense_reference(original, student, row, s: DistillSettings):
    """KL summed over target tokens from full logits: the teacher a separate copy of the original model (no
    streaming, no adapters), the student the hybrid; written out position by position."""
    with torch.no_grad():
        t_logits = original(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0].double()
    q_logits = student(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0].double()
    total = 0.0
    for i in range(row["input_ids"].shape[1] - 1):
        if row["labels"][0, i + 1] == -100:
            continue
        p = torch.softmax(t_logits[i] / s.temperature, -1)
        q = torch.softmax(q_logits[i] / s.temperature, -1)
        if s.top_k:  # both distributions on the teacher's k most likely tokens, each renormalised there
            keep = torch.argsort(p, descending=True)[: s.top_k]
            p, q = p[keep] / p[keep].sum(), q[keep] / q[keep].sum()
        total = total + (p * (p.log() - q.log())).sum()
    return total * s.temperature ** 2


@pytest.mark.parametrize("settings", [DistillSettings(), DistillSettings(2.0, 0), DistillSettings(1.0, 5)])
def test_distillation_loss_and_gradient_equal_a_dense_reference_with_a_separate_teacher(settings):
    original = tiny_model("qwen2", 4, seed=0)
    student = _lora(convert_to_hybrid(copy.deepcopy(original), HybridConfig([1, 2], 2, 8)))
    row = _row()
    got = token_loss_sum(student, dict(row), distill=settings)
    got.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}
    student.zero_grad()
    want = _dense_reference(original, student, row, settings)
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-4) and want.item() > 1e-3
    for n, p in student.named_parameters():
        if p.requires_grad:
            assert torch.allclose(grads[n], p.grad.float(), rtol=1e-3, atol=1e-7), n


@pytest.mark.parametrize("settings", [DistillSettings(), DistillSettings(2.0, 0), DistillSettings(1.0, 5)])
def test_distillation_loss_and_gradient_are_zero_when_the_student_is_the_teacher(settings):
    """No lazy layer and LoRA as initialised (B = 0): the student is the original model, so the loss and its
    gradient vanish, whatever the temperature and top-k; with lazy layers they do not."""
    row = _row()
    fresh = _lora(convert_to_hybrid(tiny_model("llama", 4), HybridConfig([], 2, 8)), seed=2)
    for n, p in fresh.named_parameters():
        if "lora_B" in n:
            torch.nn.init.zeros_(p)
    loss = token_loss_sum(fresh, dict(row), distill=settings)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert all(p.grad.abs().max() < 1e-6 for p in fresh.parameters() if p.requires_grad)
    lazy = convert_to_hybrid(tiny_model("llama", 4), HybridConfig([1, 3], 2, 8))
    assert token_loss_sum(lazy, dict(row), distill=settings).item() > 1e-3


def test_the_teacher_is_the_original_model_and_the_hybrid_comes_back_after_it():
    original = tiny_model("llama", 4)
    student = _lora(convert_to_hybrid(copy.deepcopy(original), HybridConfig([1, 3], 2, 8)))
    row = {k: v for k, v in _row().items() if k != "labels"}
    before = student(**row).logits
    with torch.no_grad():
        want = original.model(**row).last_hidden_state
    assert torch.allclose(teacher_states(student, row), want, atol=1e-5)
    assert torch.equal(student(**row).logits, before)  # streaming and adapters are back


def test_distillation_settings_are_checked():
    from omegaconf import OmegaConf

    def tr(**kw):
        return OmegaConf.create({"mode": "lora", "objective": "distill", **kw})

    assert distill_settings(OmegaConf.create({"mode": "full"})) is None
    assert distill_settings(tr(distill={"temperature": 2, "top_k": 50})) == DistillSettings(2.0, 50)
    with pytest.raises(ValueError, match="train.objective must be one of"):
        distill_settings(tr(objective="kd"))
    with pytest.raises(ValueError, match="needs train=lora"):
        distill_settings(tr(mode="full"))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill_settings(tr(distill={"temperature": 0}))
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        distill_settings(tr(distill={"top_k": -1}))
    with pytest.raises(ValueError, match="top_k must be an integer >= 0"):
        distill_settings(tr(distill={"top_k": 2.5}))
    with pytest.raises(ValueError, match="applies to train.objective=distill"):
        distill_settings(OmegaConf.create({"mode": "lora", "objective": "sft", "distill": {"top_k": 50}}))


def _log(d):
    return [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_distill_with_the_losses_of_one(tmp_path, monkeypatch, stage):
    """The same rows per step on one process (grad_accum=2) and on two DeepSpeed processes (one row each):
    equal per-step distillation losses and gradient norms (ZeRO-3: the teacher forward gathers the partitioned
    weights, the tiled head makes both models' logits shard by shard). The model comes from a saved checkpoint:
    a tiny model built in code under zero.Init would draw other random weights."""
    import train_helpers
    from lt_train.models import tiny_tokenizer

    ckpt = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    monkeypatch.setattr(train_helpers, "TINY", [a for a in train_helpers.TINY if not a.startswith("model=")]
                        + [f"model={ckpt}"])
    common = ["train=lora", "train.objective=distill", "train.max_steps=3", "train.save_every=0",
              "validation.enabled=false", "train.lr=2e-3"]
    plain = train_helpers.run_train(tmp_path / "plain", common + ["train.grad_accum=2"])
    assert plain.returncode == 0, plain.stderr[-3000:]
    extra = ["deepspeed.param_persistence_threshold=0"] if stage == "zero3" else []  # every weight partitioned
    two = train_helpers.run_train(tmp_path / stage, common + [f"deepspeed={stage}", "train.grad_accum=1"] + extra, nproc=2)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = _log(tmp_path / "plain"), _log(tmp_path / stage)
    assert len(a) == len(b) == 3 and a[0]["loss"] > 1e-4  # lazy layers [1, 3]: the hybrid starts away from it
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
