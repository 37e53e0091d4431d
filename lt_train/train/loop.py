"""The LightTransfer-Train job: load -> lazy layers -> convert_to_hybrid -> LoRA or full SFT -> save -> evaluate.

Runs as `python launch/train.py` (one process) or `torchrun --nproc_per_node=N launch/train.py` (DeepSpeed).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time

import torch

from .. import sequence_parallel
from ..data import demo_examples
from ..data.collate import collate_packed, pack_bins
from ..data.format import EncodedExample
from ..data.prepare import prepare
from ..hybrid import HybridConfig, convert_to_hybrid, set_lazy_layers
from ..io import atomic_write_json, atomic_write_text
from ..distill import DistillSettings, head_kl_sum, teacher_states, zero3_head_kl_sum
from ..lazy import select_with_stats
from ..models import load_from_config, tokenizer_from_config
from ..nll import decoder_of, lm_head_loss_sum, zero3_head_loss_sum
from ..tracking import init_wandb
from . import checkpoint as ckpt
from .config import distill_settings, validate
from ..distributed import all_reduce_sum, barrier, local_rank, set_device, timeout_of, world
from .engine import DeepSpeedEngine, PlainEngine, deepspeed_config, save_checkpoint
from .evaluate import demo_accuracy, heldout_nll
from .final_weights import adapter_state, write_model
from .preemption import PREEMPTED_EXIT, Preemption


def _log(rank: int, *msg) -> None:
    if rank == 0:
        print(*msg, flush=True)


def lr_lambda(warmup: int, total: int):
    """Linear warmup, then cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def plan_rows(lengths: list[int], pack_length: int, seed: int, epochs: int) -> list[list[int]]:
    """The whole run's packed rows, in order: packing fixed, row order reshuffled each epoch (seeded)."""
    bins = pack_bins(lengths, pack_length)
    rows = []
    for e in range(epochs):
        order = list(range(len(bins)))
        random.Random(seed * 1000 + e).shuffle(order)
        rows += [bins[i] for i in order]
    return rows


def token_loss_sum(model, inputs: dict, zero3_scale: float | None = None, engine=None,
                   length: int | None = None, distill: DistillSettings | None = None) -> torch.Tensor:
    """Sum of token NLLs of model inputs with `labels` (a packed row) or `shift_labels` (a sequence-parallel
    shard), the LM head applied in chunks (`nll.lm_head_loss_sum`). Under ZeRO-3 pass `zero3_scale` (the step's
    loss scale): DeepSpeed's tiled loss then returns the sum already scaled, its head gradient computed inside
    the call (`nll.zero3_head_loss_sum`). `engine`: run the decoder through the training engine's forward (its
    per-micro-step bookkeeping; see engine.py). `length`: the longest row a rank can hold, so that under ZeRO-3
    every rank makes as many head calls. `distill`: the sum of KL(original model || hybrid) over the same target
    tokens instead (`distill.py`), the original's states from a no-grad forward first."""
    inputs = dict(inputs, use_cache=False)
    shifted = "shift_labels" in inputs
    labels = inputs.pop("shift_labels" if shifted else "labels")
    teacher = teacher_states(model, inputs) if distill is not None else None
    hidden = engine.hidden_states(inputs) if engine is not None else decoder_of(model)(**inputs).last_hidden_state
    if distill is not None:
        if zero3_scale is not None:
            return zero3_head_kl_sum(model, hidden, teacher, labels, distill, zero3_scale, shifted=shifted,
                                     length=length)
        return head_kl_sum(model, hidden, teacher, labels, distill, shifted=shifted)
    if zero3_scale is not None:
        return zero3_head_loss_sum(model, hidden, labels, zero3_scale, shifted=shifted, length=length)
    return lm_head_loss_sum(model, hidden, labels, shifted=shifted)


def row_seed(seed: int, row) -> int:
    """The random seed of one packed row's forward and backward: a function of (train.seed, row) only."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{row}".encode()).digest()[:7], "little")


def _choose_lazy(cfg, model, train_encoded, out_dir, rank, lockstep: bool = False) -> list[int]:
    lz = cfg.lazy
    if lz.get("layers") is not None:
        return [int(i) for i in lz.layers]
    if lz.get("from_file"):  # read by validate(), which also took the file's S and W
        layers = list(lz.file_layers)
        _log(rank, f"lazy layers from {lz.from_file}: {layers} (S={lz.sink_tokens}, W={lz.window})")
        return layers
    samples = [e.input_ids for e in train_encoded[: lz.get("max_samples") or len(train_encoded)]]
    sel = select_with_stats(model, samples, lz.num_lazy, lz.strategy, lz.sink_tokens, lz.window,
                            lz.last_queries, lz.seed, lz.get("nll_samples", 4), progress=rank == 0,
                            lockstep=lockstep)
    if rank == 0:
        atomic_write_json(os.path.join(out_dir, "lazy_layers.json"),
                          {"lazy_layers": sel.layers, "strategy": sel.strategy, "per_layer_ratio": sel.per_layer_ratio,
                           "delta_nll": sel.delta_nll, "sink_tokens": lz.sink_tokens, "window": lz.window})
    _log(rank, f"lazy layers ({sel.strategy}): {sel.layers}")
    return sel.layers


def _evaluate(cfg, model, tok, heldout, problems, label, results: dict, lockstep: bool) -> None:
    """One evaluation on every rank (rows shared out, sums reduced; see evaluate.py); the result in `results`."""
    if not cfg.validation.enabled:
        return
    rank, world_size = world()
    training = model.training
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        nll = heldout_nll(model, heldout, rank, world_size, lockstep)
        acc = demo_accuracy(model, tok, problems, cfg.validation.max_new_tokens, cfg.validation.batch_size, rank,
                            world_size, lockstep) if problems else None
    model.train(training)
    results[label] = {"heldout_nll": round(nll, 4), "demo_accuracy": acc}
    _log(rank, f"eval {label}: held-out NLL {nll:.4f}, demo accuracy {acc} ({time.perf_counter() - t0:.0f}s)")


def _evaluate_both(cfg, model, tok, heldout, problems, when: str, results: dict, lockstep: bool) -> None:
    """The model with every layer full, then as the hybrid it is (its lazy layers back afterwards)."""
    hc = HybridConfig.from_model_config(model.config)
    set_lazy_layers(model, HybridConfig([], hc.sink_tokens, hc.window, hc.backend))
    _evaluate(cfg, model, tok, heldout, problems, f"full, {when}", results, lockstep)
    set_lazy_layers(model, hc)
    _evaluate(cfg, model, tok, heldout, problems, f"hybrid, {when}", results, lockstep)


def _wrap_trainable(cfg, model):
    if cfg.train.mode == "lora":
        from peft import LoraConfig, get_peft_model

        lc = cfg.train.lora
        model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                 target_modules=list(lc.target_modules), task_type="CAUSAL_LM"))
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.mode == "lora":
            model.enable_input_require_grads()
    return model


def _export(cfg, model, tok, out_dir: str, rank: int, zero3: bool) -> None:
    """Save the LoRA adapter (LoRA runs) and the merged hybrid model (safetensors + hybrid settings in the
    config, loadable by `load_hybrid`), one module gathered at a time under ZeRO-3 (final_weights.py)."""
    if cfg.train.mode == "lora":
        state = adapter_state(model, zero3)  # every rank takes part: ZeRO-3 gathers
        if rank == 0:
            model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=state)
            tok.save_pretrained(os.path.join(out_dir, "adapter"))
        if not cfg.train.get("save_merged", True):
            _log(rank, f"train.save_merged=false: adapter only ({out_dir}/adapter)")
            barrier()
            return
    write_model(model, os.path.join(out_dir, "model"), 0, rank, zero3, tokenizer=tok)
    barrier()


def _partitioned_loading(ds_config: dict):
    """Make transformers build the model inside DeepSpeed's zero.Init (from_pretrained and from_config), so
    that no rank ever holds the whole model: the returned object must stay referenced until the model is
    built (transformers holds it through a weakref)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def _parameter_storage(model) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model): a ZeRO-3 parameter stores its partition."""
    local = whole = 0
    for p in model.parameters():
        full = getattr(p, "ds_numel", p.numel())
        whole += full
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local, whole


def _selects(cfg) -> bool:
    return cfg.lazy.get("layers") is None and not cfg.lazy.get("from_file")


@contextlib.contextmanager
def _partitioned_forwards(model, ds_config: dict | None):
    """Forwards of a ZeRO-3 partitioned model before its engine exists (selection): DeepSpeed's own parameter
    hooks (`DeepSpeedZeRoOffload`, what the engine installs) gather each module's weights for its call and
    release them after, so no rank holds more than the modules in hand; the hooks go when the block ends, the
    engine then installs its own. A no-op without ZeRO-3. Every rank must make the same forwards (lockstep)."""
    if ds_config is None:
        yield
        return
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    zero = ds_config["zero_optimization"]  # the engine's own settings
    hooks = DeepSpeedZeRoOffload(model, timers=None, ds_config=None,
                                 prefetch_bucket_size=zero["stage3_prefetch_bucket_size"],
                                 param_persistence_threshold=zero["stage3_param_persistence_threshold"])
    try:
        yield
    finally:
        hooks.partition_all_parameters()  # nothing left gathered: the engine starts from partitions alone
        hooks.destroy()


def check_plan(cfg, world_size: int, rank: int):
    """Plan the run's memory for the hardware it sees (or the `hardware` group) and refuse, before loading any
    weights, a run that does not fit (`train.ignore_plan=true` runs it anyway). Writes plan.json."""
    from ..plan import plan_memory, resolve_hardware, write_plan

    plan = plan_memory(cfg, resolve_hardware(cfg, world_size))
    if rank == 0:
        write_plan(plan, cfg.output_dir)
    if not plan.fits:
        msg = f"{plan.table()}\nThis run does not fit (plan in {cfg.output_dir}/plan.json); " \
              "apply one of the changes above, or set train.ignore_plan=true to run anyway."
        if not cfg.train.get("ignore_plan"):
            raise RuntimeError(msg)
        _log(rank, "train.ignore_plan=true: running although " + msg)
    else:
        _log(rank, f"memory plan: {plan.peak_per_gpu / 2**30:.2f} GiB per {'GPU' if plan.hardware.gpus else 'process'}"
                   f" ({cfg.output_dir}/plan.json)")
    return plan


def _bf16_weights(cfg, use_ds: bool, rank: int) -> None:
    """train.bf16 under DeepSpeed: load the weights in bfloat16, whatever model.dtype says. DeepSpeed's bf16 mode
    trains bf16 weights against the optimizer's fp32 master copy, but under ZeRO-3 it does not cast the weights
    zero.Init partitions: a model loaded in fp32 trains in fp32 there, twice the memory, with no warning (ZeRO-2
    casts after loading). The export is then bfloat16 too."""
    if not (use_ds and cfg.train.get("bf16")) or cfg.model.get("dtype") == "bfloat16":
        return
    from omegaconf import open_dict

    _log(rank, f"train.bf16=true: weights load in bfloat16 (model.dtype={cfg.model.get('dtype')} set aside; "
               "DeepSpeed keeps the fp32 master copy in the optimizer)")
    with open_dict(cfg):
        cfg.model.dtype = "bfloat16"


def _prepare_data(cfg, tok, rank: int):
    """The tokenised examples, split into (train, held out). Local rank 0 of each node builds the tokenised cache
    and the other processes of its node then load it: one build on one node, one per node on several, so
    `cache_dir` may be node-local or shared (writes are atomic; a second writer keeps the first's cache)."""
    if local_rank() != 0:
        barrier()
    ds, stats, _ = prepare(cfg.data, tok, cfg.model.name, cfg.cache_dir, progress=rank == 0)
    if local_rank() == 0:
        barrier()
    encoded = [EncodedExample(torch.tensor(r["input_ids"]), torch.tensor(r["labels"])) for r in ds]
    n_eval = int(cfg.validation.heldout)  # held out whether or not eval runs, so the training data never changes
    if len(encoded) <= n_eval:
        raise ValueError(f"{len(encoded)} examples cannot leave {n_eval} held out (validation.heldout)")
    _log(rank, f"data: {stats.examples} examples ({len(encoded) - n_eval} train, {n_eval} held out), "
               f"{stats.truncated} truncated, {stats.dropped_too_long} dropped")
    return encoded[: len(encoded) - n_eval], encoded[len(encoded) - n_eval :]


def schedule_rows(tr, lengths: list[int], seed: int, per_step: int) -> tuple[list[list[int]], int]:
    """(the run's packed rows in order, optimizer steps). Refuses a run that would make no optimizer step."""
    epochs = int(tr.epochs or 1)
    rows = plan_rows(lengths, tr.pack_length, seed, epochs)
    max_steps = int(tr.max_steps) if tr.max_steps else len(rows) // per_step
    if max_steps < 1:
        raise ValueError(
            f"{len(lengths)} training examples pack into {len(rows)} rows of train.pack_length={tr.pack_length} "
            f"tokens ({epochs} epoch(s)), fewer than one optimizer step takes ({per_step} rows: train.grad_accum or "
            "train.global_batch over the processes): no step would train. Add data or train.epochs, lower the "
            "step size, or set train.max_steps")
    if max_steps * per_step > len(rows):  # more steps than the epochs hold: keep cycling through more epochs
        per_epoch = len(rows) // epochs
        rows = plan_rows(lengths, tr.pack_length, seed, math.ceil(max_steps * per_step / per_epoch))
    return rows, max_steps


def train(cfg) -> dict:
    set_device()  # before anything touches CUDA or a collective: each process on its own GPU
    rank, world_size = world()
    validate(cfg, world_size)
    out_dir = cfg.output_dir
    os.makedirs(out_dir, exist_ok=True)
    use_ds = cfg.deepspeed.stage > 0
    _bf16_weights(cfg, use_ds, rank)
    check_plan(cfg, world_size, rank)  # before any weights load
    if use_ds:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timeout_of(cfg))
    elif world_size > 1:  # pragma: no cover - validate() refuses this
        raise RuntimeError("several processes need DeepSpeed")
    seed = int(cfg.train.seed)
    random.seed(seed)
    torch.manual_seed(seed)

    tr = cfg.train
    grad_accum = int(tr.global_batch) // world_size if tr.get("global_batch") else int(tr.grad_accum)
    n_sp = int(tr.get("sequence_parallel", 1))  # processes sharing each row (Ulysses)
    ds_config = deepspeed_config(cfg.deepspeed, tr, grad_accum, n_sp) if use_ds else None
    zero3 = use_ds and int(cfg.deepspeed.stage) == 3
    per_step = grad_accum * world_size  # packed rows per optimizer step
    row_tokens = int(tr.pack_length) // n_sp  # the longest row (or sequence-parallel shard) a rank holds
    # the data first: a run that cannot train is refused before any weights load
    tok = tokenizer_from_config(cfg.model)
    train_enc, heldout = _prepare_data(cfg, tok, rank)
    rows, max_steps = schedule_rows(tr, [len(e.input_ids) for e in train_enc], seed, per_step)
    hf_ds = _partitioned_loading(ds_config) if zero3 else None  # alive until the engine exists (weakref in HF)
    model, _ = load_from_config(cfg.model)  # under ZeRO-3: built inside zero.Init, each rank its partition
    if world_size > 1:
        local, whole = _parameter_storage(model)
        print(f"rank {rank}: holds {local / whole:.1%} of the model's {whole} parameter elements after loading",
              flush=True)
    dev = torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    model.to(dev)
    problems = (demo_examples(cfg.validation.accuracy_problems, seed=10_000, min_steps=cfg.validation.accuracy_min_steps,
                              max_steps=cfg.validation.accuracy_max_steps) if cfg.validation.accuracy_problems else [])

    results: dict = {}
    # Selection runs forwards before the engine exists: under ZeRO-3 on the partitioned model, one module's
    # weights gathered at a time, every rank in step. The evaluations run later, on the engine's model.
    with _partitioned_forwards(model, ds_config if zero3 and _selects(cfg) else None):
        lazy = _choose_lazy(cfg, model, train_enc, out_dir, rank, lockstep=zero3)
        barrier()
    hc = HybridConfig(lazy, cfg.lazy.sink_tokens, cfg.lazy.window, cfg.lazy.get("backend", "auto"))
    convert_to_hybrid(model, hc)

    model = _wrap_trainable(cfg, model)
    model.train()
    sp = sequence_parallel.enable(model, n_sp)  # evaluation (modules in eval mode) keeps the unwrapped attention
    if tr.get("tiled_mlp"):  # ZeRO-3 gathers weights per tile: every rank pads to the longest row, tiles alike
        sequence_parallel.tile_mlps(model, length=row_tokens if zero3 else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(tr.warmup_ratio * max_steps), max_steps))
    engine = (DeepSpeedEngine(model, opt, sched, ds_config, mpu=sp and sp.mpu) if use_ds
              else PlainEngine(model, opt, sched, tr.max_grad_norm, grad_accum))
    model = engine.module
    if use_ds:
        _log(rank, engine.placement())
    if hf_ds is not None:  # later loads in this process must not be partitioned again
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        hf_ds = None

    ckpt_root = os.path.join(out_dir, "checkpoints")
    _evaluate_both(cfg, model, tok, heldout, problems, "before", results, zero3)  # before a resume loads weights
    start = 0
    resume_from = _resume(engine, ckpt_root, tr.resume, rank, dev)
    if resume_from:
        state, rng = ckpt.read_state(resume_from, rank)
        ckpt.set_rng_state(rng)
        start = state["step"]
        _check_row_position(state, per_step, resume_from)
        _log(rank, f"resumed from {resume_from} at step {start}")
    keep = int(tr.get("keep_checkpoints", 2))
    preempt = Preemption()
    bad_streak = bad_total = 0  # steps with a non-finite loss or gradient norm (skipped)
    distill = distill_settings(tr)
    run = init_wandb(cfg.logging, _plain(cfg), "train", out_dir) if rank == 0 else None
    if run is not None:
        run.config.update({"lazy_layers": lazy}, allow_val_change=True)
    log_path = os.path.join(out_dir, "train_log.jsonl")

    from tqdm.auto import tqdm

    bar = tqdm(total=max_steps, initial=start, desc="train", disable=rank != 0)
    t_start = time.perf_counter()
    try:  # the handlers go back however the loop ends (preempted, a bad-steps error, a crash)
        for step in range(start, max_steps):
            t0 = time.perf_counter()
            lr = sched.get_last_lr()[0]  # the rate this step's update uses (the engine steps the schedule after it)
            mine = [rows[step * per_step + rank * grad_accum + m] for m in range(grad_accum)]
            batches = [collate_packed([[train_enc[i] for i in row]], tok.pad_token_id, n_sp) for row in mine]
            local_tokens = sum(b.num_target_tokens for b in batches)
            n_global = all_reduce_sum(local_tokens, dev)  # the loss is normalised by target tokens of the step
            loss_sum = 0.0
            norm = None
            # the step's loss: token losses of all ranks / target tokens of the step, times what the engine divides
            # the summed gradients by (see engine.py)
            scale = engine.gradient_divisor / n_global
            rows_in = [{"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids} for b in batches]
            micro = sequence_parallel.shard(sp, rows_in, dev) if sp else [
                {k: v.to(dev) for k, v in r.items()} for r in rows_in]
            for m, inputs in enumerate(micro):
                # dropout masks drawn from a stream of this packed row alone: the same rows give the same losses on
                # any number of processes (rank r's micro-step m is global row step * per_step + r * grad_accum + m);
                # gradient checkpointing's recomputation replays them (it restores the RNG state it saw)
                row = step * per_step + rank * grad_accum + m if not sp else (step, rank, m)
                torch.manual_seed(row_seed(seed, row))
                if zero3:  # DeepSpeed's tiled loss: the head's backward runs inside, already scaled
                    scaled = token_loss_sum(model, inputs, zero3_scale=scale, engine=engine, length=row_tokens,
                                            distill=distill)
                else:
                    scaled = token_loss_sum(model, inputs, engine=engine, distill=distill) * scale
                micro_loss = float(scaled.detach()) / scale  # host sync, once per micro-batch
                if not math.isfinite(micro_loss):
                    # make the gradients non-finite too (a finite gradient of an infinite loss would still step): both
                    # engines then skip the optimizer step (DeepSpeed's overflow check, PlainEngine's norm check)
                    scaled, micro_loss = scaled * float("nan"), float("nan")
                loss_sum += micro_loss
                engine.backward(scaled)
                norm = engine.step()
            step_loss = all_reduce_sum(loss_sum, dev) / n_global
            tokens = all_reduce_sum(sum(int(b.input_ids.numel()) for b in batches), dev)
            dt = time.perf_counter() - t0
            bad = not math.isfinite(step_loss) or (norm is not None and not math.isfinite(norm))
            bad_streak, bad_total = (bad_streak + 1, bad_total + 1) if bad else (0, bad_total)
            rec = {"step": step + 1, "loss": step_loss, "lr": lr,
                   "grad_norm": norm, "tokens_per_s": tokens / dt, "target_tokens": n_global, "memory_mb": _memory_mb(),
                   "skipped": bad, "skipped_total": bad_total}
            if rank == 0:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
                if run is not None:
                    run.log({f"train/{k}": v for k, v in rec.items() if v is not None and k != "step"}, step=step + 1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
            if bad:
                _log(rank, f"step {step + 1}: non-finite loss ({step_loss}) or gradient norm ({norm}); optimizer step "
                           f"skipped ({bad_streak} in a row, {bad_total} in all)")
                if bad_streak >= int(tr.get("max_bad_steps", 3)):
                    last = ckpt.latest(ckpt_root)
                    raise RuntimeError(
                        f"{bad_streak} steps in a row (the last: step {step + 1}, packed rows {mine} of rank {rank}) "
                        f"had a non-finite loss or gradient norm; their updates were skipped, so the weights are those "
                        f"after step {step + 1 - bad_streak}. Last good checkpoint: {last or 'none'}; no model "
                        "exported. Lower train.lr, check those rows' data, or raise train.max_bad_steps")
            state = {"step": step + 1, "rows_consumed": (step + 1) * per_step, "rows_per_step": per_step}
            saved = None
            if not bad and tr.save_every and (step + 1) % tr.save_every == 0 and step + 1 < max_steps:
                saved = save_checkpoint(engine, ckpt_root, step + 1, state, keep) or "saved"
            if preempt.agreed(dev):  # every rank, every step: a signal on any rank stops them all here
                saved = saved or save_checkpoint(engine, ckpt_root, step + 1, state, keep)
                _log(rank, f"preempted at step {step + 1}, checkpoint {ckpt.step_dir(ckpt_root, step + 1)}; rerun with "
                           f"train.resume=auto to continue (exit code {PREEMPTED_EXIT})")
                bar.close()
                if run is not None:
                    run.finish(exit_code=PREEMPTED_EXIT)
                sys.stdout.flush()
                sys.exit(PREEMPTED_EXIT)
    finally:
        preempt.restore()
    bar.close()
    _log(rank, f"trained {max_steps - start} steps in {time.perf_counter() - t_start:.0f}s")

    _export(cfg, model, tok, out_dir, rank, zero3)
    _evaluate_both(cfg, model, tok, heldout, problems, "after", results, zero3)
    if rank == 0:
        _write_summary(out_dir, results, lazy, cfg)
    if run is not None:
        run.summary.update({k.replace(", ", "_"): v for k, v in results.items()})
        run.finish()
    barrier()
    return results


def _check_row_position(state: dict, per_step: int, where: str) -> None:
    """The resumed run goes on from the checkpoint's row position only if it takes as many packed rows per step:
    otherwise step k of this run would not start at row `rows_consumed`, and rows would be skipped or repeated."""
    consumed, step = int(state["rows_consumed"]), int(state["step"])
    if consumed != step * per_step:
        raise ValueError(
            f"checkpoint {where} was written after {consumed} packed rows in {step} steps "
            f"({state.get('rows_per_step', consumed // max(step, 1))} rows per step); this run takes {per_step} rows "
            "per step (train.grad_accum or train.global_batch over the processes), so resuming would skip or repeat "
            "rows. Resume with the step size the checkpoint was trained with, or start afresh (train.resume=none or "
            "another output_dir)")


def _resume(engine, root: str, resume, rank: int, dev) -> str | None:
    """Load the checkpoint to resume from: `resume=auto` tries `latest`, then older ones, reporting each that
    fails to load (truncated or missing file, another world size or ZeRO stage); all ranks agree on each try.
    Checkpoints that exist but none loads is an error, never a silent fresh start."""
    if resume in (None, "none"):
        return None
    candidates = ckpt.candidates(root) if resume == "auto" else [resume]
    failures = []
    for d in candidates:
        try:
            engine.load(d)
            ckpt.read_state(d, rank)
            ok = 1.0
        except Exception as e:  # noqa: BLE001 - any failure to load means: try the previous checkpoint
            failures.append(f"{d}: {type(e).__name__}: {e}"[:500])
            print(f"rank {rank}: checkpoint {d} does not load ({failures[-1]}); trying the previous one",
                  file=sys.stderr, flush=True)
            ok = 0.0
        if all_reduce_sum(ok, dev) == float(world()[1]):
            return d
    if candidates:
        raise RuntimeError(f"no usable checkpoint under {root}:\n  " + "\n  ".join(failures or ["(another rank failed)"])
                           + "\nfix or remove them, or pass train.resume=none to start afresh")
    return None


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover
        return float("nan")


def _plain(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _write_summary(out_dir: str, results: dict, lazy: list[int], cfg) -> None:
    lines = [f"# lt_train summary: {cfg.model.name}, {len(lazy)} lazy layers {lazy}, S={cfg.lazy.sink_tokens} "
             f"W={cfg.lazy.window}, {cfg.train.mode}", "", "| model | held-out NLL | demo accuracy |",
             "|---|---:|---:|"]
    for k, v in results.items():
        acc = "n/a" if v["demo_accuracy"] is None else f"{v['demo_accuracy']:.3f}"
        lines.append(f"| {k} | {v['heldout_nll']:.4f} | {acc} |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    atomic_write_text(os.path.join(out_dir, "summary.md"), text)
    atomic_write_json(os.path.join(out_dir, "summary.json"), {"results": results, "lazy_layers": lazy})
