"""Decode throughput and KV memory of a hybrid model against the full model with transformers' best caches.

    python benchmarks/decode.py [--prompts 256,2048,4096,8192 --batch 8 --new 32 --sink 4 --window 1020]

Three runs per prompt length, interleaved `--repeats` times in one process (the order rotated each time, the
fastest repeat kept):
- `static`: the full model with transformers' `StaticCache` (preallocated, `cache_implementation="static"`),
  the strongest full-model path a user has;
- `dynamic`: the full model with transformers' default `DynamicCache` (grows by `torch.cat`);
- `hybrid`: the converted model (every other layer lazy) with lt_train's `HybridCache`.
One real prefill (batch 1, full model) is shared: its KV is repeated over the batch and loaded into each cache
through the cache's own `update` (so the hybrid's lazy layers keep sinks + the last W tokens, exactly what they
keep after a real prefill). Each run then decodes `--new` tokens greedily, one token per forward.

The bound on the hybrid's speed-up over `static` comes from the bytes a decode step must read:
(weights + full-model KV) / (weights + hybrid KV), the KV taken at the last step; `reached` is the measured
ratio over that bound.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lt_train import HybridCache, HybridConfig, convert_to_hybrid  # noqa: E402
from lt_train.cache import cache_nbytes  # noqa: E402
from lt_train.models import load_model  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402


def fill(cache, prefill: DynamicCache, batch: int, prompt: int):
    """Load the shared prefill into `cache` through each layer's own update."""
    pos = torch.arange(prompt)[None].expand(batch, prompt)
    for i, layer in enumerate(prefill.layers):
        k, v = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)
        cache.update(k, v, i, kwargs={"position_ids": pos})
    return cache


def kv_bytes(cache) -> int:
    if isinstance(cache, StaticCache):  # preallocated: what it holds is its whole buffer
        return sum(x.keys.numel() * x.keys.element_size() * 2 for x in cache.layers)
    return cache_nbytes(cache)


@torch.no_grad()
def decode(model, cache, first: torch.Tensor, start: int, steps: int) -> float:
    tok = first
    t0 = time.perf_counter()
    for s in range(steps):
        pos = torch.full((tok.shape[0], 1), start + s)
        logits = model(tok, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def bench_prompt(full_model, hybrid_model, prompt: int, args) -> dict:
    cfg = full_model.config
    torch.manual_seed(0)
    ids = torch.randint(100, cfg.vocab_size, (1, prompt))
    with torch.no_grad():
        prefill = full_model(ids, use_cache=True).cache
    first = torch.randint(100, cfg.vocab_size, (args.batch, 1))
    makers = {
        "static": lambda: StaticCache(config=cfg, max_cache_len=prompt + args.new),
        "dynamic": lambda: DynamicCache(config=cfg),
        "hybrid": lambda: HybridCache(hybrid_model.config, max_cache_len=prompt + args.new),
    }
    models = {"static": full_model, "dynamic": full_model, "hybrid": hybrid_model}
    times: dict[str, list[float]] = {k: [] for k in makers}
    kv: dict[str, int] = {}
    names = list(makers)
    for r in range(args.repeats):
        for name in names[r % 3:] + names[: r % 3]:  # rotate the order: no variant always follows another
            cache = fill(makers[name](), prefill, args.batch, prompt)
            times[name].append(decode(models[name], cache, first, prompt, args.new))
            kv[name] = kv_bytes(cache)
            del cache
    tps = {k: args.batch * args.new / min(v) for k, v in times.items()}
    return {"tps": tps, "kv": kv}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", default="256,2048,4096,8192", help="comma-separated prompt lengths")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    full_model = load_model(args.model).eval()
    n = full_model.config.num_hidden_layers
    lazy = list(range(1, n, 2))  # every other layer: half the layers lazy
    hybrid_model = convert_to_hybrid(copy.deepcopy(full_model), HybridConfig(lazy, args.sink, args.window))
    weights = sum(p.numel() * p.element_size() for p in full_model.parameters())
    print(f"model={args.model} layers={n} lazy={len(lazy)} S={args.sink} W={args.window} batch={args.batch} "
          f"new={args.new} repeats={args.repeats} threads={torch.get_num_threads()}")
    print(f"{'prompt':>6} | {'static tok/s':>12} {'dynamic tok/s':>13} {'hybrid tok/s':>12} | "
          f"{'static KV MiB':>13} {'hybrid KV MiB':>13} | {'vs static':>9} {'vs dynamic':>10} {'bound':>6} "
          f"{'reached':>7}")
    for prompt in (int(p) for p in args.prompts.split(",")):
        r = bench_prompt(full_model, hybrid_model, prompt, args)
        tps, kv = r["tps"], r["kv"]
        bound = (weights + kv["static"]) / (weights + kv["hybrid"])
        vs_static = tps["hybrid"] / tps["static"]
        print(f"{prompt:>6} | {tps['static']:>12.1f} {tps['dynamic']:>13.1f} {tps['hybrid']:>12.1f} | "
              f"{kv['static'] / 2**20:>13.1f} {kv['hybrid'] / 2**20:>13.1f} | {vs_static:>8.2f}x "
              f"{tps['hybrid'] / tps['dynamic']:>9.2f}x {bound:>5.2f}x {vs_static / bound:>7.0%}", flush=True)


if __name__ == "__main__":
    main()
