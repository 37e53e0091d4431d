"""Run under `torchrun --nproc_per_node=N`: every trainable parameter's gradient and the loss of two packed rows
(documents crossing shard boundaries, streaming and full layers) through DeepSpeed's Ulysses sequence
parallelism equal those of the same rows without it. Prints one JSON line per case on rank 0; exits non-zero
on a mismatch. Used by tests/test_sequence_parallel.py."""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lt_train import sequence_parallel as sp_mod  # noqa: E402
from lt_train.data.collate import collate_packed  # noqa: E402
from lt_train.data.format import EncodedExample  # noqa: E402
from lt_train.hybrid import SEQUENCE_PARALLEL, HybridConfig, attention_modules, convert_to_hybrid  # noqa: E402
from lt_train.nll import decoder_of, lm_head_loss_sum  # noqa: E402


def build(arch: str, mode: str, vocab: int):
    from lt_train.models import load_model, tiny_model

    torch.manual_seed(0)
    model = tiny_model(arch) if arch != "smollm2" else load_model("smollm2-135m", dtype=torch.float32)
    convert_to_hybrid(model, HybridConfig([1, 3], sink_tokens=4, window=WINDOW, backend="sdpa"))
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)  # random B as well as A, so that both receive a gradient
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model


def rows_of(rank: int, lengths: list[int], vocab: int, multiple: int):
    g = torch.Generator().manual_seed(100 + rank)
    docs = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 4] = -100  # a prompt without loss
        docs.append(EncodedExample(ids, labels))
    return collate_packed([docs], pad_id=0, multiple=multiple)


def loss_of(model, inputs: dict, shifted: bool) -> torch.Tensor:
    hidden = decoder_of(model)(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                               use_cache=False).last_hidden_state
    return lm_head_loss_sum(model, hidden, inputs["shift_labels" if shifted else "labels"], shifted=shifted)


def grads(model) -> dict:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


WINDOW = 16


def main():
    global WINDOW
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="llama,qwen2,qwen3,mistral")
    ap.add_argument("--modes", default="full,lora")
    ap.add_argument("--lengths", default="45,70,30", help="document lengths of each row")
    ap.add_argument("--window", type=int, default=16)
    args = ap.parse_args()
    WINDOW = args.window
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    lengths = [int(x) for x in args.lengths.split(",")]
    sp = None
    failed = False
    for arch in args.archs.split(","):
        for mode in args.modes.split(","):
            model = build(arch, mode, 128)
            vocab = model.config.vocab_size if arch == "smollm2" else 128
            if sp is None:
                sp = sp_mod.enable(model, world)  # once per process: DeepSpeed's groups are global
            else:
                for m in attention_modules(model):
                    setattr(m, SEQUENCE_PARALLEL, True)
            mine = rows_of(rank, lengths, vocab, world)
            everyone = [rows_of(r, lengths, vocab, world) for r in range(world)]
            n = sum(int((b.labels[:, 1:] != -100).sum()) for b in everyone)

            # reference: every row whole, no sequence parallelism (eval mode bypasses the Ulysses wrapper)
            model.eval()
            ref_loss = sum(loss_of(model, vars(b), shifted=False) for b in everyone) / n
            ref_loss.backward()
            ref = grads(model)

            model.train()
            shards = sp_mod.shard(sp, [{"input_ids": mine.input_ids, "labels": mine.labels,
                                        "position_ids": mine.position_ids}], "cpu")
            local = sum(loss_of(model, s, shifted=True) for s in shards) / n
            local.backward()
            got = grads(model)
            total = local.detach().clone()
            dist.all_reduce(total)
            worst = 0.0
            for name, g in got.items():
                dist.all_reduce(g)
                worst = max(worst, float((g - ref[name]).norm() / ref[name].norm().clamp_min(1e-12)))

            # negative control: without the document mask in full layers, packed rows leak across documents
            for m in attention_modules(model):
                setattr(m, SEQUENCE_PARALLEL, False)
            leak = sum(loss_of(model, s, shifted=True) for s in shards).detach() / n
            dist.all_reduce(leak)
            model.zero_grad(set_to_none=True)
            rec = {"arch": arch, "mode": mode, "world": world, "T": int(mine.input_ids.shape[1]),
                   "shards": len(shards), "loss_ref": float(ref_loss.detach()), "loss_sp": float(total),
                   "loss_rel": abs(float(total) - float(ref_loss.detach())) / abs(float(ref_loss.detach())),
                   "worst_grad_rel": worst, "params": len(got),
                   "leak_rel": abs(float(leak) - float(ref_loss.detach())) / abs(float(ref_loss.detach()))}
            ok = rec["loss_rel"] < 1e-5 and worst < 1e-4 and rec["leak_rel"] > 1e-4
            failed |= not ok
            if rank == 0:
                print(json.dumps(dict(rec, ok=ok)), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
