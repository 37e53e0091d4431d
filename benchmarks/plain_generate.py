"""Greedy answers from a checkpoint in plain transformers, in a process that never imports lt_train: the check that a
natively exported hybrid (launch/export.py) runs without us, as a user of transformers or a serving engine would.

    python benchmarks/plain_generate.py <checkpoint> <prompts.json> <out.json> [--max-new N] [--batch B]

prompts.json: a list of prompt strings (chat template already applied). out.json: the generated texts, in order.
Batches are left-padded, in the given order, and stop at the checkpoint's end-of-sequence tokens (the generation
config's and the tokenizer's, as lt_train's evaluator does)."""
import argparse
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(args.checkpoint, padding_side="left")
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    if tok.pad_token_id is None:  # batches are padded: a tokenizer without a pad token pads with end-of-sequence
        tok.pad_token_id = eos[0]
    pad = tok.pad_token_id
    texts = []
    for a in range(0, len(prompts), args.batch):
        enc = tok(prompts[a:a + args.batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=args.max_new, do_sample=False, eos_token_id=eos,
                                 pad_token_id=pad)
        texts += tok.batch_decode(gen[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        print(f"{len(texts)}/{len(prompts)} prompts", file=sys.stderr, flush=True)
    if any(m == "lt_train" or m.startswith("lt_train.") for m in sys.modules):
        sys.exit("lt_train was imported: this check must run in plain transformers")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(texts, f)


if __name__ == "__main__":
    main()
