"""Decode throughput and KV memory of a hybrid model vs the full model (SmolLM2-135M by default).

    python benchmarks/decode.py [--prompt 8192 --batch 8 --new 64 --sink 4 --window 1020]

One real prefill (batch 1, full model) is shared by both runs: its KV is repeated over the batch and, for
the hybrid run, compressed into the streaming layers exactly as `StreamingLayer.update` does after a
prefill (sinks + the last W-1 tokens). Both runs then decode `--new` tokens greedily, interleaved
`--repeats` times. The bound on the speed-up comes from bytes read per decode step:
(weights + full KV) / (weights + hybrid KV).
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
from lt_train.cache import StreamingLayer, cache_nbytes  # noqa: E402
from lt_train.models import load_model  # noqa: E402
from transformers import DynamicCache  # noqa: E402


def build_caches(model, prefill: DynamicCache, batch: int, lazy: list[int], prompt: int):
    full = DynamicCache()
    for i, layer in enumerate(prefill.layers):
        full.update(layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1), i)
    hybrid = HybridCache(model.config)
    pos = torch.arange(prompt)[None].expand(batch, prompt)
    for i, layer in enumerate(hybrid.layers):
        k, v = full.layers[i].keys, full.layers[i].values
        if isinstance(layer, StreamingLayer):
            layer.update(k, v, kwargs={"position_ids": pos})
        else:
            layer.update(k.clone(), v.clone())
    return full, hybrid


@torch.no_grad()
def decode(model, cache, first: torch.Tensor, start: int, steps: int) -> float:
    tok = first
    t0 = time.perf_counter()
    for s in range(steps):
        pos = torch.full((tok.shape[0], 1), start + s)
        logits = model(tok, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    full_model = load_model(args.model).eval()
    n = full_model.config.num_hidden_layers
    lazy = list(range(1, n, 2))  # every other layer: half the layers lazy
    hybrid_model = convert_to_hybrid(copy.deepcopy(full_model), HybridConfig(lazy, args.sink, args.window))

    torch.manual_seed(0)
    ids = torch.randint(100, full_model.config.vocab_size, (1, args.prompt))
    t0 = time.perf_counter()
    with torch.no_grad():
        prefill = full_model(ids, use_cache=True).cache
    print(f"shared prefill of {args.prompt} tokens: {time.perf_counter() - t0:.1f}s")
    first = torch.randint(100, full_model.config.vocab_size, (args.batch, 1))

    times = {"full": [], "hybrid": []}
    for _ in range(args.repeats):
        full_cache, hybrid_cache = build_caches(hybrid_model, prefill, args.batch, lazy, args.prompt)
        kv = {"full": cache_nbytes(full_cache), "hybrid": cache_nbytes(hybrid_cache)}
        times["full"].append(decode(full_model, full_cache, first, args.prompt, args.new))
        del full_cache
        times["hybrid"].append(decode(hybrid_model, hybrid_cache, first, args.prompt, args.new))
        del hybrid_cache
    weights = sum(p.numel() * p.element_size() for p in full_model.parameters())
    tps = {k: args.batch * args.new / min(v) for k, v in times.items()}
    bound = (weights + kv["full"]) / (weights + kv["hybrid"])
    ratio = tps["hybrid"] / tps["full"]
    print(f"model={args.model} layers={n} lazy={len(lazy)} S={args.sink} W={args.window} prompt={args.prompt} "
          f"batch={args.batch} new={args.new} threads={torch.get_num_threads()}")
    print(f"{'':>8} {'tokens/s':>10} {'KV MiB':>10}")
    for k in ("full", "hybrid"):
        print(f"{k:>8} {tps[k]:>10.1f} {kv[k] / 2**20:>10.1f}")
    print(f"KV bytes ratio hybrid/full: {kv['hybrid'] / kv['full']:.3f}")
    print(f"throughput ratio hybrid/full: {ratio:.2f}x; bytes-read bound: {bound:.2f}x; "
          f"ratio/bound: {ratio / bound:.0%}")


if __name__ == "__main__":
    main()
