"""The stages of the training recipe before its step loop: set up the run (processes, memory plan, DeepSpeed),
load and prepare the data, load the model and make it a hybrid (lazy layers chosen or given), build the engine.

Each stage is a function of explicit inputs returning what the next stages use (`Run`, `Data`)."""
from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass

import torch

from .. import sequence_parallel
from ..data.collate import pack_bins
from ..data.format import EncodedExample
from ..data.prepare import prepare
from ..distributed import barrier, local_rank, set_device, set_group_timeout, timeout_of, world
from ..io import atomic_write_json
from ..lazy import select_with_stats
from ..models import tokenizer_from_config
from .config import validate
from .engine import DeepSpeedEngine, PlainEngine, deepspeed_config
from .evaluate import accuracy_problems


def log0(rank: int, *msg) -> None:
    if rank == 0:
        print(*msg, flush=True)


@dataclass
class Run:
    """Where this process stands and how the run's steps are cut."""
    rank: int
    world_size: int
    dev: torch.device
    use_ds: bool
    zero3: bool
    ds_config: dict | None
    grad_accum: int   # packed rows per optimizer step and process
    per_step: int     # packed rows per optimizer step, all processes
    n_sp: int         # processes sharing each row (Ulysses)
    row_tokens: int   # the longest row (or sequence-parallel shard) a rank holds
    seed: int


@dataclass
class Data:
    tok: object
    train: list       # tokenised training examples
    heldout: list     # tokenised held-out examples (NLL)
    rows: list        # the run's packed rows, in order (indices into `train`)
    max_steps: int
    problems: list    # accuracy problems of the evaluations


def set_up_run(cfg) -> Run:
    """Processes and devices, the config checked, the memory plan (before any weights load), DeepSpeed started,
    the seeds set."""
    set_device()  # before anything touches CUDA or a collective: each process on its own GPU
    rank, world_size = world()
    validate(cfg, world_size)
    os.makedirs(cfg.output_dir, exist_ok=True)
    use_ds = cfg.deepspeed.stage > 0
    _bf16_weights(cfg, use_ds, rank)
    check_plan(cfg, world_size, rank)
    if use_ds:
        import deepspeed

        timeout = timeout_of(cfg)
        set_group_timeout(timeout)  # DeepSpeed's own groups too, not only the world group
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    elif world_size > 1:  # pragma: no cover - validate() refuses this
        raise RuntimeError("several processes need DeepSpeed")
    seed = int(cfg.train.seed)
    random.seed(seed)
    torch.manual_seed(seed)
    tr = cfg.train
    grad_accum = int(tr.global_batch) // world_size if tr.get("global_batch") else int(tr.grad_accum)
    n_sp = int(tr.get("sequence_parallel", 1))
    ds_config = deepspeed_config(cfg.deepspeed, tr, grad_accum, n_sp) if use_ds else None
    dev = torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    return Run(rank, world_size, dev, use_ds, use_ds and int(cfg.deepspeed.stage) == 3, ds_config, grad_accum,
               grad_accum * world_size, n_sp, int(tr.pack_length) // n_sp, seed)


def load_data(cfg, run: Run) -> Data:
    """The data before the weights: a run that cannot train is refused before any weights load."""
    tok = tokenizer_from_config(cfg.model)
    train_enc, heldout = _prepare_data(cfg, tok, run.rank)
    rows, max_steps = schedule_rows(cfg.train, [len(e.input_ids) for e in train_enc], run.seed, run.per_step)
    return Data(tok, train_enc, heldout, rows, max_steps, accuracy_problems(cfg.validation, cfg.data))


def build_engine(cfg, run: Run, model, max_steps: int, hf_ds):
    """LoRA adapters or full training, gradient checkpointing, sequence parallelism, the optimizer and schedule,
    and the engine (DeepSpeed or the plain one). Returns (engine, sequence-parallel groups or None)."""
    tr = cfg.train
    model = _wrap_trainable(cfg, model)
    model.train()
    sp = sequence_parallel.enable(model, run.n_sp)  # evaluation (modules in eval mode) keeps the unwrapped attention
    if tr.get("tiled_mlp"):  # ZeRO-3 gathers weights per tile: every rank pads to the longest row, tiles alike
        sequence_parallel.tile_mlps(model, length=run.row_tokens if run.zero3 else None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(int(tr.warmup_ratio * max_steps), max_steps))
    engine = (DeepSpeedEngine(model, opt, sched, run.ds_config, mpu=sp and sp.mpu) if run.use_ds
              else PlainEngine(model, opt, sched, tr.max_grad_norm, run.grad_accum))
    if run.use_ds:
        log0(run.rank, engine.placement())
    if hf_ds is not None:  # later loads in this process must not be partitioned again
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return engine, sp


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


def _choose_lazy(cfg, model, train_encoded, out_dir, rank, lockstep: bool = False) -> list[int]:
    lz = cfg.lazy
    if lz.get("layers") is not None:
        return [int(i) for i in lz.layers]
    if lz.get("from_file"):  # read by validate(), which also took the file's S and W
        layers = list(lz.file_layers)
        log0(rank, f"lazy layers from {lz.from_file}: {layers} (S={lz.sink_tokens}, W={lz.window})")
        return layers
    samples = [e.input_ids for e in train_encoded[: lz.get("max_samples") or len(train_encoded)]]
    sel = select_with_stats(model, samples, lz.num_lazy, lz.strategy, lz.sink_tokens, lz.window,
                            lz.last_queries, lz.seed, lz.get("nll_samples", 4), progress=rank == 0,
                            lockstep=lockstep)
    if rank == 0:
        atomic_write_json(os.path.join(out_dir, "lazy_layers.json"),
                          {"lazy_layers": sel.layers, "strategy": sel.strategy, "per_layer_ratio": sel.per_layer_ratio,
                           "delta_nll": sel.delta_nll, "sink_tokens": lz.sink_tokens, "window": lz.window})
    log0(rank, f"lazy layers ({sel.strategy}): {sel.layers}")
    return sel.layers


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
        log0(rank, "train.ignore_plan=true: running although " + msg)
    else:
        log0(rank, f"memory plan: {plan.peak_per_gpu / 2**30:.2f} GiB per {'GPU' if plan.hardware.gpus else 'process'}"
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

    log0(rank, f"train.bf16=true: weights load in bfloat16 (model.dtype={cfg.model.get('dtype')} set aside; "
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
    log0(rank, f"data: {stats.examples} examples ({len(encoded) - n_eval} train, {n_eval} held out), "
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
