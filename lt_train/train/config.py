"""Checks on a training config that fail before any heavy work, naming the problem."""
from __future__ import annotations

import os

import torch

MODES = ("lora", "full")
OBJECTIVES = ("sft", "distill")


def distill_settings(tr):
    """The distillation settings of `train.objective=distill` (validated), else None."""
    from ..distill import DistillSettings

    objective = tr.get("objective", "sft")
    if objective not in OBJECTIVES:
        raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {objective!r}")
    d = tr.get("distill") or {}
    if objective == "sft":
        if float(d.get("temperature", 1.0)) != 1.0 or d.get("top_k"):
            raise ValueError(f"train.distill.* ({dict(d)}) applies to train.objective=distill; this run is sft")
        return None
    if tr.mode != "lora":
        # the teacher is the same weights with the adapters off; under full fine-tuning the weights themselves
        # move, so the original would need a frozen copy (twice the weights) or logits precomputed to disk
        raise ValueError("train.objective=distill needs train=lora: the original model is the same weights with "
                         "the adapters disabled (full fine-tuning would need a second, frozen copy of the model)")
    top_k = d.get("top_k", 0) or 0
    if isinstance(top_k, float) and top_k.is_integer():
        top_k = int(top_k)
    return DistillSettings(float(d.get("temperature", 1.0)), top_k)


def check_distill_has_lazy(tr, lazy_layers) -> None:
    """Distillation with no lazy layer has nothing to learn: the student is the teacher (loss 0 at every step)."""
    if lazy_layers is not None and len(lazy_layers) == 0 and tr.get("objective", "sft") == "distill":
        raise ValueError("train.objective=distill with no lazy layers: the model is its own teacher (every layer "
                         "full), so the loss is 0 and nothing trains. Distil a hybrid (lazy.layers or "
                         "lazy.num_lazy > 0), or fine-tune the full model with train.objective=sft")


def _given_lazy_layers(lz) -> list | None:
    """The lazy layers a config fixes before any selection runs (`lazy.layers`, the layers of `lazy.from_file`
    once `_validate_lazy` has read it, none for `lazy.num_lazy=0`), or None when a selection will choose them."""
    if lz.get("layers") is not None:
        return list(lz.layers)
    if lz.get("from_file"):
        return list(lz.file_layers)
    return [] if lz.get("num_lazy") == 0 else None


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
    distill_settings(tr)
    _validate_lazy(cfg)
    check_distill_has_lazy(tr, _given_lazy_layers(lz))
    from ..distributed import timeout_of

    timeout_of(cfg)
    if cfg.data.get("source") in ("jsonl", "json", "parquet") and not os.path.isfile(cfg.data.path):
        raise FileNotFoundError(f"data.path={cfg.data.path!r} does not exist")
    if cfg.model.name.startswith(("/", ".")) and not os.path.isdir(cfg.model.name):  # a local path
        raise FileNotFoundError(f"model.name={cfg.model.name!r} does not exist")
    n_sp = int(tr.get("sequence_parallel", 1))
    if n_sp != 1:
        from .. import sequence_parallel

        sequence_parallel.check(n_sp, world_size, text_config_of(cfg.model), cfg.model.get("attn_implementation"),
                                int(tr.pack_length), stage)
    if cfg.validation.get("enabled") and int(cfg.validation.get("heldout", 0)) < 1:
        raise ValueError(f"validation.heldout={cfg.validation.get('heldout')}: the evaluations need at least one "
                         "held-out example (or validation.enabled=false)")
    layers = lz.get("layers")
    n = num_layers_of(cfg.model)
    if layers is not None:
        _in_range(layers, n, "lazy.layers")
    elif lz.get("from_file"):
        _in_range(lz.file_layers, n, f"the lazy layers of lazy.from_file={lz.from_file}")
    else:
        from ..lazy_ratio import resolve_num_lazy

        if lz.get("num_lazy") is None:
            raise ValueError("lazy.num_lazy is not set: give a count or a fraction of the layers to select, or "
                             "lazy.layers / lazy.from_file")
        try:
            resolve_num_lazy(lz.num_lazy, n)
        except ValueError as e:
            raise ValueError(f"lazy.{e}") from None


def _in_range(layers, n: int, what: str) -> None:
    bad = [i for i in layers if not 0 <= int(i) < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range for a model with {n} layers (0..{n - 1})")


def _command_line_keys() -> set[str]:
    """The config keys set on the command line of a Hydra job (empty outside one)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task if "=" in o}


def resolve_window_alias(cfg) -> None:
    """`lazy.recent_tokens`, the former name of `lazy.window`: still read, with a deprecation message; set to a
    different value than a `lazy.window` given on the command line, refused."""
    from omegaconf import open_dict

    lz = cfg.lazy
    old = lz.get("recent_tokens")
    if old is None:
        return
    if "lazy.window" in _command_line_keys() and int(lz.window) != int(old):
        raise ValueError(f"lazy.window={lz.window} and lazy.recent_tokens={old} (its former name) disagree: "
                         "give lazy.window only")
    print(f"lazy.recent_tokens is deprecated: it is now lazy.window (taken as lazy.window={old})", flush=True)
    with open_dict(cfg):
        lz.window = old
        lz.recent_tokens = None


def _validate_lazy(cfg) -> None:
    """Every `lazy.*` value, before anything loads; a selection file applied (`apply_selection_file`)."""
    from ..lazy import STRATEGIES

    resolve_window_alias(cfg)
    lz = cfg.lazy
    if lz.get("strategy") not in STRATEGIES:
        raise ValueError(f"lazy.strategy={lz.get('strategy')!r} is not one of {STRATEGIES}")
    for key, low in (("sink_tokens", 0), ("window", 1), ("last_queries", 1), ("max_samples", 1),
                     ("nll_samples", 1)):
        v = lz.get(key)
        if v is None and key == "max_samples":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"lazy.{key} must be an integer >= {low}, got {v!r}")
    if lz.get("layers") is not None and lz.get("from_file"):
        raise ValueError("set lazy.layers or lazy.from_file, not both")
    apply_selection_file(cfg)


def apply_selection_file(cfg) -> None:
    """With `lazy.from_file`, the file's S and W replace the config's (its layers were chosen for them; a
    command-line value that differs is refused) and its layers are kept in `lazy.file_layers`, so that the plan,
    the selection, the training and the summary all see the same. Nothing without `lazy.from_file`."""
    from omegaconf import open_dict

    from ..lazy import read_selection

    resolve_window_alias(cfg)
    lz = cfg.lazy
    if not lz.get("from_file"):
        return
    if not os.path.isfile(str(lz.from_file)):
        raise FileNotFoundError(f"lazy.from_file={lz.from_file!r} does not exist: write it first with "
                                "launch/select_lazy.py, or set lazy.from_file=null to select inside this run")
    sel = read_selection(str(lz.from_file), "lazy.from_file")
    given = _command_line_keys()
    if "lazy.recent_tokens" in given:  # the window's former name
        given.add("lazy.window")
    with open_dict(cfg):
        for key in ("sink_tokens", "window"):
            if key not in sel:
                continue
            if f"lazy.{key}" in given and int(lz[key]) != int(sel[key]):
                raise ValueError(f"lazy.{key}={lz[key]} on the command line, but lazy.from_file={lz.from_file} was "
                                 f"selected with {key}={sel[key]}: its layers are lazy for that value. Drop "
                                 f"lazy.{key}, or select again with it")
            if int(lz[key]) != int(sel[key]):
                print(f"lazy.{key}: {sel[key]} from lazy.from_file={lz.from_file} (the config said {lz[key]})",
                      flush=True)
            lz[key] = int(sel[key])
        lz.file_layers = [int(i) for i in sel["lazy_layers"]]
