"""Hybrid KV cache: full layers grow as usual, lazy (streaming) layers keep S sinks + the last W-1 tokens.

`StreamingLayer` is a transformers `CacheLayerMixin` with a fixed buffer of S + W - 1 slots per row:
- slots [0, S): the sink tokens, slot s holding the token whose position id is s;
- slots [S, S + W - 1): a ring indexed by cache index, holding the most recent tokens (those with a
  position id below S are marked invalid there, since they live in the sink slots).
Keys are cached after RoPE, so the order of slots does not matter: the attention mask is computed from the
position id, cache index and validity stored beside each slot. These travel to the attention function
through the `kwargs` dict that transformers hands to `Cache.update` and then to the attention interface.
"""
from __future__ import annotations

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from .hybrid_config import HybridConfig

MIN_TRANSFORMERS = (5, 24)


def require_transformers(version: str) -> None:
    """The hybrid cache reads position ids in `Cache.update(..., kwargs=...)` and hands slot metadata to the
    attention function through that dict; transformers passes it from 5.24 on. Older versions would run the
    lazy layers over the ring with the wrong mask, so refuse them."""
    parts = []
    for p in version.split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_TRANSFORMERS:
        raise ImportError(f"lt_train needs transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))} (found {version}): "
                          "earlier versions do not pass the attention kwargs to Cache.update, which the hybrid "
                          "cache needs. pip install -U 'transformers>=5.24,<6'")


require_transformers(transformers.__version__)

KV_META = "lt_kv_meta"  # key under which a StreamingLayer passes slot metadata to the attention function
INVALID_POS = 1 << 60  # position of an empty slot: never <= a query position, so always masked


def contiguous_validity(pos: torch.Tensor) -> torch.Tensor:
    """Tokens that belong to the contiguous run of positions ending at the last token of each row.

    generate() gives left padding the position id 0; this tells those pads from the real token at
    position 0. Tokens it keeps can still be masked later by the attention mask."""
    q = pos.shape[-1]
    expected = pos[:, -1:] - (q - 1) + torch.arange(q, device=pos.device)
    return (pos == expected) & (expected >= 0)


class StreamingLayer(CacheLayerMixin):
    """Constant-size cache for one lazy layer: S sinks + a ring of W - 1 recent tokens."""

    is_sliding = True  # so transformers sizes the shared mask from a full layer
    is_compileable = False
    is_croppable = False
    GROW = 64  # slots added at a time while the sequence is shorter than S + W - 1 (a copy per 64 tokens)

    def __init__(self, sink_tokens: int, window: int, **kwargs):
        super().__init__()
        self.sink = sink_tokens
        self.ring = window - 1
        self.seen = 0  # tokens seen so far (the sequence length, not the buffer size)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_zeros(B, H, 0, D)
        self.values = value_states.new_zeros(B, value_states.shape[1], 0, value_states.shape[-1])
        self.pos = torch.full((B, 0), INVALID_POS, dtype=torch.long, device=self.device)
        self.idx = torch.full((B, 0), -1, dtype=torch.long, device=self.device)
        self.is_initialized = True

    def _grow(self, tokens: int) -> None:
        """Room for `tokens` tokens seen in all. Until the ring wraps, token i sits in slot S + i, so a short
        sequence needs only S + i slots: the buffer grows in steps of GROW slots up to S + W - 1, and a
        lazy layer never holds more than a full one would (beyond one step)."""
        cap = self.keys.shape[2]
        need = self.sink + min(self.ring, tokens)
        if need <= cap:
            return
        new = min(self.sink + self.ring, self.sink + -(-(need - self.sink) // self.GROW) * self.GROW)
        self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], new - cap, self.keys.shape[3])], 2)
        self.values = torch.cat(
            [self.values, self.values.new_zeros(*self.values.shape[:2], new - cap, self.values.shape[3])], 2)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], new - cap), INVALID_POS)], 1)
        self.idx = torch.cat([self.idx, self.idx.new_full((self.idx.shape[0], new - cap), -1)], 1)

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **_):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, q, _ = key_states.shape
        dev = key_states.device
        new_idx = (self.seen + torch.arange(q, device=dev)).expand(B, q)
        pos = kwargs.get("position_ids") if kwargs is not None else None
        new_pos = pos.expand(B, q).to(dev) if pos is not None else new_idx
        valid = contiguous_validity(new_pos)

        if self.seen == 0:
            out_k, out_v = key_states, value_states  # prefill: the attention takes the fast path
        else:
            out_k = torch.cat([self.keys, key_states], dim=2)
            out_v = torch.cat([self.values, value_states], dim=2)
            if kwargs is not None:
                kwargs[KV_META] = {
                    "pos": torch.cat([self.pos, torch.where(valid, new_pos, INVALID_POS)], dim=1),
                    "idx": torch.cat([self.idx, new_idx], dim=1),
                    "sink": self.sink,
                    "window": self.ring + 1,
                }
        self._grow(self.seen + q)
        self._store(key_states, value_states, new_pos, new_idx, valid)
        self.seen += q
        return out_k, out_v

    def _store(self, k, v, pos, idx, valid) -> None:
        B, _, q, _ = k.shape
        S, R = self.sink, self.ring
        if S > 0:
            match = (pos[:, :, None] == torch.arange(S, device=k.device)) & valid[:, :, None]  # [B, q, S]
            has = match.any(1)
            t = (match * torch.arange(q, device=k.device)[None, :, None]).amax(1)  # [B, S]
            gk = k.gather(2, t[:, None, :, None].expand(B, k.shape[1], S, k.shape[-1]))
            gv = v.gather(2, t[:, None, :, None].expand(B, v.shape[1], S, v.shape[-1]))
            h = has[:, None, :, None]
            self.keys[:, :, :S] = torch.where(h, gk, self.keys[:, :, :S])
            self.values[:, :, :S] = torch.where(h, gv, self.values[:, :, :S])
            self.pos[:, :S] = torch.where(has, pos.gather(1, t), self.pos[:, :S])
            self.idx[:, :S] = torch.where(has, idx.gather(1, t), self.idx[:, :S])
        if R > 0:
            n = min(q, R)
            slots = S + (idx[0, q - n :] % R)
            keep_pos = torch.where(valid & (pos >= S), pos, INVALID_POS)[:, q - n :]
            self.keys.index_copy_(2, slots, k[:, :, q - n :])
            self.values.index_copy_(2, slots, v[:, :, q - n :])
            self.pos.index_copy_(1, slots, keep_pos)
            self.idx.index_copy_(1, slots, idx[:, q - n :])

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The full-length mask: the attention looks slots up in it by cache index.
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0

    def _select(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.pos, self.idx = fn(self.pos), fn(self.idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda x: x[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a streaming layer cannot be cropped (evicted tokens are gone); assisted or speculative decoding "
            "is not supported with HybridCache"
        )

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.idx))


def _layer_nbytes(layer) -> int:
    if isinstance(layer, StreamingLayer):
        return layer.nbytes()
    if getattr(layer, "is_initialized", False) and layer.keys is not None:
        return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return 0


def cache_nbytes(cache) -> int:
    """Bytes a cache holds now (keys, values and streaming metadata), or its prefill peak when that was larger
    (`OnlineHybridCache` keeps full caches for a while before compressing them)."""
    now = sum(_layer_nbytes(x) for x in cache.layers)
    return max(now, getattr(cache, "peak_nbytes", 0))


class HybridCache(Cache):
    """Per-layer cache of a hybrid model: the model's own layers for full layers, `StreamingLayer` for lazy ones.

    `generate()` of a converted model builds one automatically; build it by hand for `forward` calls."""

    def __init__(self, config, lazy_layers: list[int] | None = None, sink_tokens: int | None = None,
                 window: int | None = None):
        hc = HybridConfig.from_model_config(config) if lazy_layers is None else None
        lazy = set(lazy_layers if lazy_layers is not None else hc.lazy_layers)
        S = sink_tokens if sink_tokens is not None else hc.sink_tokens
        W = window if window is not None else hc.window
        base = DynamicCache(config=config)
        n = config.get_text_config(decoder=True).num_hidden_layers
        layers = [StreamingLayer(S, W) if i in lazy else self._full_layer(base, i) for i in range(n)]
        super().__init__(layers=layers)

    @staticmethod
    def _full_layer(base: DynamicCache, i: int):
        from transformers.cache_utils import DynamicLayer

        return base.layers[i] if i < len(base.layers) else DynamicLayer()

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the cache: total, full layers, lazy layers."""
        lazy = sum(_layer_nbytes(x) for x in self.layers if isinstance(x, StreamingLayer))
        full = sum(_layer_nbytes(x) for x in self.layers if not isinstance(x, StreamingLayer))
        return {"total": full + lazy, "full": full, "lazy": lazy}
