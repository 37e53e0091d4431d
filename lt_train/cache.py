"""Hybrid KV cache: full layers in preallocated buffers, lazy (streaming) layers keep S sinks + the last W tokens.

`FullLayer` writes each step's tokens in place into a buffer sized once (or grown in large steps), so a decode
step does not copy the whole history as transformers' `DynamicLayer` does.

`StreamingLayer` is a transformers `CacheLayerMixin` with a fixed buffer of S + W slots per row:
- slots [0, S): the sink tokens, slot s holding the token whose position id is s;
- slots [S, S + W): a ring indexed by cache index, holding the W most recent tokens (tokens with a position
  id below S sit there too while the ring has not wrapped; the general path counts them once, as sinks).
Keys are cached after RoPE, so the order of slots does not matter: the attention mask is computed from the
position id, cache index and validity stored beside each slot. These travel to the attention function
through the `kwargs` dict that transformers hands to `Cache.update` and then to the attention interface.
"""
from __future__ import annotations

import torch
import transformers
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, StaticLayer
from transformers.utils import is_torchdynamo_compiling

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

# static cache lengths are rounded up to a multiple of this: calls of different lengths share one compiled step
STATIC_BUCKET = 256


def static_length(tokens: int) -> int:
    return -(-tokens // STATIC_BUCKET) * STATIC_BUCKET


KV_META = "lt_kv_meta"  # key under which a StreamingLayer passes slot metadata to the attention function
INVALID_POS = 1 << 60  # position of an empty slot: never <= a query position, so always masked


def contiguous_validity(pos: torch.Tensor) -> torch.Tensor:
    """Tokens that belong to the contiguous run of positions ending at the last token of each row.

    generate() gives left padding the position id 0; this tells those pads from the real token at
    position 0. Tokens it keeps can still be masked later by the attention mask."""
    q = pos.shape[-1]
    expected = pos[:, -1:] - (q - 1) + torch.arange(q, device=pos.device)
    return (pos == expected) & (expected >= 0)


class _CountedLayer(CacheLayerMixin):
    """What both layer kinds share: the tokens seen so far (not the buffer size) and the batch operations,
    written once over each layer's own `_select(fn)` (fn applied to every per-row tensor it holds)."""

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the full-length mask: a streaming layer looks its slots up in it by cache index
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def _select(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda x: x[indices.to(x.device)])


class FullLayer(_CountedLayer):
    """A full layer's cache in a preallocated buffer: each step writes its tokens in place and attention reads a
    view of the filled part, so no step copies the whole history (transformers' `DynamicLayer` does, by
    `torch.cat`). Sized from `max_cache_len` when the caller knows it (`generate`), else grown by an
    eighth (at least `MIN_GROW` tokens) at a time, which amortises the copies to a few tokens per step."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    MIN_GROW = 256

    def __init__(self, max_cache_len: int | None = None, grow: bool = False, **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.grow = grow
        self.seen = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[3])
        self._v = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[3])
        self._views()
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.seen], self._v[:, :, : self.seen]

    def _reserve(self, tokens: int) -> None:
        cap = self._k.shape[2]
        if tokens <= cap:
            return
        new = tokens if cap == 0 else max(tokens, cap + max(self.MIN_GROW, cap // 8))
        if self.max_cache_len is not None and tokens <= self.max_cache_len:
            # sized: the first reserve takes the whole length; grow (the length is only an upper bound) or a
            # later reserve: grow with the tokens, never past it
            sized = cap == 0 and not self.grow
            new = self.max_cache_len if sized else max(tokens, min(new, self.max_cache_len))
        k = self._k.new_empty(*self._k.shape[:2], new, self._k.shape[3])
        v = self._v.new_empty(*self._v.shape[:2], new, self._v.shape[3])
        k[:, :, : self.seen] = self._k[:, :, : self.seen]
        v[:, :, : self.seen] = self._v[:, :, : self.seen]
        self._k, self._v = k, v

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        self._reserve(self.seen + q)
        self._k[:, :, self.seen : self.seen + q] = key_states
        self._v[:, :, self.seen : self.seen + q] = value_states
        self.seen += q
        self._views()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if self.is_initialized and tokens_to_remove:
            self.seen = max(0, self.seen + tokens_to_remove)
            self._views()

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0

    def _select(self, fn) -> None:
        if self.is_initialized:
            self._k, self._v = fn(self._k[:, :, : self.seen]), fn(self._v[:, :, : self.seen])
            self._views()

    def nbytes(self) -> int:
        """Bytes allocated (the whole buffer, not only the filled part)."""
        if not self.is_initialized:
            return 0
        return self._k.numel() * self._k.element_size() + self._v.numel() * self._v.element_size()


class StreamingLayer(_CountedLayer):
    """Constant-size cache for one lazy layer: S sinks + a ring of the W most recent tokens.

    A decode step (one new token per row) writes its token into the ring first, over the token that just left
    the window, and attends over the buffer as it stands, with no mask when every slot holds a token in view
    (the common case once the ring has wrapped) and with only the ring while it has not wrapped (then it holds
    every token, and the layer costs what a full one does). Host-side flags (`sinks_full`, `last_odd`) say when
    that holds without a device sync per step. Other calls (prefill, chunks of several tokens) go through the
    general path: buffer + new tokens with their position metadata."""

    is_sliding = True  # so transformers sizes the shared mask from a full layer
    is_compileable = False
    is_croppable = False
    GROW = 64  # slots added at a time while the sequence is shorter than S + W (a copy per 64 tokens)

    def __init__(self, sink_tokens: int, window: int, max_cache_len: int | None = None, **kwargs):
        super().__init__()
        self.sink = sink_tokens
        self.ring = window
        self.max_cache_len = max_cache_len  # a known sequence length caps the buffer below S + W
        self.seen = 0  # tokens seen so far (the sequence length, not the buffer size)
        self.sinks_full = False  # every row's S sink slots hold its first S tokens
        self.last_pad = -1  # largest cache index of a padding token stored (-1: none)
        self.last_odd = -1  # largest cache index of a token that is not a valid ring entry (padding, position < S)

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
        sequence needs only S + i slots: the buffer grows in steps of GROW slots up to S + W, and a lazy layer
        never holds more than a full one would (beyond one step)."""
        cap = self.keys.shape[2]
        need = self.sink + min(self.ring, tokens)
        if need <= cap:
            return
        new = min(self.sink + self.ring, self.sink + -(-(need - self.sink) // self.GROW) * self.GROW)
        if self.max_cache_len is not None:
            new = max(need, min(new, self.sink + self.max_cache_len))
        self.keys = torch.cat([self.keys, self.keys.new_zeros(*self.keys.shape[:2], new - cap, self.keys.shape[3])], 2)
        self.values = torch.cat(
            [self.values, self.values.new_zeros(*self.values.shape[:2], new - cap, self.values.shape[3])], 2)
        self.pos = torch.cat([self.pos, self.pos.new_full((self.pos.shape[0], new - cap), INVALID_POS)], 1)
        self.idx = torch.cat([self.idx, self.idx.new_full((self.idx.shape[0], new - cap), -1)], 1)

    def _slot_validity(self) -> torch.Tensor:
        """[B, slots]: slots that hold a token the general path may attend to (ring entries of the first S
        positions are copies of the sinks: those count once, in the sink slots)."""
        ring = torch.arange(self.pos.shape[1], device=self.pos.device) >= self.sink
        return (self.pos != INVALID_POS) & ~(ring & (self.pos < self.sink))

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **_):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, _, q, _ = key_states.shape
        dev = key_states.device
        pos = kwargs.get("position_ids") if kwargs is not None else None
        if q == 1 and self.seen > 0 and self.sinks_full:
            return self._decode_step(key_states, value_states, pos, kwargs)
        new_idx = (self.seen + torch.arange(q, device=dev)).expand(B, q)
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
                    "valid": torch.cat([self._slot_validity(), valid], dim=1),
                    "sink": self.sink,
                    "window": self.ring,
                }
        self._grow(self.seen + q)
        self._store(key_states, value_states, new_pos, new_idx, valid)
        self.seen += q
        return out_k, out_v

    def _decode_step(self, k, v, pos, kwargs):
        """One token per row, every row's sinks already filled (so the token's position is >= S): write it into
        its ring slot, then hand the attention the slots in view."""
        S, W, t = self.sink, self.ring, self.seen
        self._grow(t + 1)
        slot = S + t % W
        self.keys[:, :, slot : slot + 1] = k
        self.values[:, :, slot : slot + 1] = v
        if pos is not None:
            self.pos[:, slot : slot + 1] = pos.to(self.pos.device)
        else:
            self.pos[:, slot] = t
        self.idx[:, slot] = t
        self.seen = t + 1
        if t < W:  # the ring has not wrapped: it holds tokens 0..t in slots S..S+t, i.e. every token
            lo, hi = S, S + t + 1
            valid = None if self.last_pad < 0 else (self.pos[:, lo:hi] != INVALID_POS)
            idx = None  # slot S + i holds cache index i: the attention mask applies as it is
        else:  # the ring holds tokens t-W+1..t, all in view; sinks before them
            lo, hi = 0, S + W
            valid = None if self.last_odd <= t - W else self._slot_validity()
            idx = self.idx
        if kwargs is not None:
            kwargs[KV_META] = {"decode": True, "valid": valid, "idx": idx, "sink": S, "window": W}
        return self.keys[:, :, lo:hi], self.values[:, :, lo:hi]

    def _store(self, k, v, pos, idx, valid) -> None:
        self._write(k, v, pos, idx, valid)
        S = self.sink
        # host-side flags for the decode fast path (a device sync, once per call of several tokens)
        self.sinks_full = bool((self.pos[:, :S] != INVALID_POS).all()) if S > 0 else True
        pad_idx = torch.where(valid, -1, idx)
        odd_idx = torch.where(valid & (pos >= S), -1, idx)
        self.last_pad = max(self.last_pad, int(pad_idx.max()))
        self.last_odd = max(self.last_odd, int(odd_idx.max()))

    def _write(self, k, v, pos, idx, valid) -> None:
        """Store tokens in place, by device tensors only: sinks by position id, the ring by cache index."""
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
            # tokens of the first S positions also stay in the ring (a short sequence attends over the ring
            # alone); `_slot_validity` keeps the general path from counting them twice
            keep_pos = torch.where(valid, pos, INVALID_POS)[:, q - n :]
            self.keys.index_copy_(2, slots, k[:, :, q - n :])
            self.values.index_copy_(2, slots, v[:, :, q - n :])
            self.pos.index_copy_(1, slots, keep_pos)
            self.idx.index_copy_(1, slots, idx[:, q - n :])

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.seen = 0
        self.sinks_full, self.last_pad, self.last_odd = False, -1, -1

    def _select(self, fn) -> None:
        if self.is_initialized:
            self.keys, self.values = fn(self.keys), fn(self.values)
            self.pos, self.idx = fn(self.pos), fn(self.idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a streaming layer cannot be cropped (evicted tokens are gone); assisted or speculative decoding "
            "is not supported with HybridCache"
        )

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pos, self.idx))


def _check_static(capacity: tuple[int, int], seen: int | None, key_states: torch.Tensor) -> None:
    """Refuse, in the eager calls of a static layer, a batch it was not sized for or tokens past its end (the
    compiled decode step cannot check without a host sync: `generate` sizes the cache from its arguments).
    `capacity`: (batch, tokens) it was allocated for; `seen`: tokens in it, None to skip the length check."""
    batch, tokens = capacity
    if key_states.shape[0] != batch:
        raise ValueError(f"a static hybrid cache sized for batch {batch} got a batch of {key_states.shape[0]}; "
                         "build the cache for this batch")
    if seen is not None and seen + key_states.shape[2] > tokens:
        raise ValueError(f"the static hybrid cache holds {tokens} tokens; {seen} are in and {key_states.shape[2]} "
                         "more came: size it for prompt + new tokens")


class StaticStreamingLayer(StreamingLayer):
    """A `StreamingLayer` whose decode step compiles to one graph (`torch.compile(fullgraph=True)`, CUDA graphs):
    its buffer of S + W slots is allocated once at the first update, at a fixed address, and a one-token step
    reads and writes it by device tensors only — the token's ring slot comes from a token counter kept as a
    tensor, the mask from the position ids and cache indices stored beside each slot — so no Python value that
    changes per step enters the step and nothing recompiles as decoding goes on (through the ring's wrap, past
    the window, with left padding). Each step attends over all S + W slots with that mask: the attention is the
    same as the eager layer's, at the cost of masked slots while the ring fills. Calls of several tokens
    (prefill, chunks) run eager through `StreamingLayer`'s general path."""

    is_compileable = True

    def __init__(self, sink_tokens: int, window: int, max_cache_len: int, **kwargs):
        super().__init__(sink_tokens, window, max_cache_len)
        self.cumulative_length = torch.tensor(0, dtype=torch.long)  # a tensor: read in the step without a guard

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        # a sequence shorter than the window never wraps: t % W < max_cache_len
        self._grow(self.max_cache_len)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not is_torchdynamo_compiling():  # fixed addresses, so CUDA graphs can replay the step
            for t in (self.keys, self.values, self.pos, self.idx, self.cumulative_length):
                torch._dynamo.mark_static_address(t)

    def _grow(self, tokens: int) -> None:
        if self.keys.shape[2] == 0:  # only the first allocation: a static buffer never moves
            super()._grow(tokens)

    def update(self, key_states, value_states, *args, kwargs: dict | None = None, **_):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = kwargs.get("position_ids") if kwargs is not None else None
        if key_states.shape[2] == 1:
            _check_static((self.keys.shape[0], self.max_cache_len), None, key_states)
            return self._static_step(key_states, value_states, pos, kwargs)
        self.seen = int(self.cumulative_length)  # eager: a host sync is fine here
        _check_static((self.keys.shape[0], self.max_cache_len), self.seen, key_states)
        out = super().update(key_states, value_states, kwargs=kwargs)
        self.cumulative_length.fill_(self.seen)
        return out

    def _static_step(self, k, v, pos, kwargs):
        B = k.shape[0]
        idx = self.cumulative_length.view(1, 1).expand(B, 1)
        pos = idx if pos is None else pos.to(self.device).expand(B, 1)
        self._write(k, v, pos, idx, pos >= 0)
        self.cumulative_length.add_(1)
        if kwargs is not None:
            kwargs[KV_META] = {"static": True, "pos": self.pos, "idx": self.idx, "valid": self._slot_validity(),
                               "sink": self.sink, "window": self.ring}
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0  # as transformers' StaticLayer: the mask never changes shape

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:  # keep the buffers (and their addresses): empty every slot
            self.pos.fill_(INVALID_POS)
            self.idx.fill_(-1)
            self.cumulative_length.zero_()
        self.seen = 0
        self.sinks_full, self.last_pad, self.last_odd = False, -1, -1

    def _select(self, fn) -> None:
        raise NotImplementedError("a static hybrid cache keeps its batch: build one per batch")


class StaticFullLayer(StaticLayer):
    """transformers' `StaticLayer`, refusing a prefill that overflows it or a batch it was not sized for."""

    def update(self, key_states, value_states, *args, **kwargs):
        eager = key_states.shape[2] > 1 and not is_torchdynamo_compiling()
        batch = self.keys.shape[0] if self.is_initialized else key_states.shape[0]  # the first call sizes it
        _check_static((batch, self.max_cache_len), int(self.cumulative_length) if eager else None, key_states)
        return super().update(key_states, value_states, *args, **kwargs)


def _layer_nbytes(layer) -> int:
    if isinstance(layer, (StreamingLayer, FullLayer)):
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
    """Per-layer cache of a hybrid model: `FullLayer` (preallocated) for full layers, `StreamingLayer` for lazy
    ones; a layer the model config makes sliding-window keeps transformers' own sliding layer.

    `generate()` of a converted model builds one automatically (sized from the prompt and `max_new_tokens`);
    build it by hand for `forward` calls. `max_cache_len`: the longest sequence expected (prompt + new
    tokens), so that full layers allocate once; without it they grow in large steps. `grow=True`: the length is
    only an upper bound (rows that end at very different lengths): full layers grow with the tokens up to it."""

    def __init__(self, config, lazy_layers: list[int] | None = None, sink_tokens: int | None = None,
                 window: int | None = None, max_cache_len: int | None = None, grow: bool = False,
                 static: bool = False):
        hc = HybridConfig.from_model_config(config) if lazy_layers is None else None
        lazy = set(lazy_layers if lazy_layers is not None else hc.lazy_layers)
        S = sink_tokens if sink_tokens is not None else hc.sink_tokens
        W = window if window is not None else hc.window
        if static and (max_cache_len is None or grow):
            raise ValueError("a static hybrid cache (for a compiled decode step) needs max_cache_len, the "
                             "prompt + new tokens it must hold, and cannot grow")
        self.max_cache_len, self.grow, self.static = max_cache_len, grow, static
        base = DynamicCache(config=config)
        n = config.get_text_config(decoder=True).num_hidden_layers
        streaming = StaticStreamingLayer if static else StreamingLayer
        layers = [streaming(S, W, max_cache_len) if i in lazy else self._full_layer(base, i) for i in range(n)]
        super().__init__(layers=layers)

    def _full_layer(self, base: DynamicCache, i: int):
        if i < len(base.layers) and type(base.layers[i]) is not DynamicLayer:
            if self.static:
                raise ValueError("a static hybrid cache does not support the model's own sliding-window layers")
            return base.layers[i]  # e.g. a sliding-window layer of the model's own config
        return StaticFullLayer(self.max_cache_len) if self.static else FullLayer(self.max_cache_len, self.grow)

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the cache: total, full layers, lazy layers."""
        lazy = sum(_layer_nbytes(x) for x in self.layers if isinstance(x, StreamingLayer))
        full = sum(_layer_nbytes(x) for x in self.layers if not isinstance(x, StreamingLayer))
        return {"total": full + lazy, "full": full, "lazy": lazy}
