"""Write the trained model as a transformers checkpoint one module at a time, gathered from a ZeRO-3 partition.

Under ZeRO-3 no rank holds the whole model, and none must at the end either: full fine-tuning of a 32B model is
~61 GiB in bf16, more than a GPU and, on every rank of a node at once, more than its host memory. So each module
that owns parameters is gathered on its own (a collective every rank joins), rank 0 copies it to host memory and
adds it to the current safetensors shard, and the gathered parameters are released before the next module. The
writer's host memory then holds one shard in flight; every other rank, one module gathered at a time.

LoRA: a LoRA layer's base weight, A and B are gathered together and the merged weight W + scale * B A is written
under the base model's name (peft's own `get_delta_weight`), so the result equals `merge_and_unload()`.
"""
from __future__ import annotations

import json
import os

import torch

from ..io import atomic_write_json

SHARD_BYTES = 2 * 2**30  # safetensors file size that starts a new shard


def _gathered(params: list, enabled: bool):
    import contextlib

    if not enabled or not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _units(model):
    """(module name, module, its own parameters, LoRA layer or not), in module order: the unit gathered at once.
    A LoRA layer is one unit with its adapters; a parameter shared by two modules (tied weights) is written once."""
    seen: set[int] = set()
    skip: set[str] = set()
    for name, m in model.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip):
            continue
        lora = hasattr(m, "lora_A") and hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")
        if lora:
            skip.add(name)
            own = [(f"{name}.{n}", p) for n, p in m.named_parameters()]
        else:
            own = [(f"{name}.{n}" if name else n, p) for n, p in m.named_parameters(recurse=False)]
        own = [(n, p) for n, p in own if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            yield name, m, own, lora


def _base_name(name: str) -> str:
    """The plain model's name of a peft model's parameter."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def _tensors_of(name: str, module, own, lora: bool) -> dict[str, torch.Tensor]:
    """The unit's tensors as the plain (merged) model names them, on the CPU."""
    if not lora:
        return {_base_name(n): p.detach().to("cpu", copy=True).contiguous() for n, p in own}
    out = {}
    base = module.base_layer
    prefix = _base_name(name)
    weight = base.weight.detach()
    for adapter in module.active_adapters:
        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    out[f"{prefix}.weight"] = weight.to("cpu", copy=True).contiguous()
    if getattr(base, "bias", None) is not None:
        out[f"{prefix}.bias"] = base.bias.detach().to("cpu", copy=True).contiguous()
    return out


class _ShardWriter:
    """safetensors shards written as they fill, renamed to transformers' `model-0000i-of-0000n` at the end."""

    def __init__(self, path: str, shard_bytes: int):
        self.path, self.limit = path, shard_bytes
        self.buf: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.buf and self.size + n > self.limit:
            self.flush()
        self.buf.update(tensors)
        self.size += n
        self.total += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        tmp = os.path.join(self.path, f".shard-{len(self.files):05d}.tmp")
        save_file(self.buf, tmp, metadata={"format": "pt"})
        self.files.append((tmp, list(self.buf)))
        self.buf, self.size = {}, 0

    def close(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.files[0][0], os.path.join(self.path, "model.safetensors"))
            return
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.path, final))
            weight_map.update({k: final for k in names})
        atomic_write_json(os.path.join(self.path, "model.safetensors.index.json"),
                          {"metadata": {"total_size": self.total}, "weight_map": weight_map})


def write_model(model, path: str, writer_rank: int, rank: int, zero3: bool, tokenizer=None,
                shard_bytes: int = SHARD_BYTES) -> None:
    """Write `model` (the trained module, LoRA merged) to `path` as safetensors + config (+ tokenizer). Every rank
    calls this (under ZeRO-3 each gather is a collective); only `writer_rank` writes, into a folder beside `path`
    that replaces it once complete: a crash leaves the previous export (or none), never a mix of old and new
    shards."""
    import shutil

    plain = model.get_base_model() if hasattr(model, "get_base_model") else model
    writer = None
    partial = f"{path.rstrip('/')}.partial-{os.getpid()}"
    if rank == writer_rank:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        writer = _ShardWriter(partial, shard_bytes)
    for name, module, own, lora in _units(model):
        with _gathered([p for _, p in own], zero3):
            if writer is not None:
                writer.add(_tensors_of(name, module, own, lora))
    if writer is None:
        return
    writer.close()
    plain.config.save_pretrained(partial)
    gen = getattr(plain, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    old = f"{path.rstrip('/')}.old-{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(partial, path)
    shutil.rmtree(old, ignore_errors=True)


def adapter_state(model, zero3: bool) -> dict[str, torch.Tensor]:
    """The LoRA adapters (the trainable parameters), gathered one module at a time: small, kept whole."""
    state = {}
    for name, _, own, _ in _units(model):
        trainable = [(n, p) for n, p in own if p.requires_grad]
        with _gathered([p for _, p in trainable], zero3):
            state.update({n: p.detach().to("cpu", copy=True) for n, p in trainable})
    return state


def saved_names(path: str) -> list[str]:
    """The tensor names a checkpoint written by `write_model` holds."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return sorted(json.load(f)["weight_map"])
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sorted(f.keys())
