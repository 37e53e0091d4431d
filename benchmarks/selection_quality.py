"""Held-out NLL of SmolLM2-135M with half its layers lazy, per selection strategy.

    python benchmarks/selection_quality.py [--length 2048 --sink 4 --window 252 --calib 4 --heldout 8]

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
    for strategy in ["nll", "error", "ratio", "frequency", "first", "last", "pyramid"]:
        t0 = time.perf_counter()
        layers = select_with_stats(model, calib, args.fraction, strategy, S, W, args.last_queries).layers
        took = time.perf_counter() - t0
        convert_to_hybrid(model, HybridConfig(layers, S, W))
        rows.append((strategy, mean_nll(model, heldout) - full, layers, took))
        revert_hybrid(model)
        print(f"{strategy:>10}: dNLL {rows[-1][1]:+.4f}  layers {layers}  (selection {took:.0f}s)", flush=True)
    draws = []
    for seed in range(args.random_draws):
        layers = select_with_stats(model, calib[:1], args.fraction, "random", S, W, args.last_queries, seed).layers
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
    print(f"| random, mean ± sd of {len(draws)} draws | {statistics.mean(draws):+.4f} ± {statistics.stdev(draws):.4f} "
          f"(min {min(draws):+.4f}, max {max(draws):+.4f}) |")


if __name__ == "__main__":
    main()
