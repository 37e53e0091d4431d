"""Select lazy layers: python launch/select_lazy.py model=... data=... lazy.strategy=... lazy.num_lazy=0.5"""
import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.select_job import run  # noqa: E402


@hydra.main(config_path="../conf", config_name="select_lazy", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], os.path.join(ROOT, "conf"), ("model",))
    main()
