"""Memory planner: what one training step needs per GPU (or per CPU process) and per node, before any weight
loads (memory.py says how). The parts: hardware.py (the inputs about the machine), arch.py (the model on the meta
device), trace.py (activations traced per layer), memory.py (model states, DeepSpeed's arithmetic, the phases),
suggest.py (changes that make a plan fit), search.py (the longest row that fits), report.py (table, plan.json).

`plan_memory(cfg) -> MemoryPlan`; `python launch/plan.py` prints the table and writes plan.json."""
from .arch import arch_config, meta_model, param_counts
from .hardware import Hardware, detect_hardware, hardware_from_config, resolve_hardware
from .memory import (ALLGATHER_BUCKET, EXPORT_SHARD, HEAD_CHUNK, PREFETCH_BUCKET, REDUCE_BUCKET, STATE_PARTS,
                     plan_memory)
from .report import GiB, MemoryPlan, write_plan
from .search import longest_pack_length
from .trace import layer_activations

__all__ = ["ALLGATHER_BUCKET", "EXPORT_SHARD", "GiB", "HEAD_CHUNK", "Hardware", "MemoryPlan", "PREFETCH_BUCKET",
           "REDUCE_BUCKET", "STATE_PARTS", "arch_config", "detect_hardware", "hardware_from_config",
           "layer_activations", "longest_pack_length", "meta_model", "param_counts", "plan_memory",
           "resolve_hardware", "write_plan"]
