"""Two ways to run the optimisation, behind one small interface: plain PyTorch (one process) and DeepSpeed
ZeRO (stages 2 and 3, optional CPU offload; any number of processes under torchrun, CPU or GPU).

Both take the same optimizer and scheduler, receive losses already normalised by the global number of
target tokens, and save / restore everything needed for an exact resume.
"""
from __future__ import annotations

import os

import torch

from ..distributed import barrier, world
from . import checkpoint as ckpt


class PlainEngine:
    """Single-process training with torch.optim."""

    def __init__(self, model, optimizer, scheduler, max_grad_norm: float, grad_accum: int):
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm, self.grad_accum = max_grad_norm, grad_accum
        self.rank, self.world_size = 0, 1
        self.gradient_divisor = 1
        self._micro = 0

    def hidden_states(self, inputs: dict) -> torch.Tensor:
        from ..nll import decoder_of

        return decoder_of(self.module)(**inputs).last_hidden_state

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        """Call after every micro-batch; steps the optimizer at accumulation boundaries (returns grad norm)."""
        self._micro += 1
        if self._micro % self.grad_accum:
            return None
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm or float("inf"))
        if not torch.isfinite(norm):  # skip, as DeepSpeed does on overflow: weights, optimizer, schedule unchanged
            self.optimizer.zero_grad(set_to_none=True)
            return float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def trainable_state(self) -> dict:
        return {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}

    def save(self, d: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(d, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.trainable_state().items()}, os.path.join(d, "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(d, "optimizer.pt"))

    def load(self, d: str) -> None:
        from safetensors.torch import load_file

        missing = set(self.trainable_state()) - set(state := load_file(os.path.join(d, "trainable.safetensors")))
        if missing:
            raise ValueError(f"checkpoint {d} lacks trainable parameters, e.g. {sorted(missing)[:3]}")
        self.module.load_state_dict(state, strict=False)
        opt = torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])


def deepspeed_config(ds_cfg, train_cfg, grad_accum: int, sequence_parallel: int = 1) -> dict:
    """`grad_accum`: packed rows per process per step. Under sequence parallelism each process runs one shard of
    every row of its group, so it takes `grad_accum x sequence_parallel` micro-steps per optimizer step."""
    from ..plan import ALLGATHER_BUCKET, PREFETCH_BUCKET, REDUCE_BUCKET

    stage = int(ds_cfg.stage)
    # buckets set here, not left to DeepSpeed's defaults, so that the memory plan counts what the engine allocates
    zero = {"stage": stage, "reduce_bucket_size": REDUCE_BUCKET, "allgather_bucket_size": ALLGATHER_BUCKET}
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = PREFETCH_BUCKET
        # parameters below this many elements stay gathered for the whole run (DeepSpeed's default, 1e5: norms
        # and biases); 0 gathers every module per call, the strictest test of ranks in step
        zero["stage3_param_persistence_threshold"] = int(ds_cfg.get("param_persistence_threshold", 100_000))
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds_cfg.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds_cfg.get("offload_param"):
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum * sequence_parallel,
        "gradient_clipping": float(train_cfg.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(train_cfg.bf16)},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # our torch AdamW, also with offload (no JIT-built CPU Adam)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed ZeRO: `deepspeed.initialize` driven directly (the HF Trainer and Accelerate silently drop
    DeepSpeed or the world size on CPU)."""

    def __init__(self, model, optimizer, scheduler, ds_config: dict, mpu=None):
        import deepspeed

        # mpu: the sequence-parallel groups (sequence_parallel.enable); gradients are then averaged over the
        # data-parallel degree, world size / N
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, mpu=mpu)
        self.module = self.engine.module
        self.rank, self.world_size = world()
        self.stage = ds_config["zero_optimization"]["stage"]
        sp = 1 if mpu is None else mpu.get_sequence_parallel_world_size()
        # What DeepSpeed divides the summed gradients by. ZeRO-1/2 divide by the data-parallel degree (world / N);
        # ZeRO-3's reduce-scatter (the default path) averages over all ranks, sequence-parallel ones included
        # (deepspeed 0.19: stage3.__avg_scatter_grads has no sequence-parallel factor). The loop scales its loss
        # by this, so that both give sum of token gradients / target tokens; tests/test_sequence_parallel.py
        # checks it against one process.
        self.gradient_divisor = self.world_size if self.stage == 3 else self.world_size // sp

    def placement(self) -> str:
        """Where DeepSpeed put things, read from its own objects: the dtype of the parameters this rank holds
        (its ZeRO-3 partition), and whether its ZeRO optimizer offloads the fp32 master weights and optimizer state
        to the CPU, with the device they live on."""
        p = next(self.module.parameters())
        held = getattr(p, "ds_tensor", p)
        opt = self.optimizer
        offload = bool(getattr(opt, "offload_optimizer", False) or getattr(opt, "cpu_offload", False))
        master = (getattr(opt, "fp32_partitioned_groups_flat", None)
                  or getattr(opt, "single_partition_of_fp32_groups", None) or [None])[0]
        where = master.device.type if master is not None else "unknown"
        return (f"DeepSpeed ZeRO-{self.stage}: parameters {held.dtype}, optimizer state "
                f"{'offloaded to ' + where if offload else 'on ' + where} ({type(opt).__name__})")

    def hidden_states(self, inputs: dict) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H], through `engine.forward`: DeepSpeed counts micro-steps there
        (ZeRO-3 copies the first micro-step's gradient and adds the others; a forward that bypasses the engine
        keeps every micro-step the first, so only the last one's gradient survives the accumulation) and hooks the
        output to start its backward bookkeeping. The LM head is skipped (no logits kept); the loss takes the states."""
        out = self.engine(**inputs, output_hidden_states=True,
                          logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
        return out.hidden_states[-1]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # our loss is already normalised

    def step(self) -> float | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, d: str) -> None:
        root, tag = os.path.split(d.rstrip("/"))
        self.engine.save_checkpoint(root, tag=tag, save_latest=False)

    def load(self, d: str) -> None:
        root, tag = os.path.split(d.rstrip("/"))
        path, _ = self.engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint {d}")


def save_checkpoint(engine, root: str, step: int, state: dict, keep: int = 2) -> str | None:
    """All ranks write into a temporary directory; rank 0 renames it into place once everyone is done."""
    tmp = os.path.join(root, f".partial-step_{step:07d}")
    if engine.rank == 0:
        os.makedirs(root, exist_ok=True)
    barrier()
    try:
        engine.save(tmp)
        os.makedirs(tmp, exist_ok=True)
        ckpt.write_rng(tmp, engine.rank)
        barrier()
        final = None
        if engine.rank == 0:
            ckpt.write_state(tmp, state)
            final = ckpt.publish(root, tmp, step, keep)
    except OSError as e:  # a full disk, a quota, a vanished mount: the previous checkpoint stays `latest`
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the checkpoint of step {step} could not be written ({e}); "
                           f"{ckpt.latest(root) or 'no earlier checkpoint'} stays the latest one. Free space and "
                           "rerun with train.resume=auto") from e
    barrier()
    return final
