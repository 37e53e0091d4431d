"""The longest packed row whose plan fits the hardware."""
from __future__ import annotations

import math

from .hardware import Hardware
from .memory import plan_memory


def longest_pack_length(cfg, hardware: Hardware | None = None, quantum: int = 1024, limit: int = 1 << 22) -> int:
    """The longest `train.pack_length` (a multiple of `quantum` and of train.sequence_parallel) whose plan fits
    `hardware`; 0 if not even one quantum fits. Doubling, then bisection: about 2 log2(limit / quantum) plans."""
    from omegaconf import OmegaConf

    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else \
        OmegaConf.create(cfg)
    n = int(base.train.get("sequence_parallel", 1) or 1)
    q = math.lcm(quantum, n)

    def fits(k: int) -> bool:
        base.train.pack_length = k * q
        return plan_memory(base, hardware, suggest=False).fits

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi * q <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit // q + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * q
