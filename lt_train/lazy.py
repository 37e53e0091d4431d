"""Lazy-layer statistics and selection (LightTransfer-Train and baselines).

The lazy ratio of a layer is the softmax attention mass that its last `last_queries` queries put on the sink
keys (position < S) and the recent keys (i - j < W), averaged over heads and queries. It is computed from
log-sum-exps, mass = exp(lse over the selected keys - lse over all keys), for the last queries only, so the
extra memory is O(last_queries * T) per layer and the cost is close to one forward pass.
"""
from __future__ import annotations

import json
import math
import os
import random as _random
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .distributed import all_reduce_tensor, group, share
from .lazy_ratio import layer_lazy_ratio, layer_output_error, resolve_num_lazy  # noqa: F401 -- part of this module's interface
from .nll import decoder_of

STRATEGIES = ("default", "nll", "error", "ratio", "frequency", "random", "first", "last", "pyramid")
DEFAULT_STRATEGY = "nll"  # measured best on SmolLM2 (README, benchmarks/selection_quality.py)


# ---------------------------------------------------------------------------------------------------------
# Probing a whole model: an attention function that records statistics and then runs the usual attention

_PROBE_PREFIX = "lt_probe_"


def _probe_attention(base: str):
    def probe(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        rec = getattr(module, "_lt_probe", None)
        if rec is not None:
            rec(module, query, key, value, scaling)
        from .hybrid import _base_attention

        return _base_attention(base, module)(module, query, key, value, attention_mask, scaling=scaling,
                                             dropout=dropout, **kwargs)

    return probe


def _register_probe(base: str) -> str:
    name = _PROBE_PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _probe_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


@torch.no_grad()
def lazy_ratios_per_head(model, input_ids, sink_tokens: int = 4, window: int = 1020,
                         last_queries: int = 64, attention_mask=None) -> torch.Tensor:
    """[num_layers, num_heads] lazy ratios, averaged over the batch (see `layer_lazy_ratio`)."""
    return layer_statistics(model, input_ids, sink_tokens, window, last_queries, attention_mask)[0]


@torch.no_grad()
def layer_statistics(model, input_ids, sink_tokens: int = 4, window: int = 1020, last_queries: int = 64,
                     attention_mask=None, output_error: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward: the per-head lazy ratios [num_layers, num_heads] and, with `output_error`, each layer's
    relative output error under streaming attention [num_layers] (`layer_output_error`), both averaged over
    the batch."""
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    base = model.config._attn_implementation or "sdpa"
    if base.startswith(("lt_hybrid_", _PROBE_PREFIX)):
        raise ValueError("measure lazy ratios on the original model, before convert_to_hybrid")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    out: dict[int, torch.Tensor] = {}
    errors: dict[int, torch.Tensor] = {}

    def record(module, q, k, v, scaling):
        ok = valid.to(q.device)
        out[module.layer_idx] = layer_lazy_ratio(q, k, ok, sink_tokens, window, last_queries, scaling).mean(0).cpu()
        if output_error:
            errors[module.layer_idx] = layer_output_error(q, k, v, ok, sink_tokens, window, last_queries,
                                                          module.o_proj, scaling).mean(0).cpu()

    model.set_attn_implementation(_register_probe(base))
    try:
        for m in modules:
            m._lt_probe = record
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False)
    finally:
        for m in modules:
            del m._lt_probe
        model.set_attn_implementation(base)
    ratios = torch.stack([out[i] for i in sorted(out)])
    return ratios, (torch.stack([errors[i] for i in sorted(errors)]) if output_error else None)


def lazy_ratios(model, input_ids, sink_tokens: int = 4, window: int = 1020, last_queries: int = 64,
                attention_mask=None) -> torch.Tensor:
    """[num_layers] lazy ratio of each layer: the mean over heads of `lazy_ratios_per_head`."""
    return lazy_ratios_per_head(model, input_ids, sink_tokens, window, last_queries, attention_mask).mean(-1)


# ---------------------------------------------------------------------------------------------------------
# Selection




def pyramid_layers(num_layers: int, n: int) -> list[int]:
    """Lazy layers denser with depth, density rising linearly (the shape of PyramidKV's budgets: lower
    layers keep more context). Quantiles of a density proportional to depth: layer = L * sqrt(u)."""
    chosen: list[int] = []
    for k in range(n):
        i = min(num_layers - 1, int(num_layers * math.sqrt((k + 0.5) / n)))
        while i in chosen:  # collisions near the top: take the next free layer below
            i -= 1
        chosen.append(i if i >= 0 else min(set(range(num_layers)) - set(chosen)))
    return sorted(chosen)


@dataclass
class Selection:
    layers: list[int]
    strategy: str
    num_layers: int
    per_layer_ratio: list[float]  # mean over samples
    per_head_ratio: list[list[float]]  # [layer][head], mean over samples
    per_sample_ratio: list[list[float]]  # [sample][layer]
    sample_lengths: list[int]
    frequency: list[int] | None = None  # times each layer was among a sample's top-k laziest
    delta_nll: list[float] | None = None  # per layer, converted alone (strategy "nll")
    output_error: list[float] | None = None  # per layer, relative output error of streaming (strategy "error")
    base_nll: float | None = None
    short_samples: int = 0


def _check_samples(samples) -> list[torch.Tensor]:
    if not samples:
        raise ValueError("no samples given for lazy-layer selection")
    out = []
    for n, s in enumerate(samples):
        s = torch.as_tensor(s)
        if s.ndim != 1 or s.numel() < 2:
            raise ValueError(f"sample {n} must be a 1-D tensor of at least 2 token ids, got shape {tuple(s.shape)}")
        out.append(s.long())
    return out


def select_lazy_layers(model, samples, num_lazy, strategy: str = "default", sink_tokens: int = 4,
                       window: int = 1020, last_queries: int = 64, seed: int = 0) -> list[int]:
    """The `num_lazy` layers to make lazy (sorted), by `strategy` (see `STRATEGIES`)."""
    return select_with_stats(model, samples, num_lazy, strategy, sink_tokens, window, last_queries,
                             seed).layers


def select_with_stats(model, samples, num_lazy, strategy: str = "default", sink_tokens: int = 4,
                      window: int = 1020, last_queries: int = 64, seed: int = 0,
                      nll_samples: int = 4, progress: bool = False, lockstep: bool = False) -> Selection:
    """`select_lazy_layers` with every statistic it measured (for reports and lazy_layers.json).

    `lockstep` (a ZeRO-3 partitioned model, whose every module call gathers its weights: a collective): every
    rank makes the same number of forwards, a rank with fewer samples or layers repeating one and discarding it."""
    import warnings

    from tqdm.auto import tqdm

    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {STRATEGIES}")
    strategy = DEFAULT_STRATEGY if strategy == "default" else strategy
    samples = _check_samples(samples)
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    n = resolve_num_lazy(num_lazy, L)
    min_len = sink_tokens + window + last_queries
    short = sum(1 for s in samples if s.numel() <= min_len)
    if short:
        warnings.warn(f"{short} of {len(samples)} samples have T <= sink + recent + last_queries = {min_len} "
                      "tokens: every key of their last queries is a sink or recent key, so their lazy ratio is "
                      "1 for every layer and says nothing. Use longer samples or a smaller window.", stacklevel=2)

    dev = next(model.parameters()).device
    # Shared out over the process group: each rank measures samples rank, rank + world, ...; a sum over ranks
    # (zeros elsewhere) gives every rank the same statistics, so they all choose the same layers.
    rank, world_size = group()
    heads = None
    want_error = strategy == "error"
    errors = torch.zeros(len(samples), L, dtype=torch.float64)
    for k, counted in tqdm(share(len(samples), rank, world_size, lockstep), desc="lazy ratios",
                           disable=not progress):
        h, e = layer_statistics(model, samples[k].to(dev)[None], sink_tokens, window, last_queries,
                                output_error=want_error)
        if heads is None:
            heads = torch.zeros(len(samples), *h.shape, dtype=torch.float64)
        if not counted:
            continue
        heads[k] = h.double().cpu()
        if e is not None:
            errors[k] = e.double()
    if heads is None:  # more ranks than samples: this rank measured none; learn the shape from one sample
        h = lazy_ratios_per_head(model, samples[0].to(dev)[None], sink_tokens, window, last_queries)
        heads = torch.zeros(len(samples), *h.shape, dtype=torch.float64)
    heads = all_reduce_tensor(heads).float()  # [N, L, H]
    per_sample = heads.mean(-1)  # [N, L]
    mean_ratio = per_sample.mean(0)
    sel = Selection([], strategy, L, mean_ratio.tolist(), heads.mean(0).tolist(), per_sample.tolist(),
                    [s.numel() for s in samples], short_samples=short)
    order_by_ratio = sorted(range(L), key=lambda i: -mean_ratio[i].item())
    if strategy == "ratio":
        layers = order_by_ratio[:n]
    elif strategy == "frequency":
        counts = [0] * L
        for row in per_sample:
            for i in row.topk(n).indices.tolist() if n else []:
                counts[i] += 1
        sel.frequency = counts
        layers = sorted(range(L), key=lambda i: (-counts[i], -mean_ratio[i].item()))[:n]
    elif strategy == "error":  # the layers whose output streaming attention changes least
        err = all_reduce_tensor(errors).mean(0)
        sel.output_error = err.tolist()
        layers = sorted(range(L), key=lambda i: (err[i].item(), -mean_ratio[i].item()))[:n]
    elif strategy == "random":
        layers = _random.Random(seed).sample(range(L), n)
    elif strategy == "first":
        layers = list(range(n))
    elif strategy == "last":
        layers = list(range(L - n, L))
    elif strategy == "pyramid":
        layers = pyramid_layers(L, n)
    else:  # "nll": convert each layer alone and measure the damage directly
        delta, base_nll = single_layer_delta_nll(model, samples[:nll_samples], sink_tokens, window, progress,
                                                 lockstep)
        sel.delta_nll, sel.base_nll = delta, base_nll
        layers = sorted(range(L), key=lambda i: (delta[i], -mean_ratio[i].item()))[:n]
    sel.layers = sorted(layers)
    return sel


def single_layer_delta_nll(model, samples, sink_tokens: int, window: int, progress: bool = False,
                           lockstep: bool = False):
    """Increase of the mean NLL on `samples` when each layer alone becomes a streaming layer. Shared out over
    the process group: rank r scores layers r, r + world, ...; the results are summed over ranks, so every rank
    holds every layer's score (each rank computes the unconverted NLL itself: one forward per sample)."""
    from tqdm.auto import tqdm

    from .hybrid import HybridConfig, convert_to_hybrid, revert_hybrid, set_lazy_layers
    from .nll import mean_nll

    L = model.config.get_text_config(decoder=True).num_hidden_layers
    rank, world_size = group()
    base_nll = mean_nll(model, samples)
    convert_to_hybrid(model, HybridConfig([], sink_tokens, window))
    delta = torch.zeros(L, dtype=torch.float64)
    try:
        for i, counted in tqdm(share(L, rank, world_size, lockstep), desc="single-layer NLL", disable=not progress):
            set_lazy_layers(model, HybridConfig([i], sink_tokens, window))
            d = mean_nll(model, samples) - base_nll
            if counted:
                delta[i] = d
    finally:
        revert_hybrid(model)
    return all_reduce_tensor(delta).tolist(), base_nll


def read_selection(path: str, setting: str) -> dict:
    """A lazy_layers.json written by launch/select_lazy.py or the trainer; `setting` names the option that
    pointed to it, for the error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{setting}: {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        sel = json.load(f)
    if not isinstance(sel, dict) or "lazy_layers" not in sel:
        raise ValueError(f"{setting}: {path} has no 'lazy_layers' (expected a lazy_layers.json from "
                         "launch/select_lazy.py)")
    if "window" not in sel and "recent_tokens" in sel:  # files written before the window had one name
        sel["window"] = sel.pop("recent_tokens")
    return sel
