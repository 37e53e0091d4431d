"""Preemption: SIGTERM (what SLURM and Kubernetes send before a kill) or SIGUSR1 (`sbatch --signal=USR1@120`)
asks the run to stop at the next step boundary with a checkpoint of that step.

The handler only records the signal; the training loop asks `agreed()` after every optimizer step, which all
ranks answer together (one all-reduce), so every rank finishes the step in flight, saves the same step and
exits with `PREEMPTED_EXIT`. A second signal while the checkpoint is written is recorded and ignored: the save
is never cut short by us (a SIGKILL still can, and then the atomic rename keeps the previous checkpoint).
"""
from __future__ import annotations

import signal
import sys

import torch

PREEMPTED_EXIT = 143  # 128 + SIGTERM, as a shell reports a run killed by SIGTERM; torchrun --max-restarts reruns it
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class Preemption:
    def __init__(self, signals=SIGNALS):
        self.received: int | None = None
        self.count = 0
        self._previous = {}
        for s in signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler, no preemption
                pass

    def _handler(self, signum, frame) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum
            print(f"received {signal.Signals(signum).name}: finishing the step in flight, then checkpointing",
                  file=sys.stderr, flush=True)

    def agreed(self, device) -> bool:
        """True on every rank when any rank was signalled (a collective: call it on all ranks, every step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
