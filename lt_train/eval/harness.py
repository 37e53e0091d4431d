"""A hybrid model inside lm-evaluation-harness: `--model lt_hybrid`.

    lt-lm-eval run --model lt_hybrid --model_args pretrained=smollm2-135m,lazy_layers=1;3,sink_tokens=4,window=64 \
        --tasks gsm8k --include_path my_tasks/

`HybridLM` is lm-eval's own `HFLM` (its batching, request ordering, stop sequences and scoring are untouched)
around a model that lt_train loaded and converted: `generate_until` runs `model.generate`, which a converted
model answers with its hybrid cache, and `loglikelihood` / `loglikelihood_rolling` run the forward with streaming
attention in the lazy layers. `pretrained` is a built-in name, a local directory or a hub id; a checkpoint saved
hybrid comes back hybrid, otherwise `lazy_layers` (separated by ';' because lm-eval splits its arguments at
commas), `from_file` (a launch/select_lazy.py selection, its S and W used) or `online_num_lazy` make it hybrid,
with `sink_tokens`, `window` and `attention_backend`. An argument it would not act on is an error, not ignored.

lm-eval 0.4.13 finds external models only once their module is imported, so `lt-lm-eval` (this module's `main`)
imports it and then runs lm-eval's own command line; releases that read the `lm_eval.models` entry point (declared
in pyproject.toml) find `lt_hybrid` from the plain `lm_eval` command too.
"""
from __future__ import annotations

import re

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from omegaconf import OmegaConf

from ..hybrid import CONFIG_KEY, convert_to_hybrid
from ..models import load_from_config
from .job import hybrid_from_config


def parse_layers(value) -> list[int] | None:
    """`lazy_layers` as lm-eval passes it: an int, a list, or text such as "1;3;5" (also ':' or spaces)."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    parts = [p for p in re.split(r"[;:\s]+", str(value).strip("[]() ")) if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"lazy_layers={value!r}: give layer indices separated by ';' (lm-eval splits "
                         "--model_args at commas), e.g. lazy_layers=1;3;5") from None


# HFLM's arguments that still act on a model passed in built (the rest, such as peft, subfolder or device
# placement, are read only when HFLM loads the model itself, and would be dropped without a word)
HFLM_ARGS = frozenset({"batch_size", "max_batch_size", "truncation", "logits_cache", "max_length", "softmax_dtype",
                       "mixed_precision_dtype", "add_bos_token", "prefix_token_id", "think_end_token",
                       "enable_thinking", "chat_template_args"})


@register_model("lt_hybrid")
class HybridLM(HFLM):
    """lm-eval's HFLM over an lt_train hybrid (or, with no hybrid settings, the full model it was loaded as)."""

    def __init__(self, pretrained: str = "smollm2-135m", lazy_layers=None, from_file: str | None = None,
                 online_num_lazy=None, online_criterion: str = "error", sink_tokens: int | None = None,
                 window: int | None = None, attention_backend: str | None = None, dtype: str = "auto",
                 attn_implementation: str = "sdpa", device: str | None = None, trust_remote_code: bool = False,
                 revision: str | None = None, arch: str = "llama", num_layers: int = 4, **kwargs):
        unknown = sorted(set(kwargs) - HFLM_ARGS)
        if unknown:
            raise ValueError(f"lt_hybrid does not take {unknown}: its own arguments are pretrained, lazy_layers, "
                             "from_file, online_num_lazy, online_criterion, sink_tokens, window, attention_backend, "
                             "dtype, attn_implementation, device, trust_remote_code, revision; and of HFLM's, "
                             f"{sorted(HFLM_ARGS)}")
        model, tokenizer = load_from_config({
            "name": str(pretrained), "dtype": dtype, "trust_remote_code": bool(trust_remote_code),
            "revision": revision, "arch": arch, "num_layers": int(num_layers),
            "attn_implementation": attn_implementation})
        hcfg = OmegaConf.create({"lazy_layers": parse_layers(lazy_layers), "from_file": from_file,
                                 "online_num_lazy": online_num_lazy, "online_criterion": online_criterion,
                                 "sink_tokens": 4 if sink_tokens is None else int(sink_tokens),
                                 "window": 1020 if window is None else int(window),
                                 "backend": attention_backend or "auto"})
        hybrid = hybrid_from_config(hcfg)
        if hybrid is None and (sink_tokens, window, attention_backend) != (None, None, None):
            raise ValueError("sink_tokens / window / attention_backend make no hybrid alone: also give lazy_layers, "
                             "from_file or online_num_lazy")
        if hybrid is not None:
            if getattr(model.config.get_text_config(decoder=True), CONFIG_KEY, None) is not None:
                raise ValueError(f"{pretrained} is saved hybrid already; drop lazy_layers / from_file / "
                                 "online_num_lazy (or load the original model to choose other layers)")
            convert_to_hybrid(model, hybrid)
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's command line asks for "cuda" by default; like its HFLM, use what this machine has
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=model.to(device).eval(), tokenizer=tokenizer, backend="causal", **kwargs)


def main() -> None:
    """`lt-lm-eval`: lm-eval's command line with `lt_hybrid` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
