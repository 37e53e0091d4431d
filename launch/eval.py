"""Evaluate a model on a math benchmark (optionally side by side with another):

    python launch/eval.py model=<conf/model name | hub id | path> eval=<aime24 | aime25 | math500 | gsm8k | demo | file.jsonl> \
        [eval.n_samples=8 eval.temperature=0.6 eval.top_p=0.95 eval.max_new_tokens=32768] [eval.compare_with=<model>]
"""
import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.eval.job import run  # noqa: E402

CONF = os.path.join(ROOT, "conf")


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, conf_dir=CONF)


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], CONF)
    main()
