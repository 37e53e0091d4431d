"""Memory planner: what one training step needs per GPU (or per CPU process) and per node, before any weight loads.

The model is built from its config on the meta device (no weights, no hub): parameter counts, the largest
module and the LoRA adapters' sizes are read off it, and the activations one decoder layer saves for backward
are measured by running that layer on meta tensors with `saved_tensors_hooks`. Meta tensors have no fused
attention kernel (SDPA would fall back to the T x T math path there), so attention itself is replaced during
that trace by a stand-in that saves exactly what the real kernel saves (query, key, value, output, log-sum-exp;
for the chunked streaming SDPA, q, k, v and the causal head's output, its blocked part being recomputed in
backward; the cached block mask is counted once per step).

Per device (a GPU, or the process itself on a CPU run) the plan adds:
- model states, with DeepSpeed's own arithmetic for ZeRO (estimate_zero2/3_model_states_mem_needs: 16-bit
  params, 18 bytes per trainable parameter of grads / fp32 master / Adam states split over the ranks, 4 bytes per
  parameter of the largest layer gathered under ZeRO-3), or torch AdamW's for a plain run;
- DeepSpeed's communication buckets;
- at the step's peak, the larger of: the backward phase (all activations, or the layer inputs plus one
  recomputed layer with gradient checkpointing, or the gradients that replace them, plus one layer's working
  set), the LM-head phase (one chunk of logits: the loss is always chunked or tiled) and, for torch AdamW, the
  optimizer step.
Per node (host): offloaded optimizer states / parameters and the weights each rank loads.

`plan_memory(cfg) -> MemoryPlan`; `python launch/plan.py` prints the table and writes plan.json.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch

GiB = 2**30
# DeepSpeed's communication buckets, set explicitly in engine.deepspeed_config so plan and engine agree.
REDUCE_BUCKET = 200_000_000          # elements: gradient reduction (ZeRO-2 / 3)
ALLGATHER_BUCKET = 200_000_000       # elements: ZeRO-2 parameter all-gather after the step
PREFETCH_BUCKET = 50_000_000         # elements: ZeRO-3 parameter prefetch
HEAD_CHUNK = 1024                    # tokens per LM-head chunk in nll.lm_head_loss_sum
BACKWARD_WORKSET = 0.6               # a layer's backward working set, as a fraction of what it saved (measured)
SDPA_BLOCK = 256                     # query block of the chunked streaming SDPA (attention/sdpa.py)
ARCH_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size")


@dataclass
class Hardware:
    gpus: int = 0                 # GPUs per node; 0: a CPU run (the plan is then for host memory per process)
    gpu_memory_gb: float = 0.0    # memory of one GPU, GB (10^9 bytes, as vendors state it)
    nodes: int = 1
    host_memory_gb: float = 0.0   # per node; 0: not checked
    processes: int = 1            # CPU runs: processes per node (torchrun --nproc_per_node)

    @property
    def world(self) -> int:
        return self.nodes * (self.gpus if self.gpus else self.processes)

    def validate(self) -> None:
        for name in ("gpus", "nodes", "processes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or (name != "gpus" and v < 1):
                raise ValueError(f"hardware.{name} must be a whole number >= {0 if name == 'gpus' else 1}, got {v!r}")
        for name in ("gpu_memory_gb", "host_memory_gb"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"hardware.{name} must be a number of GB >= 0, got {v!r}")
        if self.gpus and not self.gpu_memory_gb:
            raise ValueError(f"hardware.gpus={self.gpus} needs hardware.gpu_memory_gb (e.g. 80 for an H100 80GB)")


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


# ---------------------------------------------------------------------------------------------------------
# The model on the meta device


def arch_config(mcfg):
    """A transformers config for a `model` config: its `arch` block (config.json-shaped, shipped in conf/model so
    planning works offline), the tiny test config, or the checkpoint's own config.json (local or hub)."""
    from transformers import AutoConfig

    from .models import resolve, tiny_config

    if mcfg.get("name") == "tiny":
        return tiny_config(mcfg.get("arch", "llama"), int(mcfg.get("num_layers", 4)))
    arch = mcfg.get("arch")
    if arch:
        arch = dict(arch)
        missing = [f for f in ARCH_FIELDS if arch.get(f) is None]
        if missing:
            raise ValueError(f"model.arch of {mcfg.get('name')!r} lacks {missing} (a config.json-shaped block "
                             f"needs {list(ARCH_FIELDS)})")
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    cfg = AutoConfig.from_pretrained(resolve(mcfg["name"]), revision=mcfg.get("revision"),
                                     trust_remote_code=bool(mcfg.get("trust_remote_code", False)))
    text = cfg.get_text_config(decoder=True)
    missing = [f for f in ARCH_FIELDS[1:] if getattr(text, f, None) is None]
    if missing:
        raise ValueError(f"the config of {mcfg['name']!r} lacks {missing}: cannot plan its memory")
    return cfg


def meta_model(config, dtype: torch.dtype):
    """The model without weights; on a copy of `config`, since the trace switches its attention function."""
    import copy

    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype, attn_implementation="sdpa")


def param_counts(model) -> tuple[int, int]:
    """(parameters with shared ones counted once, largest number of parameters owned by one module)."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return sum(seen.values()), largest


def lora_params(model, targets: list[str], r: int) -> int:
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets:
            n += r * (m.in_features + m.out_features)
    return n


# ---------------------------------------------------------------------------------------------------------
# Activations: one decoder layer traced on meta tensors


class _SavedLike(torch.autograd.Function):
    """Returns an empty tensor like `out` and saves `tensors` for backward, as a fused kernel would."""

    @staticmethod
    def forward(ctx, out, *tensors):
        ctx.save_for_backward(*tensors)
        return out.new_empty(out.shape)

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - never run (meta planning only)
        return (g,) + (None,) * len(ctx.saved_tensors)


def _plan_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention stand-in for the trace: saves what the real kernel saves. Full layers (and streaming layers
    on flex / flash-attn): q, k, v, out, lse. Chunked streaming SDPA: q, k, v and the first W queries' output
    and lse (the blocked part is recomputed in backward); see attention/sdpa.py.
    Under sequence parallelism (`module.lt_plan_sp` = N) the layer holds T/N tokens and the kernel runs on what
    Ulysses' all-to-all hands it: all T tokens of Hq/N query heads and Hkv/N key-value heads (at least one:
    DeepSpeed replicates KV heads when N exceeds them)."""
    n = getattr(module, "lt_plan_sp", 1)
    local = query
    if n > 1:
        B, Hq, t, D = query.shape
        hkv = max(1, key.shape[1] // n)
        # new storages in the graph (what the kernel saves is the all-to-all's output, not this rank's q, k, v)
        query = query.new_empty(B, Hq // n, t * n, D) + query.sum() * 0
        key = key.new_empty(B, hkv, t * n, D) + key.sum() * 0
        value = value.new_empty(B, hkv, t * n, D) + value.sum() * 0
    out = _kernel_saves(module, query, key, value)
    if n > 1:  # back to this rank's tokens, all heads (the all-to-all itself saves nothing)
        out = local + out.sum() * 0
    return out.transpose(1, 2), None


def _kernel_saves(module, query, key, value):
    B, Hq, T, D = query.shape
    spec = getattr(module, "lt_plan", None)  # (sink, window, backend) on lazy layers
    if spec is None or spec[2] != "sdpa" or spec[1] >= T:
        lse = query.new_empty(B, Hq, T, dtype=torch.float32)
        out = _SavedLike.apply(query, query, key, value, lse)
    else:
        # On the GPUs this plans for, the blocked part is recomputed in backward (torch.utils.checkpoint,
        # attention/sdpa.py): it keeps only q, k and v (on CPU it keeps its output and lse too, as dense does).
        # The first W queries go to the fused causal kernel, which keeps its output and lse.
        W = spec[1]
        oh = query.new_empty(B, Hq, W, D)
        lse = query.new_empty(B, Hq, W, dtype=torch.float32)
        out = _SavedLike.apply(query, query, key, value, oh, lse)
        out = out + query * 0  # keep the graph connected to q, k, v
    return out


def streaming_mask_bytes(tokens: int, sink: int, window: int, elem_bytes: int) -> int:
    """The chunked streaming SDPA's additive block mask [nblk, 1, block, S + block + W - 1], built once per shape
    and kept in attention/sdpa.py's _MASK_CACHE for every lazy layer's forward and recompute: counted once."""
    block = min(SDPA_BLOCK, tokens)
    W = min(window, tokens)
    return -(-tokens // block) * block * (sink + block + W - 1) * elem_bytes


def _register_plan_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("lt_plan", _plan_attention)
    AttentionMaskInterface.register("lt_plan", sdpa_mask)
    return "lt_plan"


def saved_bytes(fn) -> tuple[int, dict]:
    """Bytes of the distinct storages autograd saves while `fn` runs, and the storage keys with their sizes."""
    seen: dict = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s._cdata] = max(seen.get(s._cdata, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()), seen


def layer_activations(model, tokens: int, lazy_spec: tuple | None, sequence_parallel: int = 1) -> int:
    """Bytes one decoder layer saves for backward on a row of `tokens` tokens (batch 1), traced on meta, on one
    of `sequence_parallel` processes sharing the row (tokens / N each). `lazy_spec` = (sink, window, backend)
    makes it a streaming layer. Excludes storages shared by all layers (the rotary tables)."""
    from .nll import decoder_of

    dec = decoder_of(model)
    layer = dec.layers[0]
    attn = layer.self_attn
    attn.lt_plan = lazy_spec
    attn.lt_plan_sp = sequence_parallel
    dtype = next(model.parameters()).dtype
    H = model.config.get_text_config(decoder=True).hidden_size
    local = tokens // sequence_parallel
    x = torch.empty(1, local, H, device="meta", dtype=dtype, requires_grad=True)
    pos = torch.arange(local, device="meta")[None]
    pe = dec.rotary_emb(x, pos)
    shared = {t.untyped_storage()._cdata for t in pe}
    configs = {id(c): c for c in (model.config, attn.config, model.config.get_text_config(decoder=True))}
    before = {k: c._attn_implementation for k, c in configs.items()}
    name = _register_plan_attention()
    for c in configs.values():
        c._attn_implementation = name
    try:
        _, seen = saved_bytes(lambda: layer(x, position_embeddings=pe, position_ids=pos, attention_mask=None))
    finally:
        attn.lt_plan = None
        attn.lt_plan_sp = 1
        for k, c in configs.items():
            c._attn_implementation = before[k]
    # parameters saved by matmuls are weights, not activations
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in shared and k not in params)


# ---------------------------------------------------------------------------------------------------------
# The plan


def _get(cfg, path: str, default=None):
    node = cfg
    for part in path.split("."):
        if node is None:
            return default
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


def hardware_from_config(cfg) -> Hardware:
    h = _get(cfg, "hardware", {}) or {}

    def val(key, kind, default):
        v = h.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or (kind is int and isinstance(v, float) and not v.is_integer()):
            raise ValueError(f"hardware.{key} must be a whole number, got {v!r}")
        return kind(v)

    try:
        hw = Hardware(gpus=val("gpus", int, 0), gpu_memory_gb=val("gpu_memory_gb", float, 0.0),
                      nodes=val("nodes", int, 1), host_memory_gb=val("host_memory_gb", float, 0.0),
                      processes=val("processes", int, 1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"hardware settings must be numbers: {dict(h)} ({e})") from None
    hw.validate()
    return hw


def resolve_hardware(cfg, world_size: int | None = None) -> Hardware:
    """The `hardware` group with its nulls filled from this machine. Naming GPUs (hardware.gpus) plans for that
    machine instead: the host memory is then only checked when hardware.host_memory_gb is given."""
    from .distributed import world

    h = dict(_get(cfg, "hardware", {}) or {})
    ws = world_size if world_size is not None else world()[1]
    if h.get("gpus") is None:
        det = detect_hardware(ws)
        h.setdefault("gpus", None)
        h["gpus"] = det.gpus
        for k in ("gpu_memory_gb", "host_memory_gb"):
            if h.get(k) is None:
                h[k] = getattr(det, k)
    if h.get("processes") is None:
        h["processes"] = ws if not h.get("gpus") else 1
    return hardware_from_config({"hardware": h})


def detect_hardware(world_size: int = 1) -> Hardware:
    """The hardware this process sees: its GPUs (or CPU processes) and the node's memory."""
    host = 0.0
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        host = kb * 1024 / 1e9
    except (OSError, StopIteration, ValueError):
        pass
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        mem = torch.cuda.get_device_properties(0).total_memory / 1e9
        return Hardware(gpus=min(n, world_size) if world_size > 1 else 1, gpu_memory_gb=mem, host_memory_gb=host)
    return Hardware(gpus=0, host_memory_gb=host, processes=max(world_size, 1))


def plan_memory(cfg, hardware: Hardware | None = None, suggest: bool = True) -> MemoryPlan:
    """The memory plan of the training run `cfg` (a launch/train.py config) on `hardware` (default: the
    config's `hardware` group)."""
    hw = hardware or hardware_from_config(cfg)
    hw.validate()
    mcfg, tr, ds, lz = cfg["model"], cfg["train"], cfg["deepspeed"], cfg["lazy"]
    mode = tr["mode"]
    stage = int(ds.get("stage", 0))
    off_opt, off_par = bool(ds.get("offload_optimizer")), bool(ds.get("offload_param"))
    bf16 = bool(tr.get("bf16"))
    gc = bool(tr.get("gradient_checkpointing"))
    T = int(tr["pack_length"])
    if T < 1:
        raise ValueError(f"train.pack_length must be >= 1, got {T}")
    world = hw.world
    if stage == 0 and world > 1:
        raise ValueError(f"{world} processes need DeepSpeed (deepspeed=zero2 or zero3)")
    n_sp = int(tr.get("sequence_parallel", 1) or 1)
    mdtype = str(mcfg.get("dtype", "float32"))
    pb = 2 if (bf16 or mdtype in ("bfloat16", "float16", "auto")) else 4  # bytes per weight / activation element
    dtype = torch.bfloat16 if pb == 2 else torch.float32

    config = arch_config(mcfg)
    text = config.get_text_config(decoder=True)
    L = int(text.num_hidden_layers)
    if n_sp != 1:
        from .sequence_parallel import check

        check(n_sp, world, text, mcfg.get("attn_implementation"), T, stage)
    t_local = T // n_sp  # tokens each process holds outside attention
    model = meta_model(config, dtype)
    N, largest = param_counts(model)
    lora = _get(tr, "lora", {}) or {}
    Nt = N if mode == "full" else lora_params(model, list(lora.get("target_modules", [])), int(lora.get("r", 16)))
    if mode == "lora" and Nt == 0:
        raise ValueError(f"train.lora.target_modules {list(lora.get('target_modules', []))} match no linear layer")

    # streaming layers and their backend as the trainer will run them
    from .lazy_ratio import resolve_num_lazy

    # a selection file's layers, S and W: put into the config by train.config.apply_selection_file
    explicit = lz.get("layers") if lz.get("layers") is not None else lz.get("file_layers")
    S, W = int(lz.get("sink_tokens", 4)), int(lz.get("window", 1020))
    n_lazy = len(explicit) if explicit is not None else resolve_num_lazy(lz.get("num_lazy", 0.5), L)
    backend = lz.get("backend", "auto") or "auto"
    if backend == "auto":
        backend = "flex" if hw.gpus else "sdpa"  # packed rows on GPU: flex (flash_attn if installed saves the same)

    if mode == "lora":
        model = _meta_lora(model, lora)
    if tr.get("tiled_mlp"):  # the traced MLP then keeps only its input (intermediates exist per tile)
        from .sequence_parallel import tile_mlps

        tile_mlps(model)
    a_full = layer_activations(model, T, None, n_sp)
    a_lazy = layer_activations(model, T, (S, W, backend), n_sp) if n_lazy else 0
    H, V = int(text.hidden_size), int(text.vocab_size)

    # ---- model states (per device)
    parts: dict[str, int] = {}
    host: dict[str, int] = {}
    gpus_per_node = hw.gpus if hw.gpus else hw.processes
    if stage == 0:
        parts["parameters"] = N * pb
        parts["gradients"] = Nt * pb
        parts["optimizer states (AdamW)"] = 2 * Nt * pb
    else:
        # DeepSpeed's arithmetic (estimate_zero2/3_model_states_mem_needs): in bf16, 2 bytes per parameter of
        # 16-bit weights, then per trainable parameter 4 of fp32 master weights, 8 of Adam moments and the gradients:
        # 6 (16-bit + fp32 partitions) under ZeRO-2, 4 under ZeRO-3, so 18 per parameter in all for both. In fp32
        # (CPU runs) the weights are 4 bytes, gradients 4, and DeepSpeed still keeps a fp32 copy of its partition.
        mixed = pb == 2
        p16, master, states = (2 if mixed else 4), 4, 8
        g16, g32 = (2, (4 if stage == 2 else 2)) if mixed else (0, 4)
        if stage == 2:
            parts["parameters"] = N * p16
        else:
            parts["parameters (partition)"] = 0 if off_par else -(-N * p16 // world)
            # the largest module gathered with its gradient (DeepSpeed's 4 bytes x largest layer in bf16)
            parts["gathered layer (ZeRO-3)"] = largest * (p16 + (g16 or 4))
            if off_par:
                host["parameters (offloaded)"] = -(-N * p16 // world) * gpus_per_node
        opt = -(-Nt * (master + states) // world)
        grads = -(-Nt * (g16 + g32) // world)
        if off_opt:
            parts["gradients (partition)"] = -(-Nt * g16 // world) if mixed else 0
            host["optimizer states + fp32 grads (offloaded)"] = (  # fp32 gradients on the host: 4 bytes
                -(-Nt * (master + states + 4) // world) * gpus_per_node)
        else:
            parts["gradients (partition)"] = grads
            parts["optimizer states (partition)"] = opt
        bucket_elems = min(REDUCE_BUCKET, Nt) if not hw.gpus else REDUCE_BUCKET
        parts["DeepSpeed buckets"] = bucket_elems * (2 if mixed else 4) + (
            min(PREFETCH_BUCKET, N) * p16 if stage == 3 else 0)

    # ---- activations (per device, one packed row of T tokens), at the peak of the step
    # Backward walks down the layers: each layer's activations (or checkpointed input) are freed as its
    # gradients appear, so what is held is the larger of the two, plus the layer in hand: recomputed (with
    # checkpointing) and its working set (gradients of its intermediates: BACKWARD_WORKSET of what it saved,
    # measured 0.51-0.56 on an H200 for a Qwen2-1.5B shape). Under ZeRO the gradient partitions are allocated
    # up front (counted above); torch allocates .grad during backward.
    n_full = L - n_lazy
    layer_in = t_local * H * pb  # a decoder layer's input, what gradient checkpointing keeps
    a_max = max(a_full, a_lazy)
    held = L * layer_in if gc else n_full * a_full + n_lazy * a_lazy
    parts["activations (checkpointed inputs)" if gc else "activations (all layers)"] = held
    if stage == 0:
        grads = parts.pop("gradients")
        parts["gradients (beyond the activations freed by then)"] = max(0, grads - held)
    if gc:
        parts["activations (one layer recomputed)"] = a_max
    layer_phase = int(BACKWARD_WORKSET * a_max)
    # the LM head (before the layers' backward): one chunk of logits in the model dtype, their fp32 copy and
    # its gradient (nll.lm_head_loss_sum; DeepSpeed's tiled loss under ZeRO-3), plus the hidden states' gradient
    head_phase = min(HEAD_CHUNK, t_local) * V * (pb + 4 + 4) + 3 * t_local * H * 4 - (a_max if gc else 0)
    if tr.get("objective", "sft") == "distill":
        # the original model's last states, kept from its no-grad forward through the step, and in the head
        # phase, beside the student's chunk of logits, distill.kl_sum's chunk-sized temporaries: the teacher's
        # logits and their fp32 copy, both log-softmaxes, the pointwise KL and its gradient
        parts["teacher states (distill)"] = t_local * H * pb
        head_phase += min(HEAD_CHUNK, t_local) * V * (pb + 5 * 4)
    if head_phase > layer_phase:
        parts["LM head chunk (the step's peak)"] = head_phase
    else:
        parts["backward working set (one layer)"] = layer_phase
    if n_lazy and backend == "sdpa" and W < T:
        parts["streaming block mask (shared)"] = streaming_mask_bytes(T, S, W, pb)
    if stage == 0:  # torch AdamW's step: all gradients plus foreach temporaries of the trainable size
        static = ("parameters", "optimizer states (AdamW)")
        step_phase = grads + Nt * pb
        if step_phase > sum(v for k, v in parts.items() if k not in static):
            parts = {k: parts[k] for k in static}
            parts["gradients"] = grads
            parts["optimizer step temporaries (the step's peak)"] = Nt * pb

    # ---- host per node: what each rank's loading holds at its peak
    if hw.gpus:
        partitioned = stage == 3  # zero.Init: each rank materialises only its partition
        host["model loading (all ranks, peak)"] = (-(-N * pb // world) * gpus_per_node if partitioned
                                                    else N * pb * gpus_per_node)

    settings = {"model": str(mcfg.get("name")), "params": N, "trainable": Nt, "largest_layer_params": largest,
                "mode": mode, "zero_stage": stage, "offload_optimizer": off_opt, "offload_param": off_par,
                "dtype": "bf16" if pb == 2 else "fp32", "tokens": T, "sequence_parallel": n_sp,
                "tiled_mlp": bool(tr.get("tiled_mlp")), "layers": L,
                "lazy_layers": n_lazy,
                "streaming_backend": backend, "sink_tokens": S, "window": W, "gradient_checkpointing": gc,
                "world_size": world, "layer_activation_bytes": {"full": a_full, "lazy": a_lazy}}
    phases = _other_phases(cfg, parts, host, N=N, largest=largest, pb=pb, p16=(2 if pb == 2 else 4), stage=stage,
                           T=T, t_local=t_local, H=H, V=V, L=L, a_max=a_max, text=text)
    plan = MemoryPlan(parts, host, hw, settings, deepspeed_estimate=_deepspeed_estimate(
        N, largest, stage, off_opt, off_par, hw) if mode == "full" and stage and bf16 else None, phases=phases)
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(cfg, hw)
    return plan


EXPORT_SHARD = 2 * 2**30  # bytes of one safetensors shard the export's writer holds (train/final_weights.py)
STATE_PARTS = ("parameters", "parameters (partition)", "gradients (partition)", "optimizer states (partition)",
               "optimizer states (AdamW)", "DeepSpeed buckets")  # what the engine holds between steps


def _other_phases(cfg, step: dict, host: dict, *, N, largest, pb, p16, stage, T, t_local, H, V, L, a_max,
                  text) -> dict:
    """The phases around the training step, per GPU and per node: selection (before the engine exists: the
    weights, under ZeRO-3 the partition and one module gathered at a time), the evaluations before and after
    training (on the engine's model: its states, one module gathered, a forward without gradients), and the
    export (one module gathered; the writer's host holds one shard in flight)."""
    lz, val = cfg["lazy"], _get(cfg, "validation", {}) or {}
    states = {k: v for k, v in step.items() if k in STATE_PARTS}
    offloaded = {k: v for k, v in host.items() if "offloaded" in k}
    gathered = {"one module gathered (ZeRO-3)": largest * p16} if stage == 3 else {}
    # a forward without gradients: a layer's transients (bounded by what it saves for backward), its input and
    # output, and one chunk of LM-head logits with their fp32 copy
    forward = {"forward without gradients (one layer + head chunk)":
               a_max + 2 * T * H * pb + min(HEAD_CHUNK, T) * V * (pb + 4)}
    phases: dict[str, dict] = {}
    if lz.get("layers") is None and not lz.get("from_file") and lz.get("file_layers") is None:
        weights = ({"parameters (partition)": step.get("parameters (partition)", 0), **gathered,
                    "DeepSpeed prefetch bucket": min(PREFETCH_BUCKET, N) * p16} if stage == 3
                   else {"parameters": N * pb})
        phases["selection"] = {"per_gpu": {**weights, **forward},
                               "host": {k: v for k, v in host.items() if k.startswith("model loading")}}
    if val.get("enabled"):
        kv = 0
        if int(val.get("accuracy_problems") or 0):
            heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
            hd = int(getattr(text, "head_dim", None) or H // text.num_attention_heads)
            kv = int(val.get("batch_size", 8)) * (int(val.get("max_new_tokens", 320)) + 512) * L * 2 * heads * hd * pb
        ev = {**states, **gathered, **forward, **({"KV cache (demo answers)": kv} if kv else {})}
        phases["evaluation (before / after)"] = {"per_gpu": ev, "host": dict(offloaded)}
    phases["export"] = {"per_gpu": {**states, **gathered},
                        "host": {**offloaded, "export writer (one shard + one module)": EXPORT_SHARD + largest * p16}}
    return phases


def longest_pack_length(cfg, hardware: Hardware | None = None, quantum: int = 1024, limit: int = 1 << 22) -> int:
    """The longest `train.pack_length` (a multiple of `quantum` and of train.sequence_parallel) whose plan fits
    `hardware`; 0 if not even one quantum fits. Doubling, then bisection: about 2 log2(limit / quantum) plans."""
    from omegaconf import OmegaConf

    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else \
        OmegaConf.create(cfg)
    n = int(base.train.get("sequence_parallel", 1) or 1)
    q = math.lcm(quantum, n)

    def fits(k: int) -> bool:
        base.train.pack_length = k * q
        return plan_memory(base, hardware, suggest=False).fits

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi * q <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit // q + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * q


def _meta_lora(model, lora: dict):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=int(lora.get("r", 16)), lora_alpha=int(lora.get("alpha", 32)),
                                            lora_dropout=float(lora.get("dropout", 0.0)),
                                            target_modules=list(lora.get("target_modules", [])),
                                            task_type="CAUSAL_LM"))


def _deepspeed_estimate(N: int, largest: int, stage: int, off_opt: bool, off_par: bool, hw: Hardware) -> dict:
    """DeepSpeed's estimate_zero2/3_model_states_mem_needs (runtime/zero/stage3.py, stage_1_and_2.py),
    re-stated so that planning does not import DeepSpeed; zero_init=True and additional_buffer_factor=1.5."""
    gpus = hw.world
    per_node = hw.gpus or hw.processes
    if stage == 3:
        lay = 4 * largest
        if off_opt and off_par:
            gpu, cpu = lay, N * 18 / hw.nodes * 1.5
        elif off_opt:
            gpu, cpu = lay + 2 * N / gpus, N * 16 / hw.nodes * 1.5
        else:
            gpu, cpu = lay + 18 * N / gpus, largest * 4 * per_node * 1.5
    else:
        if off_opt:
            gpu, cpu = 2 * N, N * max(4 * gpus, 16) * 1.5
        else:
            gpu, cpu = 2 * N + 18 * N / gpus, N * 4 * per_node * 1.5
    return {"per_gpu": int(gpu), "per_node_host": int(cpu)}


def _suggestions(cfg, hw: Hardware) -> list[str]:
    """Overrides that make the plan fit, cheapest first (each tried on its own, then a few combinations)."""
    from omegaconf import OmegaConf

    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if OmegaConf.is_config(cfg) else \
        OmegaConf.create(cfg)
    T = int(base.train.pack_length)
    stage = int(base.deepspeed.get("stage", 0))
    candidates: list[tuple[str, dict]] = []
    if not base.train.get("gradient_checkpointing"):
        candidates.append(("train.gradient_checkpointing=true", {"train.gradient_checkpointing": True}))
    if stage and stage < 3:
        candidates.append(("deepspeed=zero3", {"deepspeed.stage": 3}))
    if stage and not base.deepspeed.get("offload_optimizer"):
        candidates.append(("deepspeed.offload_optimizer=true", {"deepspeed.offload_optimizer": True}))
    if stage == 3 and not base.deepspeed.get("offload_param"):
        candidates.append(("deepspeed=zero3_offload (optimizer and parameters on the host)",
                           {"deepspeed.offload_optimizer": True, "deepspeed.offload_param": True}))
    if base.train.mode == "lora" and float(base.train.get("lora", {}).get("dropout", 0) or 0) > 0:
        # LoRA dropout keeps a dropped-out copy of every adapted projection's input for backward
        candidates.append(("train.lora.dropout=0", {"train.lora.dropout": 0.0}))
    from . import sequence_parallel

    text_config = arch_config(base.model).get_text_config(decoder=True)
    for n in (2, 4, 8):
        n_sp = n * int(base.train.get("sequence_parallel", 1) or 1)
        try:  # only a degree the trainer itself would accept (the same check refuses it there)
            sequence_parallel.check(n_sp, hw.world, text_config, base.model.get("attn_implementation"), T, stage)
        except ValueError:
            continue
        candidates.append((f"train.sequence_parallel={n_sp}", {"train.sequence_parallel": n_sp}))
    if base.train.mode == "full":
        candidates.append(("train=lora", {"train.mode": "lora", "train.lora": {
            "r": 16, "alpha": 32, "dropout": 0.05,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}))
    for frac in (2, 4):
        if T // frac >= 1024:
            candidates.append((f"train.pack_length={T // frac}", {"train.pack_length": T // frac}))
    if hw.gpus:
        for more in (2, 4):
            candidates.append((f"hardware.nodes={hw.nodes * more} ({hw.world * more} GPUs)",
                               {"hardware": dataclasses.replace(hw, nodes=hw.nodes * more)}))
    out = []
    singles = [c for c in candidates]
    tried = singles + [(f"{a} + {b}", {**da, **db}) for i, (a, da) in enumerate(singles) for (b, db) in singles[i + 1:]
                       if not ("hardware" in da and "hardware" in db)]
    seen_overrides = []
    for label, overrides in tried:
        if overrides in seen_overrides:  # e.g. offload_optimizer + zero3_offload is zero3_offload
            continue
        seen_overrides.append(overrides)
        c = OmegaConf.create(OmegaConf.to_container(base))
        for k, v in overrides.items():
            if k != "hardware":
                OmegaConf.update(c, k, v, force_add=True)
        try:
            p = plan_memory(c, overrides.get("hardware", hw), suggest=False)
        except (ValueError, ImportError):
            continue
        if p.fits:
            out.append(f"{label}: {p.peak_per_gpu / GiB:.1f} GiB per {'GPU' if hw.gpus else 'process'}")
        if len(out) >= 6:
            break
    return out


def write_plan(plan: MemoryPlan, out_dir: str) -> str:
    from .io import atomic_write_json

    path = os.path.join(out_dir, "plan.json")
    atomic_write_json(path, plan.to_json())
    return path
