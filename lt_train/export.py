"""Export a sink-free hybrid as a plain transformers checkpoint: no lt_train code needed to run it.

Qwen2 and Qwen3 configs carry a per-layer attention type (`layer_types`: "full_attention" | "sliding_attention")
with `use_sliding_window` and `sliding_window`; transformers then runs the sliding layers with its own mask
(key j visible from query i iff 0 <= i - j < sliding_window) and its own sliding-window cache, and serving
engines that read those fields can too. That is a lazy layer with S = 0 sinks and W = sliding_window, so a
hybrid trained with `lazy.sink_tokens=0` exports exactly; with sinks it cannot (none of them keeps sink tokens).
"""
from __future__ import annotations

import json
import os

from .hybrid_config import CONFIG_KEY, HybridConfig
from .io import atomic_write_json

NATIVE_SLIDING = ("qwen2", "qwen3")  # transformers configs with per-layer `layer_types` and a sliding window


def check_native(config) -> HybridConfig:
    """The hybrid settings of `config`, or a ValueError saying why it has no native equivalent."""
    text = config.get_text_config(decoder=True)
    if getattr(text, CONFIG_KEY, None) is None:
        raise ValueError("not a hybrid model (no lt_hybrid settings in its config): save it with save_pretrained")
    hc = HybridConfig.from_model_config(config)
    if hc.online_num_lazy is not None:
        raise ValueError("online selection picks the lazy layers per prompt; a native export needs fixed lazy layers")
    if hc.sink_tokens:
        raise ValueError(f"sink_tokens={hc.sink_tokens}: transformers' sliding-window layers (and serving engines "
                         "reading layer_types) keep no sink tokens, so only a hybrid trained with "
                         "lazy.sink_tokens=0 exports natively; keep this one as an lt_train checkpoint (load_hybrid)")
    if text.model_type not in NATIVE_SLIDING:
        raise ValueError(f"model type {text.model_type!r}: its transformers config has no per-layer sliding window "
                         f"(layer_types); native export supports {NATIVE_SLIDING}")
    return hc


def export_native(model, path: str, tokenizer=None) -> str:
    """Write `model` (a converted hybrid with S = 0, Qwen2 / Qwen3) to `path` as a plain checkpoint: safetensors
    weights and a config whose lazy layers are "sliding_attention" layers of window W. Returns `path`."""
    hc = check_native(model.config)
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop(CONFIG_KEY, None)
    lazy = set(hc.lazy_layers)
    cfg["layer_types"] = ["sliding_attention" if i in lazy else "full_attention" for i in range(n)]
    cfg["use_sliding_window"] = True
    cfg["sliding_window"] = hc.window
    atomic_write_json(cfg_path, cfg)
    return path
