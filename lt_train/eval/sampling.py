"""Generation for evaluation: prompts, a fixed batch plan, and a batched decode loop with a seed per sample.

The batch plan depends only on (problems, n_samples, batch_size), and sample s of problem p always samples
with its own generator seeded `sample_seed(seed, p, s, n_samples)`, whatever its batch. So a resumed run
regenerates an interrupted batch exactly, and two models compared on the same problems use the same seeds.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from ..cache import cache_nbytes, static_length
from ..hybrid import new_cache

log = logging.getLogger(__name__)

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
    compile: bool = False  # decode steps through torch.compile over a static cache (see `compiled_step`)

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
                       ecfg.get("instruction"), ecfg.get("system_prompt"), bool(ecfg.get("compile", False)))


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
    tokens: list[int]       # generated tokens per row, EOS included
    finished: list[bool]    # False: cut at max_new_tokens
    seconds: float
    kv_bytes: int           # the cache's largest size during the batch (its prefill peak, for online selection)


def sample_seed(seed: int, problem: int, sample: int, n_samples: int) -> int:
    """The seed of one sample: its tokens do not depend on which batch or process draws it. Distinct for every
    (problem, sample) of a run: the problem stride grows past 1009 when a run draws more samples than that."""
    return (seed * 1_000_003 + problem * max(1009, n_samples) + sample) % (2**63)


def next_tokens(logits: torch.Tensor, gs: GenSettings, gens: list[torch.Generator]) -> torch.Tensor:
    """Greedy, or temperature -> top-k -> top-p (the order of transformers' warpers), one generator per row."""
    if gs.greedy:
        return logits.argmax(-1)
    logits = logits.float() / gs.temperature
    if gs.top_k:
        kth = logits.topk(min(gs.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gs.top_p < 1.0:
        sorted_logits, order = logits.sort(-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - gs.top_p  # the least likely tokens outside the top-p mass
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return draw(probs, gens)


def draw(probs: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` [B, V], row i drawn with generator i: exactly `torch.multinomial(probs[i], 1,
    generator=gens[i])`, which for one sample is the exponential race argmax(p / q), q ~ Exp(1) drawn from the
    generator (ATen's multinomial); here the B noise rows come from their generators and the race is one batched
    division and argmax instead of B multinomial calls."""
    q = torch.stack([torch.empty_like(probs[i]).exponential_(1, generator=g) for i, g in enumerate(gens)])
    return (probs / q).argmax(-1)


def compiled_step(model):
    """The decode forward of `model` compiled once (kept on the model): one graph with fixed shapes
    (`fullgraph=True, dynamic=False`), CUDA graphs on a GPU (`reduce-overhead`). Inputs: tokens [B, 1], the
    attention mask over every slot of a static cache [B, L], position ids [B, 1], the cache. A new batch size or
    cache length compiles once more; within a batch nothing recompiles."""
    fn = model.__dict__.get("_lt_compiled_step")
    if fn is None:
        def step(ids, mask, pos, cache):
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]

        dev = next(model.parameters()).device
        fn = torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead" if dev.type == "cuda" else None)
        model.__dict__["_lt_compiled_step"] = fn
    return fn


def _static_cache(model, batch: int, length: int):
    """One static cache per (batch, length), kept on the model and emptied for each batch: its buffers keep their
    addresses, so a CUDA graph recorded for the first batch replays for the next (a new cache would record anew)."""
    caches = model.__dict__.setdefault("_lt_static_caches", {})
    cache = caches.get((batch, length))
    if cache is None:
        cache = caches[(batch, length)] = new_cache(model, max_cache_len=length, static=True)
    else:
        cache.reset()
    return cache


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[str], gs: GenSettings, seeds: list[int],
                   lockstep: bool = False) -> BatchOutput:
    """Generate for left-padded prompts with a fresh cache; each row samples with its own seed.

    The decode loop is written out (not `generate`) for two reasons: rows that finish are dropped from the
    batch and the cache at once, so a long-reasoning batch does not keep computing its finished rows, and a
    generator per row makes a sample's tokens independent of its batch-mates.

    `lockstep`: every call makes exactly `max_new_tokens` forwards, finished rows kept in the batch and their later
    tokens dropped: the ranks of a ZeRO-3 model gather each module's weights in every forward (a collective), so
    they must make as many, and this needs no collective per token to agree on when to stop.

    `gs.compile`: decode steps run `compiled_step` over a static cache; finished rows keep their slot (their tokens
    dropped) so that the step's shapes never change, and the loop ends when every row has finished."""
    dev = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    finally:
        tokenizer.padding_side = side
    eos = torch.tensor(eos_ids(model, tokenizer), device=dev)
    B = len(prompts)
    out_tokens: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    # prompt + max_new_tokens only bounds the full layers' buffers (grow=True): the rows of a reasoning batch end at
    # very different lengths, and buffers sized to it for tokens most rows never generate made the hybrid's peak
    # KV larger than the full model's DynamicCache (433 vs 388 MiB, GSM8K x8 at up to 2048 tokens)
    P = enc.input_ids.shape[1]
    if gs.compile:
        L = static_length(P + gs.max_new_tokens)  # batches of nearby lengths share the compiled step
        cache = _static_cache(model, B, L)
        static_mask = enc.attention_mask.new_zeros(B, L)
        static_mask[:, :P] = enc.attention_mask
    else:
        cache = new_cache(model, max_cache_len=P + gs.max_new_tokens, grow=True)
    fixed = lockstep or gs.compile  # finished rows keep their slot in the batch
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()

    mask = enc.attention_mask
    pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() sets them
    logits = model(input_ids=enc.input_ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    peak = cache_nbytes(cache)
    # on the logits' device: with device_map=auto the LM head may sit on another GPU than the embeddings
    gens = [torch.Generator(device=logits.device).manual_seed(int(s)) for s in seeds]
    alive = list(range(B))
    last = pos[:, -1:]
    for step in range(gs.max_new_tokens):
        tok = next_tokens(logits, gs, [gens[r] for r in alive])
        # the step's one host sync: the tokens and which of them end their rows, read together
        host = torch.stack([tok, torch.isin(tok, eos.to(tok.device)).long()]).tolist()
        done = [bool(d) for d in host[1]]
        for j, (r, t, d) in enumerate(zip(alive, host[0], done)):
            if fixed and finished[r]:
                done[j] = True
                continue
            out_tokens[r].append(t)
            finished[r] = d
        keep = [j for j, d in enumerate(done) if not d]
        if step == gs.max_new_tokens - 1 or not (keep or lockstep):
            break
        if len(keep) < len(alive) and not fixed:  # drop finished rows from the batch and the cache
            sel = torch.tensor(keep)  # on the CPU: layers may sit on several devices (device_map)
            cache.batch_select_indices(sel)
            mask, last, tok = mask[sel.to(dev)], last[sel.to(dev)], tok[sel.to(tok.device)]
            alive = [alive[j] for j in keep]
        last = last + 1
        if gs.compile:
            static_mask[:, P + step] = 1
            try:
                logits = compiled_step(model)(tok[:, None], static_mask, last, cache)
            except Exception as e:  # noqa: BLE001 - the first call compiles: say what failed and the way out
                if step:
                    raise
                raise RuntimeError(f"eval.compile=true: torch.compile could not compile the decode step "
                                   f"({type(e).__name__}: {str(e)[:300]}); run with eval.compile=false") from e
        else:
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=last, cache=cache,
                           use_cache=True).logits[:, -1]
        peak = max(peak, cache_nbytes(cache))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out_tokens]
    return BatchOutput(texts, [len(t) for t in out_tokens], finished, seconds, peak)
