"""The evaluator's sampling step: one `torch.multinomial` per row and two host syncs per token (before) against
the rows' exponential noise, one batched argmax and one host sync (now, `lt_train.eval.sampling.draw`), and
against what transformers' `generate` does (one `torch.multinomial` over the whole batch from one generator,
one sync): the fastest draw, but a sample's tokens then depend on its batch-mates and its place in the batch.

    python benchmarks/sampling.py [--batches 8,32 --vocab 49152 --steps 200 --decode-batch 8 --new 64]

Two measurements, each interleaved in one process (`_timing.interleaved_medians`):
1. the sampling step alone (temperature 0.6, top-p 0.95 warping, then the draw and the host read), B rows of a
   `--vocab` vocabulary, `--steps` steps;
2. the evaluator's `generate_batch` on SmolLM2-135M (8 samples of one prompt, `--new` tokens, sampled), its
   draw switched between the two versions (the loop's one host read per step is the same in both): decode
   tokens/s.
Both versions draw the same tokens for the same seeds (tests/test_eval.py), so the second row times the same work.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import interleaved_medians  # noqa: E402

from lt_train.eval import sampling  # noqa: E402
from lt_train.eval.sampling import GenSettings  # noqa: E402


def per_row(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """The former draw: one multinomial per row."""
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


def one_generator(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """transformers' draw: one multinomial for the batch, from the first row's generator (no per-sample seeds)."""
    return torch.multinomial(probs, 1, generator=gens[0]).squeeze(1)


def step(draw, logits, gs, gens, eos, syncs: int):
    sampling.draw = draw
    tok = sampling.next_tokens(logits, gs, gens)
    if syncs == 2:  # the former loop: the end flags and the tokens read separately
        torch.isin(tok, eos).tolist()
        tok.tolist()
    else:
        torch.stack([tok, torch.isin(tok, eos).long()]).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--decode-batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    new_draw = sampling.draw
    gs = GenSettings(8, False, 0.6, 0.95, 0, args.new, args.decode_batch, 0, None, None)
    eos = torch.tensor([0, 2])
    print("| what | before | now | speed-up | transformers' batched draw (no per-sample seeds) |\n"
          "|---|---:|---:|---:|---:|")
    for B in (int(b) for b in args.batches.split(",")):
        logits = torch.randn(B, args.vocab) * 3
        gens = [torch.Generator().manual_seed(i) for i in range(B)]

        def run(draw, syncs):
            return lambda: [step(draw, logits, gs, gens, eos, syncs) for _ in range(args.steps)]
        t = interleaved_medians({"before": run(per_row, 2), "now": run(new_draw, 1),
                                 "hf": run(one_generator, 1)}, args.repeats)
        us = {k: v / args.steps * 1e6 for k, v in t.items()}
        print(f"| sampling step, B={B}, V={args.vocab} (us) | {us['before']:.0f} | {us['now']:.0f} | "
              f"{us['before'] / us['now']:.2f}x | {us['hf']:.0f} ({us['hf'] / us['now']:.2f}x of now) |", flush=True)

    from lt_train.eval.sampling import build_prompt, generate_batch
    from lt_train.models import load_model, load_tokenizer

    model, tok = load_model("smollm2-135m").eval(), load_tokenizer("smollm2-135m")
    prompt = build_prompt(tok, "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                               "clips in May. How many clips did Natalia sell altogether in April and May?")
    tokens = {}

    def decode(draw):
        def go():
            sampling.draw = draw
            out = generate_batch(model, tok, [prompt] * args.decode_batch, gs, seeds=list(range(args.decode_batch)))
            tokens[draw] = sum(out.tokens)
        return go
    t = interleaved_medians({"before": decode(per_row), "now": decode(new_draw), "hf": decode(one_generator)},
                            max(2, args.repeats // 2))
    assert tokens[per_row] == tokens[new_draw]  # the same samples
    rate = {k: tokens[d] / v for (k, v), d in zip(t.items(), (per_row, new_draw, one_generator))}
    print(f"| evaluator decode, SmolLM2-135M, batch {args.decode_batch}, up to {args.new} new tokens (tokens/s) | "
          f"{rate['before']:.1f} | {rate['now']:.1f} | {rate['now'] / rate['before']:.2f}x | {rate['hf']:.1f} |")
    sampling.draw = new_draw


if __name__ == "__main__":
    main()
