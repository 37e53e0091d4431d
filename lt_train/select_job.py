"""The selection job behind `launch/select_lazy.py`: statistics over samples -> lazy_layers.json + a chart."""
from __future__ import annotations

import logging
import os
import time

import torch

from .data import encode_example, load_examples
from .distributed import group, init_if_needed, timeout_of
from .io import atomic_write_json, pyplot, save_figure
from .lazy import select_with_stats
from .models import load_from_config
from .tracking import init_wandb

log = logging.getLogger(__name__)


def selection_samples(dcfg, tokenizer, limit: int | None):
    """question + answer token ids of the data config's examples (as in training), and a description."""
    examples, report = load_examples(dcfg)
    if limit:
        examples = examples[: int(limit)]
    samples, dropped = [], 0
    for ex in examples:
        enc = encode_example(tokenizer, ex, dcfg.get("system_prompt"), dcfg.get("max_length"),
                             dcfg.get("length_policy", "truncate"))
        if enc is None:
            dropped += 1
            continue
        samples.append(enc.input_ids)
    desc = {"name": dcfg.get("name", dcfg.get("source")), "source": report.source, "rows_read": report.rows,
            "rows_skipped": len(report.skipped), "used": len(samples), "dropped_too_long": dropped}
    return samples, desc


def plot_ratios(path: str, result: dict) -> None:
    plt = pyplot()
    L = len(result["per_layer_ratio"])
    chosen = set(result["lazy_layers"])
    colors = ["tab:orange" if i in chosen else "tab:blue" for i in range(L)]
    second = ("delta_nll", "NLL increase, layer alone") if result.get("delta_nll") else (
        ("output_error", "relative output error") if result.get("output_error") else None)
    panels = 2 if second else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, L * 0.3), 3.2 * panels), squeeze=False)
    ax = axes[0][0]
    ax.bar(range(L), result["per_layer_ratio"], color=colors)
    ax.set_ylabel("lazy ratio")
    ax.set_title(f"{result['model']['name']}: {len(chosen)}/{L} lazy layers (orange), strategy {result['strategy']}, "
                 f"S={result['sink_tokens']} W={result['window']}")
    if panels == 2:
        ax = axes[1][0]
        ax.bar(range(L), result[second[0]], color=colors)
        ax.set_ylabel(second[1])
    ax.set_xlabel("layer")
    if L <= 64:
        for a in axes[:, 0]:
            a.set_xticks(range(L))
    fig.tight_layout()
    save_figure(fig, path)


def run(cfg) -> dict:
    """Select lazy layers as `cfg` (conf/select_lazy.yaml) says; writes (rank 0) and returns the result dict.
    Under `torchrun --nproc_per_node=N` every process holds the model and measures 1/N of the samples (ratios)
    and of the layers (nll); all processes end with the same choice."""
    from omegaconf import OmegaConf

    from .train.config import resolve_window_alias

    resolve_window_alias(cfg)
    lz = cfg.lazy
    out_dir = cfg.output_dir
    init_if_needed(timeout_of(cfg))  # under torchrun the measurements are shared out over the processes
    rank, world_size = group()
    os.makedirs(out_dir, exist_ok=True)
    model, tok = load_from_config(cfg.model)
    if torch.cuda.is_available() and world_size > 1 and not cfg.model.get("device_map"):
        model.to(torch.device("cuda", torch.cuda.current_device()))
    samples, data_desc = selection_samples(cfg.data, tok, lz.get("max_samples"))
    run_ = init_wandb(cfg.logging, OmegaConf.to_container(cfg, resolve=True), "select_lazy", out_dir) if rank == 0 \
        else None
    t0 = time.perf_counter()
    sel = select_with_stats(model, samples, lz.num_lazy, lz.strategy, lz.sink_tokens, lz.window,
                            lz.last_queries, lz.seed, lz.get("nll_samples", 4), progress=True)
    result = {
        "lazy_layers": sel.layers,
        "strategy": sel.strategy,
        "num_layers": sel.num_layers,
        "sink_tokens": lz.sink_tokens,
        "window": lz.window,
        "last_queries": lz.last_queries,
        "per_layer_ratio": sel.per_layer_ratio,
        "per_head_ratio": sel.per_head_ratio,
        "per_sample": [{"length": n, "ratio": r} for n, r in zip(sel.sample_lengths, sel.per_sample_ratio)],
        "frequency": sel.frequency,
        "delta_nll": sel.delta_nll,
        "output_error": sel.output_error,
        "base_nll": sel.base_nll,
        "short_samples": sel.short_samples,
        "model": {"name": cfg.model.name, "revision": cfg.model.get("revision"),
                  "model_type": model.config.model_type},
        "data": data_desc,
        "seconds": round(time.perf_counter() - t0, 1),
        "processes": world_size,
    }
    if world_size > 1:
        print(f"rank {rank}: lazy layers ({sel.strategy}): {sel.layers}", flush=True)
    if rank != 0:
        return result
    json_path = os.path.join(out_dir, "lazy_layers.json")
    atomic_write_json(json_path, result)
    png = os.path.join(out_dir, "lazy_ratios.png")
    plot_ratios(png, result)
    if run_ is not None:
        import wandb

        run_.log({"lazy_layers": sel.layers, "lazy_ratio_chart": wandb.Image(png),
                  **{f"lazy_ratio/layer_{i}": r for i, r in enumerate(sel.per_layer_ratio)}})
        run_.finish()
    log.info("lazy layers %s written to %s", sel.layers, json_path)
    print(f"lazy layers ({sel.strategy}): {sel.layers}\nwritten: {json_path}, {png}")
    return result
