"""LightTransfer-Train: python launch/train.py [overrides], or torchrun --nproc_per_node=N launch/train.py deepspeed=zero2"""
import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.train.loop import train  # noqa: E402


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], os.path.join(ROOT, "conf"), ("model",))
    main()
