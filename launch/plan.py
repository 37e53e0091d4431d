"""Memory plan of a training run, before any weights load:
python launch/plan.py <the same overrides as launch/train.py> hardware.gpus=8 hardware.gpu_memory_gb=80 [longest=true]"""
import math
import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.plan import longest_pack_length, plan_memory, resolve_hardware, write_plan  # noqa: E402
from lt_train.train.config import apply_selection_file  # noqa: E402


@hydra.main(config_path="../conf", config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    apply_selection_file(cfg)  # lazy.from_file: its layers, S and W, as the trainer plans them
    hw = resolve_hardware(cfg)
    plan = plan_memory(cfg, hw)
    print(plan.table())
    print(f"written: {write_plan(plan, cfg.output_dir)}")
    if cfg.get("longest"):
        n = int(cfg.train.get("sequence_parallel", 1) or 1)
        print(f"longest train.pack_length that fits (multiples of {math.lcm(1024, n)}): "
              f"{longest_pack_length(cfg, hw)}")


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], os.path.join(ROOT, "conf"), ("model",))
    main()
