"""Sequence parallelism for long rows: DeepSpeed's Ulysses (ALST) for HF models, with lt_train's hybrid attention.

N processes (a sequence-parallel group) share one packed row: each holds T/N consecutive tokens through the
embeddings, MLPs and norms; around each attention call DeepSpeed's all-to-all hands every process whole rows for
Hq/N of the heads, so the hybrid attention function sees exactly what it sees without sequence parallelism
(full layers the base attention, lazy layers streaming attention, both over the whole row and its gathered
position ids: packed documents keep their own sinks across shard boundaries).

What DeepSpeed provides and this module only drives:
- `UlyssesSPAttentionHF.register_with_transformers`: wraps the model's registered attention function
  (`lt_hybrid_<base>`) and builds the process groups (the `mpu` handed to `deepspeed.initialize`);
- `UlyssesSPDataLoaderAdapter`: the row of each process of a group is shared out as N shards, with labels
  shifted before sharding (`shift_labels`) so no target is lost at a shard boundary;
- the ZeRO engines, which sum gradients over all ranks and divide by the data-parallel degree (ZeRO-1/2) or by
  the world size (ZeRO-3): `train.engine.DeepSpeedEngine.gradient_divisor`;
- `TiledMLP` (`tile_mlps`), for the MLPs' intermediates at long lengths.

Rows are padded to a multiple of N (the padding is one more loss-free document), never refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Architectures whose attention modules DeepSpeed's wrapper can shard: the ones lt_train converts.
from .hybrid import IMPL_PREFIX, SEQUENCE_PARALLEL, SUPPORTED_MODEL_TYPES, attention_modules

# DeepSpeed refuses eager (it would need a T x T mask per layer); flex rebuilds a plain causal block mask
# after the all-to-all, which would drop packed documents' boundaries.
SUPPORTED_BASES = ("sdpa", "flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class SPGroup:
    size: int  # N: processes sharing one row
    rank: int  # this process's index inside its group (its shard)
    group: object  # the torch.distributed group
    mpu: object  # DeepSpeed's parallel-state module, for deepspeed.initialize(mpu=...)


def check(n: int, world_size: int, text_config, base_attention: str | None, pack_length: int,
          stage: int) -> None:
    """Refuse, naming the setting, a sequence-parallel run that DeepSpeed's Ulysses cannot shard."""
    if n == 1:
        return
    if n < 1:
        raise ValueError(f"train.sequence_parallel must be >= 1, got {n}")
    if stage == 0:
        raise ValueError(f"train.sequence_parallel={n} needs DeepSpeed: add deepspeed=zero2 or deepspeed=zero3")
    if world_size % n:
        raise ValueError(f"train.sequence_parallel={n} does not divide the {world_size} processes "
                         f"(torchrun --nproc_per_node): use a divisor of {world_size}")
    mt = text_config.model_type
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"train.sequence_parallel={n}: architecture {mt!r} cannot be sharded here; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    heads, kv = text_config.num_attention_heads, text_config.num_key_value_heads
    if heads % n:
        raise ValueError(f"train.sequence_parallel={n} does not divide the model's {heads} attention heads "
                         f"(each process computes heads / N of them); use a divisor of {heads}")
    if kv % n and n % kv:
        raise ValueError(f"train.sequence_parallel={n} and the model's {kv} key-value heads: one must divide the "
                         "other (DeepSpeed splits or replicates KV heads)")
    base = (base_attention or "sdpa").removeprefix(IMPL_PREFIX)
    if base not in SUPPORTED_BASES:
        raise ValueError(f"train.sequence_parallel={n} with model.attn_implementation={base!r}: Ulysses runs "
                         f"with {SUPPORTED_BASES}")
    if pack_length % n:
        raise ValueError(f"train.pack_length={pack_length} is not divisible by train.sequence_parallel={n}: "
                         "rows are padded to a multiple of N, which must not exceed the packing length")


def enable(model, n: int) -> SPGroup | None:
    """Wrap the model's attention function with DeepSpeed's Ulysses all-to-all and build the process groups.
    Call after `convert_to_hybrid` (the wrapped function is the hybrid one) and before `deepspeed.initialize`.
    Only modules in training mode go through the all-to-all: evaluation calls the unwrapped function with its
    mask intact, so a rank-0-only evaluation never waits on the other ranks (DeepSpeed's own `disable_in_eval`
    drops the mask first, which loses padding and packed documents)."""
    if n == 1:
        return None
    import torch.distributed as dist
    from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation
    if getattr(ALL_ATTENTION_FUNCTIONS[name], "lt_unwrapped", None) is not None:
        raise RuntimeError(f"sequence parallelism is already enabled for {name!r} in this process")
    plain = ALL_ATTENTION_FUNCTIONS[name]
    UlyssesSPAttentionHF.register_with_transformers(
        model, core_attn_implementation=name, sequence_parallel_size=n, micro_batch_size=1,
        seq_length_is_variable=True)
    ulysses = ALL_ATTENTION_FUNCTIONS[name]

    def attention(module, *args, **kwargs):
        return (ulysses if module.training else plain)(module, *args, **kwargs)

    attention.lt_unwrapped = plain
    ALL_ATTENTION_FUNCTIONS[name] = attention
    for m in attention_modules(model):  # full layers rebuild packed rows' document mask (see hybrid.py)
        setattr(m, SEQUENCE_PARALLEL, True)
    group = mpu.get_sequence_parallel_group()
    return SPGroup(n, dist.get_rank(group), group, mpu)


def shard(sp: SPGroup, rows: list[dict], device) -> list[dict]:
    """This process's shards of the rows of its whole group: each process passes its own rows (dicts of
    [1, T] tensors `input_ids`, `labels`, `position_ids`, T a multiple of N) and gets N x len(rows) shards,
    group rank 0's rows first, each {input_ids, position_ids, shift_labels} of T/N tokens."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    adapter = UlyssesSPDataLoaderAdapter(rows, sp_rank=sp.rank, sp_group=sp.group, sp_world_size=sp.size,
                                         device=device)
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in adapter]


def tile_mlps(model, tile_tokens: int | None = None, length: int | None = None) -> int:
    """Run every decoder layer's MLP through DeepSpeed's `TiledMLP` (ALST): the intermediate activations
    (3 x intermediate_size per token, the largest part of a recomputed layer) exist for one tile of tokens at a
    time, in forward and in backward, which recomputes each tile's MLP. Tiles of `tile_tokens` (default: the
    hidden size, DeepSpeed's choice). Only training forwards with gradients are tiled; evaluation runs the plain
    MLP.

    Under ZeRO-3 every tile gathers the MLP's weights (a collective), so all ranks must make the same number of
    tiles: pass `length` (the longest row a rank can hold) and every call pads its tokens to it, so the count
    follows from the config alone. DeepSpeed's own example agrees the count with an all-reduce in every MLP call
    instead: a collective and a host sync per layer per micro-step, and a hang when one rank runs the model alone.
    Returns the number of MLPs tiled."""
    import math
    import types

    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    from .nll import decoder_of

    layers = decoder_of(model).layers
    tile = tile_tokens or model.config.get_text_config(decoder=True).hidden_size

    def plain(mlp, x):
        return type(mlp).forward(mlp, x)

    def tiled_forward(mlp, x):
        if not (mlp.training and torch.is_grad_enabled()):
            return plain(mlp, x)
        T = x.shape[-2]
        if length is not None and T > length:
            raise ValueError(f"a row of {T} tokens reached a tiled MLP padded to {length} (train.pack_length / "
                             "train.sequence_parallel): rows must not exceed train.pack_length")
        n = length or T
        shards = max(1, math.ceil(n / tile))
        shards = math.ceil(n / math.ceil(n / shards))  # what torch.chunk makes (TiledMLP counts on it)
        if shards == 1:
            return plain(mlp, x)
        if n > T:  # the MLP is per token: zero rows are computed, then dropped (their gradient is zero)
            x = torch.nn.functional.pad(x, (0, 0, 0, n - T))
        return TiledMLP.apply(plain, mlp, x, shards, list(mlp.parameters()))[..., :T, :]

    for layer in layers:
        layer.mlp.forward = types.MethodType(tiled_forward, layer.mlp)
    return len(layers)
