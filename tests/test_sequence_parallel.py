"""Sequence parallelism (DeepSpeed Ulysses) on CPU with gloo: the same gradients, losses and resume as without it,
and clear errors for settings it cannot run."""
import json
import os
import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from train_helpers import ROOT, learns_and_resumes_exactly, run_train, torchrun

WORKER = os.path.join(ROOT, "tests", "sp_worker.py")


def _torchrun(nproc: int, args: list[str], timeout: int = 900):
    cmd = torchrun(nproc) + [WORKER] + args
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc, records


def _check(proc, records, expected: int):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(records) == expected
    for r in records:
        assert r["shards"] == r["world"] and r["T"] % r["world"] == 0
        assert r["loss_rel"] < 1e-5 and r["worst_grad_rel"] < 1e-4, r
        # the negative control: without the document mask, full layers would see the previous document
        assert r["leak_rel"] > 1e-4, r


def test_every_gradient_equals_the_unsharded_rows_on_all_four_architectures():
    """Two processes, one packed row each (documents of 45, 70, 30 tokens: both shard boundaries fall inside
    documents), two streaming layers with W=16: loss and every trainable parameter's gradient, LoRA and full."""
    proc, records = _torchrun(2, [])
    _check(proc, records, 8)
    assert {(r["arch"], r["mode"]) for r in records} == {
        (a, m) for a in ("llama", "qwen2", "qwen3", "mistral") for m in ("full", "lora")}


@pytest.mark.slow
def test_four_way_split_replicates_key_value_heads():
    """N=4 with 2 KV heads: DeepSpeed replicates each KV head on two processes."""
    proc, records = _torchrun(4, ["--archs", "qwen2"])
    _check(proc, records, 2)


@pytest.mark.slow
def test_smollm2_three_way():
    """SmolLM2-135M has 9 query / 3 KV heads, so N=3 (N=2 divides neither): LoRA on a 1050-token packed row."""
    proc, records = _torchrun(3, ["--archs", "smollm2", "--modes", "lora", "--lengths", "300,500,250",
                                  "--window", "64"], timeout=1500)
    _check(proc, records, 1)


# ---------------------------------------------------------------------------------------------------------
# The trainer: train.sequence_parallel=2 against one process with the same rows per step


def _log(d):
    return [json.loads(line) for line in (d / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A saved tiny model: under ZeRO-3 it is built inside zero.Init, so random initialisation would differ."""
    from lt_train.models import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def _same_steps(a, b):
    for x, y in zip(_log(a), _log(b), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("stage,mode,global_batch", [("zero2", "full", 2), ("zero3", "lora", 4)])
def test_trainer_with_two_way_sequence_parallelism_equals_one_process(tmp_path, tiny_ckpt, stage, mode,
                                                                     global_batch):
    """Per-step losses and gradient norms (the norm of every trainable gradient together) equal one plain
    process's; global_batch=4 gives each process two rows per step, so the group runs four shards per step."""
    common = [f"model={tiny_ckpt}", f"train={mode}", "train.max_steps=3", "train.save_every=0",
              "validation.enabled=false", "train.lr=1e-3", f"train.global_batch={global_batch}"]
    common += ["train.lora.dropout=0"] if mode == "lora" else []
    plain = run_train(tmp_path / "plain", common)
    assert plain.returncode == 0, plain.stderr[-3000:]
    sp = run_train(tmp_path / "sp", common + [f"deepspeed={stage}", "train.sequence_parallel=2"], nproc=2)
    assert sp.returncode == 0, sp.stdout[-3000:] + sp.stderr[-3000:]
    _same_steps(tmp_path / "plain", tmp_path / "sp")


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_way_sequence_times_two_way_data_parallel(tmp_path, tiny_ckpt, stage):
    """Four processes: two groups of two, each group on its own rows."""
    common = [f"model={tiny_ckpt}", "train=full", "train.max_steps=2", "train.save_every=0",
              "validation.enabled=false", "train.lr=1e-3", "train.global_batch=4"]
    assert run_train(tmp_path / "plain", common).returncode == 0
    sp = run_train(tmp_path / "sp", common + [f"deepspeed={stage}", "train.sequence_parallel=2"], nproc=4)
    assert sp.returncode == 0, sp.stdout[-3000:] + sp.stderr[-3000:]
    _same_steps(tmp_path / "plain", tmp_path / "sp")


@pytest.mark.slow
def test_sequence_parallel_run_learns_exports_and_resumes_exactly(tmp_path):
    args = ["deepspeed=zero2", "train=full", "train.lr=1e-3", "train.max_steps=6", "train.save_every=2",
            "train.sequence_parallel=2"]
    learns_and_resumes_exactly(tmp_path, args, nproc=2)  # rank 0 evaluates, unsharded


# ---------------------------------------------------------------------------------------------------------
# Settings it cannot run: errors that name the setting, before any weights load


def _cfg(**train):
    base = OmegaConf.load(os.path.join(ROOT, "conf", "train.yaml"))
    cfg = OmegaConf.create({
        "model": {"name": "tiny", "arch": "llama", "num_layers": 4, "attn_implementation": "sdpa"},
        "train": {**OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "train", "full.yaml"))),
                  **base.train, "pack_length": 1600, "sequence_parallel": 2},
        "deepspeed": {"stage": 2},
        "lazy": {**OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf", "lazy", "default.yaml"))),
                 "layers": None, "from_file": None},
        "data": {"source": "demo"}})
    cfg.train.update(train)
    return cfg


@pytest.mark.parametrize("world,train,model,message", [
    (3, {}, {}, "does not divide the 3 processes"),
    (3, {"sequence_parallel": 3, "pack_length": 1599}, {}, "does not divide the model's 4 attention heads"),
    (2, {"pack_length": 1601}, {}, "train.pack_length=1601 is not divisible by train.sequence_parallel=2"),
    (2, {}, {"attn_implementation": "eager"}, "model.attn_implementation='eager'"),
    (2, {"sequence_parallel": 0}, {}, "train.sequence_parallel must be >= 1"),
])
def test_settings_ulysses_cannot_run_are_refused_by_name(world, train, model, message):
    from lt_train.train.config import validate

    cfg = _cfg(**train)
    cfg.model.update(model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg, world)


def test_key_value_heads_that_neither_divide_nor_are_divided_are_refused():
    from lt_train import sequence_parallel
    from lt_train.models import tiny_config

    cfg = tiny_config("qwen2", num_attention_heads=12, num_key_value_heads=4)
    sequence_parallel.check(4, 4, cfg, "sdpa", 1600, 3)  # 4 KV heads over 4 processes: fine
    with pytest.raises(ValueError, match="the model's 4 key-value heads"):
        sequence_parallel.check(6, 6, cfg, "sdpa", 1800, 3)
    with pytest.raises(ValueError, match="architecture 'gpt2' cannot be sharded"):
        from transformers import AutoConfig

        sequence_parallel.check(2, 2, AutoConfig.for_model("gpt2"), "sdpa", 1600, 3)
    with pytest.raises(ValueError, match="needs DeepSpeed"):
        sequence_parallel.check(2, 2, cfg, "sdpa", 1600, 0)


def test_packed_rows_are_padded_to_a_multiple_with_a_loss_free_document():
    from lt_train.data.collate import collate_packed
    from lt_train.data.format import EncodedExample

    docs = [EncodedExample(torch.arange(5, 12), torch.arange(5, 12)), EncodedExample(torch.arange(20, 26),
                                                                                      torch.arange(20, 26))]
    b = collate_packed([docs], pad_id=0, multiple=4)
    assert b.input_ids.shape == (1, 16)
    assert b.position_ids[0].tolist() == list(range(7)) + list(range(6)) + [0, 1, 2]
    assert (b.labels[0, 13:] == -100).all() and b.num_target_tokens == 6 + 5
    assert collate_packed([docs], pad_id=0).input_ids.shape == (1, 13)


def test_full_layers_document_mask_equals_transformers_and_is_shared_by_the_layers():
    """Under Ulysses the full layers rebuild the packed rows' mask from the gathered positions: it must be the
    mask transformers builds for the same positions, and one tensor for all layers of a forward."""
    from transformers.masking_utils import create_causal_mask

    from lt_train.hybrid import _packed_causal_mask
    from lt_train.models import tiny_config

    cfg = tiny_config("llama")
    cfg._attn_implementation = "sdpa"
    pos = torch.cat([torch.arange(5), torch.arange(7), torch.arange(3)])[None]
    ref = create_causal_mask(config=cfg, inputs_embeds=torch.zeros(1, 15, 64), attention_mask=None, cache=None,
                             position_ids=pos)
    ours = _packed_causal_mask(pos)
    assert torch.equal(ours, ref)
    assert _packed_causal_mask(pos.clone()) is ours
    other = torch.cat([torch.arange(6), torch.arange(9)])[None]
    assert not torch.equal(_packed_causal_mask(other), ours)
    assert _packed_causal_mask(torch.arange(15)[None]) is None  # one document: plain causal (is_causal)


@pytest.mark.parametrize("mode,length", [("full", None), ("lora", None), ("full", 420), ("lora", 420)])
def test_tiled_mlps_give_the_same_gradients(mode, length):
    """DeepSpeed's TiledMLP on every layer (333 tokens in 7 tiles, the last one short; or padded to 420
    tokens, as under ZeRO-3, in 9 tiles): the same loss gradient for every trainable parameter as the untiled
    model, and the same output in evaluation."""
    import copy

    from lt_train.models import tiny_model
    from lt_train.nll import decoder_of, lm_head_loss_sum
    from lt_train.sequence_parallel import tile_mlps

    a = tiny_model("qwen2").train()
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        a = get_peft_model(a, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                         target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
    b = copy.deepcopy(a)
    assert tile_mlps(b, tile_tokens=50, length=length) == 4
    x = torch.randint(3, 128, (1, 333))
    calls = []
    mlp = decoder_of(b).layers[0].mlp
    mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[-2]))
    with torch.no_grad():
        torch.testing.assert_close(decoder_of(b.eval())(input_ids=x).last_hidden_state,
                                   decoder_of(a.eval())(input_ids=x).last_hidden_state)
    assert calls == [333]  # evaluation: the plain MLP, one call
    a.train(), b.train()
    calls.clear()
    for m in (a, b):
        lm_head_loss_sum(m, decoder_of(m)(input_ids=x).last_hidden_state, x).backward()
    assert calls == ([48] * 6 + [45] if length is None else [47] * 8 + [44]) * 2  # tiles of forward, its recompute
    pairs = [(p, q) for p, q in zip(b.parameters(), a.parameters()) if q.requires_grad]
    assert pairs and all(p.grad is not None for p, _ in pairs)
    for p, q in pairs:
        assert float((p.grad - q.grad).norm() / q.grad.norm()) < 1e-5


def test_a_tiled_mlp_run_of_two_processes_evaluates_on_one_rank_and_ends(tmp_path):
    """ZeRO-2, two processes, tiled MLPs, validation on: the evaluations (before and after training, on the trained
    model whose MLPs are tiled) run the plain MLP and call no collective of their own, so the run ends (with a
    collective in every MLP call it hung, the ranks' evaluations making different numbers of calls)."""
    proc = run_train(tmp_path, ["train=full", "train.max_steps=2", "train.save_every=0", "deepspeed=zero2",
                                "train.tiled_mlp=true", "validation.accuracy_problems=2"], nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "summary.json", encoding="utf-8") as f:
        assert set(json.load(f)["results"]) == {"full, before", "hybrid, before", "hybrid, after", "full, after"}


@pytest.mark.slow
def test_tiled_mlp_run_under_zero3_and_ulysses_equals_one_process(tmp_path, tiny_ckpt):
    """Validation on, every parameter gathered per call (persistence threshold 0): the run ends, with the losses
    and the evaluations of one process."""
    common = [f"model={tiny_ckpt}", "train=full", "train.max_steps=2", "train.save_every=0",
              "validation.heldout=3", "validation.accuracy_problems=3", "validation.batch_size=1",
              "validation.max_new_tokens=12", "train.lr=1e-3", "train.global_batch=2"]
    assert run_train(tmp_path / "plain", common).returncode == 0
    sp = run_train(tmp_path / "sp", common + ["deepspeed=zero3", "train.sequence_parallel=2", "train.tiled_mlp=true",
                                              "deepspeed.param_persistence_threshold=0"], nproc=2, timeout=600)
    assert sp.returncode == 0, sp.stdout[-3000:] + sp.stderr[-3000:]
    _same_steps(tmp_path / "plain", tmp_path / "sp")
    results = [json.loads((tmp_path / d / "summary.json").read_text())["results"] for d in ("plain", "sp")]
    assert results[0].keys() == results[1].keys() and len(results[0]) == 4
    for k, v in results[0].items():
        assert results[1][k]["heldout_nll"] == pytest.approx(v["heldout_nll"], abs=2e-4), k
