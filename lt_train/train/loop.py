"""The LightTransfer-Train recipe: set up the run -> load the data -> load the model and make it a hybrid -> build
the engine -> evaluate before -> the step loop -> export -> evaluate after -> summary.

Runs as `python launch/train.py` (one process) or `torchrun --nproc_per_node=N launch/train.py` (DeepSpeed). The
stages before the loop are in setup.py; the loop, its step, and what it does about bad steps, checkpoints and
preemption are here.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from .. import sequence_parallel
from ..data.collate import collate_packed
from ..distill import DistillSettings, head_kl_sum, teacher_states, zero3_head_kl_sum
from ..distributed import all_reduce_sum, barrier, world
from ..io import atomic_write_json, atomic_write_text
from ..nll import decoder_of, lm_head_loss_sum, zero3_head_loss_sum
from ..tracking import init_wandb
from . import checkpoint as ckpt
from .config import check_distill_has_lazy, distill_settings
from .engine import save_checkpoint
from .evaluate import evaluate_pair
from .final_weights import adapter_state, write_model
from .preemption import PREEMPTED_EXIT, Preemption
from ..hybrid import HybridConfig, convert_to_hybrid
from ..models import load_from_config
from .setup import (Data, Run, _choose_lazy, _parameter_storage, _partitioned_forwards,  # noqa: F401
                    _partitioned_loading, _selects, _wrap_trainable, build_engine, load_data, log0, lr_lambda,
                    plan_rows, schedule_rows, set_up_run)


def train(cfg) -> dict:
    """The recipe, stage by stage; returns the evaluations' results."""
    run = set_up_run(cfg)
    data = load_data(cfg, run)
    model, lazy, hf_ds = load_and_convert(cfg, run, data)
    engine, sp = build_engine(cfg, run, model, data.max_steps, hf_ds)
    del hf_ds, model
    results: dict = {}
    evaluate_pair(cfg, engine.module, data, "before", results, run.zero3)  # before a resume loads weights
    start = resume(cfg, run, engine)
    tracker = init_wandb(cfg.logging, _plain(cfg), "train", cfg.output_dir) if run.rank == 0 else None
    if tracker is not None:
        tracker.config.update({"lazy_layers": lazy}, allow_val_change=True)
    run_steps(cfg, run, data, engine, sp, start, tracker)
    export(cfg, engine.module, data.tok, cfg.output_dir, run.rank, run.zero3)
    evaluate_pair(cfg, engine.module, data, "after", results, run.zero3, control=True)
    if run.rank == 0:
        _write_summary(cfg.output_dir, results, lazy, cfg)
    if tracker is not None:
        tracker.summary.update({k.replace(", ", "_"): v for k, v in results.items()})
        tracker.finish()
    barrier()
    return results


def load_and_convert(cfg, run: Run, data: Data):
    """The model (under ZeRO-3 built inside zero.Init, each rank its partition), its lazy layers chosen (or
    given), converted to the hybrid. Returns (model, lazy layers, the object that keeps ZeRO-3 loading on)."""
    hf_ds = _partitioned_loading(run.ds_config) if run.zero3 else None  # alive until the engine exists (weakref)
    model, _ = load_from_config(cfg.model)
    if run.world_size > 1:
        local, whole = _parameter_storage(model)
        print(f"rank {run.rank}: holds {local / whole:.1%} of the model's {whole} parameter elements after loading",
              flush=True)
    model.to(run.dev)
    # Selection runs forwards before the engine exists: under ZeRO-3 on the partitioned model, one module's
    # weights gathered at a time, every rank in step. The evaluations run later, on the engine's model.
    with _partitioned_forwards(model, run.ds_config if run.zero3 and _selects(cfg) else None):
        lazy = _choose_lazy(cfg, model, data.train, cfg.output_dir, run.rank, lockstep=run.zero3)
        barrier()
    check_distill_has_lazy(cfg.train, lazy)  # the layers a selection chose, if none were given
    convert_to_hybrid(model, HybridConfig(lazy, cfg.lazy.sink_tokens, cfg.lazy.window, cfg.lazy.get("backend", "auto")))
    return model, lazy, hf_ds


def resume(cfg, run: Run, engine) -> int:
    """The step to start from: 0, or that of the checkpoint `train.resume` loads (weights, optimizer, RNG)."""
    root = os.path.join(cfg.output_dir, "checkpoints")
    resume_from = _resume(engine, root, cfg.train.resume, run.rank, run.dev)
    if not resume_from:
        return 0
    state, rng = ckpt.read_state(resume_from, run.rank)
    ckpt.set_rng_state(rng)
    _check_row_position(state, run.per_step, resume_from)
    log0(run.rank, f"resumed from {resume_from} at step {state['step']}")
    return int(state["step"])


def run_steps(cfg, run: Run, data: Data, engine, sp, start: int, tracker) -> None:
    """The step loop: one optimizer step per iteration, logged; bad steps counted (and the run stopped after too
    many in a row), checkpoints written every `train.save_every`, and a preemption signal on any rank ends every
    rank here with a checkpoint."""
    from tqdm.auto import tqdm

    tr = cfg.train
    root = os.path.join(cfg.output_dir, "checkpoints")
    preempt, distill, bad = Preemption(), distill_settings(tr), BadSteps(int(tr.get("max_bad_steps", 3)), root)
    log_path = os.path.join(cfg.output_dir, "train_log.jsonl")
    bar = tqdm(total=data.max_steps, initial=start, desc="train", disable=run.rank != 0)
    t_start = time.perf_counter()
    try:  # the handlers go back however the loop ends (preempted, a bad-steps error, a crash)
        for step in range(start, data.max_steps):
            rec, mine = train_step(run, data, engine, sp, step, distill)
            rec.update(bad.record(rec, step, run.rank))
            if run.rank == 0:
                _log_step(rec, log_path, tracker, bar)
            bad.check(step, mine, run.rank)  # after the step is logged: the last bad step is in the log too
            state = {"step": step + 1, "rows_consumed": (step + 1) * run.per_step, "rows_per_step": run.per_step}
            saved = None
            if not rec["skipped"] and tr.save_every and (step + 1) % tr.save_every == 0 and step + 1 < data.max_steps:
                saved = save_checkpoint(engine, root, step + 1, state, int(tr.get("keep_checkpoints", 2))) or "saved"
            if preempt.agreed(run.dev):  # every rank, every step: a signal on any rank stops them all here
                _stop_preempted(engine, root, step, state, saved, int(tr.get("keep_checkpoints", 2)), run.rank,
                                bar, tracker)
    finally:
        preempt.restore()
    bar.close()
    log0(run.rank, f"trained {data.max_steps - start} steps in {time.perf_counter() - t_start:.0f}s")


def train_step(run: Run, data: Data, engine, sp, step: int, distill) -> tuple[dict, list[int]]:
    """One optimizer step over this rank's packed rows of `step`: (its log record, the rows)."""
    t0 = time.perf_counter()
    lr = engine.scheduler.get_last_lr()[0]  # the rate this step's update uses (the engine steps it after)
    mine = [data.rows[step * run.per_step + run.rank * run.grad_accum + m] for m in range(run.grad_accum)]
    batches = [collate_packed([[data.train[i] for i in row]], data.tok.pad_token_id, run.n_sp) for row in mine]
    n_global = all_reduce_sum(sum(b.num_target_tokens for b in batches), run.dev)  # the loss is per target token
    # the step's loss: token losses of all ranks / target tokens of the step, times what the engine divides
    # the summed gradients by (see engine.py)
    scale = engine.gradient_divisor / n_global
    rows_in = [{"input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids} for b in batches]
    micro = sequence_parallel.shard(sp, rows_in, run.dev) if sp else [
        {k: v.to(run.dev) for k, v in r.items()} for r in rows_in]
    loss_sum, norm = 0.0, None
    for m, inputs in enumerate(micro):
        # dropout masks drawn from a stream of this packed row alone: the same rows give the same losses on any
        # number of processes (rank r's micro-step m is global row step * per_step + r * grad_accum + m); gradient
        # checkpointing's recomputation replays them (it restores the RNG state it saw)
        row = step * run.per_step + run.rank * run.grad_accum + m if not sp else (step, run.rank, m)
        torch.manual_seed(row_seed(run.seed, row))
        if run.zero3:  # DeepSpeed's tiled loss: the head's backward runs inside, already scaled
            scaled = token_loss_sum(engine.module, inputs, zero3_scale=scale, engine=engine, length=run.row_tokens,
                                    distill=distill)
        else:
            scaled = token_loss_sum(engine.module, inputs, engine=engine, distill=distill) * scale
        micro_loss = float(scaled.detach()) / scale  # host sync, once per micro-batch
        if not math.isfinite(micro_loss):
            # make the gradients non-finite too (a finite gradient of an infinite loss would still step): both
            # engines then skip the optimizer step (DeepSpeed's overflow check, PlainEngine's norm check)
            scaled, micro_loss = scaled * float("nan"), float("nan")
        loss_sum += micro_loss
        engine.backward(scaled)
        norm = engine.step()
    step_loss = all_reduce_sum(loss_sum, run.dev) / n_global
    tokens = all_reduce_sum(sum(int(b.input_ids.numel()) for b in batches), run.dev)
    dt = time.perf_counter() - t0
    return {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": norm, "tokens_per_s": tokens / dt,
            "target_tokens": n_global, "memory_mb": _memory_mb()}, mine


class BadSteps:
    """Steps with a non-finite loss or gradient norm (their updates skipped): counted, and the run stopped with
    the last good checkpoint named after `limit` in a row."""

    def __init__(self, limit: int, root: str):
        self.limit, self.root, self.streak, self.total = limit, root, 0, 0

    def record(self, rec: dict, step: int, rank: int) -> dict:
        bad = not math.isfinite(rec["loss"]) or (rec["grad_norm"] is not None and not math.isfinite(rec["grad_norm"]))
        self.streak, self.total = (self.streak + 1, self.total + 1) if bad else (0, self.total)
        if bad:
            log0(rank, f"step {step + 1}: non-finite loss ({rec['loss']}) or gradient norm ({rec['grad_norm']}); "
                       f"optimizer step skipped ({self.streak} in a row, {self.total} in all)")
        return {"skipped": bad, "skipped_total": self.total}

    def check(self, step: int, rows: list[int], rank: int) -> None:
        """Stop the run after `limit` bad steps in a row (every rank sees the same losses: all stop together)."""
        if self.streak >= self.limit:
            raise RuntimeError(
                f"{self.streak} steps in a row (the last: step {step + 1}, packed rows {rows} of rank {rank}) "
                f"had a non-finite loss or gradient norm; their updates were skipped, so the weights are those "
                f"after step {step + 1 - self.streak}. Last good checkpoint: {ckpt.latest(self.root) or 'none'}; "
                "no model exported. Lower train.lr, check those rows' data, or raise train.max_bad_steps")


def _log_step(rec: dict, path: str, tracker, bar) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    if tracker is not None:
        tracker.log({f"train/{k}": v for k, v in rec.items() if v is not None and k != "step"}, step=rec["step"])
    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    bar.update(1)


def _stop_preempted(engine, root: str, step: int, state: dict, saved, keep: int, rank: int, bar, tracker) -> None:
    """A preemption signal reached some rank: checkpoint (unless this step just did) and exit with PREEMPTED_EXIT."""
    saved = saved or save_checkpoint(engine, root, step + 1, state, keep)
    log0(rank, f"preempted at step {step + 1}, checkpoint {ckpt.step_dir(root, step + 1)}; rerun with "
               f"train.resume=auto to continue (exit code {PREEMPTED_EXIT})")
    bar.close()
    if tracker is not None:
        tracker.finish(exit_code=PREEMPTED_EXIT)
    sys.stdout.flush()
    sys.exit(PREEMPTED_EXIT)


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


def export(cfg, model, tok, out_dir: str, rank: int, zero3: bool) -> None:
    """Save the LoRA adapter (LoRA runs) and the merged hybrid model (safetensors + hybrid settings in the
    config, loadable by `load_hybrid`), one module gathered at a time under ZeRO-3 (final_weights.py)."""
    if cfg.train.mode == "lora":
        state = adapter_state(model, zero3)  # every rank takes part: ZeRO-3 gathers
        if rank == 0:
            model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=state)
            tok.save_pretrained(os.path.join(out_dir, "adapter"))
        if not cfg.train.get("save_merged", True):
            log0(rank, f"train.save_merged=false: adapter only ({out_dir}/adapter)")
            barrier()
            return
    write_model(model, os.path.join(out_dir, "model"), 0, rank, zero3, tokenizer=tok)
    barrier()


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


# the rows of the summary in the order that tells the story: before training, the hybrid after, the controls
_STORY = (("full, before", "the original model"), ("hybrid, before", "the hybrid, training-free"),
          ("hybrid, after", "the hybrid after training"), ("full, after", "the trained weights, every layer full"),
          ("every layer streaming, after", "control: the trained weights, every layer streaming"))


def _write_summary(out_dir: str, results: dict, lazy: list[int], cfg) -> None:
    task = cfg.validation.get("task", "demo")
    lines = [f"# lt_train summary: {cfg.model.name}, {len(lazy)} lazy layers {lazy}, S={cfg.lazy.sink_tokens} "
             f"W={cfg.lazy.window}, {cfg.train.mode}", "", f"| model | what it is | held-out NLL | {task} accuracy |", "|---|---|---:|---:|"]
    for key, label in _STORY:
        if key in results:
            v = results[key]
            acc = "n/a" if v["demo_accuracy"] is None else f"{v['demo_accuracy']:.1%}"
            lines.append(f"| {key} | {label} | {v['heldout_nll']:.4f} | {acc} |")
    lines += ["", f"outputs in {out_dir}: model/ (the trained hybrid, `load_hybrid`)"
              + (", adapter/ (LoRA)" if cfg.train.mode == "lora" else "")
              + ", train_log.jsonl, summary.md, summary.json, plan.json"]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    atomic_write_text(os.path.join(out_dir, "summary.md"), text)
    atomic_write_json(os.path.join(out_dir, "summary.json"), {"results": results, "lazy_layers": lazy})
