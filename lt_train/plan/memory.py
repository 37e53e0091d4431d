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

`plan_memory(cfg) -> MemoryPlan`; `python launch/plan.py` prints the table and writes plan.json."""
from __future__ import annotations

import torch

from ..nll import HEAD_CHUNK  # tokens per LM-head chunk in the losses
from .arch import arch_config, lora_params, meta_model, param_counts, _meta_lora
from .hardware import Hardware, _get, hardware_from_config
from .report import MemoryPlan
from .suggest import _deepspeed_estimate, _suggestions
from .trace import layer_activations

# DeepSpeed's communication buckets, set explicitly in engine.deepspeed_config so plan and engine agree.
REDUCE_BUCKET = 200_000_000          # elements: gradient reduction (ZeRO-2 / 3)
ALLGATHER_BUCKET = 200_000_000       # elements: ZeRO-2 parameter all-gather after the step
PREFETCH_BUCKET = 50_000_000         # elements: ZeRO-3 parameter prefetch
BACKWARD_WORKSET = 0.6               # a layer's backward working set, as a fraction of what it saved (measured)


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
        from ..sequence_parallel import check

        check(n_sp, world, text, mcfg.get("attn_implementation"), T, stage)
    t_local = T // n_sp  # tokens each process holds outside attention
    model = meta_model(config, dtype)
    N, largest = param_counts(model)
    lora = _get(tr, "lora", {}) or {}
    Nt = N if mode == "full" else lora_params(model, list(lora.get("target_modules", [])), int(lora.get("r", 16)))
    if mode == "lora" and Nt == 0:
        raise ValueError(f"train.lora.target_modules {list(lora.get('target_modules', []))} match no linear layer")

    # streaming layers and their backend as the trainer will run them
    from ..lazy_ratio import resolve_num_lazy

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
        from ..sequence_parallel import tile_mlps

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
        plan.suggestions = _suggestions(cfg, hw, plan_memory)
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
            kv = int(val.get("batch_size", 8)) * (int(val.get("max_new_tokens") or 320) + 512) * L * 2 * heads * hd * pb
        ev = {**states, **gathered, **forward, **({"KV cache (demo answers)": kv} if kv else {})}
        phases["evaluation (before / after)"] = {"per_gpu": ev, "host": dict(offloaded)}
    phases["export"] = {"per_gpu": {**states, **gathered},
                        "host": {**offloaded, "export writer (one shard + one module)": EXPORT_SHARD + largest * p16}}
    return phases
