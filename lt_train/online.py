"""LightTransfer-Test: the cache that chooses lazy layers during prefill (`OnlineHybridCache`), the policy on top
of the plain hybrid cache (cache.py) and the lazy-ratio arithmetic (lazy_ratio.py)."""
from __future__ import annotations

import heapq

from .cache import HybridCache, StreamingLayer
from .lazy_ratio import layer_lazy_ratio, layer_output_error, resolve_num_lazy

ONLINE = "lt_online"  # key under which OnlineHybridCache hands itself to the attention function


class OnlineHybridCache(HybridCache):
    """LightTransfer-Test: lazy layers chosen on the fly during prefill, from the prompt itself.

    Prefill runs full attention in every layer. After each layer's attention, its lazy ratio on the prompt
    (see `lt_train.lazy.layer_lazy_ratio`, averaged over the batch), or with `criterion="error"` minus its
    relative output error (`layer_output_error`), enters a priority queue of the layers that
    still hold a full cache; whenever that queue holds more than `num_full` layers, the laziest one is
    declared lazy and its cache is compressed at once to S sinks + W recent tokens. So at most
    `num_full + 1` full caches are alive at any time. Decoding then streams in the chosen layers."""

    def __init__(self, config, num_lazy: int | float, sink_tokens: int = 4, window: int = 1020,
                 last_queries: int = 64, max_cache_len: int | None = None, criterion: str = "ratio",
                 grow: bool = False):
        super().__init__(config, lazy_layers=[], sink_tokens=sink_tokens, window=window, max_cache_len=max_cache_len,
                         grow=grow)
        self.num_layers = len(self.layers)
        self.num_full = self.num_layers - resolve_num_lazy(num_lazy, self.num_layers)
        self.sink, self.window, self.last_queries = sink_tokens, window, last_queries
        self.selecting = True
        self.criterion = criterion
        self.ratios: dict[int, float] = {}  # the lazy ratio of each layer (criterion "ratio")
        self.errors: dict[int, float] = {}  # the relative output error of streaming (criterion "error")
        self.lazy_layers: list[int] = []
        self._queue: list[tuple[float, int]] = []  # (-ratio, layer): a max-heap on the ratio
        self.peak_nbytes = 0
        self.max_full_alive = 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.selecting and isinstance(kwargs.get("kwargs"), dict):
            kwargs["kwargs"][ONLINE] = self
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def observe(self, layer_idx: int, query, key, valid, position_ids, scaling, value=None, o_proj=None) -> None:
        """Called by the attention function right after layer `layer_idx` attended over the prompt. The layer's
        laziness is its lazy ratio, or minus its relative output error under streaming (criterion "error")."""
        if self.criterion == "error":
            err = float(layer_output_error(query, key, value, valid, self.sink, self.window, self.last_queries,
                                           o_proj, scaling).mean())
            self.errors[layer_idx] = err
            laziness = -err
        else:
            laziness = float(layer_lazy_ratio(query, key, valid, self.sink, self.window, self.last_queries,
                                              scaling).mean())
            self.ratios[layer_idx] = laziness
        heapq.heappush(self._queue, (-laziness, layer_idx))
        self.max_full_alive = max(self.max_full_alive, len(self._queue))
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes()["total"])
        while len(self._queue) > self.num_full:
            _, lazy = heapq.heappop(self._queue)
            self._compress(lazy, position_ids)
        if len(self.ratios) + len(self.errors) == self.num_layers:
            self.selecting = False

    def _compress(self, layer_idx: int, position_ids) -> None:
        full = self.layers[layer_idx]
        s = StreamingLayer(self.sink, self.window, self.max_cache_len)
        B, q = full.keys.shape[0], full.keys.shape[2]
        s.update(full.keys, full.values, kwargs={"position_ids": position_ids.expand(B, q)})
        self.layers[layer_idx] = s
        self.lazy_layers = sorted(self.lazy_layers + [layer_idx])
