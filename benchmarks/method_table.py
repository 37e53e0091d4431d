"""The paper's table in miniature: full vs hybrid, before and after LightTransfer-Train, on SmolLM2-135M.

    python benchmarks/method_table.py [--out outputs/method_table --steps 20 --problems 24 --window 128]

Two measures per row:
- accuracy (± standard error over problems) on held-out problems of the embedded long-range task
  (`eval=recall`, lt_train/data/recall.py): a code stated only at the start of a 0.8-1.6k-token context is asked
  for at its end, answered greedily and graded by the project's grader;
- held-out NLL of real long chain-of-thought text (../shared/data/long_cot_sft.jsonl; skipped when absent).

Rows: the full model before and after a LoRA fine-tune on the task; the hybrid (half the layers lazy, S=4, W
tokens) training-free with layers chosen by `nll`, `error`, `ratio` and at random (mean of draws); the hybrid
after LightTransfer-Train (the `nll` layers) with LoRA, with full fine-tuning, and with LoRA at S=0 (the
sink-free hybrid that exports as a plain sliding-window model); and the control that sees only the last W
tokens everywhere (every layer streaming). Every stage runs the project's entry points (launch/select_lazy.py,
launch/train.py, launch/eval.py) and leaves its output under --out: a rerun skips what is done.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stages import layers_arg, run_stage, write_table  # noqa: E402
COT = os.path.join(ROOT, "..", "shared", "data", "long_cot_sft.jsonl")
MODEL = "smollm2-135m"


def _data(args) -> list[str]:
    return ["data=recall", f"data.min_chars={args.min_chars}", f"data.max_chars={args.max_chars}"]


def select(out: str, strategy: str, args, seed: int = 0) -> list[int]:
    d = os.path.join(out, f"select_{strategy}" + (f"_{seed}" if strategy == "random" else ""))
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "lazy_layers.json")
    run_stage("select_lazy.py", [f"model={MODEL}", *_data(args), f"output_dir={d}", f"lazy.strategy={strategy}",
                            f"lazy.seed={seed}", f"lazy.sink_tokens={args.sink}", f"lazy.window={args.window}",
                            f"lazy.max_samples={args.select_samples}", f"lazy.nll_samples={args.nll_samples}",
                            "logging.wandb=false"], path, os.path.join(d, "log.txt"))
    with open(path) as f:
        return json.load(f)["lazy_layers"]


def train(out: str, name: str, mode: str, layers: list[int], sink: int, args) -> str:
    d = os.path.join(out, f"train_{name}")
    os.makedirs(d, exist_ok=True)
    model_dir = os.path.join(d, "model")
    run_stage("train.py", [f"model={MODEL}", *_data(args), f"train={mode}", f"output_dir={d}",
                      f"lazy.layers={layers_arg(layers)}", f"lazy.sink_tokens={sink}",
                      f"lazy.window={args.window}", f"data.num_samples={args.train_samples}",
                      f"data.max_length={args.pack}",
                      f"train.max_steps={args.steps}", "train.grad_accum=1", f"train.pack_length={args.pack}",
                      f"train.lr={args.lora_lr if mode == 'lora' else args.full_lr}", "train.save_every=1000",
                      "validation.enabled=false", "logging.wandb=false"],
         os.path.join(model_dir, "config.json"), os.path.join(d, "log.txt"))
    return model_dir


def evaluate(out: str, row: str, model: str, layers: list[int] | None, sink: int, args) -> dict:
    d = os.path.join(out, f"eval_{row}")
    os.makedirs(d, exist_ok=True)
    hybrid = ([f"hybrid.lazy_layers={layers_arg(layers)}", f"hybrid.sink_tokens={sink}",
               f"hybrid.window={args.window}"] if layers else [])
    done = glob.glob(os.path.join(d, "*", "summary.json"))
    run_stage("eval.py", [f"model={model}", "eval=recall", f"output_dir={d}", f"eval.num_problems={args.problems}",
                     f"eval.min_chars={args.min_chars}", f"eval.max_chars={args.max_chars}",
                     "logging.wandb=false", *hybrid], done[0] if done else os.path.join(d, "-"),
         os.path.join(d, "log.txt"))
    with open(glob.glob(os.path.join(d, "*", "summary.json"))[0]) as f:
        return json.load(f)["metrics"]


def heldout_nll(model_path: str, layers: list[int] | None, sink: int, args, texts) -> float | None:
    if not texts:
        return None
    from lt_train import HybridConfig, convert_to_hybrid
    from lt_train.models import load_model
    from lt_train.nll import mean_nll

    model = load_model(model_path).eval()
    if layers:
        convert_to_hybrid(model, HybridConfig(layers, sink, args.window))
    return mean_nll(model, texts)


def cot_texts(args):
    if not os.path.exists(args.cot):
        print(f"{args.cot} not found: the NLL column is left out")
        return []
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from selection_quality import load_texts

    from lt_train.models import load_tokenizer

    return load_texts(args.cot, load_tokenizer(MODEL), args.cot_length, args.cot_samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "method_table"))
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--min-chars", type=int, default=1200, help="recall contexts of 1200-2000 characters: "
                    "about 760-1590 SmolLM2 tokens (median 1130), the register 500+ tokens before the last query's window")
    ap.add_argument("--max-chars", type=int, default=2000)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps of each fine-tune")
    ap.add_argument("--pack", type=int, default=1536, help="tokens per packed training row (one row per step; "
                    "longer samples are dropped and counted in the training log)")
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--problems", type=int, default=24)
    ap.add_argument("--fine-tunes", default="full_lora,hybrid_lora,hybrid_full,hybrid_lora_s0",
                    help="which fine-tunes to run (their rows are left out otherwise)")
    ap.add_argument("--select-samples", type=int, default=4)
    ap.add_argument("--nll-samples", type=int, default=2)
    ap.add_argument("--random-draws", type=int, default=2)
    ap.add_argument("--cot", default=COT)
    ap.add_argument("--cot-length", type=int, default=1024)
    ap.add_argument("--cot-samples", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    L = 30  # SmolLM2-135M
    every = list(range(L))

    print("selection (training-free, on the task's training samples):", flush=True)
    chosen = {s: select(args.out, s, args) for s in ("nll", "error", "ratio")}
    draws = [select(args.out, "random", args, seed) for seed in range(args.random_draws)]
    print("fine-tunes:", flush=True)
    runs = {  # name: (mode, lazy layers, S)
        "full_lora": ("lora", [], args.sink), "hybrid_lora": ("lora", chosen["nll"], args.sink),
        "hybrid_full": ("full", chosen["nll"], args.sink), "hybrid_lora_s0": ("lora", chosen["nll"], 0)}
    wanted = args.fine_tunes.split(",")
    unknown = set(wanted) - set(runs)
    if unknown:
        sys.exit(f"unknown --fine-tunes {sorted(unknown)}; choose from {list(runs)}")
    tuned = {name: train(args.out, name, *runs[name], args) for name in runs if name in wanted}

    rows = [  # (row label, model, lazy layers, S, group); rows of fine-tunes left out are skipped
        ("full model, before", MODEL, None, args.sink, None),
        ("full model, after LoRA", tuned.get("full_lora"), None, args.sink, None),
        *[(f"hybrid training-free, {s} layers", MODEL, chosen[s], args.sink, None) for s in ("nll", "error", "ratio")],
        *[(f"hybrid training-free, random layers (draw {i})", MODEL, lz, args.sink, "random") for i, lz in enumerate(draws)],
        ("hybrid after LightTransfer-Train, LoRA (S=4)", tuned.get("hybrid_lora"), chosen["nll"], args.sink, None),
        ("hybrid after LightTransfer-Train, full FT (S=4)", tuned.get("hybrid_full"), chosen["nll"], args.sink, None),
        ("hybrid after LightTransfer-Train, LoRA, S=0", tuned.get("hybrid_lora_s0"), chosen["nll"], 0, None),
        ("control: every layer streaming, full model after LoRA", tuned.get("full_lora"), every, args.sink, None),
    ]
    rows = [r for r in rows if r[1] is not None]
    texts = cot_texts(args)
    print("evaluation:", flush=True)
    results = []
    for label, model, layers, sink, group in rows:
        row = "".join(c if c.isalnum() else "_" for c in label.lower()) + f"_p{args.problems}"
        s = evaluate(args.out, row, model, layers, sink, args)
        nll_path = os.path.join(args.out, f"eval_{row}", f"cot_nll_{len(texts)}x{args.cot_length}.json")
        if not os.path.exists(nll_path):
            with open(nll_path, "w") as f:
                json.dump({"nll": heldout_nll(model, layers, sink, args, texts)}, f)
        with open(nll_path) as f:
            nll = json.load(f)["nll"]
        results.append((label, s["pass@1"], s["pass@1_se"], nll, group))
        print(f"  {label}: {s['pass@1']:.1%} ± {s['pass@1_se']:.1%}, NLL {nll}", flush=True)

    lines = [f"SmolLM2-135M, {round(args.fraction * L)}/{L} layers lazy, S={args.sink} (S=0 where named), "
             f"W={args.window}; {args.problems} held-out recall problems (greedy); fine-tunes of {args.steps} "
             f"steps x {args.pack} tokens; NLL: {len(texts)} long-CoT texts of {args.cot_length} tokens",
             "", "| model | recall accuracy | long-CoT NLL |", "|---|---:|---:|"]
    fmt = (lambda x: "—" if x is None else f"{x:.4f}")
    for label, acc, se, nll, group in results:
        if group is None:
            lines.append(f"| {label} | {acc:.1%} ± {se:.1%} | {fmt(nll)} |")
    rnd = [r for r in results if r[4] == "random"]
    if rnd:
        nlls = [r[3] for r in rnd if r[3] is not None]
        lines.append(f"| hybrid training-free, random layers (mean of {len(rnd)} draws) | "
                     f"{statistics.mean(r[1] for r in rnd):.1%} (draws {', '.join(f'{r[1]:.0%}' for r in rnd)}) | "
                     f"{fmt(statistics.mean(nlls) if nlls else None)} |")
    write_table(args.out, lines, t_start)


if __name__ == "__main__":
    main()
