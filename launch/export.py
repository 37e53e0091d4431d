"""Export a sink-free hybrid (Qwen2 / Qwen3) as a plain transformers checkpoint with sliding-window layers:
python launch/export.py model=<hybrid checkpoint> output_dir=<dir>"""
import os
import sys

import hydra
from omegaconf import DictConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from lt_train.cli import expand_shortcuts  # noqa: E402
from lt_train.export import check_native, export_native  # noqa: E402
from lt_train.models import load_from_config  # noqa: E402


@hydra.main(config_path="../conf", config_name="export", version_base="1.3")
def main(cfg: DictConfig) -> None:
    model, tok = load_from_config(cfg.model)
    hc = check_native(model.config)  # before writing anything
    path = export_native(model, cfg.output_dir, tok)
    print(f"exported {cfg.model.name}: {len(hc.lazy_layers)} sliding-window layers {hc.lazy_layers} "
          f"(W={hc.window}) -> {path}; load it with AutoModelForCausalLM.from_pretrained (no lt_train needed)")


if __name__ == "__main__":
    sys.argv[1:] = expand_shortcuts(sys.argv[1:], os.path.join(ROOT, "conf"), ("model",))
    main()
