"""The evaluation job behind `launch/eval.py`: one model (or two, side by side) over one benchmark.

Per model, in `output_dir/<model label>/`: run.json (what runs), samples.jsonl (every sample, appended as batches
finish; a rerun resumes), summary.json and report.md. With `eval.compare_with`, also comparison.json /
comparison.md / passk.png in `output_dir`: accuracy difference, throughput ratio and KV memory ratio.
"""
from __future__ import annotations

import gc
import logging
import os
import re

import torch

from ..distributed import barrier, init_if_needed, timeout_of, world
from ..hybrid import CONFIG_KEY, HybridConfig, convert_to_hybrid
from ..lazy import read_selection
from ..models import load_from_config
from ..tracking import init_wandb
from .benchmarks import Problem, fingerprint, load_problems
from .grader import Grader
from .report import write_comparison, write_run_report
from .runner import generate_missing, summarize
from .sampling import GenSettings, gen_settings
from .store import SampleStore

log = logging.getLogger(__name__)


def hybrid_from_config(hcfg) -> HybridConfig | None:
    """The on-the-fly hybrid settings of `hybrid:` in conf/evaluate.yaml, or None for none."""
    if hcfg is None:
        return None
    chosen = [k for k in ("lazy_layers", "from_file", "online_num_lazy") if hcfg.get(k) is not None]
    if len(chosen) > 1:
        raise ValueError(f"hybrid: set one of lazy_layers, from_file, online_num_lazy (got {chosen})")
    if not chosen:
        return None
    S, W = int(hcfg.get("sink_tokens", 4)), int(hcfg.get("window", 1020))
    backend = hcfg.get("backend", "auto")
    if chosen[0] == "online_num_lazy":
        return HybridConfig([], S, W, backend, online_num_lazy=hcfg.online_num_lazy,
                            online_criterion=hcfg.get("online_criterion", "error"))
    if chosen[0] == "from_file":
        sel = read_selection(str(hcfg.from_file), "hybrid.from_file")
        # the layers were chosen for the file's S and W: use those
        return HybridConfig(list(sel["lazy_layers"]), int(sel.get("sink_tokens", S)),
                            int(sel.get("window", W)), backend)
    return HybridConfig([int(i) for i in hcfg.lazy_layers], S, W, backend)


def attention_of(model) -> str:
    """How the model attends, in words, for reports."""
    data = getattr(model.config.get_text_config(decoder=True), CONFIG_KEY, None)
    if data is None:
        return "full attention"
    L = model.config.get_text_config(decoder=True).num_hidden_layers
    if data.get("online_num_lazy") is not None:
        return f"hybrid, {data['online_num_lazy']} of {L} layers lazy per prompt (online), " \
               f"S={data['sink_tokens']} W={data['window']}"
    return f"hybrid, {len(data['lazy_layers'])}/{L} lazy layers {data['lazy_layers']}, " \
           f"S={data['sink_tokens']} W={data['window']}"


def label_of(name: str, hybrid: HybridConfig | None) -> str:
    """A folder name for a model's results."""
    label = re.sub(r"[^A-Za-z0-9._-]+", "--", str(name).strip("./")) or "model"
    return label[-80:] + ("+hybrid" if hybrid is not None else "")


def protocol_of(gs: GenSettings) -> str:
    how = "greedy" if gs.greedy else f"sampled, T={gs.temperature} top-p {gs.top_p}" + \
        (f" top-k {gs.top_k}" if gs.top_k else "")
    return f"{how}, up to {gs.max_new_tokens} new tokens, {gs.n_samples} per problem, seed {gs.seed}, " \
           f"batch {gs.batch_size}"


def _device(model) -> None:
    if torch.cuda.is_available() and not hasattr(model, "hf_device_map"):
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")


def evaluate_one(mcfg, hybrid: HybridConfig | None, problems: list[Problem], ecfg, gs: GenSettings,
                 out_dir: str, grader: Grader, progress: bool = True) -> dict:
    """Load one model, generate what is missing, write its report; returns its summary.json content."""
    model, tok = load_from_config(mcfg)
    if hybrid is not None:
        convert_to_hybrid(model, hybrid)
    _device(model)
    label = label_of(mcfg["name"], hybrid)
    run_dir = os.path.join(out_dir, label)
    attention = attention_of(model)
    max_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if max_pos and gs.max_new_tokens > max_pos:
        log.warning("eval.max_new_tokens=%d exceeds %s's max_position_embeddings=%d: answers that long run "
                    "past the positions the model was trained on", gs.max_new_tokens, mcfg["name"], max_pos)
    header = {"model": str(mcfg["name"]), "revision": mcfg.get("revision"), "dtype": str(mcfg.get("dtype")),
              "attention": attention, "benchmark": ecfg.name, "problems": len(problems),
              "problems_fingerprint": fingerprint(problems), "mode": ecfg.mode,
              # the batch size may change between a crash and the resume (say, after running out of memory); a
              # compiled decode is recorded only when on (runs from before it existed resume as eager ones), and
              # a resume must keep it: in bf16 a compiled step may round differently
              "generation": {k: v for k, v in gs.to_dict().items()
                             if k != "batch_size" and (k != "compile" or v)}}
    rank, world_size = world()
    if rank == 0:
        SampleStore.init_dir(run_dir, header, overwrite=bool(ecfg.get("overwrite", False)))
    barrier()
    store = SampleStore(run_dir, header, rank)
    barrier()  # every process has read the store before any appends: they agree on what is missing
    generate_missing(model, tok, problems, gs, ecfg.mode, store, grader, progress and rank == 0, label,
                     rank, world_size)
    del model  # before a compared model is loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    barrier()
    if rank != 0:
        return {"label": label}
    store.reload()  # the other processes' samples too
    summary, per_problem = summarize(store.records, problems, gs, ecfg.mode, grader)
    meta = {"model": str(mcfg["name"]), "label": label, "attention": attention, "benchmark": ecfg.name,
            "protocol": protocol_of(gs), "generation": gs.to_dict(), "torn_lines_dropped": store.torn_lines}
    write_run_report(run_dir, meta, summary, per_problem, list(store.records.values()))
    log.info("%s on %s: pass@1 %.3f ± %.3f, maj@%d %.3f, %.1f tok/s, peak KV %.1f MiB -> %s", label, ecfg.name,
             summary["pass@1"], summary["pass@1_se"], gs.n_samples, summary[f"maj@{gs.n_samples}"],
             summary["tokens_per_s"], summary["peak_kv_bytes"] / 2**20, run_dir)
    return {**meta, "metrics": summary, "problems": per_problem, "dir": run_dir}


def compare_model_config(mcfg, other: str, conf_dir: str | None):
    """The model config of `eval.compare_with`: a conf/model/<name>.yaml, else `model` with its name replaced."""
    from omegaconf import OmegaConf

    if conf_dir and os.path.isfile(os.path.join(conf_dir, "model", f"{other}.yaml")):
        return OmegaConf.load(os.path.join(conf_dir, "model", f"{other}.yaml"))
    cfg = OmegaConf.create(OmegaConf.to_container(mcfg, resolve=True))
    cfg.name = other
    return cfg


def run(cfg, conf_dir: str | None = None) -> dict:
    """Evaluate as `cfg` (conf/evaluate.yaml) says; returns {label: summary, ..., "comparison": ...}."""
    from omegaconf import OmegaConf

    ecfg = cfg.eval
    init_if_needed(timeout_of(cfg))
    rank, world_size = world()
    if world_size > 1 and cfg.model.get("device_map"):
        raise ValueError("model.device_map spreads one model over the GPUs; under torchrun each process "
                         "holds its own copy. Use one or the other")
    problems = load_problems(ecfg)
    gs = gen_settings(ecfg)
    hybrid = hybrid_from_config(cfg.get("hybrid"))
    grader = Grader(timeout=float(ecfg.get("grader_timeout", 5)))
    out_dir = cfg.output_dir
    os.makedirs(out_dir, exist_ok=True)
    log.info("%s: %d problems x %d samples (%s)%s", ecfg.name, len(problems), gs.n_samples, protocol_of(gs),
             f", {world_size} processes" if world_size > 1 else "")
    wb = init_wandb(cfg.logging, OmegaConf.to_container(cfg, resolve=True), "eval", out_dir) if rank == 0 else None
    try:
        models = [(cfg.model, hybrid)]
        if ecfg.get("compare_with"):
            models.append((compare_model_config(cfg.model, str(ecfg.compare_with), conf_dir), None))
            if label_of(models[1][0]["name"], None) == label_of(cfg.model["name"], hybrid):
                raise ValueError(f"eval.compare_with={ecfg.compare_with} is the model under evaluation, with the same "
                                 "attention: compare with another model, or make this one hybrid (hybrid.*)")
        runs = [evaluate_one(m, h, problems, ecfg, gs, out_dir, grader) for m, h in models]
        result = {r["label"]: r for r in runs}
        if rank != 0:
            return {}
        if len(runs) == 2:
            result["comparison"] = write_comparison(out_dir, runs[0], runs[1])
            c = result["comparison"]
            log.info("%s vs %s: pass@1 %+.3f ± %.3f, throughput %.2fx, KV memory %.3fx -> %s",
                     runs[0]["label"], runs[1]["label"], c["pass@1_diff"], c["pass@1_diff_se"],
                     c["throughput_ratio"], c["kv_memory_ratio"], os.path.join(out_dir, "comparison.md"))
        if wb is not None:
            _log_wandb(wb, runs, result.get("comparison"))
        return result
    finally:
        grader.close()
        if wb is not None:
            wb.finish()


def _log_wandb(wb, runs: list[dict], comparison: dict | None) -> None:
    import wandb

    for r in runs:
        wb.summary.update({f"{r['label']}/{k}": v for k, v in r["metrics"].items()})
        cols = ["id", "reference", "correct", "n", "pass@1", "maj_answer", "maj_correct", "mean_tokens", "truncated"]
        wb.log({f"{r['label']}/problems": wandb.Table(columns=cols, data=[[p[c] for c in cols] for p in r["problems"]])})
    if comparison:
        wb.summary.update({f"comparison/{k}": v for k, v in comparison.items() if isinstance(v, (int, float))})
