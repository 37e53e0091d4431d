"""Training checkpoints: written to a temporary directory, then renamed, then pointed to by `latest`.

A kill at any moment leaves the previous checkpoint intact and `latest` pointing at a complete one.
RNG states travel with the checkpoint so that a resumed run draws the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import torch

from ..io import atomic_write

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def latest(root: str) -> str | None:
    """The newest complete checkpoint directory under `root`, or None."""
    p = os.path.join(root, LATEST)
    if not os.path.exists(p):
        return None
    with open(p, encoding="utf-8") as f:
        d = os.path.join(root, f.read().strip())
    return d if os.path.isdir(d) else None


def candidates(root: str) -> list[str]:
    """Checkpoints to try on resume, newest first: the one `latest` names, then the other complete ones."""
    if not os.path.isdir(root):
        return []
    found = sorted((d for d in os.listdir(root) if d.startswith("step_")), reverse=True)
    dirs = [os.path.join(root, d) for d in found]
    first = latest(root)
    return ([first] if first else []) + [d for d in dirs if d != first]


def publish(root: str, tmp_dir: str, step: int, keep: int = 2) -> str:
    """Rename a fully written `tmp_dir` into place and point `latest` at it; drop old checkpoints."""
    final = step_dir(root, step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp_dir, final)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(os.path.basename(final))

    atomic_write(os.path.join(root, LATEST), write)
    done = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for d in done[:-keep] if keep else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def write_rng(d: str, rank: int) -> None:
    """Each rank's RNG state (ranks may draw different numbers, e.g. dropout on different data)."""
    torch.save({"rng": rng_state()}, os.path.join(d, f"rng_rank{rank}.pt"))


def write_state(d: str, state: dict) -> None:
    """Trainer state (step, data position) beside the engine's files; rank 0 only."""
    with open(os.path.join(d, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2)


def read_state(d: str, rank: int = 0) -> tuple[dict, dict]:
    with open(os.path.join(d, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    rng = torch.load(os.path.join(d, f"rng_rank{rank}.pt"), weights_only=True)["rng"]
    return state, rng
