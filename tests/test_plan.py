"""The memory planner (lt_train/plan.py, launch/plan.py) and the trainer's refusal of runs that do not fit."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, AutoModelForCausalLM

from lt_train import plan as planner
from lt_train.plan import Hardware, plan_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
H100x8 = Hardware(gpus=8, gpu_memory_gb=80)


def _cfg(overrides, name="plan"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


def _qwen2_params(H, I, L, Hq, Hkv, V, D=None, tied=False):
    """Parameter count of a Qwen2 decoder written out from its architecture (q/k/v biases, no o bias)."""
    D = D or H // Hq
    attn = H * Hq * D + Hq * D + 2 * (H * Hkv * D + Hkv * D) + Hq * D * H
    layer = attn + 3 * H * I + 2 * H
    return V * H + L * layer + H + (0 if tied else V * H)


def test_qwq_32b_model_states_are_deepspeeds_own_arithmetic():
    p = plan_memory(_cfg(["+experiment=qwq_still", "deepspeed=zero3"]), H100x8)
    N = _qwen2_params(5120, 27648, 64, 40, 8, 152064)
    assert p.settings["params"] == N and p.settings["largest_layer_params"] == 152064 * 5120
    states = sum(v for k, v in p.per_gpu.items() if k.startswith(("parameters", "gathered", "gradients", "optimizer")))
    # DeepSpeed, estimate_zero3_model_states_mem_needs without offload: 18 bytes x N / GPUs + 4 x largest layer
    assert states == pytest.approx(18 * N / 8 + 4 * 152064 * 5120, rel=1e-6)
    assert p.deepspeed_estimate["per_gpu"] == pytest.approx(states, rel=1e-6)
    # 20k tokens, checkpointed: 64 layer inputs of 20000 x 5120 bf16 values
    assert p.per_gpu["activations (checkpointed inputs)"] == 64 * 20000 * 5120 * 2
    assert not p.fits and p.per_gpu_total > 80e9
    assert any(s.startswith("deepspeed.offload_optimizer=true") for s in p.suggestions)
    text = p.table()
    assert "does NOT fit" in text and "optimizer states (partition)" in text


@pytest.mark.parametrize("experiment", ["qwq_still", "qwen25_32b_still"])
def test_shipped_32b_recipes_fit_on_8_gpus_of_80_gb(experiment):
    p = plan_memory(_cfg([f"+experiment={experiment}"]), H100x8)
    assert p.fits, p.table()
    assert p.settings["offload_optimizer"] and p.host["optimizer states + fp32 grads (offloaded)"] > 0


def test_the_plan_counts_every_phase_of_the_run_and_its_verdict_is_the_largest():
    """QwQ-32B, the shipped full fine-tune on 8 x 80 GB: selection (before the engine: the partition, one module
    gathered, a forward without gradients), the evaluations (the engine's states besides) and the export (one
    module per GPU; one shard on the writer's host) each below the training step, which is the verdict. A phase
    over budget refuses the run although the step fits."""
    import dataclasses

    largest = 152064 * 5120
    p = plan_memory(_cfg(["+experiment=qwq_still"]), H100x8)
    assert set(p.phases) == {"selection", "evaluation (before / after)", "export"} and p.fits
    sel, ev, ex = p.phases["selection"], p.phases["evaluation (before / after)"], p.phases["export"]
    module = {"one module gathered (ZeRO-3)": largest * 2}
    assert sel["per_gpu"].items() >= {**module, "parameters (partition)": p.per_gpu["parameters (partition)"]}.items()
    assert ev["per_gpu"].items() >= module.items() and ex["per_gpu"].items() >= module.items()
    assert ex["host"]["export writer (one shard + one module)"] == planner.EXPORT_SHARD + largest * 2
    states = sum(v for k, v in p.per_gpu.items() if k in planner.STATE_PARTS)
    assert sum(ex["per_gpu"].values()) == states + largest * 2
    assert p.peak_per_gpu == p.per_gpu_total  # the step is the largest phase
    assert set(p.to_json()["phases"]) == set(p.phases) and "export" in p.table()
    given = plan_memory(_cfg(["+experiment=qwq_still", "lazy.layers=[0,1]", "validation.enabled=false"]), H100x8)
    assert set(given.phases) == {"export"}
    # a phase alone over budget: a budget between the step and the (enlarged) selection phase
    p.phases["selection"]["per_gpu"]["forward without gradients (one layer + head chunk)"] += 70 * 2**30
    assert p.per_gpu_total < p.device_budget < p.peak_per_gpu and not p.fits
    assert dataclasses.replace(p, hardware=Hardware(gpus=8, gpu_memory_gb=200)).fits


def _real_saved_bytes(layer, x, pe, pos):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, position_embeddings=pe, position_ids=pos, attention_mask=None)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {t.untyped_storage().data_ptr() for t in pe}
    return sum(v for k, v in seen.items() if k not in skip)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_traced_layer_activations_equal_what_a_real_cpu_layer_saves(arch):
    """The meta-device trace (with the fused-attention stand-in) against the storages a real CPU layer saves."""
    from lt_train import HybridConfig, convert_to_hybrid

    config = AutoConfig.for_model(arch, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    T = 700
    for lazy in (None, (4, 64, "sdpa")):
        meta = planner.meta_model(config, torch.float32)
        planned = planner.layer_activations(meta, T, lazy)
        torch.manual_seed(0)
        real = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
        if lazy:
            convert_to_hybrid(real, HybridConfig([0], lazy[0], lazy[1], backend="sdpa"))
        x = torch.randn(1, T, 128, requires_grad=True)
        pos = torch.arange(T)[None]
        pe = real.model.rotary_emb(x, pos)
        measured = _real_saved_bytes(real.model.layers[0], x, pe, pos)
        assert planned == pytest.approx(measured, rel=0.05), (lazy, planned, measured)


@pytest.mark.parametrize("hw,message", [
    ({"gpus": -1}, "hardware.gpus must be a whole number"),
    ({"gpus": 8}, "needs hardware.gpu_memory_gb"),
    ({"gpus": 8, "gpu_memory_gb": "lots"}, "hardware settings must be numbers"),
    ({"nodes": 0}, "hardware.nodes must be a whole number >= 1"),
])
def test_bad_hardware_values_are_named(hw, message):
    with pytest.raises(ValueError, match=message):
        planner.hardware_from_config({"hardware": hw})


def test_a_model_config_without_the_needed_fields_is_named():
    cfg = _cfg(["model=smollm2-135m", "~model.arch.vocab_size"])
    with pytest.raises(ValueError, match=r"lacks \['vocab_size'\]"):
        plan_memory(cfg, Hardware(gpus=0, processes=1))


def test_global_batch_must_divide_over_the_processes():
    from lt_train.train.config import validate

    cfg = _cfg(["model=tiny", "train.global_batch=3", "deepspeed=zero2"], name="train")
    with pytest.raises(ValueError, match="train.global_batch=3 must be a positive multiple of the 2 processes"):
        validate(cfg, 2)
    validate(_cfg(["model=tiny", "train.global_batch=4", "deepspeed=zero2"], name="train"), 2)


def test_trainer_refuses_a_run_that_does_not_fit_before_loading_weights(tmp_path, monkeypatch):
    from lt_train.train import loop

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded before the plan refused the run")

    monkeypatch.setattr(loop, "load_from_config", no_loading)
    # data=demo: the default recall contexts are longer than data.max_length in the tiny tokenizer
    cfg = _cfg(["model=tiny", "data=demo", "hardware.host_memory_gb=0.001", f"output_dir={tmp_path}",
                f"cache_dir={tmp_path}/cache"], name="train")
    with pytest.raises(RuntimeError, match="(?s)does NOT fit.*train.ignore_plan=true"):
        loop.train(cfg)
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["fits"] is False and saved["per_gpu_bytes"]["total"] == sum(saved["per_gpu_bytes"]["parts"].values())
    # ignore_plan lets it through to loading
    cfg = _cfg(["model=tiny", "data=demo", "hardware.host_memory_gb=0.001", "train.ignore_plan=true", f"output_dir={tmp_path}",
                f"cache_dir={tmp_path}/cache"], name="train")
    with pytest.raises(AssertionError, match="weights were loaded"):
        loop.train(cfg)


def test_plan_command_writes_plan_json(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "+experiment=qwq_still",
                          "hardware.gpus=8", "hardware.gpu_memory_gb=141", f"output_dir={tmp_path}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "plan.json").read_text())
    assert set(data) >= {"per_gpu_bytes", "host_bytes", "fits", "suggestions"}
    assert data["fits"] is True and data["per_gpu_bytes"]["total"] < 141e9
    assert "verdict: fits" in out.stdout


def test_the_plan_command_plans_a_selection_files_layers_sinks_and_window(tmp_path):
    """As the trainer does: 3 lazy layers with S=0 and W=256 from the file, not the config's num_lazy / S / W."""
    sel = tmp_path / "lazy_layers.json"
    sel.write_text(json.dumps({"lazy_layers": [1, 5, 9], "sink_tokens": 0, "recent_tokens": 256}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "+experiment=qwq_still",
                          f"lazy.from_file={sel}", "hardware.gpus=8", "hardware.gpu_memory_gb=141",
                          f"output_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    settings = json.loads((tmp_path / "plan.json").read_text())["settings"]
    assert (settings["lazy_layers"], settings["sink_tokens"], settings["window"]) == (3, 0, 256)
    assert "selection" not in json.loads((tmp_path / "plan.json").read_text())["phases"]


def test_sequence_parallel_layer_holds_what_one_process_holds_of_a_row_n_times_shorter():
    """Ulysses: a process keeps T/N tokens outside attention and, inside, all T tokens of Hq/N query and Hkv/N KV
    heads: exactly one process's activations of a T/N row, until N exceeds the KV heads (then replicated). A
    streaming layer keeps a little less: its causal head (the first W queries) is W rows of Hq/N heads."""
    from lt_train.models import tiny_config
    from lt_train.plan import layer_activations, meta_model

    m = meta_model(tiny_config("qwen2", num_attention_heads=8, num_key_value_heads=4), torch.float32)
    for spec in (None, (4, 64, "sdpa")):
        one = layer_activations(m, 1024, spec)
        for n in (2, 4):
            sp = layer_activations(m, 1024 * n, spec, n)
            assert sp == one if spec is None else 0.99 * one < sp < one
        assert layer_activations(m, 8192, spec, 8) > one  # 4 KV heads over 8 processes: each holds a whole one


def test_longest_sample_grows_with_sequence_parallelism_and_bad_n_is_named():
    from lt_train.plan import longest_pack_length

    n1 = longest_pack_length(_cfg(["+experiment=qwq_still"]), H100x8)
    n2 = longest_pack_length(_cfg(["+experiment=qwq_still", "train.sequence_parallel=2"]), H100x8)
    assert 20_000 < n1 and 1.8 * n1 < n2 < 2.2 * n1
    assert plan_memory(_cfg(["+experiment=qwq_still", f"train.pack_length={n2}",
                             "train.sequence_parallel=2"]), H100x8).fits
    assert not plan_memory(_cfg(["+experiment=qwq_still", f"train.pack_length={n2 + 2048}",
                                 "train.sequence_parallel=2"]), H100x8, suggest=False).fits
    too_long = plan_memory(_cfg(["+experiment=qwq_still", f"train.pack_length={n1 + 1024}"]), H100x8)
    assert any(s.startswith("train.sequence_parallel=2") for s in too_long.suggestions), too_long.suggestions
    with pytest.raises(ValueError, match="does not divide the model's 40 attention heads"):
        plan_memory(_cfg(["+experiment=qwq_still", "train.sequence_parallel=3", "train.pack_length=30000"]),
                    Hardware(gpus=6, gpu_memory_gb=80))


def test_sequence_parallel_is_suggested_only_where_the_trainer_would_accept_it():
    """Suggestions pass the trainer's own check: the test above has train.sequence_parallel=2 suggested for this
    run on sdpa; on eager attention (Ulysses runs on sdpa / flash only) there is none, other suggestions remain."""
    eager = plan_memory(_cfg(["+experiment=qwq_still", "train.pack_length=65536", "model.attn_implementation=eager"]),
                        H100x8)
    assert not eager.fits and eager.suggestions
    assert not any("sequence_parallel" in s for s in eager.suggestions), eager.suggestions


def test_tiled_mlp_leaves_only_the_mlp_input_in_the_recomputed_layer():
    plain = plan_memory(_cfg(["+experiment=qwq_still", "train.pack_length=32768"]), H100x8, suggest=False)
    tiled = plan_memory(_cfg(["+experiment=qwq_still", "train.pack_length=32768", "train.tiled_mlp=true"]), H100x8,
                        suggest=False)
    key = "activations (one layer recomputed)"
    # QwQ-32B's MLP keeps gate, up, act(gate) and their product: 4 x 27648 bf16 values per token, untiled
    assert plain.per_gpu[key] - tiled.per_gpu[key] == pytest.approx(4 * 27648 * 2 * 32768, rel=0.05)
    assert tiled.per_gpu["activations (checkpointed inputs)"] == plain.per_gpu["activations (checkpointed inputs)"]


def test_distillation_adds_the_teachers_states_and_logits_chunk():
    """train.objective=distill under LoRA: the teacher's last states (T x H in the model dtype) held through the
    step, and in the head phase a second chunk of logits; nothing else changes."""
    over = ["+experiment=qwq_still", "train=lora", "deepspeed=zero3"]
    sft, kd = plan_memory(_cfg(over), H100x8), plan_memory(_cfg(over + ["train.objective=distill"]), H100x8)
    T, H, pb = sft.settings["tokens"], 5120, 2
    assert kd.per_gpu["teacher states (distill)"] == T * H * pb and "teacher states (distill)" not in sft.per_gpu
    head = [k for k in kd.per_gpu if k.startswith("LM head chunk") or k.startswith("backward working set")]
    grown = sum(kd.per_gpu[k] for k in head) - sum(sft.per_gpu.get(k, 0) for k in head)
    assert grown >= 0 and kd.per_gpu_total - sft.per_gpu_total == T * H * pb + grown
    assert {k: v for k, v in kd.per_gpu.items() if k not in head and k != "teacher states (distill)"} == \
        {k: v for k, v in sft.per_gpu.items() if k not in head}
