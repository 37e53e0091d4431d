"""Weights & Biases, optional: off unless `logging.wandb=true`; offline when no API key is configured."""
from __future__ import annotations

import os


def init_wandb(logging_cfg, config: dict, job_type: str, output_dir: str):
    if not logging_cfg.get("wandb", False):
        return None
    import wandb

    has_key = bool(os.environ.get("WANDB_API_KEY")) or os.path.exists(os.path.expanduser("~/.netrc"))
    mode = os.environ.get("WANDB_MODE") or ("online" if has_key else "offline")
    return wandb.init(project=logging_cfg.get("project", "lt_train"), name=logging_cfg.get("run_name"),
                      job_type=job_type, config=config, dir=output_dir, mode=mode)
