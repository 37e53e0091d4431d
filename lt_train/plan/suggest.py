"""What to change when a plan does not fit (each candidate re-planned), and DeepSpeed's own estimate beside ours."""
from __future__ import annotations

import dataclasses

from .arch import arch_config
from .hardware import Hardware
from .report import GiB


def _deepspeed_estimate(N: int, largest: int, stage: int, off_opt: bool, off_par: bool, hw: Hardware) -> dict:
    """DeepSpeed's estimate_zero2/3_model_states_mem_needs (runtime/zero/stage3.py, stage_1_and_2.py),
    re-stated so that planning does not import DeepSpeed; zero_init=True and additional_buffer_factor=1.5."""
    gpus = hw.world
    per_node = hw.gpus or hw.processes
    if stage == 3:
        lay = 4 * largest
        if off_opt and off_par:
            gpu, cpu = lay, N * 18 / hw.nodes * 1.5
        elif off_opt:
            gpu, cpu = lay + 2 * N / gpus, N * 16 / hw.nodes * 1.5
        else:
            gpu, cpu = lay + 18 * N / gpus, largest * 4 * per_node * 1.5
    else:
        if off_opt:
            gpu, cpu = 2 * N, N * max(4 * gpus, 16) * 1.5
        else:
            gpu, cpu = 2 * N + 18 * N / gpus, N * 4 * per_node * 1.5
    return {"per_gpu": int(gpu), "per_node_host": int(cpu)}


def _suggestions(cfg, hw: Hardware, plan_memory) -> list[str]:
    """Overrides that make the plan fit, cheapest first (each tried on its own, then a few combinations), each
    re-planned by `plan_memory` (passed in: the planner calls this module, not the other way round)."""
    from omegaconf import OmegaConf

    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else \
        OmegaConf.create(cfg)
    T = int(base.train.pack_length)
    stage = int(base.deepspeed.get("stage", 0))
    candidates: list[tuple[str, dict]] = []
    if not base.train.get("gradient_checkpointing"):
        candidates.append(("train.gradient_checkpointing=true", {"train.gradient_checkpointing": True}))
    if stage and stage < 3:
        candidates.append(("deepspeed=zero3", {"deepspeed.stage": 3}))
    if stage and not base.deepspeed.get("offload_optimizer"):
        candidates.append(("deepspeed.offload_optimizer=true", {"deepspeed.offload_optimizer": True}))
    if stage == 3 and not base.deepspeed.get("offload_param"):
        candidates.append(("deepspeed=zero3_offload (optimizer and parameters on the host)",
                           {"deepspeed.offload_optimizer": True, "deepspeed.offload_param": True}))
    if base.train.mode == "lora" and float(base.train.get("lora", {}).get("dropout", 0) or 0) > 0:
        # LoRA dropout keeps a dropped-out copy of every adapted projection's input for backward
        candidates.append(("train.lora.dropout=0", {"train.lora.dropout": 0.0}))
    from .. import sequence_parallel

    text_config = arch_config(base.model).get_text_config(decoder=True)
    for n in (2, 4, 8):
        n_sp = n * int(base.train.get("sequence_parallel", 1) or 1)
        try:  # only a degree the trainer itself would accept (the same check refuses it there)
            sequence_parallel.check(n_sp, hw.world, text_config, base.model.get("attn_implementation"), T, stage)
        except ValueError:
            continue
        candidates.append((f"train.sequence_parallel={n_sp}", {"train.sequence_parallel": n_sp}))
    if base.train.mode == "full":
        candidates.append(("train=lora", {"train.mode": "lora", "train.lora": {
            "r": 16, "alpha": 32, "dropout": 0.05,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}))
    for frac in (2, 4):
        if T // frac >= 1024:
            candidates.append((f"train.pack_length={T // frac}", {"train.pack_length": T // frac}))
    if hw.gpus:
        for more in (2, 4):
            candidates.append((f"hardware.nodes={hw.nodes * more} ({hw.world * more} GPUs)",
                               {"hardware": dataclasses.replace(hw, nodes=hw.nodes * more)}))
    out = []
    singles = [c for c in candidates]
    tried = singles + [(f"{a} + {b}", {**da, **db}) for i, (a, da) in enumerate(singles) for (b, db) in singles[i + 1:]
                       if not ("hardware" in da and "hardware" in db)]
    seen_overrides = []
    for label, overrides in tried:
        if overrides in seen_overrides:  # e.g. offload_optimizer + zero3_offload is zero3_offload
            continue
        seen_overrides.append(overrides)
        c = OmegaConf.create(OmegaConf.to_container(base))
        for k, v in overrides.items():
            if k != "hardware":
                OmegaConf.update(c, k, v, force_add=True)
        try:
            p = plan_memory(c, overrides.get("hardware", hw), suggest=False)
        except (ValueError, ImportError):
            continue
        if p.fits:
            out.append(f"{label}: {p.peak_per_gpu / GiB:.1f} GiB per {'GPU' if hw.gpus else 'process'}")
        if len(out) >= 6:
            break
    return out
