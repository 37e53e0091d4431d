"""Generation for evaluation: prompts, a fixed batch plan with per-batch seeds, one batched `generate` call.

The batch plan depends only on (problems, n_samples, batch_size): sample s of problem p always lands in the
same batch, and batch b always samples with seed `batch_seed(seed, b)`. So a resumed run regenerates an
interrupted batch exactly, and two models compared on the same plan use the same seeds.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from ..cache import cache_nbytes, new_cache

log = logging.getLogger(__name__)

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class GenSettings:
    n_samples: int
    greedy: bool
    temperature: float
    top_p: float
    top_k: int  # 0: off (the DeepSeek-R1 protocol uses temperature and top-p only)
    max_new_tokens: int
    batch_size: int
    seed: int
    instruction: str | None
    system_prompt: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def gen_settings(ecfg) -> GenSettings:
    """Validated generation settings from an eval config; n_samples null means 8 sampled; greedy means 1."""
    temperature = float(ecfg.get("temperature", 0.6))
    greedy = bool(ecfg.get("greedy", False)) or temperature <= 0
    n = ecfg.get("n_samples")
    if greedy and n is not None and int(n) > 1:
        # n greedy samples would all be identical (an lm-eval pass@k pitfall): one per problem, said loudly
        log.warning("greedy decoding: eval.n_samples=%s ignored, one sample per problem (pass@k needs sampling)", n)
        n = 1
    n = (1 if greedy else 8) if n is None else int(n)
    if n < 1:
        raise ValueError(f"eval.n_samples must be >= 1, got {n}")
    top_p = float(ecfg.get("top_p", 1.0))
    if not 0 < top_p <= 1:
        raise ValueError(f"eval.top_p must be in (0, 1], got {top_p}")
    max_new = int(ecfg.get("max_new_tokens", 32768))
    batch = int(ecfg.get("batch_size", 8))
    if max_new < 1 or batch < 1:
        raise ValueError(f"eval.max_new_tokens and eval.batch_size must be >= 1, got {max_new} and {batch}")
    return GenSettings(n, greedy, 0.0 if greedy else temperature, 1.0 if greedy else top_p,
                       0 if greedy else int(ecfg.get("top_k", 0) or 0), max_new, batch, int(ecfg.get("seed", 0)),
                       ecfg.get("instruction"), ecfg.get("system_prompt"))


def build_prompt(tokenizer, question: str, instruction: str | None = None, system_prompt: str | None = None) -> str:
    """The question (plus the instruction on its own line) through the tokenizer's chat template."""
    user = f"{question}\n{instruction}" if instruction else question
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; evaluate an instruction-tuned / reasoning model, "
                         "or give its tokenizer a chat_template")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def plan_batches(num_problems: int, n_samples: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """(problem index, sample index) pairs in problem order, cut into batches."""
    flat = [(p, s) for p in range(num_problems) for s in range(n_samples)]
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def batch_seed(seed: int, batch: int) -> int:
    return (seed * 1_000_003 + batch) % (2**63)


def eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config (chat models often list several) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return ids


@dataclass
class BatchOutput:
    texts: list[str]
    tokens: list[int]       # generated tokens per row, EOS included, padding excluded
    finished: list[bool]    # False: cut at max_new_tokens
    seconds: float
    kv_bytes: int           # cache size at the end of the batch (or its prefill peak, when larger)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], gs: GenSettings, seed: int) -> BatchOutput:
    """One `generate` call over left-padded prompts, with a fresh cache whose size is read afterwards."""
    from transformers import GenerationConfig

    dev = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    finally:
        tokenizer.padding_side = side
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # A fresh config, not the model's: checkpoints ship defaults (top_k=50, repetition penalties) that would
    # silently change the protocol.
    gcfg = GenerationConfig(max_new_tokens=gs.max_new_tokens, do_sample=not gs.greedy, eos_token_id=eos,
                            pad_token_id=pad, **({} if gs.greedy else
                                                 {"temperature": gs.temperature, "top_p": gs.top_p,
                                                  "top_k": gs.top_k or None}))
    cache = new_cache(model)
    torch.manual_seed(seed)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = model.generate(**enc, generation_config=gcfg, cache=cache)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    gen = out[:, enc.input_ids.shape[1]:].cpu()
    is_eos = torch.isin(gen, torch.tensor(eos))
    texts, tokens, finished = [], [], []
    for row, hits in zip(gen, is_eos):
        stop = int(hits.nonzero()[0, 0]) + 1 if hits.any() else row.numel()
        texts.append(tokenizer.decode(row[:stop], skip_special_tokens=True))
        tokens.append(stop)
        finished.append(bool(hits.any()))
    return BatchOutput(texts, tokens, finished, seconds, cache_nbytes(cache))
