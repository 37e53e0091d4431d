"""Hybrid conversion: streaming attention in lazy layers, the model's own attention in the others.

Plugs into transformers through its extension points, with no forked modeling file:
- an attention function registered with `AttentionInterface` under `lt_hybrid_<base>` that dispatches per
  layer (full layers call the base implementation, lazy layers call `lt_train.attention`);
- the base implementation's mask function registered with `AttentionMaskInterface` under the same name, so
  full layers receive exactly the mask they would have had;
- `HybridCache` (see cache.py), which `generate()` of a converted model uses without extra arguments.
The settings live in `model.config.lt_hybrid`, so `save_pretrained` + `load_hybrid` restore the model.
"""
from __future__ import annotations

import copy
import sys
import types
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import check_backend, positional_streaming_sdpa, streaming_attention
from .cache import KV_META, HybridCache, contiguous_validity, static_length
from .hybrid_config import CONFIG_KEY, HybridConfig
from .online import ONLINE, OnlineHybridCache

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
IMPL_PREFIX = "lt_hybrid_"
# set on attention modules by sequence_parallel.enable: their calls see whole rows with gathered position ids
SEQUENCE_PARALLEL = "lt_sequence_parallel"


@dataclass(frozen=True)
class _LayerSpec:  # set on each lazy attention module as `module.lt_streaming`
    sink: int
    window: int
    backend: str


# ---------------------------------------------------------------------------------------------------------
# The attention function


def _base_attention(base: str, module):
    if base == "eager":  # eager lives in the modeling file, not in the registry
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _mask_key_validity(mask) -> torch.Tensor | None:
    """[B, KV] bool: which cache indices are real tokens, read from whatever mask the base produced.

    With as many queries as keys the diagonal says it (a real token always sees itself, packed rows
    included); with a cache, the last query row does (it sees every earlier real token)."""
    if not isinstance(mask, torch.Tensor):
        return None  # None (no padding) or a flex BlockMask
    if mask.ndim == 2:
        return mask.bool()
    m = mask[:, 0]
    row = m.diagonal(dim1=-2, dim2=-1) if m.shape[-1] == m.shape[-2] else m[:, -1, :]
    return row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2


# (position ids, mask, layout) of the last forward, held weakly so that no mask outlives its forward
_LAYOUT_CACHE: list = [lambda: None, lambda: None, None]


def _prefill_layout(pos: torch.Tensor, mask_valid: torch.Tensor | None, key: tuple):
    """For keys == queries: ("fast", pad, offset) when each row is padding followed by one contiguous run of
    positions, ("packed", pos) for rows of several documents without padding, else ("general", valid).
    `key` (the position ids and mask objects of this forward) lets all layers of one forward share the
    result, which costs a host sync to compute."""
    c = _LAYOUT_CACHE
    if key[0] is not None and c[0]() is key[0] and c[1]() is key[1]:
        return c[2]
    B, T = pos.shape
    t = torch.arange(T, device=pos.device)
    offset = (T - 1) - pos[:, -1]  # position = index - offset on the row's last run
    contiguous = pos == t - offset[:, None]
    # keys == queries: the cache was empty, so the mask's first T columns are these tokens (a static cache's mask
    # has a column for every slot it holds, the rest empty)
    real = torch.ones_like(pos, dtype=torch.bool) if mask_valid is None else mask_valid[:, :T]
    pad = real.to(torch.int8).argmax(1)
    if bool((real == (t[None] >= pad[:, None])).all()) and bool((~real | contiguous).all()):
        layout = ("fast", None, None) if not bool(pad.any() or offset.any()) else ("fast", pad, offset)
    elif bool(real.all()):
        layout = ("packed", pos)  # several documents per row, positions restarting at each
    else:
        layout = ("general", real)
    c[0] = weakref.ref(key[0]) if key[0] is not None else (lambda: None)
    c[1] = weakref.ref(key[1]) if isinstance(key[1], torch.Tensor) else (lambda: None)
    c[2] = layout
    return layout


def _streaming_forward(module, query, key, value, attention_mask, scaling, spec: _LayerSpec, kwargs):
    B, _, Q, _ = query.shape
    K = key.shape[2]
    dev = query.device
    raw_pos = kwargs.get("position_ids")
    pos = (torch.arange(K - Q, K, device=dev)[None] if raw_pos is None else raw_pos.to(dev)).expand(B, Q)
    mask_valid = _mask_key_validity(attention_mask)
    meta = kwargs.get(KV_META)

    if meta is None and K == Q:  # training, or prefill from an empty cache
        layout = _prefill_layout(pos, mask_valid, (raw_pos, attention_mask))
        if layout[0] == "fast":
            return streaming_attention(query, key, value, spec.sink, spec.window, scaling, spec.backend,
                                       pad=layout[1], offset=layout[2])
        if layout[0] == "packed":
            return streaming_attention(query, key, value, spec.sink, spec.window, scaling, spec.backend,
                                       doc_pos=layout[1])
        idx = torch.arange(K, device=dev).expand(B, K)
        k_pos, k_idx, q_idx, k_valid = pos, idx, idx, layout[1]
    elif meta is None:  # a full-history cache (e.g. the default DynamicCache): positions are contiguous
        idx = torch.arange(K, device=dev).expand(B, K)
        k_pos = idx - ((K - 1) - pos[:, -1:])
        k_idx, q_idx = idx, idx[:, K - Q :]
        k_valid = k_pos >= 0
        if mask_valid is not None:
            k_valid = k_valid & mask_valid[:, -K:]
    elif meta.get("decode"):  # HybridCache decode step: every slot it hands over is in view unless masked
        return _decode_attention(query, key, value, mask_valid, meta, scaling)
    elif meta.get("static"):  # static (compilable) decode step: every slot, masked by device tensors only
        return _static_decode_attention(query, key, value, pos, mask_valid, meta, scaling)
    else:  # HybridCache streaming layer: sinks + ring + new tokens, with their metadata
        k_pos, k_idx = meta["pos"], meta["idx"]
        q_idx = k_idx[:, K - Q :]
        k_valid = meta["valid"]
        if mask_valid is not None:
            k_valid = k_valid & _mask_at(mask_valid, k_idx)
    return positional_streaming_sdpa(query, key, value, spec.sink, spec.window, pos, k_pos, q_idx, k_idx,
                                     k_valid, scaling)


def _decode_attention(query, key, value, mask_valid, meta, scaling):
    """One query per row over the slots a `StreamingLayer` decode step returned (sinks + ring, or the ring
    alone before it wraps): all in the window by construction, so the only mask is which slots hold real
    tokens (`meta["valid"]`, None when all do) and the caller's attention mask, looked up by cache index."""
    valid = meta["valid"]
    if mask_valid is not None:
        idx = meta["idx"]
        mv = mask_valid[:, : key.shape[2]] if idx is None else _mask_at(mask_valid, idx)
        valid = mv if valid is None else valid & mv
    return one_query_sdpa(query, key, value, None if valid is None else valid[:, None, None, :], scaling)


def _static_decode_attention(query, key, value, pos, mask_valid, meta, scaling):
    """One query per row over all S + W slots of a `StaticStreamingLayer`: a slot is attended to when it holds a
    token (`valid`), the caller's mask lets that token be seen (looked up by cache index), and the token is in
    the query's view (a sink, or within the window)."""
    k_pos, S, W = meta["pos"], meta["sink"], meta["window"]
    ok = meta["valid"] & (k_pos <= pos) & ((k_pos < S) | (pos - k_pos < W))
    if mask_valid is not None:
        ok = ok & _mask_at(mask_valid, meta["idx"])
    return one_query_sdpa(query, key, value, ok[:, None, None, :], scaling)


def _mask_at(mask_valid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The caller's key validity [B, KV] looked up at the cache indices `idx` [B, slots] of a streaming layer's
    slots (an empty slot's index, -1, reads column 0: such slots are masked by their own validity anyway)."""
    return mask_valid.gather(1, idx.clamp(0, mask_valid.shape[1] - 1))


def one_query_sdpa(query, key, value, mask, scaling) -> torch.Tensor:
    """SDPA for one query per row (decode) with the query heads of each KV group folded into queries of that KV
    head, as transformers' sdpa does when it has a mask (`pack_gqa`): K and V are read once per group, not once
    per query head (on this CPU 1.4x faster than `enable_gqa` at 8k keys). Head h uses KV head h // (Hq / Hkv).
    `mask` [B, 1, 1, K] or None."""
    B, Hq, Q, D = query.shape
    Hkv = key.shape[1]
    if Q != 1 or Hq == Hkv:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=Hq != Hkv)
    out = F.scaled_dot_product_attention(query.reshape(B, Hkv, Hq // Hkv, D), key, value, attn_mask=mask,
                                         scale=scaling)
    return out.reshape(B, Hq, 1, D)


def _observe(online, module, query, key, value, attention_mask, kwargs, scaling) -> None:
    B, _, Q, _ = query.shape
    pos = kwargs.get("position_ids")
    pos = torch.arange(Q, device=query.device)[None] if pos is None else pos
    valid = _mask_key_validity(attention_mask)
    valid = contiguous_validity(pos.expand(B, Q)) if valid is None else valid[:, -Q:]
    online.observe(module.layer_idx, query, key, valid, pos, scaling, value=value, o_proj=module.o_proj)


# (positions, weak mask) of the last packed-row mask built under sequence parallelism: every full layer of a
# forward gets the same tensor (SDPA keeps its mask for backward, so one T x T mask per step, not one per layer),
# and none outlives the backward that holds it
_PACKED_MASK: list = [None, lambda: None]


def _packed_causal_mask(pos: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, T, T] bool: causal and inside each document, documents being runs of positions that count up by 1
    (as transformers finds packed rows); None for rows of one document each."""
    last, mask = _PACKED_MASK[0], _PACKED_MASK[1]()
    if mask is not None and last.shape == pos.shape and torch.equal(last, pos):
        return mask
    start = torch.ones_like(pos, dtype=torch.bool)
    start[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(start[:, 1:].any()):
        return None
    doc = start.cumsum(-1)
    t = torch.arange(pos.shape[1], device=pos.device)
    mask = ((doc[:, :, None] == doc[:, None, :]) & (t[:, None] >= t[None, :]))[:, None]
    _PACKED_MASK[:] = [pos.clone(), weakref.ref(mask)]
    return mask


def _make_attention(base: str):
    def hybrid_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        spec = getattr(module, "lt_streaming", None)
        meta = kwargs.get(KV_META)
        if spec is None and meta is not None:  # a layer that online selection made lazy
            spec = _LayerSpec(meta["sink"], meta["window"], "sdpa")
        if spec is None:
            if (getattr(module, SEQUENCE_PARALLEL, False) and base == "sdpa" and attention_mask is None
                    and kwargs.get("position_ids") is not None and module.training):
                # Ulysses drops the mask (it was built for one shard) and gathers the position ids: packed
                # documents must stay apart in full layers too (flash attention reads them from position_ids)
                attention_mask = _packed_causal_mask(kwargs["position_ids"].expand(query.shape[0], -1))
            online = kwargs.pop(ONLINE, None)
            if (base == "sdpa" and query.shape[2] == 1 and attention_mask is None and online is None
                    and not module.training):
                # a decode step without a mask: transformers' sdpa would take `enable_gqa`, which reads K and V
                # once per query head on CPU; the same attention with the heads folded (what it does with a mask)
                out = one_query_sdpa(query, key, value, None, scaling)
                return out.transpose(1, 2).contiguous(), None
            out = _base_attention(base, module)(module, query, key, value, attention_mask, scaling=scaling,
                                                dropout=dropout, **kwargs)
            if online is not None:
                _observe(online, module, query, key, value, attention_mask, kwargs, scaling)
            return out
        if dropout and module.training:
            raise NotImplementedError("attention dropout is not supported in streaming layers")
        out = _streaming_forward(module, query, key, value, attention_mask, scaling, spec, kwargs)
        return out.transpose(1, 2).contiguous(), None

    return hybrid_attention


def _register(base: str) -> str:
    name = IMPL_PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _make_attention(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


# ---------------------------------------------------------------------------------------------------------
# Caches of a converted model


def make_cache(config, max_cache_len: int | None = None, grow: bool = False, static: bool = False) -> Cache:
    """The cache `generate()` of a converted model uses: static lazy layers, or online selection.
    `max_cache_len` (prompt + new tokens, when known) sizes the full layers' buffers once. `static`: every
    buffer allocated once and a decode step that compiles to one graph (for a compiled decode)."""
    hc = HybridConfig.from_model_config(config)
    if hc.online_num_lazy is not None:
        if static:
            raise ValueError("online selection (LightTransfer-Test) picks its lazy layers during each prefill and "
                             "has no static cache: decode it uncompiled, or fix the lazy layers")
        return OnlineHybridCache(config, hc.online_num_lazy, hc.sink_tokens, hc.window, hc.last_queries,
                                 max_cache_len=max_cache_len, criterion=hc.online_criterion, grow=grow)
    return HybridCache(config, max_cache_len=max_cache_len, grow=grow, static=static)


def new_cache(model, max_cache_len: int | None = None, grow: bool = False, static: bool = False) -> Cache:
    """A fresh cache for `model.generate(cache=...)`: the hybrid cache of a converted model, else the
    default dynamic cache (transformers' `StaticCache` when `static`). Passing it in lets the caller read its
    size afterwards."""
    config = model.config
    if getattr(config.get_text_config(decoder=True), CONFIG_KEY, None) is not None:
        return make_cache(config, max_cache_len, grow, static)
    if static:
        if max_cache_len is None:
            raise ValueError("a static cache needs max_cache_len (prompt + new tokens)")
        return StaticCache(config=config, max_cache_len=max_cache_len)
    return DynamicCache(config=config)


# ---------------------------------------------------------------------------------------------------------
# Conversion


def attention_modules(model) -> list:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _longest(args, kwargs, gen_cfg) -> int | None:
    """Prompt + new tokens of a `generate` call, when its arguments say (else the cache grows as needed)."""
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    new = kwargs.get("max_new_tokens", gen_cfg.max_new_tokens)
    if ids is None or new is None:
        return None
    return ids.shape[-1] + int(new)


def _hybrid_generate(self, *args, **kwargs):
    """`generate` that builds a `HybridCache` when the caller passed no cache of their own: a static one, whose
    decode step compiles, when the call asks transformers to compile (`compile_config=`) or for its static cache
    (`cache_implementation="static"`: transformers' `StaticCache` would hand the lazy layers a buffer they cannot
    read). Its length is rounded up (`static_length`), so calls of nearby lengths share one compiled step."""
    gen_cfg = kwargs.get("generation_config") or self.generation_config
    wants_cache = kwargs.get("use_cache", gen_cfg.use_cache) is not False
    impl = kwargs.pop("cache_implementation", None) or getattr(gen_cfg, "cache_implementation", None)
    if impl not in (None, "static", "dynamic"):
        raise ValueError(f"cache_implementation={impl!r} is not supported by a hybrid model: it builds its own cache "
                         "(HybridCache; static=True for a compiled decode)")
    if kwargs.get("cache") is None and wants_cache:
        longest = _longest(args, kwargs, gen_cfg)
        static = impl == "static" or (kwargs.get("compile_config") or getattr(gen_cfg, "compile_config", None)) is not None
        if static and longest is None:
            raise ValueError("a compiled generate needs max_new_tokens (the static cache is sized from the prompt "
                             "+ new tokens)")
        kwargs["cache"] = make_cache(self.config, static_length(longest) if static else longest, static=static)
    if impl is not None and getattr(gen_cfg, "cache_implementation", None) is not None:
        gen_cfg = kwargs["generation_config"] = copy.deepcopy(gen_cfg)
        gen_cfg.cache_implementation = None  # the cache is passed in: transformers refuses both
    cache = kwargs.get("cache")
    if getattr(cache, "static", False):
        longest = _longest(args, kwargs, gen_cfg)
        if longest is None or longest > cache.max_cache_len:
            raise ValueError(f"the static hybrid cache holds {cache.max_cache_len} tokens, fewer than prompt + "
                             f"max_new_tokens ({longest}): its decode step cannot check for overflow")
    return type(self).generate(self, *args, **kwargs)


def convert_to_hybrid(model, cfg: HybridConfig):
    """Make `cfg.lazy_layers` of `model` streaming layers, in place; returns the model."""
    config = model.config.get_text_config(decoder=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    cfg.validate(config.num_hidden_layers)
    check_backend(cfg.backend)
    base = model.config._attn_implementation or "sdpa"
    if base.startswith(IMPL_PREFIX):
        base = base[len(IMPL_PREFIX):]
    if base not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(f"full layers use attention {base!r}, which has no registered mask function")
    name = _register(base)

    modules = attention_modules(model)
    if len(modules) != config.num_hidden_layers:
        raise ValueError(f"found {len(modules)} attention modules for {config.num_hidden_layers} layers")
    model.set_attn_implementation(name)
    model.generate = types.MethodType(_hybrid_generate, model)
    set_lazy_layers(model, cfg, base)
    return model


def set_lazy_layers(model, cfg: HybridConfig, base: str | None = None) -> None:
    """Change which layers of an already converted model are lazy (cheap: no weights move)."""
    config = model.config.get_text_config(decoder=True)
    cfg.validate(config.num_hidden_layers)
    if base is None:
        base = getattr(config, CONFIG_KEY)["base_attention"]
    lazy = set(cfg.lazy_layers)
    for m in attention_modules(model):
        m.lt_streaming = _LayerSpec(cfg.sink_tokens, cfg.window, cfg.backend) if m.layer_idx in lazy else None
    setattr(config, CONFIG_KEY, dict(cfg.to_dict(), lazy_layers=sorted(lazy), base_attention=base))


def revert_hybrid(model):
    """Undo `convert_to_hybrid`: every layer back to the base attention; returns the model."""
    config = model.config.get_text_config(decoder=True)
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        return model
    for m in attention_modules(model):
        m.__dict__.pop("lt_streaming", None)
    model.set_attn_implementation(data["base_attention"])
    delattr(config, CONFIG_KEY)
    model.__dict__.pop("generate", None)
    return model


def load_hybrid(path: str, **from_pretrained_kwargs):
    """Load a model saved after `convert_to_hybrid` and re-apply its hybrid settings.

    Weights come from safetensors; `trust_remote_code` stays off unless the caller turns it on."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from_pretrained_kwargs.setdefault("use_safetensors", True)
    trc = from_pretrained_kwargs.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trc)
    data = getattr(config.get_text_config(decoder=True), CONFIG_KEY, None)
    if data is None:
        raise ValueError(f"{path} holds no hybrid settings (no '{CONFIG_KEY}' in its config); "
                         "load it with transformers and call convert_to_hybrid")
    base = data.get("base_attention")
    if base and "attn_implementation" not in from_pretrained_kwargs:
        from_pretrained_kwargs["attn_implementation"] = base
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    return convert_to_hybrid(model, HybridConfig.from_model_config(model.config))
