"""The few torch.distributed helpers the jobs share: rank / world size from torchrun's environment,
a barrier and a sum that are no-ops in a single process, and process-group start-up for jobs that are not
driven by DeepSpeed."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# How long a rank waits at a collective (a barrier, a gather) for the others before the run fails. Generous by
# default: a rank may be generating a 32k-token answer of a 32B model while the others wait for it
# (torch's own default, 10 minutes for NCCL, is not). Set per job with `distributed.timeout_minutes`.
DEFAULT_TIMEOUT_MINUTES = 120


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def set_device() -> None:
    """Bind this process to its GPU (torchrun's LOCAL_RANK) before anything touches CUDA: a collective or a
    `torch.cuda.current_device()` before it would use cuda:0 on every rank of the node."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())


def timeout_of(cfg) -> datetime.timedelta:
    """The collective timeout of a job config's `distributed.timeout_minutes` (the default when unset)."""
    d = cfg.get("distributed") if cfg is not None else None
    minutes = (d or {}).get("timeout_minutes")
    minutes = DEFAULT_TIMEOUT_MINUTES if minutes is None else minutes
    if float(minutes) <= 0:
        raise ValueError(f"distributed.timeout_minutes must be > 0, got {minutes}")
    return datetime.timedelta(minutes=float(minutes))


def set_group_timeout(timeout: datetime.timedelta) -> None:
    """Make `timeout` the one of every process group created from now on without a timeout of its own.

    torch gives such a group its backend's default (10 minutes for NCCL), not the world group's, and DeepSpeed
    creates its ZeRO and sequence-parallel groups with `new_group(ranks)` and no timeout: without this, a rank
    waiting on one of them would fail after 10 minutes whatever `distributed.timeout_minutes` says. torch reads
    these module defaults each time a group is created."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout


def init_if_needed(timeout: datetime.timedelta | None = None) -> None:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU) when launched with more than one process."""
    set_device()
    if world()[1] > 1 and dist.is_available() and not dist.is_initialized():
        timeout = timeout or datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
        set_group_timeout(timeout)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)


def all_reduce_sum(x: float, device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def group() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one: the split of work that is
    shared out (selection) follows the group that can actually combine the results."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the process group (the same bits on every rank), returned on t's device and dtype; `t`
    itself when there is no group. Travels as float64 on the backend's device (gloo: CPU, NCCL: GPU)."""
    if group()[1] == 1:
        return t
    dev = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.detach().to(dev, torch.float64)
    dist.all_reduce(buf)
    return buf.to(t.device, t.dtype)


def share(n: int, rank: int, world: int, lockstep: bool = False) -> list[tuple[int, bool]]:
    """(index, counted) of this rank's items i = rank, rank + world, ...; with `lockstep`, padded with item 0,
    not counted, to the longest share, so that every rank makes as many forwards."""
    mine = [(i, True) for i in range(rank, n, world)]
    if lockstep:
        mine += [(0, False)] * (-(-n // world) - len(mine))
    return mine
