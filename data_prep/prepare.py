"""Tokenise and cache a dataset, print and plot its statistics:
python data_prep/prepare.py data=<demo|long_cot_local|jsonl|still_long_cot|limo|s1k> model=<name>"""
import os
import sys
from dataclasses import asdict

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.data.prepare import plot_lengths, prepare, summary  # noqa: E402
from lt_train.io import atomic_write_json  # noqa: E402
from lt_train.models import tokenizer_from_config  # noqa: E402


@hydra.main(config_path="../conf", config_name="prepare", version_base="1.3")
def main(cfg: DictConfig) -> None:
    tok = tokenizer_from_config(cfg.model)
    ds, stats, path = prepare(cfg.data, tok, cfg.model.name, cfg.cache_dir, progress=True)
    os.makedirs(cfg.output_dir, exist_ok=True)
    plot_lengths(os.path.join(cfg.output_dir, "lengths.png"), stats, cfg.data.get("max_length"), cfg.data.name)
    atomic_write_json(os.path.join(cfg.output_dir, "stats.json"), {**asdict(stats), "cache": path})
    print(summary(stats))
    print(f"cache: {path}\nwritten: {cfg.output_dir}/lengths.png, {cfg.output_dir}/stats.json")


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], os.path.join(ROOT, "conf"), ("model",))
    main()
