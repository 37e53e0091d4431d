"""The planner's hardware: GPUs per node, their memory, nodes, host memory — from the `hardware` config group or
detected."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Hardware:
    gpus: int = 0                 # GPUs per node; 0: a CPU run (the plan is then for host memory per process)
    gpu_memory_gb: float = 0.0    # memory of one GPU, GB (10^9 bytes, as vendors state it)
    nodes: int = 1
    host_memory_gb: float = 0.0   # per node; 0: not checked
    processes: int = 1            # CPU runs: processes per node (torchrun --nproc_per_node)

    @property
    def world(self) -> int:
        return self.nodes * (self.gpus if self.gpus else self.processes)

    def validate(self) -> None:
        for name in ("gpus", "nodes", "processes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (name != "gpus" and v < 1):
                raise ValueError(f"hardware.{name} must be a whole number >= {0 if name == 'gpus' else 1}, got {v!r}")
        for name in ("gpu_memory_gb", "host_memory_gb"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"hardware.{name} must be a number of GB >= 0, got {v!r}")
        if self.gpus and not self.gpu_memory_gb:
            raise ValueError(f"hardware.gpus={self.gpus} needs hardware.gpu_memory_gb (e.g. 80 for an H100 80GB)")


def _get(cfg, path: str, default=None):
    node = cfg
    for part in path.split("."):
        if node is None:
            return default
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


def hardware_from_config(cfg) -> Hardware:
    h = _get(cfg, "hardware", {}) or {}

    def val(key, kind, default):
        v = h.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or (kind is int and isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"hardware.{key} must be a whole number, got {v!r}")
        return kind(v)

    try:
        hw = Hardware(gpus=val("gpus", int, 0), gpu_memory_gb=val("gpu_memory_gb", float, 0.0),
                      nodes=val("nodes", int, 1), host_memory_gb=val("host_memory_gb", float, 0.0),
                      processes=val("processes", int, 1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"hardware settings must be numbers: {dict(h)} ({e})") from None
    hw.validate()
    return hw


def resolve_hardware(cfg, world_size: int | None = None) -> Hardware:
    """The `hardware` group with its nulls filled from this machine. Naming GPUs (hardware.gpus) plans for that
    machine instead: the host memory is then only checked when hardware.host_memory_gb is given."""
    from ..distributed import world

    h = dict(_get(cfg, "hardware", {}) or {})
    ws = world_size if world_size is not None else world()[1]
    if h.get("gpus") is None:
        det = detect_hardware(ws)
        h.setdefault("gpus", None)
        h["gpus"] = det.gpus
        for k in ("gpu_memory_gb", "host_memory_gb"):
            if h.get(k) is None:
                h[k] = getattr(det, k)
    if h.get("processes") is None:
        h["processes"] = ws if not h.get("gpus") else 1
    return hardware_from_config({"hardware": h})


def detect_hardware(world_size: int = 1) -> Hardware:
    """The hardware this process sees: its GPUs (or CPU processes) and the node's memory."""
    host = 0.0
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        host = kb * 1024 / 1e9
    except (OSError, StopIteration, ValueError):
        pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        mem = torch.cuda.get_device_properties(0).total_memory / 1e9
        return Hardware(gpus=min(n, world_size) if world_size > 1 else 1, gpu_memory_gb=mem, host_memory_gb=host)
    return Hardware(gpus=0, host_memory_gb=host, processes=max(world_size, 1))
