"""Held-out NLL of SmolLM2-135M with half its layers lazy, per selection strategy.

    python benchmarks/selection_quality.py [--length 2048 --sink 4 --window 252 --calib 4 --heldout 8] [--no-online]

Real long chain-of-thought text (problem + response) from ../shared/data/long_cot_sft.jsonl (or --data): the
first --calib samples long enough are used to select layers, the next --heldout ones to measure the NLL
increase over the full model. No fine-tuning: this measures the selection alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from lt_train import HybridConfig, convert_to_hybrid, revert_hybrid  # noqa: E402
from lt_train.lazy import select_with_stats  # noqa: E402
from lt_train.models import load_model, load_tokenizer  # noqa: E402
from lt_train.nll import mean_nll  # noqa: E402

DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "long_cot_sft.jsonl")


def load_texts(path: str, tok, length: int, n: int) -> list[torch.Tensor]:
    if not os.path.exists(path):
        sys.exit(f"data file {path} not found: pass --data with a JSONL of problem/response rows")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids = tok(row["problem"] + "\n\n" + row["response"], return_tensors="pt").input_ids[0]
            if ids.numel() >= length:
                out.append(ids[:length])
            if len(out) == n:
                break
    if len(out) < n:
        sys.exit(f"only {len(out)} samples of >= {length} tokens in {path}, need {n}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=252)
    ap.add_argument("--last-queries", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--calib", type=int, default=4)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--strategies", default="nll,error,ratio,frequency,first,last,pyramid",
                    help="comma-separated offline strategies to compare (nll takes one forward per layer and sample)")
    ap.add_argument("--online", action=argparse.BooleanOptionalAction, default=True,
                    help="also compare the online criteria (LightTransfer-Test)")
    args = ap.parse_args()

    model = load_model(args.model).eval()
    tok = load_tokenizer(args.model)
    texts = load_texts(args.data, tok, args.length, args.calib + args.heldout)
    calib, heldout = texts[: args.calib], texts[args.calib :]
    S, W = args.sink, args.window
    full = mean_nll(model, heldout)
    rows = []
    # the cost of one plain forward over the calibration samples, to express each selection's cost in forwards
    t0 = time.perf_counter()
    mean_nll(model, calib)
    forward = time.perf_counter() - t0
    for strategy in args.strategies.split(","):
        t0 = time.perf_counter()
        layers = select_with_stats(model, calib, args.fraction, strategy, S, W, args.last_queries).layers
        took = time.perf_counter() - t0
        convert_to_hybrid(model, HybridConfig(layers, S, W))
        rows.append((strategy, mean_nll(model, heldout) - full, layers, took))
        revert_hybrid(model)
        print(f"{strategy:>10}: dNLL {rows[-1][1]:+.4f}  layers {layers}  (selection {took:.0f}s)", flush=True)
    draws, random_layers = [], []
    for seed in range(args.random_draws):
        layers = select_with_stats(model, calib[:1], args.fraction, "random", S, W, args.last_queries, seed).layers
        random_layers.append(layers)
        convert_to_hybrid(model, HybridConfig(layers, S, W))
        draws.append(mean_nll(model, heldout) - full)
        revert_hybrid(model)
        print(f"random seed {seed}: dNLL {draws[-1]:+.4f}  layers {layers}", flush=True)

    print(f"\nmodel={args.model} tokens/sample={args.length} S={S} W={W} lazy={args.fraction:.0%} "
          f"calibration={args.calib} held-out={args.heldout} full-model NLL={full:.4f}")
    print("| strategy | held-out NLL increase | selection cost |\n|---|---:|---:|")
    for strategy, d, _, took in rows:
        name = f"{strategy} (default)" if strategy == "nll" else strategy
        print(f"| {name} | {d:+.4f} | {took:.0f} s ({took / forward:.1f} forwards) |")
    if len(draws) > 1:
        print(f"| random, mean ± sd of {len(draws)} draws | {statistics.mean(draws):+.4f} ± "
              f"{statistics.stdev(draws):.4f} (min {min(draws):+.4f}, max {max(draws):+.4f}) | |")
    if args.online:
        fixed = [(f"fixed: offline `{strategy}` layers", [layers]) for strategy, _, layers, _ in rows]
        if random_layers:
            fixed.append((f"fixed: random layers, mean of {len(random_layers)} draws", random_layers))
        rows_online = online_rows(model, heldout, args, fixed)
        print(f"\nLightTransfer-Test (online, {args.fraction:.0%} lazy, chosen during the prefill of the first "
              f"{args.length // 2} tokens of each held-out text; NLL of the other {args.length - args.length // 2} "
              "teacher-forced; fixed rows: the same layers for every text, for comparison):")
        print("| layers | continuation NLL increase | seconds (prefill + continuation, all texts) |")
        print("|---|---:|---:|")
        for criterion, d, took in rows_online:
            print(f"| {criterion} | {d:+.4f} | {took:.0f} |")


@torch.no_grad()
def continuation_nll(model, ids: torch.Tensor, prompt: int, cache) -> tuple[float, list[int]]:
    """Mean NLL of the tokens after the first `prompt` ones, teacher-forced through `cache` after a prefill of
    the prompt (an online cache picks its lazy layers during that prefill); and the layers it made lazy."""
    import torch.nn.functional as F

    first = model(ids[None, :prompt], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    pos = torch.arange(prompt, ids.numel())[None]
    rest = model(ids[None, prompt:], cache=cache, use_cache=True, position_ids=pos).logits[0]
    logits = torch.cat([first[None], rest[:-1]])
    nll = F.cross_entropy(logits.float(), ids[prompt:]).item()
    return nll, list(getattr(cache, "lazy_layers", []))


def online_rows(model, heldout, args, fixed=()) -> list[tuple[str, float, float]]:
    """LightTransfer-Test: on each held-out text the first half is the prompt, during whose prefill the online
    queue picks the lazy layers (by `ratio` or by `error`); the second half is teacher-forced through the
    resulting cache. `fixed`: (name, [layer lists]) measured the same way with those layers lazy on every text
    (mean over the lists). Rows: (name, NLL increase over the full model, seconds)."""
    from transformers import DynamicCache

    from lt_train.hybrid import make_cache

    half = args.length // 2
    full = statistics.mean(continuation_nll(model, t, half, DynamicCache(config=model.config))[0] for t in heldout)

    def as_hybrid(cfg):  # (NLL, layers) per held-out text, the model converted with cfg for the while
        convert_to_hybrid(model, cfg)
        try:
            return [continuation_nll(model, t, half, make_cache(model.config)) for t in heldout]
        finally:
            revert_hybrid(model)

    out = []
    for criterion in ("ratio", "error"):
        t0 = time.perf_counter()
        res = as_hybrid(HybridConfig([], args.sink, args.window, online_num_lazy=args.fraction,
                                     last_queries=args.last_queries, online_criterion=criterion))
        out.append((criterion, statistics.mean(r[0] for r in res) - full, time.perf_counter() - t0))
        print(f"online {criterion:>6}: dNLL {out[-1][1]:+.4f} ({out[-1][2]:.0f}s; layers of the first text "
              f"{res[0][1]})", flush=True)
    for name, lists in fixed:
        t0 = time.perf_counter()
        ds = [statistics.mean(r[0] for r in as_hybrid(HybridConfig(layers, args.sink, args.window))) - full
              for layers in lists]
        out.append((name, statistics.mean(ds), time.perf_counter() - t0))
        print(f"{name}: dNLL {out[-1][1]:+.4f}", flush=True)
    return out


if __name__ == "__main__":
    main()
