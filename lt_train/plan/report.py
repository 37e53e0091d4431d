"""A memory plan as a result: its parts per phase, the table it prints, plan.json."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .hardware import Hardware

GiB = 2**30


@dataclass
class MemoryPlan:
    per_gpu: dict[str, int]       # bytes per GPU (or per CPU process), by part
    host: dict[str, int]          # bytes per node, by part
    hardware: Hardware
    settings: dict
    suggestions: list[str] = field(default_factory=list)
    deepspeed_estimate: dict | None = None  # DeepSpeed's own model-states estimate, for comparison
    # the run's other phases, each {"per_gpu": parts, "host": parts}: selection, the evaluations, the export
    phases: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    @property
    def per_gpu_total(self) -> int:
        return sum(self.per_gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def device_budget(self) -> int:
        hw = self.hardware
        if hw.gpus:
            return int(hw.gpu_memory_gb * 1e9)
        return int(hw.host_memory_gb * 1e9 / max(hw.processes, 1)) if hw.host_memory_gb else 0

    def phase_totals(self) -> dict[str, tuple[int, int]]:
        """(per GPU, host per node) of every phase of the run, the training step included, in run order."""
        out = {name: (sum(p["per_gpu"].values()), sum(p["host"].values())) for name, p in self.phases.items()
               if name != "export"}
        out["training step"] = (self.per_gpu_total, self.host_total)
        if "export" in self.phases:
            p = self.phases["export"]
            out["export"] = (sum(p["per_gpu"].values()), sum(p["host"].values()))
        return out

    @property
    def peak_per_gpu(self) -> int:
        return max(g for g, _ in self.phase_totals().values())

    @property
    def peak_host(self) -> int:
        return max(h for _, h in self.phase_totals().values())

    @property
    def fits(self) -> bool:
        """The largest phase fits the GPU (or process) budget and the node's host memory."""
        hw = self.hardware
        ok = not self.device_budget or self.peak_per_gpu <= self.device_budget
        if hw.gpus and hw.host_memory_gb:
            ok = ok and self.peak_host <= hw.host_memory_gb * 1e9
        return ok

    def to_json(self) -> dict:
        return {"per_gpu_bytes": {"parts": self.per_gpu, "total": self.per_gpu_total},
                "host_bytes": {"parts": self.host, "total": self.host_total},
                "fits": self.fits, "suggestions": self.suggestions, "hardware": dataclasses.asdict(self.hardware),
                "settings": self.settings, "deepspeed_estimate": self.deepspeed_estimate,
                "phases": {k: {"per_gpu_bytes": {"parts": v["per_gpu"], "total": sum(v["per_gpu"].values())},
                               "host_bytes": {"parts": v["host"], "total": sum(v["host"].values())}}
                           for k, v in self.phases.items()},
                "peak_per_gpu_bytes": self.peak_per_gpu, "peak_host_bytes": self.peak_host}

    def table(self) -> str:
        hw, s = self.hardware, self.settings
        where = (f"{hw.nodes} node(s) x {hw.gpus} GPU(s) of {hw.gpu_memory_gb:g} GB" if hw.gpus
                 else f"CPU, {hw.processes} process(es)" + (f", {hw.host_memory_gb:g} GB host" if hw.host_memory_gb else ""))
        n_sp = s.get("sequence_parallel", 1)
        shared = f" over {n_sp} sequence-parallel processes" if n_sp > 1 else ""
        lines = [f"memory plan: {s['model']} ({s['params'] / 1e9:.2f}B params, {s['trainable'] / 1e6:.1f}M trainable), "
                 f"{s['mode']}, ZeRO-{s['zero_stage']}{' + optimizer offload' if s['offload_optimizer'] else ''}"
                 f"{' + param offload' if s['offload_param'] else ''}, {s['dtype']}, T={s['tokens']}{shared}, "
                 f"{s['lazy_layers']}/{s['layers']} lazy ({s['streaming_backend']}), gradient checkpointing "
                 f"{'on' if s['gradient_checkpointing'] else 'off'}, on {where}",
                 f"{'per GPU' if hw.gpus else 'per process'}:"]
        lines += [f"  {k:<34} {v / GiB:>9.2f} GiB" for k, v in self.per_gpu.items()]
        budget = self.device_budget
        verdict = ("" if not budget else
                   f"  (budget {budget / GiB:.2f} GiB: " + ("fits, " if self.per_gpu_total <= budget else "does NOT fit, ")
                   + f"{(budget - self.per_gpu_total) / GiB:+.2f} GiB)")
        lines.append(f"  {'total':<34} {self.per_gpu_total / GiB:>9.2f} GiB{verdict}")
        if hw.gpus:
            lines.append("per node (host memory):")
            lines += [f"  {k:<34} {v / GiB:>9.2f} GiB" for k, v in self.host.items()]
            hb = hw.host_memory_gb * 1e9
            hv = "" if not hb else f"  (host {hb / GiB:.0f} GiB: {'fits' if self.host_total <= hb else 'does NOT fit'})"
            lines.append(f"  {'total':<34} {self.host_total / GiB:>9.2f} GiB{hv}")
        if self.phases:
            budget_s = f" of {budget / GiB:.2f}" if budget else ""
            lines.append(f"phases of the run ({'per GPU' if hw.gpus else 'per process'}{budget_s} GiB"
                         + (", host per node GiB)" if hw.gpus else ")") + ":")
            for name, (g, h) in self.phase_totals().items():
                lines.append(f"  {name:<34} {g / GiB:>9.2f}" + (f" {h / GiB:>9.2f}" if hw.gpus else ""))
            for name, p in self.phases.items():
                lines.append(f"  {name}: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in {**p['per_gpu'],
                             **{f'host: {k}': v for k, v in p['host'].items()}}.items()))
        if self.deepspeed_estimate:
            d = self.deepspeed_estimate
            lines.append(f"DeepSpeed's own estimate of the model states: {d['per_gpu'] / GiB:.2f} GiB per GPU, "
                         f"{d['per_node_host'] / GiB:.2f} GiB host per node")
        lines.append("verdict: " + ("fits" if self.fits else "does NOT fit"))
        if self.suggestions:
            lines.append("changes that would fit (cheapest first):")
            lines += [f"  {x}" for x in self.suggestions]
        return "\n".join(lines)


def write_plan(plan: MemoryPlan, out_dir: str) -> str:
    from ..io import atomic_write_json

    path = os.path.join(out_dir, "plan.json")
    atomic_write_json(path, plan.to_json())
    return path
