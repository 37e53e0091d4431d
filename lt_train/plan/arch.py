"""The model as the planner sees it: its architecture read from the config, built on the meta device (no weights),
its parameter counts and the LoRA adapters' sizes."""
from __future__ import annotations

import torch

ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


def arch_config(mcfg):
    """A transformers config for a `model` config: its `arch` block (config.json-shaped, shipped in conf/model so
    planning works offline), the tiny test config, or the checkpoint's own config.json (local or hub)."""
    from transformers import AutoConfig

    from ..models import resolve, tiny_config

    if mcfg.get("name") == "tiny":
        return tiny_config(mcfg.get("arch", "llama"), int(mcfg.get("num_layers", 4)))
    arch = mcfg.get("arch")
    if arch:
        arch = dict(arch)
        missing = [f for f in ARCH_FIELDS if arch.get(f) is None]
        if missing:
            raise ValueError(f"model.arch of {mcfg.get('name')!r} lacks {missing} (a config.json-shaped block "
                             f"needs {list(ARCH_FIELDS)})")
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    cfg = AutoConfig.from_pretrained(resolve(mcfg["name"]), revision=mcfg.get("revision"),
                                     trust_remote_code=bool(mcfg.get("trust_remote_code", False)))
    text = cfg.get_text_config(decoder=True)
    missing = [f for f in ARCH_FIELDS[1:] if getattr(text, f, None) is None]
    if missing:
        raise ValueError(f"the config of {mcfg['name']!r} lacks {missing}: cannot plan its memory")
    return cfg


def meta_model(config, dtype: torch.dtype):
    """The model without weights; on a copy of `config`, since the trace switches its attention function."""
    import copy

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, attn_implementation="sdpa")


def param_counts(model) -> tuple[int, int]:
    """(parameters with shared ones counted once, largest number of parameters owned by one module)."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return sum(seen.values()), largest


def lora_params(model, targets: list[str], r: int) -> int:
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets:
            n += r * (m.in_features + m.out_features)
    return n


def _meta_lora(model, lora: dict):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)),
                                            lora_dropout=float(lora.get("dropout", 0.0)),
                                            target_modules=list(lora.get("target_modules", [])),
                                            task_type="CAUSAL_LM"))
