"""The decode harness `decode.py` and `gpu_check.py` share: a shared prefill loaded into any cache, greedy
decode steps eager or compiled, operators per step, and the KV bytes of a sequence for a fixed-budget batch."""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache, StaticCache

from lt_train import HybridCache
from lt_train.hybrid_config import HybridConfig


def fill(cache, prefill: DynamicCache, batch: int, prompt: int, dev) -> None:
    """Put a batch-1 prefill, repeated over the batch, into `cache` through each layer's own update (the hybrid's
    lazy layers keep sinks + the last W tokens, exactly what they keep after a real prefill)."""
    pos = torch.arange(prompt, device=dev)[None].expand(batch, prompt)
    for i, src in enumerate(prefill.layers):
        k = src.keys.expand(batch, -1, -1, -1).contiguous()
        v = src.values.expand(batch, -1, -1, -1).contiguous()
        cache.update(k, v, i, kwargs={"position_ids": pos})
        del k, v


def make_cache(kind: str, config, length: int):
    """`static` (transformers' StaticCache, full model), `dynamic` (DynamicCache, full model), `hybrid` (eager
    HybridCache) or `hybrid_static` (the compilable HybridCache), sized for `length` tokens."""
    if kind == "static":
        return StaticCache(config=config, max_cache_len=length)
    if kind == "dynamic":
        return DynamicCache(config=config)
    return HybridCache(config, max_cache_len=length, static=kind == "hybrid_static")


def _step(model, tok, pos, cache):
    return model(tok, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]


def compiled(dev) -> callable:
    """The decode step as a user compiles it: one graph, fixed shapes, CUDA graphs on a GPU. Every new shape
    (batch, cache length, model) compiles once: the limit is raised so a table of shapes does not run into it."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(_step, fullgraph=True, dynamic=False,
                         mode="reduce-overhead" if dev.type == "cuda" else None)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def decode(model, cache, first, start: int, steps: int, dev, step=_step):
    """Greedy decode `steps` tokens from `first` [B, 1] at position `start`: (seconds, tokens [B, steps], the
    first step's logits)."""
    # contiguous: a compiled step guards on strides, and a column sliced out of a [B, n] tensor has other strides
    tok, toks, first_logits = first.contiguous(), [], None
    sync(dev)
    t0 = time.perf_counter()
    for s in range(steps):
        pos = torch.full((tok.shape[0], 1), start + s, device=dev)
        logits = step(model, tok, pos, cache)
        first_logits = logits.float().clone() if first_logits is None else first_logits
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
    sync(dev)
    return time.perf_counter() - t0, torch.cat(toks, 1), first_logits


@torch.no_grad()
def ops_per_step(model, cache, first, start: int, dev, step=_step) -> int:
    """Work dispatched by one decode step (it runs twice, advancing the cache by two tokens): on CUDA the kernels
    it runs (under CUDA graphs these replay from one launch, so for the compiled rows the count is the graph's
    size, not its launches); on CPU the ATen operators called from Python or from compiled code, not those nested
    inside another operator (inductor's own generated kernels are not ATen operators and are not counted) — the
    proxy for launch overhead that a CPU can measure, comparable between the eager rows."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    pos = torch.full((first.shape[0], 1), start, device=dev)
    first = first.contiguous()
    step(model, first, pos, cache)  # under the profiler once first: a compiled step may recompile for it
    with profile(activities=acts) as prof:
        step(model, first, pos, cache)
        sync(dev)
    events = prof.events()
    if dev.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


@torch.no_grad()
def time_split(model, cache, first, start: int, dev, step=_step, steps: int = 4, top: int = 5) -> list:
    """Where a decode step's time goes: the `top` operators by their own time over `steps` profiled steps, as
    (name, share of the steps' wall time), then the other ATen operators together, then what no ATen operator
    accounts for (Python and, in a compiled step, inductor's own generated kernels)."""
    from torch.profiler import ProfilerActivity, profile

    tok = first.contiguous()
    pos = torch.full((tok.shape[0], 1), start, device=dev)
    step(model, tok, pos, cache)  # a compiled step may recompile under the profiler: not timed
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        sync(dev)
        t0 = time.perf_counter()
        for s in range(steps):
            step(model, tok, pos + 1 + s, cache)
        sync(dev)
        wall = (time.perf_counter() - t0) * 1e6

    def own(e):
        return (e.self_device_time_total if dev.type == "cuda" else e.self_cpu_time_total) / wall

    rows = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")), key=own, reverse=True)
    split = [(e.key, own(e)) for e in rows[:top]]
    aten = sum(own(e) for e in rows)
    return split + [("other ATen operators", aten - sum(x for _, x in split)),
                    ("no ATen operator (Python, inductor's kernels)", max(0.0, 1 - aten))]


def kv_bytes_per_sequence(config, hc: HybridConfig | None, length: int, dtype: torch.dtype) -> int:
    """KV bytes one sequence of `length` tokens holds: a full layer keeps every token, a lazy one S + min(W, length)
    slots plus their position id and cache index (int64 each) — what `HybridCache(static=True)` allocates."""
    c = config.get_text_config(decoder=True)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_token = 2 * c.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8
    lazy = set(hc.lazy_layers) if hc is not None else set()
    total = 0
    for i in range(c.num_hidden_layers):
        if i in lazy:
            slots = hc.sink_tokens + min(hc.window, length)
            total += slots * (per_token + 16)
        else:
            total += length * per_token
    return total


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process: one per shape and model is expected, more means recompiles."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]
