"""Training-step speed and peak memory, hybrid vs full (SmolLM2-135M by default).

    python benchmarks/train_step.py [--lengths 4096 8192 --mode lora --repeats 2]

One step = forward + backward + optimizer step on one sequence, LoRA (default) or full fine-tuning, fp32.
Hybrid: half the layers lazy (every other layer), S=4, W=1020, chunked-SDPA streaming attention. Both
variants are timed interleaved in one run; peak memory is the growth of the process's peak resident memory
(`ru_maxrss`) over one step, in a fresh subprocess per variant and length.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lt_train import HybridConfig, convert_to_hybrid  # noqa: E402
from lt_train.models import load_model  # noqa: E402


def build(model_name: str, hybrid: bool, mode: str, sink: int, window: int):
    model = load_model(model_name)
    n = model.config.num_hidden_layers
    convert_to_hybrid(model, HybridConfig(list(range(1, n, 2)) if hybrid else [], sink, window))
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt


def step_fn(model, opt, T: int, vocab: int):
    from lt_train.data.collate import Batch
    from lt_train.train.loop import token_loss_sum

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, vocab, (1, T), generator=g)
    batch = Batch(ids, ids.clone(), torch.arange(T)[None], None)

    def run():
        loss = token_loss_sum(model, batch.model_inputs()) / T
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def measure_step_memory(model_name: str, hybrid: bool, mode: str, sink: int, window: int, T: int) -> float:
    """Peak resident memory of one training step above the peak reached while loading: the kernel's own
    high-water mark (`ru_maxrss`), exact where sampling the resident size can miss a short-lived peak. One
    step in a fresh process (the allocator keeps freed pages, so a second step would hide the peak)."""
    import resource

    model, opt = build(model_name, hybrid, mode, sink, window)
    f = step_fn(model, opt, T, model.config.vocab_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    f()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before


def peak_memory(args, hybrid: bool, T: int) -> float:
    """`measure_step_memory` in a fresh process, so that one variant's peak does not hide the other's."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); import train_step as b;"
            f"print(b.measure_step_memory({args.model!r}, {hybrid}, {args.mode!r}, {args.sink}, {args.window}, {T}))")
    # Large blocks straight from mmap and back to the system when freed (a fixed threshold also stops glibc from
    # raising it as blocks are freed): the resident peak then follows the live tensors' peak, not how the heap
    # happened to fragment (which moved the same step's figure by gigabytes between runs).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        print(out.stderr[-2000:], file=sys.stderr)
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-only", action="store_true")
    args = ap.parse_args()
    from _timing import interleaved_medians

    if args.memory_only:
        for T in args.lengths:
            print(f"T={T}: peak step memory full {peak_memory(args, False, T):.1f} MiB, "
                  f"hybrid {peak_memory(args, True, T):.1f} MiB", flush=True)
        return
    # Memory first, while this process is small: a child's ru_maxrss starts from its parent's resident size
    # at the fork (Linux keeps the high-water mark across exec), which would hide the step's own peak.
    mems = {T: {"full": float("nan"), "hybrid": float("nan")} if args.no_memory else
            {"full": peak_memory(args, False, T), "hybrid": peak_memory(args, True, T)} for T in args.lengths}
    full, opt_f = build(args.model, False, args.mode, args.sink, args.window)
    hyb, opt_h = build(args.model, True, args.mode, args.sink, args.window)
    vocab = full.config.vocab_size
    rows = []
    print(f"model={args.model} mode={args.mode} S={args.sink} W={args.window} threads={torch.get_num_threads()}")
    print(f"{'T':>6} {'full tok/s':>11} {'hybrid tok/s':>13} {'speed-up':>9} {'full MiB':>9} {'hybrid MiB':>11}")
    for T in args.lengths:
        t = interleaved_medians({"full": step_fn(full, opt_f, T, vocab), "hybrid": step_fn(hyb, opt_h, T, vocab)},
                                args.repeats)
        mem = mems[T]
        rows.append({"T": T, "full_tok_s": T / t["full"], "hybrid_tok_s": T / t["hybrid"],
                     "speedup": t["full"] / t["hybrid"], "full_mib": mem["full"], "hybrid_mib": mem["hybrid"]})
        r = rows[-1]
        print(f"{T:>6} {r['full_tok_s']:>11.0f} {r['hybrid_tok_s']:>13.0f} {r['speedup']:>8.2f}x "
              f"{r['full_mib']:>9.0f} {r['hybrid_mib']:>11.0f}", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
