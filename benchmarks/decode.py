"""Decode throughput and KV memory of a hybrid model against the full model with transformers' best caches,
eager and compiled, and throughput at a fixed KV budget (what the paper's 2.17x compares).

    python benchmarks/decode.py [--prompts 256,2048,8192 --batch 8 --new 32 --sink 4 --window 1020
                                 --kv-budget-gb 0.5 --no-compile --profile]

Per prompt length, interleaved `--repeats` times in one process (the order rotated, the fastest repeat kept):
- `static`: the full model with transformers' `StaticCache`, eager;
- `dynamic`: the full model with transformers' default `DynamicCache`, eager;
- `hybrid`: the converted model (every other layer lazy) with lt_train's `HybridCache`, eager;
- `static+c`: the full model with `StaticCache`, decode step compiled (`torch.compile(fullgraph=True,
  dynamic=False)`, CUDA graphs on a GPU) — the strongest full-model path a user has;
- `hybrid+c`: the hybrid with `HybridCache(static=True)`, its decode step compiled the same way.
One real prefill (batch 1, full model) is shared: its KV is repeated over the batch and loaded into each cache
through the cache's own `update`. Each run then decodes `--new` tokens greedily after `WARM` warm-up steps
(compilation happens there, outside the timing).

Tables: (a) tokens/s and the ratios eager hybrid / eager static and compiled hybrid / compiled static, against
the bound from the bytes a decode step reads, (weights + full KV) / (weights + hybrid KV); (b) operators
dispatched per decode step (kernels on CUDA; ATen operators on CPU), the proxy for launch overhead; (c) at a
fixed KV budget (`--kv-budget-gb`, prompt `--budget-prompt` + `--new`), each model at the largest batch whose
cache fits, tokens/s there, and the throughput ratio beside the capacity ratio; with `--profile`, (d) where a
decode step's time goes at the last prompt (operators by their own time, per variant).

On a CPU inductor's code is slower than eager (the compiled rows are for the GPU; here they are compared only
compiled to compiled).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _decode import (compiled, decode, fill, graphs_compiled, kv_bytes_per_sequence, make_cache,  # noqa: E402
                     ops_per_step, time_split)
from lt_train import HybridConfig, convert_to_hybrid  # noqa: E402
from lt_train.cache import cache_nbytes  # noqa: E402
from lt_train.models import load_model  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

WARM = 3


def kv_bytes(cache) -> int:
    if isinstance(cache, StaticCache):  # preallocated: what it holds is its whole buffer
        return sum(x.keys.numel() * x.keys.element_size() * 2 for x in cache.layers)
    return cache_nbytes(cache)


def prefill_of(model, prompt: int, dev) -> DynamicCache:
    torch.manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (1, prompt), device=dev)
    with torch.no_grad():
        return model(ids, use_cache=True, logits_to_keep=1).cache


def variants(full_model, hybrid_model, dev, compile_: bool) -> dict:
    """name: (model, cache kind, step)"""
    v = {"static": (full_model, "static", None), "dynamic": (full_model, "dynamic", None),
         "hybrid": (hybrid_model, "hybrid", None)}
    if compile_:
        step = compiled(dev)
        v["static+c"] = (full_model, "static", step)
        v["hybrid+c"] = (hybrid_model, "hybrid_static", step)
    return v


def warmed(model, kind, step, prefill, batch: int, prompt: int, new: int, first, dev):
    """A cache of `kind` sized for `new` steps after WARM warm-up steps (one shape per prompt and batch: a
    compiled step compiles once), filled with the prefill and warmed up: (cache, the last token, step keywords)."""
    cache = make_cache(kind, model.config, prompt + WARM + new + 2)
    fill(cache, prefill, batch, prompt, dev)
    kw = {} if step is None else {"step": step}
    _, warm, _ = decode(model, cache, first, prompt, WARM, dev, **kw)
    return cache, warm[:, -1:], kw


def run_variant(model, kind, step, prefill, batch: int, prompt: int, new: int, first, dev):
    """(seconds for `new` steps after WARM warm-up steps, tokens, KV bytes at the end, operators per step)"""
    cache, last, kw = warmed(model, kind, step, prefill, batch, prompt, new, first, dev)
    secs, toks, _ = decode(model, cache, last, prompt + WARM, new, dev, **kw)
    ops = ops_per_step(model, cache, toks[:, -1:], prompt + WARM + new, dev, **kw)
    return secs, toks, kv_bytes(cache), ops


def bench_prompt(vs: dict, prompt: int, args, dev) -> dict:
    prefill = prefill_of(vs["static"][0], prompt, dev)
    first = torch.randint(100, vs["static"][0].config.vocab_size, (args.batch, 1), device=dev)
    times: dict[str, list[float]] = {k: [] for k in vs}
    kv, ops, toks = {}, {}, {}
    names = list(vs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:  # no variant always follows another
            secs, toks[name], kv[name], ops[name] = run_variant(*vs[name], prefill, args.batch, prompt, args.new,
                                                                first, dev)
            times[name].append(secs)
    return {"tps": {k: args.batch * args.new / min(t) for k, t in times.items()}, "kv": kv, "ops": ops,
            "same_tokens": {k: torch.equal(toks[k], toks[k.replace("+c", "")]) for k in vs if k.endswith("+c")}}


def budget_table(vs: dict, hc: HybridConfig, args, dev, weights: int) -> None:
    """Largest batch whose KV fits the budget at prompt + new tokens, for each model, and tokens/s there."""
    prompt, length = args.budget_prompt, args.budget_prompt + WARM + args.new + 2
    budget = args.kv_budget_gb * 2**30
    dtype = next(vs["static"][0].parameters()).dtype
    full_name, hyb_name = ("static+c", "hybrid+c") if "static+c" in vs else ("static", "hybrid")
    rows = {}
    prefill = prefill_of(vs["static"][0], prompt, dev)
    for name, hcfg in ((full_name, None), (hyb_name, hc)):
        per_seq = kv_bytes_per_sequence(vs[name][0].config, hcfg, length, dtype)
        batch = min(args.max_batch, int(budget // per_seq))
        if batch < 1:
            sys.exit(f"--kv-budget-gb {args.kv_budget_gb} holds no sequence of {length} tokens ({per_seq / 2**20:.0f} "
                     "MiB each): raise it or lower --budget-prompt")
        first = torch.randint(100, vs[name][0].config.vocab_size, (batch, 1), device=dev)
        secs = min(run_variant(*vs[name], prefill, batch, prompt, args.new, first, dev)[0] for _ in range(args.repeats))
        rows[name] = (per_seq, batch, batch * args.new / secs)
    capped = " (capped by --max-batch)" if any(r[1] == args.max_batch for r in rows.values()) else ""
    print(f"\n(c) fixed KV budget {args.kv_budget_gb} GiB, prompt {prompt} + {args.new} new, weights "
          f"{weights / 2**30:.2f} GiB not counted{capped}")
    print(f"{'model':>9} | {'KV MiB/seq':>10} {'batch':>5} {'tok/s':>8}")
    for name, (per_seq, batch, tps) in rows.items():
        print(f"{name:>9} | {per_seq / 2**20:>10.1f} {batch:>5} {tps:>8.1f}")
    (pf, bf, tf), (ph, bh, th) = rows[full_name], rows[hyb_name]
    print(f"capacity ratio {bh / bf:.2f}x (bytes {pf / ph:.2f}x), throughput ratio {th / tf:.2f}x")


def profile_table(vs: dict, prompt: int, args, dev) -> None:
    """(d) where one decode step's time goes at `prompt`, per variant (static full and hybrid, eager and compiled)."""
    prefill = prefill_of(vs["static"][0], prompt, dev)
    first = torch.randint(100, vs["static"][0].config.vocab_size, (args.batch, 1), device=dev)
    print(f"\n(d) where a decode step's time goes, prompt {prompt}, batch {args.batch}: operators by their own "
          "time, share of the step")
    for name in (k for k in ("static", "hybrid", "static+c", "hybrid+c") if k in vs):
        cache, last, kw = warmed(*vs[name], prefill, args.batch, prompt, args.new, first, dev)
        split = time_split(vs[name][0], cache, last, prompt + WARM, dev, **kw)
        print(f"{name:>9} | " + ", ".join(f"{n.replace('aten::', '')} {x:.0%}" for n, x in split), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", default="256,2048,8192", help="comma-separated prompt lengths")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true", help="eager rows only")
    ap.add_argument("--kv-budget-gb", type=float, default=0.5, help="0: skip the fixed-budget table")
    ap.add_argument("--budget-prompt", type=int, default=2048)
    ap.add_argument("--max-batch", type=int, default=64, help="cap on the fixed-budget batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--profile", action="store_true", help="(d) where a decode step's time goes, at the last prompt")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    full_model = load_model(args.model).to(dev).eval()
    n = full_model.config.num_hidden_layers
    hc = HybridConfig(list(range(1, n, 2)), args.sink, args.window)  # every other layer: half the layers lazy
    hybrid_model = convert_to_hybrid(copy.deepcopy(full_model), hc)
    weights = sum(p.numel() * p.element_size() for p in full_model.parameters())
    vs = variants(full_model, hybrid_model, dev, not args.no_compile)
    print(f"model={args.model} device={dev} layers={n} lazy={len(hc.lazy_layers)} S={args.sink} W={args.window} "
          f"batch={args.batch} new={args.new} repeats={args.repeats} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}")
    results = {}
    print("\n(a) tokens/s")
    print(f"{'prompt':>6} | " + " ".join(f"{k:>9}" for k in vs) + f" | {'static KV':>9} {'hybrid KV':>9} MiB | "
          f"{'eager':>6} {'compiled':>8} {'bound':>6} {'reached':>7} | compiled = eager tokens")
    for prompt in (int(p) for p in args.prompts.split(",")):
        r = results[prompt] = bench_prompt(vs, prompt, args, dev)
        tps, kv = r["tps"], r["kv"]
        bound = (weights + kv["static"]) / (weights + kv["hybrid"])
        eager = tps["hybrid"] / tps["static"]
        comp = tps["hybrid+c"] / tps["static+c"] if "hybrid+c" in tps else None
        print(f"{prompt:>6} | " + " ".join(f"{tps[k]:>9.1f}" for k in vs) +
              f" | {kv['static'] / 2**20:>9.1f} {kv['hybrid'] / 2**20:>9.1f}     | {eager:>5.2f}x "
              + (f"{comp:>7.2f}x" if comp else f"{'-':>8}") + f" {bound:>5.2f}x {(comp or eager) / bound:>7.0%} | "
              + " ".join(f"{k}: {v}" for k, v in r["same_tokens"].items()), flush=True)
    print("\n(b) operators per decode step (" + ("CUDA kernels" if dev.type == "cuda" else "ATen operators") + ")")
    print(f"{'prompt':>6} | " + " ".join(f"{k:>9}" for k in vs) + " | hybrid/static eager, compiled")
    for prompt, r in results.items():
        o = r["ops"]
        comp = f"{o['hybrid+c'] / max(1, o['static+c']):.2f}x" if "hybrid+c" in o else "-"
        print(f"{prompt:>6} | " + " ".join(f"{o[k]:>9}" for k in vs) + f" | {o['hybrid'] / o['static']:.2f}x, {comp}")
    if args.kv_budget_gb > 0:
        budget_table(vs, hc, args, dev, weights)
    if args.profile:
        profile_table(vs, int(args.prompts.split(",")[-1]), args, dev)
    if not args.no_compile:  # each compiled variant: one graph per (prompt, batch); more would be recompilations
        print(f"\ngraphs compiled: {graphs_compiled()}")


if __name__ == "__main__":
    main()
