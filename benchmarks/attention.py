"""Forward+backward time of each streaming backend vs dense causal SDPA (SmolLM2 head shapes).

    python benchmarks/attention.py [--lengths 2048 8192 16384] [--repeats 3]

Prints, per sequence length, each backend's time and its speed-up over dense causal attention measured in
the same run. FlexAttention has no backward pass on CPU: there it is timed forward-only against the dense
forward. flash-attn is timed only where it is installed (CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_medians  # noqa: E402

from lt_train.attention import flash, streaming_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32 on CPU (bf16 is emulated and slow there)")
    args = ap.parse_args()
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    S, W = args.sink, args.window
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"device={dev} dtype={args.dtype} threads={torch.get_num_threads()} S={S} W={W} "
          f"heads={args.heads}/{args.kv_heads} head_dim={args.head_dim}")
    print(f"{'T':>6} {'backend':>12} {'pass':>8} {'time_s':>9} {'dense_s':>9} {'speed-up':>9}")
    for T in args.lengths:
        q = torch.randn(1, args.heads, T, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, args.kv_heads, T, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, args.kv_heads, T, args.head_dim, device=dev, dtype=dtype, requires_grad=True)
        g = torch.randn_like(q)

        def fwd_bwd(fn):
            def run():
                out = fn()
                out.backward(g)
                q.grad = k.grad = v.grad = None
                sync()
            return run

        def fwd(fn):
            def run():
                with torch.no_grad():
                    fn()
                sync()
            return run

        dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        backends = ["sdpa"] + (["flash_attn"] if flash.is_available() and dtype != torch.float32 else [])
        train = {"dense": fwd_bwd(dense)}
        for b in backends:
            train[b] = fwd_bwd(lambda b=b: streaming_attention(q, k, v, S, W, backend=b))
        can_flex_bwd = dev.type == "cuda"
        if can_flex_bwd:
            train["flex"] = fwd_bwd(lambda: streaming_attention(q, k, v, S, W, backend="flex"))
        res = interleaved_medians(train, args.repeats)
        for name, t in res.items():
            if name != "dense":
                print(f"{T:>6} {name:>12} {'fwd+bwd':>8} {t:>9.3f} {res['dense']:>9.3f} {res['dense'] / t:>8.2f}x")
        if not can_flex_bwd:
            qd, kd, vd = q.detach(), k.detach(), v.detach()
            inf = interleaved_medians({
                "dense": fwd(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)),
                "flex": fwd(lambda: streaming_attention(qd, kd, vd, S, W, backend="flex")),
            }, args.repeats)
            print(f"{T:>6} {'flex':>12} {'fwd':>8} {inf['flex']:>9.3f} {inf['dense']:>9.3f} "
                  f"{inf['dense'] / inf['flex']:>8.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
