"""Memory plan of a training run, before any weights load:
python launch/plan.py <the same overrides as launch/train.py> hardware.gpus=8 hardware.gpu_memory_gb=80"""
import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.plan import plan_memory, resolve_hardware, write_plan  # noqa: E402


@hydra.main(config_path="../conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    plan = plan_memory(cfg, resolve_hardware(cfg))
    print(plan.table())
    print(f"written: {write_plan(plan, cfg.output_dir)}")


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], os.path.join(ROOT, "conf"), ("model",))
    main()
