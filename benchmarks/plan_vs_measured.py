"""The memory planner against measurements on this CPU: planned vs measured peak per process of one training step.

    python benchmarks/plan_vs_measured.py [--model smollm2-135m] [--lengths 2048 8192] [--only plain,zero2,zero3]

For each engine (one plain process; ZeRO-2 and ZeRO-3 under `torchrun --nproc_per_node=2`, gloo), LoRA and full
fine-tuning, gradient checkpointing off and on, and each length, a fresh process group runs what the trainer runs
(the model loaded as launch/train.py loads it, partitioned by zero.Init under ZeRO-3; half the layers lazy; LoRA
or full; the engine; two steps of the chunked loss on one packed row of T tokens, the second one measured: the
first allocates the optimizer states) while a thread samples the
resident memory every 2 ms (with MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors leave the resident set
as they leave a GPU's allocated memory). Measured = peak RSS of each rank minus its RSS after the libraries were imported and
the process group started (the largest rank is reported); planned = `lt_train.plan.plan_memory` for the same
config on this CPU. ZeRO-3 with LoRA and gradient checkpointing is skipped (refused on CPU by the trainer).
Prints a markdown table; `--json` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name: (deepspeed config, processes, sequence-parallel size N); zero3-3 / zero3-sp3: three processes, whole rows
# on each vs one row shared by all three (Ulysses; SmolLM2's 9 heads / 3 KV heads allow N=3, not 2)
ENGINES = {"plain": ("none", 1, 1), "zero2": ("zero2", 2, 1), "zero3": ("zero3", 2, 1),
           "zero3-3": ("zero3", 3, 1), "zero3-sp3": ("zero3", 3, 3)}


def overrides(model: str, engine: str, mode: str, gc: bool, T: int) -> list[str]:
    ds, _, n_sp = ENGINES[engine]
    return [f"model={model}", f"train={mode}", f"deepspeed={ds}", f"train.pack_length={T}", "train.grad_accum=1",
            f"train.gradient_checkpointing={'true' if gc else 'false'}", "lazy.num_lazy=0.5",
            "validation.enabled=false", "train.bf16=false", f"train.sequence_parallel={n_sp}"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(argv: list[str]) -> None:
    """One rank: build as the trainer does, run one step, print {"rank", "measured"} as JSON."""
    import deepspeed  # noqa: F401 -- imported before the baseline, like every other library used below
    import peft  # noqa: F401
    import torch
    from hydra import compose, initialize_config_dir

    from lt_train import sequence_parallel
    from lt_train.data.collate import Batch
    from lt_train.distributed import world
    from lt_train.hybrid import HybridConfig, convert_to_hybrid
    from lt_train.models import load_from_config
    from lt_train.train import loop
    from lt_train.train.engine import DeepSpeedEngine, PlainEngine, deepspeed_config

    rank, world_size = world()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("train", overrides=argv)
    stage = int(cfg.deepspeed.stage)
    if stage:
        deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    base = _rss()
    peak, done = [base], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    tr = cfg.train
    n_sp = int(tr.sequence_parallel)
    ds_config = deepspeed_config(cfg.deepspeed, tr, 1, n_sp) if stage else None
    hf_ds = loop._partitioned_loading(ds_config) if stage == 3 else None
    model, _ = load_from_config(cfg.model)
    n = model.config.num_hidden_layers
    convert_to_hybrid(model, HybridConfig(list(range(1, n, 2)), cfg.lazy.sink_tokens, cfg.lazy.window))
    model = loop._wrap_trainable(cfg, model)
    model.train()
    sp = sequence_parallel.enable(model, n_sp)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine = (DeepSpeedEngine(model, opt, sched, ds_config, mpu=sp and sp.mpu) if stage
              else PlainEngine(model, opt, sched, 1.0, 1))
    del hf_ds
    T = int(tr.pack_length)
    ids = torch.randint(100, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(rank))
    batch = Batch(ids, ids.clone(), torch.arange(T)[None], None)
    scale = engine.gradient_divisor / (T * world_size)

    def step():
        if os.environ.get("PVM_WHOLE_HEAD"):  # the comparison: a loss over all T x vocab logits at once
            logits = engine.module(input_ids=ids, position_ids=batch.position_ids).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum") * scale
            engine.backward(loss)
            engine.step()
            return loss
        row = {"input_ids": ids, "labels": ids.clone(), "position_ids": batch.position_ids}
        for inputs in (sequence_parallel.shard(sp, [row], "cpu") if sp else [row]):  # N shards under Ulysses
            loss = loop.token_loss_sum(engine.module, inputs, zero3_scale=scale if stage == 3 else None,
                                       engine=engine)
            loss = loss if stage == 3 else loss * scale
            engine.backward(loss)
            engine.step()
        return loss

    step()  # the first step allocates the optimizer states; the plan is for the steady state: measure the second
    peak[0] = _rss()
    loss = step()
    done.set()
    t.join()
    print("PLANVSMEASURED " + json.dumps({"rank": rank, "measured": peak[0] - base, "loss": float(loss)}), flush=True)


def measure(args, engine: str, mode: str, gc: bool, T: int) -> dict:
    from hydra import compose, initialize_config_dir

    from lt_train.plan import Hardware, plan_memory

    ov = overrides(args.model, engine, mode, gc, T)
    _, nproc, _ = ENGINES[engine]
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("train", overrides=ov)
    plan = plan_memory(cfg, Hardware(gpus=0, processes=nproc), suggest=False)
    script = os.path.abspath(__file__)
    cmd = ([sys.executable, script, "--worker"] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(29700 + (T + hash((engine, mode, gc))) % 200), script, "--worker"])
    # MALLOC_MMAP_THRESHOLD_: large blocks come from mmap and go back to the OS when freed, so the resident memory
    # follows the live tensors (as max_memory_allocated does on a GPU) instead of glibc's retained heap, which
    # on this machine kept up to 2 GB of freed recomputation buffers of a LoRA step resident.
    env = dict(os.environ, DS_ACCELERATOR="cpu", MALLOC_MMAP_THRESHOLD_="65536",
               OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd + ov, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    rows = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("PLANVSMEASURED")]
    if proc.returncode or len(rows) != nproc:
        return {"engine": engine, "mode": mode, "gc": gc, "T": T, "error": (proc.stderr or proc.stdout)[-1500:]}
    measured = max(r["measured"] for r in rows)
    planned = plan.per_gpu_total
    return {"engine": engine, "mode": mode, "gc": gc, "T": T, "planned": planned, "measured": measured,
            "ratio": planned / measured, "parts": plan.per_gpu}


def replan(args) -> None:
    """The table for measurements taken earlier (each config's measured peak), planned by the current code."""
    from hydra import compose, initialize_config_dir

    from lt_train.plan import Hardware, plan_memory

    rows = [r for path in args.replan for r in json.load(open(path)) if "measured" in r]
    print("| engine | mode | checkpointing | T | planned MiB | measured MiB | planned / measured |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides(args.model, r["engine"], r["mode"], r["gc"], r["T"]))
        planned = plan_memory(cfg, Hardware(gpus=0, processes=ENGINES[r["engine"]][1]), suggest=False).per_gpu_total
        print(f"| {r['engine']} | {r['mode']} | {'on' if r['gc'] else 'off'} | {r['T']} | {planned / 2**20:.0f} | "
              f"{r['measured'] / 2**20:.0f} | {planned / r['measured']:.2f} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--only", default="plain,zero2,zero3")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--whole-head", action="store_true",
                    help="measure with full T x vocab logits instead of the chunked / tiled loss (no plan)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--replan", nargs="+", default=None,
                    help="JSON files of earlier runs: keep their measurements, plan them again with this planner")
    args = ap.parse_args()
    if args.whole_head:
        os.environ["PVM_WHOLE_HEAD"] = "1"
    if args.replan:
        return replan(args)
    rows = []
    print("| engine | mode | checkpointing | T | planned MiB | measured MiB | planned / measured |")
    print("|---|---|---|---:|---:|---:|---:|")
    for engine in args.only.split(","):
        for mode in args.modes.split(","):
            for gc in [c == "on" for c in args.checkpointing.split(",")]:
                if engine == "zero3" and mode == "lora" and gc:
                    continue  # refused on CPU by the trainer (train/config.py)
                for T in args.lengths:
                    r = measure(args, engine, mode, gc, T)
                    rows.append(r)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(rows, f, indent=1)
                    if "error" in r:
                        print(f"| {engine} | {mode} | {'on' if gc else 'off'} | {T} | error | {r['error'][-300:]!r} | |",
                              flush=True)
                        continue
                    print(f"| {engine} | {mode} | {'on' if gc else 'off'} | {T} | {r['planned'] / 2**20:.0f} | "
                          f"{r['measured'] / 2**20:.0f} | {r['ratio']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
