"""Checks on a training config that fail before any heavy work, naming the problem."""
from __future__ import annotations

import os

import torch

MODES = ("lora", "full")


def text_config_of(mcfg):
    """The decoder config of the configured model, read without loading weights."""
    from transformers import AutoConfig

    from ..models import resolve, tiny_config

    if mcfg.name == "tiny":
        return tiny_config(mcfg.get("arch", "llama"), int(mcfg.get("num_layers", 4)))
    cfg = AutoConfig.from_pretrained(resolve(mcfg.name), revision=mcfg.get("revision"),
                                     trust_remote_code=bool(mcfg.get("trust_remote_code", False)))
    return cfg.get_text_config(decoder=True)


def num_layers_of(mcfg) -> int:
    return text_config_of(mcfg).num_hidden_layers


def validate(cfg, world_size: int) -> None:
    tr, ds, lz = cfg.train, cfg.deepspeed, cfg.lazy
    if tr.mode not in MODES:
        raise ValueError(f"train.mode must be one of {MODES}, got {tr.mode!r}")
    if int(tr.grad_accum) < 1 or float(tr.lr) <= 0:
        raise ValueError("train.grad_accum must be >= 1 and train.lr > 0")
    gb = tr.get("global_batch")
    if gb is not None and (int(gb) < 1 or int(gb) % world_size):
        raise ValueError(f"train.global_batch={gb} must be a positive multiple of the {world_size} processes "
                         f"(each process takes global_batch / {world_size} packed rows per step)")
    if int(tr.get("max_bad_steps", 3)) < 1:
        raise ValueError(f"train.max_bad_steps must be >= 1, got {tr.max_bad_steps}")
    if int(tr.get("keep_checkpoints", 2)) < 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1 (resume needs one), got {tr.keep_checkpoints}")
    if not tr.max_steps and not tr.epochs:
        raise ValueError("set train.max_steps or train.epochs")
    if tr.get("fp16"):
        raise ValueError("fp16 is not supported (DeepSpeed refuses it on CPU, and bf16 is the recipe): use train.bf16=true")
    stage = int(ds.stage)
    if stage not in (0, 2, 3):
        raise ValueError(f"deepspeed.stage must be 0 (none), 2 or 3, got {stage}")
    if stage == 0 and world_size > 1:
        raise ValueError(f"{world_size} processes need DeepSpeed: add deepspeed=zero2 or deepspeed=zero3")
    if ds.get("offload_param") and stage != 3:
        raise ValueError("deepspeed.offload_param needs ZeRO stage 3 (deepspeed=zero3_offload)")
    if stage == 3 and tr.gradient_checkpointing and tr.mode == "lora" and not torch.cuda.is_available():
        raise ValueError("ZeRO-3 with LoRA and gradient checkpointing is not supported on CPU here: "
                         "set train.gradient_checkpointing=false or use deepspeed=zero2")
    if tr.bf16 and stage == 0 and not torch.cuda.is_available():
        raise ValueError("train.bf16 without DeepSpeed runs only on GPU; on CPU use fp32 (bf16 is emulated, ~12x slower)")
    if lz.get("from_file"):
        if not os.path.isfile(lz.from_file):
            raise FileNotFoundError(f"lazy.from_file={lz.from_file!r} does not exist")
    if cfg.data.get("source") in ("jsonl", "json", "parquet") and not os.path.isfile(cfg.data.path):
        raise FileNotFoundError(f"data.path={cfg.data.path!r} does not exist")
    if cfg.model.name.startswith(("/", ".")) and not os.path.isdir(cfg.model.name):  # a local path
        raise FileNotFoundError(f"model.name={cfg.model.name!r} does not exist")
    n_sp = int(tr.get("sequence_parallel", 1))
    if n_sp != 1:
        from .. import sequence_parallel

        sequence_parallel.check(n_sp, world_size, text_config_of(cfg.model), cfg.model.get("attn_implementation"),
                                int(tr.pack_length), stage)
    layers = lz.get("layers")
    if layers is not None:
        n = num_layers_of(cfg.model)
        bad = [i for i in layers if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"lazy.layers {bad} out of range for a model with {n} layers (0..{n - 1})")
