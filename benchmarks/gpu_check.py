"""The prepared GPU check: proves lt_train's CUDA paths and measures them, in one run.

    python benchmarks/gpu_check.py --out DIR                      # one H200: under 8 minutes
    python benchmarks/gpu_check.py --out DIR --quick              # a first smoke run (about a minute)
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny  # the same code paths on CPU (the test suite)

Sections (`--only attention,hybrid,decode,train` runs a subset):
1. attention: every streaming backend available here (chunked SDPA, FlexAttention forward and backward,
   flash-attn when importable) against a dense masked softmax written from the definition, in bf16 and
   fp32, whole rows, packed documents and left-padded batches, T up to 16k;
2. hybrid: hybrid forward + backward (logits and every parameter gradient) and greedy generation (transformers'
   `generate` with the hybrid cache, and the evaluator's own decode loop) against a reference model whose
   attention is that dense softmax, for tiny Llama / Qwen2 / Qwen3 / Mistral models;
3. decode: a Qwen2-1.5B-shaped model (random weights, bf16), half the layers lazy (S=4, W=1020) vs the full
   model with transformers' static cache and with its dynamic cache: tokens/s, peak GPU memory, KV bytes, the
   bytes-read bound, and the largest batch each fits in `--budget-gb` (arithmetic from the measured peak);
4. train: one training step (LoRA and full, bf16, gradient checkpointing, chunked LM-head loss) of that model:
   full vs hybrid (chunked SDPA and FlexAttention streaming) tokens/s and peak memory at 8k, 16k, 32k tokens.

Only torch, transformers and lt_train's core are imported at module level (peft where the LoRA step needs
it). Models are built from configs with random weights: nothing is downloaded. Every item is isolated: a
failure is recorded with its traceback and the run goes on; items past the time budget are recorded as
skipped. Results are printed as tables and written to `DIR/gpu_check.json` after every item, so a run that is
killed still leaves what it measured. Exit status: 0 when no correctness check failed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import transformers  # noqa: E402
from _decode import compiled, decode, fill, make_cache, ops_per_step  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, StaticCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from lt_train import HybridCache, HybridConfig, convert_to_hybrid, revert_hybrid, set_lazy_layers  # noqa: E402
from lt_train.attention import flash as flash_backend  # noqa: E402
from lt_train.attention import streaming_attention  # noqa: E402
from lt_train.cache import cache_nbytes  # noqa: E402
from lt_train.models import TINY_ARCHS, tiny_config, tiny_tokenizer  # noqa: E402
from lt_train.nll import decoder_of, lm_head_loss_sum  # noqa: E402

SECTIONS = ("attention", "hybrid", "decode", "train")
SECTION_SHARE = {"attention": 0.3, "hybrid": 0.1, "decode": 0.25, "train": 0.35}  # of --budget-s

# A Qwen2-1.5B-shaped model (public architecture numbers of Qwen/Qwen2.5-1.5B): 28 layers, hidden 1536,
# 12 query / 2 KV heads of 128, MLP 8960, vocabulary 151936.
QWEN2_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072, rope_theta=1e6,
                  tie_word_embeddings=True, rms_norm_eps=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Sizes


def sizes(args) -> dict:
    if args.tiny:  # CPU test: every code path, seconds
        return dict(att=[("rows", 1, 300, 4, 50), ("packed", 1, 400, 4, 48), ("padded", 2, 300, 4, 64)],
                    dtypes=["float32"], model=dict(tiny_config("qwen2", 4, hidden_size=64).to_dict()),
                    decode_prompts=[256], decode_batch=2, decode_new=6, sink=4, window=64, decode_repeats=2,
                    train_lengths=[256], train_repeats=1)
    model = dict(QWEN2_1_5B, model_type="qwen2")
    if args.quick:
        return dict(att=[("rows", 1, 4096, 4, 1020), ("packed", 1, 4096, 4, 1020), ("padded", 2, 2048, 4, 1020)],
                    dtypes=["bfloat16"], model=model, decode_prompts=[4096], decode_batch=4, decode_new=16,
                    sink=4, window=1020, decode_repeats=1, train_lengths=[4096], train_repeats=1)
    return dict(att=[("rows", 1, 16384, 4, 1020), ("packed", 1, 16384, 4, 1020), ("padded", 2, 4096, 4, 1020)],
                dtypes=["bfloat16", "float32"], model=model, decode_prompts=[16384, 32768], decode_batch=16,
                decode_new=128, sink=4, window=1020, decode_repeats=3, train_lengths=[8192, 16384, 32768],
                train_repeats=2)


# ---------------------------------------------------------------------------------------------------------
# Bookkeeping: records, time budget, tables


class Run:
    """Collects records, writes the JSON after each, and tells when the time budget is spent."""

    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.records: list[dict] = []
        self.section_deadline = float("inf")
        self.meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": _device_name(args.device), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "flash_attn": flash_backend.is_available(), "args": vars(args),
        }
        os.makedirs(args.out, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > min(self.args.budget_s, self.section_deadline)

    def start_section(self, name: str) -> None:
        """Each section may use its share of the budget plus whatever earlier sections left unused."""
        share = SECTION_SHARE[name] * self.args.budget_s
        start = self.elapsed() if self.section_deadline == float("inf") else max(self.section_deadline, self.elapsed())
        self.section_deadline = start + share

    def add(self, section: str, name: str, status: str, **fields) -> dict:
        rec = {"section": section, "name": name, "status": status, "t": round(self.elapsed(), 1), **fields}
        self.records.append(rec)
        err = f"  {fields['error'].splitlines()[-1][:160]}" if fields.get("error") else ""
        print(f"[{rec['t']:>6.1f}s] {section:<9} {status:<5} {name}{err}", flush=True)
        self.save()
        return rec

    def item(self, section: str, name: str, fn, **fields) -> dict | None:
        """Run one item: its returned dict is recorded as pass (or fail when it says `ok: False`); an
        exception is recorded as fail with its traceback; past the budget, skipped."""
        if self.over_budget():
            return self.add(section, name, "skip", reason=f"time budget spent ({self.args.budget_s}s in all, "
                            f"{SECTION_SHARE[section]:.0%} for this section)", **fields)
        try:
            out = fn() or {}
        except Exception as e:  # noqa: BLE001 -- one broken item must not hide the others
            return self.add(section, name, "fail", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                            **fields)
        finally:
            _free()
        status = out.pop("status", None) or ("fail" if out.get("ok") is False else "pass")
        return self.add(section, name, status, **fields, **out)

    def save(self) -> None:
        path = os.path.join(self.args.out, "gpu_check.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"meta": self.meta, "records": self.records}, f, indent=1, default=str)
        os.replace(tmp, path)


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def _free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _gib(n) -> float | None:
    return None if n is None else round(n / 2**30, 3)


@contextlib.contextmanager
def _peak(dev):
    """Measures the peak GPU memory allocated inside the block: out['peak'] (absolute), out['above'] (over
    what was allocated when the block started). None on CPU."""
    out = {"peak": None, "above": None, "start": None}
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out["start"] = torch.cuda.memory_allocated(dev)
    yield out
    if dev.type == "cuda":
        _sync(dev)
        out["peak"] = torch.cuda.max_memory_allocated(dev)
        out["above"] = out["peak"] - out["start"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32 (0 when both are zero)."""
    a, b = a.float(), b.float()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


# ---------------------------------------------------------------------------------------------------------
# The independent reference: dense masked softmax from the definition, chunked over queries


def dense_reference(q, k, v, sink: int, window: int, pos: torch.Tensor, valid: torch.Tensor | None = None,
                    scale: float | None = None, chunk: int = 2048) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, T, D], pos [B, T] (position ids, restarting at 0 in each packed
    document), valid [B, T] (real keys). Query i sees key j iff both belong to the same document (index minus
    position equal), j is real, j <= i and (pos_j < sink or i - j < window). fp32 math; a query with no
    visible key (padding) sees itself. Differentiable; each query chunk is recomputed in backward."""
    B, Hq, T, D = q.shape
    rep = Hq // k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    idx = torch.arange(T, device=q.device)
    doc = idx[None] - pos  # where each token's document starts
    valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid.bool()

    def part(qc, kk, vv, s):
        qi = idx[s : s + qc.shape[2]]
        kf, vf = kk.float().repeat_interleave(rep, 1), vv.float().repeat_interleave(rep, 1)
        scores = torch.einsum("bhqd,bhkd->bhqk", qc.float(), kf) * scale
        allowed = (valid[:, None, :] & (doc[:, s : s + len(qi), None] == doc[:, None, :])
                   & (idx[None, None, :] <= qi[None, :, None])
                   & ((pos[:, None, :] < sink) | (qi[None, :, None] - idx[None, None, :] < window)))
        allowed = allowed | (~allowed.any(-1, keepdim=True) & (idx[None, None, :] == qi[None, :, None]))
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, -1), vf)

    outs = []
    for s in range(0, T, chunk):
        qc = q[:, :, s : s + chunk]
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            outs.append(torch.utils.checkpoint.checkpoint(part, qc, k, v, s, use_reentrant=False))
        else:
            outs.append(part(qc, k, v, s))
    return torch.cat(outs, 2)


def _ref_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of the reference models: whole sequences (no cache), dense; streaming where the module
    carries `lt_ref = (sink, window)`. Padding comes in as kwargs['ref_valid']."""
    B, _, T, _ = query.shape
    pos = kwargs["position_ids"].expand(B, T)
    sink, window = getattr(module, "lt_ref", None) or (0, 1 << 40)
    out = dense_reference(query, key, value, sink, window, pos, kwargs.get("ref_valid"), scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("lt_gpu_check_reference", _ref_attention)
AttentionMaskInterface.register("lt_gpu_check_reference", sdpa_mask)


# ---------------------------------------------------------------------------------------------------------
# 1. Streaming attention backends against the reference


def _layout(kind: str, B: int, T: int, sink: int, dev):
    """(pos [B, T], valid [B, T] or None, kwargs for streaming_attention) of a whole-row, packed or padded batch."""
    t = torch.arange(T, device=dev)
    if kind == "rows":
        return t.expand(B, T), None, {}
    if kind == "packed":  # documents of odd lengths, one shorter than the sinks, crossing query blocks
        lens = [T // 3 + 17, max(sink - 1, 1), T // 5 + 3]
        lens.append(T - sum(lens))
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])[None].expand(B, T)
        return pos, None, {"doc_pos": pos}
    pads = torch.tensor([0] + [T // 7 + 13 * b for b in range(1, B)], device=dev)
    valid = t[None] >= pads[:, None]
    pos = (t[None] - pads[:, None]).clamp(min=0)
    return pos, valid, {"pad": pads, "offset": pads}


def attention_case(kind: str, B: int, T: int, sink: int, window: int, dtype, backend: str, dev,
                   backward: bool = True, heads=(12, 2), head_dim: int = 128, ref_window: int | None = None) -> dict:
    """One backend on one layout against `dense_reference` (forward, and backward unless `backward=False`).
    `ref_window` lets a test give the reference a different window to prove the comparison can fail."""
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, heads[0], T, head_dim, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, heads[1], T, head_dim, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, heads[1], T, head_dim, device=dev, dtype=dtype, generator=g)
    pos, valid, kw = _layout(kind, B, T, sink, dev)
    q, k, v = (x.requires_grad_(backward) for x in (q, k, v))
    _sync(dev)
    t0 = time.perf_counter()
    out = streaming_attention(q, k, v, sink, window, backend=backend, **kw)
    _sync(dev)
    t_fwd = time.perf_counter() - t0
    ref = dense_reference(q, k, v, sink, ref_window or window, pos, valid)
    m = torch.ones(B, 1, T, 1, device=dev) if valid is None else valid[:, None, :, None].float()
    res = {"out_rel_err": rel_err(out.float() * m, ref * m),
           "out_max_abs": ((out.float() - ref) * m).abs().max().item(), "first_call_s": round(t_fwd, 2)}
    tol = 1e-3 if dtype == torch.float32 else 1.5e-2
    ok = res["out_rel_err"] < tol
    if backward:
        go = torch.randn(out.shape, device=dev, dtype=dtype, generator=g) * m.to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), go)
        ref_grads = torch.autograd.grad(ref, (q, k, v), go.float())
        errs = [rel_err(a, b) for a, b in zip(grads, ref_grads)]
        res["grad_rel_err"] = max(errs)
        ok = ok and res["grad_rel_err"] < (2 * tol)
    res["tolerance"] = tol
    res["ok"] = bool(ok)
    return res


def section_attention(run: Run, sz: dict, dev) -> None:
    backends = ["sdpa", "flex"] + (["flash_attn"] if flash_backend.is_available() else [])
    if not flash_backend.is_available():
        run.add("attention", "flash_attn", "skip", reason="flash-attn is not importable here (or no CUDA)")
    for dtype_name in sz["dtypes"]:
        dtype = getattr(torch, dtype_name)
        for kind, B, T, S, W in sz["att"]:
            for backend in backends:
                name = f"{backend} {kind} B={B} T={T} S={S} W={W} {dtype_name}"
                if backend == "flash_attn" and (dtype == torch.float32 or kind == "padded"):
                    continue  # flash-attn: fp16/bf16 only; left-padded batches are sent to sdpa by design
                backward = not (backend == "flex" and dev.type == "cpu")
                if not backward:
                    name += " (forward only: FlexAttention has no backward on CPU)"
                run.item("attention", name, lambda: attention_case(kind, B, T, S, W, dtype, backend, dev, backward,
                                                                   **_att_heads(sz)),
                         backend=backend, layout=kind, T=T, dtype=dtype_name)


def _att_heads(sz: dict) -> dict:
    return {"heads": (4, 2), "head_dim": 16} if sz["model"]["hidden_size"] <= 128 else {}


# ---------------------------------------------------------------------------------------------------------
# 2. Hybrid models against a reference model (tiny configs, fp32)

HYB_S, HYB_W, HYB_LAZY = 2, 16, [0, 2]  # layer 0 lazy on purpose: transformers reads lengths from layer 0


def _hybrid_pair(arch: str, dev, backend: str):
    torch.manual_seed(0)
    cfg = tiny_config(arch, 4)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dev).eval()
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("lt_gpu_check_reference")
    for m in ref.modules():
        if hasattr(m, "q_proj"):
            m.lt_ref = (HYB_S, HYB_W) if m.layer_idx in HYB_LAZY else None
    convert_to_hybrid(model, HybridConfig(HYB_LAZY, sink_tokens=HYB_S, window=HYB_W, backend=backend))
    return model, ref


@contextlib.contextmanager
def _flash_calls(backend: str):
    """Counts the calls of flash-attn's streaming path while a check runs: a check of `flash_attn` that never
    reached it (sent to sdpa, say, by left padding) must fail, not pass on another backend's numbers."""
    calls = [0]
    real = flash_backend.flash_streaming

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    if backend == "flash_attn":
        flash_backend.flash_streaming = counted
    try:
        yield calls
    finally:
        flash_backend.flash_streaming = real


def _flash_result(res: dict, backend: str, calls: list) -> dict:
    if backend == "flash_attn":
        res["flash_calls"] = calls[0]
        res["ok"] = bool(res["ok"] and calls[0] > 0)
    return res


def hybrid_forward_backward(arch: str, dev, backend: str, dtype=torch.float32) -> dict:
    with _flash_calls(backend) as calls:
        return _flash_result(_hybrid_forward_backward(arch, dev, backend, dtype), backend, calls)


def _hybrid_forward_backward(arch: str, dev, backend: str, dtype=torch.float32) -> dict:
    """Logits and every parameter's gradient of a hybrid model on two rows: a whole row and a packed row of
    three documents (one shorter than the sinks), against the reference model (fp32). `dtype`: the hybrid's
    (flash-attn runs bf16 only; the tolerances then allow for bf16 rounding)."""
    model, ref = _hybrid_pair(arch, dev, backend)
    model.to(dtype)
    tol = (1e-4, 1e-3) if dtype == torch.float32 else (3e-2, 6e-2)
    T = 300
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, T), generator=g).to(dev)
    lens = [120, 1, T - 121]
    pos = torch.stack([torch.arange(T), torch.cat([torch.arange(n) for n in lens])]).to(dev)
    res, grads = {}, {}
    for name, m in (("hybrid", model), ("reference", ref)):
        m.zero_grad(set_to_none=True)
        rows = []
        for r in range(2):  # one row per forward: transformers detects packing per batch
            kw = {"ref_valid": torch.ones(1, T, dtype=torch.bool, device=dev)} if m is ref else {}
            # use_cache=False as in training: transformers detects packed rows only when there is no cache
            rows.append(m(ids[r : r + 1], position_ids=pos[r : r + 1], use_cache=False, **kw).logits)
        logits = torch.cat(rows)
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(dev)
        (logits * w).sum().backward()
        res[name] = logits.detach()
        grads[name] = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    err = rel_err(res["hybrid"], res["reference"])
    gerr = max(rel_err(grads["hybrid"][n], grads["reference"][n]) for n in grads["reference"])
    missing = sorted(set(grads["reference"]) - set(grads["hybrid"]))
    return {"logits_rel_err": err, "grad_rel_err": gerr, "ok": err < tol[0] and gerr < tol[1] and not missing,
            "missing_grads": missing, "tolerance": tol}


def hybrid_decode_logits(arch: str, dev, backend: str, dtype) -> dict:
    with _flash_calls(backend) as calls:
        return _flash_result(_hybrid_decode_logits(arch, dev, backend, dtype), backend, calls)


@torch.no_grad()
def _hybrid_decode_logits(arch: str, dev, backend: str, dtype) -> dict:
    """Prefill (longer than S + W) under `backend` and 24 cached decode steps of the hybrid in `dtype` (a decode
    step attends over the ring with sdpa whatever the backend), teacher-forced with the reference's own greedy
    tokens: the logits of every step against the fp32 reference recomputing the whole sequence. Rows are left-
    padded except for flash-attn, which sends padded rows to sdpa by design."""
    model, ref = _hybrid_pair(arch, dev, backend)
    model.to(dtype)
    g = torch.Generator().manual_seed(4)
    B, T, new = 2, 40, 24
    pads = (0, 0) if backend == "flash_attn" else (0, 9)
    ids = torch.randint(3, 128, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p], am[b, :p] = 0, 0
    ids, am = ids.to(dev), am.to(dev)
    seq = _reference_greedy(ref, ids, am, new)
    full_am = torch.cat([am, torch.ones(B, new, dtype=am.dtype, device=dev)], 1)
    pos = (full_am.long().cumsum(-1) - 1).clamp(min=0)
    want = ref(seq, attention_mask=full_am, position_ids=pos, use_cache=False, ref_valid=full_am.bool()).logits
    out = model(seq[:, :T], attention_mask=am, position_ids=pos[:, :T], use_cache=True)
    cache, got = out.past_key_values, [out.logits[:, -1]]  # (transformers names the argument `cache` now)
    for t in range(T, T + new - 1):
        out = model(seq[:, t : t + 1], attention_mask=full_am[:, : t + 1], position_ids=pos[:, t : t + 1],
                    cache=cache, use_cache=True)
        got.append(out.logits[:, -1])
    err = rel_err(torch.stack(got, 1), want[:, T - 1 : T + new - 1])
    return {"logits_rel_err": err, "steps": new, "ok": err < 3e-2}


def _reference_greedy(ref, ids, am, steps: int, eos: int | None = None):
    """Greedy tokens by recomputing the whole sequence every step (no cache), positions as generate() sets."""
    for _ in range(steps):
        pos = (am.long().cumsum(-1) - 1).clamp(min=0)
        logits = ref(ids, attention_mask=am, position_ids=pos, use_cache=False, ref_valid=am.bool()).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    return ids


@torch.no_grad()
def hybrid_generate(arch: str, dev) -> dict:
    """Greedy `generate` (hybrid cache, prompt longer than S + W, left padding) token-identical to recompute."""
    model, ref = _hybrid_pair(arch, dev, "auto")
    g = torch.Generator().manual_seed(3)
    B, T, pads, new = 3, 40, (0, 7, 19), 32
    ids = torch.randint(3, 128, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        ids[b, :p], am[b, :p] = 0, 0
    ids, am = ids.to(dev), am.to(dev)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=new, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    expected = _reference_greedy(ref, ids, am, new)
    same = out.shape == expected.shape and torch.equal(out, expected)
    first_diff = None if same else int((out[:, T:] != expected[:, T:]).any(0).float().argmax())
    return {"ok": bool(same), "new_tokens": new, "first_differing_step": first_diff}


@torch.no_grad()
def evaluator_decode(arch: str, dev) -> dict:
    """The evaluator's decode loop (`lt_train.eval.sampling.generate_batch`: rows leave the batch at EOS) on
    CUDA, greedy, against recompute truncated at each row's first EOS."""
    from lt_train.eval.sampling import GenSettings, generate_batch

    model, ref = _hybrid_pair(arch, dev, "auto")
    tok = tiny_tokenizer()
    model.generation_config.eos_token_id = ref.generation_config.eos_token_id = 2
    prompts = ["What is 12 + 30? Think step by step.", "Hi", "A longer question about sinks and windows, please."]
    gs = GenSettings(1, True, 0.0, 1.0, 0, 40, len(prompts), 0, None, None)
    out = generate_batch(model, tok, prompts, gs, seeds=[0] * len(prompts))
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    full = _reference_greedy(ref, enc.input_ids.to(dev), enc.attention_mask.to(dev), gs.max_new_tokens)
    expected = []
    for row in full[:, enc.input_ids.shape[1]:].tolist():
        cut = row[: row.index(2) + 1] if 2 in row else row
        expected.append(tok.decode(cut, skip_special_tokens=True))
    compiled_out = generate_batch(model, tok, prompts, GenSettings(**{**gs.to_dict(), "compile": True}),
                                  seeds=[0] * len(prompts))
    return {"ok": out.texts == expected and compiled_out.texts == expected, "rows_finished_early": sum(out.finished),
            "compiled_same": compiled_out.texts == expected}


def section_hybrid(run: Run, sz: dict, dev) -> None:
    for arch in TINY_ARCHS:
        run.item("hybrid", f"{arch} forward+backward (sdpa streaming) vs reference",
                 lambda: hybrid_forward_backward(arch, dev, "sdpa"), arch=arch)
        if dev.type == "cuda":
            run.item("hybrid", f"{arch} forward+backward (flex streaming) vs reference",
                     lambda: hybrid_forward_backward(arch, dev, "flex"), arch=arch)
        run.item("hybrid", f"{arch} greedy generate (hybrid cache) == recompute", lambda: hybrid_generate(arch, dev),
                 arch=arch)
    if dev.type != "cuda":
        run.add("hybrid", "flex streaming forward+backward", "skip", reason="FlexAttention has no backward on CPU")
    # flash-attn is never picked by backend=auto until these have passed on a GPU (attention.FLASH_VERIFIED)
    if flash_backend.is_available():
        for arch in TINY_ARCHS:
            run.item("hybrid", f"{arch} forward+backward (flash_attn streaming, bf16) vs fp32 reference",
                     lambda: hybrid_forward_backward(arch, dev, "flash_attn", torch.bfloat16), arch=arch)
            run.item("hybrid", f"{arch} prefill (flash_attn, bf16) + cached decode logits vs fp32 reference",
                     lambda: hybrid_decode_logits(arch, dev, "flash_attn", torch.bfloat16), arch=arch)
    else:
        run.add("hybrid", "flash_attn streaming forward+backward and decode", "skip",
                reason="flash-attn is not importable here (or no CUDA)")
    run.item("hybrid", "evaluator decode loop (llama), eager and compiled, == recompute", lambda: evaluator_decode("llama", dev))


# ---------------------------------------------------------------------------------------------------------
# 3. Decode: hybrid vs the full model with static and dynamic caches


def use_variant(model, hc: HybridConfig | None) -> None:
    """Full model (transformers' own attention, no lt_train code in the path) for None, else hybrid with `hc`."""
    from lt_train.hybrid import CONFIG_KEY

    converted = getattr(model.config, CONFIG_KEY, None) is not None
    if hc is None:
        revert_hybrid(model)
    elif converted:
        set_lazy_layers(model, hc)
    else:
        convert_to_hybrid(model, hc)


def build_model(sz: dict, dev, dtype):
    from transformers import AutoConfig

    cfg = dict(sz["model"])
    arch = cfg.pop("model_type")
    config = AutoConfig.for_model(arch, **{k: v for k, v in cfg.items() if k in _CONFIG_KEYS})
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


_CONFIG_KEYS = set(QWEN2_1_5B) | {"head_dim", "pad_token_id", "bos_token_id", "eos_token_id"}


WARM_STEPS = 4  # decode steps before the timed ones (kernel selection, allocator, clocks)


def decode_prompt(run: Run, sz: dict, dev, model, prompt: int) -> None:
    """One model, switched between full (`revert_hybrid`: transformers' own attention) and hybrid (half the
    layers lazy) before each variant: the same weights for all three."""
    B, new, reps = sz["decode_batch"], sz["decode_new"], sz["decode_repeats"]
    g = torch.Generator().manual_seed(0)
    n = model.config.num_hidden_layers
    hc = HybridConfig(list(range(1, n, 2)), sz["sink"], sz["window"])
    use_variant(model, None)
    ids = torch.randint(100, model.config.vocab_size, (1, prompt), generator=g).to(dev)
    with torch.no_grad():
        prefill = DynamicCache(config=model.config)
        model(ids, cache=prefill, use_cache=True, logits_to_keep=1)
    first = torch.randint(100, model.config.vocab_size, (B, 1), generator=g).to(dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    length = prompt + WARM_STEPS + max(new, 8) + 2
    step = compiled(dev)
    makers = {  # name: (hybrid settings or None for the full model, cache kind, compiled step or None)
        "full_static": (None, "static", None),
        "full_dynamic": (None, "dynamic", None),
        "hybrid": (hc, "hybrid", None),
        "full_static_compiled": (None, "static", step),
        "hybrid_compiled": (hc, "hybrid_static", step),
    }
    results: dict[str, dict] = {}
    first_logits: dict[str, torch.Tensor] = {}
    tokens: dict[str, torch.Tensor] = {}

    def one(name):
        setting, kind, fn = makers[name]
        use_variant(model, setting)
        kw = {} if fn is None else {"step": fn}
        with _peak(dev) as mem:
            cache = make_cache(kind, model.config, length)
            fill(cache, prefill, B, prompt, dev)
            kv_start = cache_nbytes(cache)
            _, warm, first_logits[name] = decode(model, cache, first, prompt, WARM_STEPS, dev, **kw)
            secs, tokens[name], _ = decode(model, cache, warm[:, -1:], prompt + WARM_STEPS, new, dev, **kw)
            kv_end = cache_nbytes(cache)
            ops = ops_per_step(model, cache, tokens[name][:, -1:], prompt + WARM_STEPS + new, dev, **kw)
        del cache
        r = results.setdefault(name, {"seconds": []})
        r["seconds"].append(secs)
        r.update(kv_bytes_start=kv_start, kv_bytes_end=kv_end, peak_bytes=mem["peak"], peak_above_start=mem["above"],
                 ops_per_step=ops)
        return {"tokens_per_s": B * new / secs, "kv_gib": _gib(kv_end), "peak_gib": _gib(mem["peak"]),
                "ops_per_step": ops}

    for rep in range(reps):  # interleaved: machine noise hits all three alike
        for name in makers:
            run.item("decode", f"{name} prompt={prompt} batch={B} new={new} (repeat {rep + 1})", lambda: one(name),
                     variant=name, prompt=prompt, batch=B, new=new, repeat=rep)
    if run.args.profile_decode:
        profile_decode(run, model, makers, prefill, first, B, prompt, dev)
    del prefill
    if len(results) < len(makers):
        return
    for name in ("full_static", "hybrid"):  # the compiled step decodes the same tokens as the eager one
        same = torch.equal(tokens[name + "_compiled"], tokens[name])
        err = rel_err(first_logits[name + "_compiled"], first_logits[name])
        # fp32: greedy tokens must agree; bf16: inductor's fused kernels round differently, reported only
        status = ("pass" if same else "fail") if model.dtype == torch.float32 else "info"
        run.add("decode", f"{name} compiled vs eager, prompt={prompt}", status, same_tokens=same,
                logits_rel_err=err, prompt=prompt, dtype=str(model.dtype))
    # The static and dynamic caches hold the same keys, so the full model's first-step logits agree up to kernel
    # numerics: checked in fp32; in bf16 only reported (the static cache attends over its whole buffer with a
    # mask, another SDPA kernel, and 28 random-weight layers amplify bf16 rounding: 3.7e-2 measured on an H200).
    err = rel_err(first_logits["full_static"], first_logits["full_dynamic"])
    if model.dtype == torch.float32:
        status = "pass" if err < 1e-4 else "fail"
    else:
        status = "info"
    run.add("decode", f"full static vs full dynamic first-step logits, prompt={prompt}", status,
            logits_rel_err=err, prompt=prompt, dtype=str(model.dtype))
    summary = {}
    for name, r in results.items():
        tps = B * new / min(r["seconds"])
        # bytes per sequence: the measured peak over what was allocated before the cache (KV + decode workspace)
        per_seq = (r["peak_above_start"] if r["peak_above_start"] is not None else r["kv_bytes_end"]) / B
        fit = int((sz_budget(run) - weights) // per_seq) if per_seq else None
        summary[name] = {"tokens_per_s": tps, "kv_bytes": r["kv_bytes_end"], "peak_bytes": r["peak_bytes"],
                         "per_sequence_bytes": per_seq, "max_batch_in_budget": fit, "ops_per_step": r["ops_per_step"]}
    base = summary["full_static"]
    bound = (weights + base["kv_bytes"]) / (weights + summary["hybrid"]["kv_bytes"])
    ratio = summary["hybrid"]["tokens_per_s"] / base["tokens_per_s"]
    run.add("decode", f"summary prompt={prompt} batch={B}", "info", prompt=prompt, batch=B, new=new,
            weights_bytes=weights, variants=summary, hybrid_vs_static=ratio,
            hybrid_vs_dynamic=summary["hybrid"]["tokens_per_s"] / summary["full_dynamic"]["tokens_per_s"],
            compiled_hybrid_vs_compiled_static=(summary["hybrid_compiled"]["tokens_per_s"]
                                                / summary["full_static_compiled"]["tokens_per_s"]),
            ops_hybrid_vs_static=summary["hybrid"]["ops_per_step"] / summary["full_static"]["ops_per_step"],
            bytes_bound_vs_static=bound, fraction_of_bound=ratio / bound, budget_gb=run.args.budget_gb)


def profile_decode(run: Run, model, makers, prefill, first, B: int, prompt: int, dev) -> None:
    """torch.profiler tables (8 decode steps per variant) into OUT/decode_profile_<prompt>.txt: where a
    step's time goes, host or device."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    path = os.path.join(run.args.out, f"decode_profile_{prompt}.txt")
    with open(path, "w") as f:
        for name, (setting, kind, fn) in makers.items():
            use_variant(model, setting)
            kw = {} if fn is None else {"step": fn}
            cache = make_cache(kind, model.config, prompt + WARM_STEPS + 9)
            fill(cache, prefill, B, prompt, dev)
            decode(model, cache, first, prompt, WARM_STEPS, dev, **kw)
            with profile(activities=acts) as prof:
                secs, _, _ = decode(model, cache, first, prompt + WARM_STEPS, 8, dev, **kw)
            del cache
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            f.write(f"== {name}: 8 steps in {secs:.3f}s (wall, profiled) ==\n")
            f.write(prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
            f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15) + "\n")
            _free()
    run.add("decode", f"profile prompt={prompt}", "info", path=path)


def sz_budget(run: Run) -> float:
    return run.args.budget_gb * 2**30


def section_decode(run: Run, sz: dict, dev) -> None:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_model(sz, dev, dtype)
    for prompt in sz["decode_prompts"]:
        if run.over_budget():
            run.add("decode", f"prompt={prompt}", "skip", reason="time budget spent")
            continue
        try:
            decode_prompt(run, sz, dev, model, prompt)
        except Exception as e:  # noqa: BLE001
            run.add("decode", f"prompt={prompt}", "fail", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        _free()
    del model


# ---------------------------------------------------------------------------------------------------------
# 4. One training step: full vs hybrid, LoRA and full fine-tuning


def _train_step(model, opt, ids, dev) -> tuple[float, float]:
    T = ids.shape[1]
    pos = torch.arange(T, device=dev)[None]
    hidden = decoder_of(model)(input_ids=ids, position_ids=pos).last_hidden_state
    loss = lm_head_loss_sum(model, hidden, ids) / (T - 1)
    loss.backward()
    gn = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1e9)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach()), float(gn)  # host syncs: once per step


def section_train(run: Run, sz: dict, dev) -> None:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    variants = ["full", "hybrid_sdpa"] + (["hybrid_flex"] if dev.type == "cuda" else [])
    if dev.type != "cuda":
        run.add("train", "hybrid_flex", "skip", reason="FlexAttention has no backward on CPU")
    for mode in ("lora", "full"):
        if run.over_budget():
            run.add("train", mode, "skip", reason="time budget spent")
            continue
        model = build_model(sz, dev, dtype)
        n = model.config.num_hidden_layers
        if hasattr(model, "activation_checkpointing_enable"):  # the v5.24 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        base = model
        if mode == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError as e:
                run.add("train", "lora", "skip", reason=f"peft not importable: {e}")
                continue
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        lazy = list(range(1, n, 2))
        setting = {"full": None,
                   "hybrid_sdpa": HybridConfig(lazy, sz["sink"], sz["window"], backend="sdpa"),
                   "hybrid_flex": HybridConfig(lazy, sz["sink"], sz["window"], backend="flex")}
        for T in sz["train_lengths"]:
            ids = torch.randint(100, base.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T)).to(dev)
            times: dict[str, list[float]] = {v: [] for v in variants}
            for rep in range(1 + sz["train_repeats"]):  # the first round warms up (and compiles flex)
                for var in variants:
                    def step(var=var, rep=rep):
                        use_variant(base, setting[var])
                        with _peak(dev) as mem:
                            _sync(dev)
                            t0 = time.perf_counter()
                            loss, gn = _train_step(model, opt, ids, dev)
                            _sync(dev)
                            dt = time.perf_counter() - t0
                        if not (math.isfinite(loss) and math.isfinite(gn)):
                            return {"ok": False, "loss": loss, "grad_norm": gn}
                        if rep:
                            times[var].append(dt)
                        return {"seconds": dt, "tokens_per_s": T / dt, "loss": loss, "grad_norm": gn,
                                "peak_gib": _gib(mem["peak"]), "step_peak_above_start_gib": _gib(mem["above"]),
                                "warmup": rep == 0}
                    run.item("train", f"{mode} {var} T={T} ({'warm-up' if rep == 0 else f'step {rep}'})", step,
                             mode=mode, variant=var, T=T, repeat=rep)
            done = {v: min(ts) for v, ts in times.items() if ts}
            if "full" in done and len(done) > 1:
                run.add("train", f"summary {mode} T={T}", "info", mode=mode, T=T,
                        tokens_per_s={v: T / s for v, s in done.items()},
                        speedup_vs_full={v: done["full"] / s for v, s in done.items()},
                        peak_gib=_train_peaks(run, mode, T))
        revert_hybrid(base)
        del model, base, opt
        _free()


def _train_peaks(run: Run, mode: str, T: int) -> dict:
    out = {}
    for r in run.records:
        if (r["section"] == "train" and r.get("mode") == mode and r.get("T") == T and r.get("peak_gib") is not None
                and not r.get("warmup")):  # the warm-up step also allocates the optimizer states
            out[r["variant"]] = max(out.get(r["variant"], 0), r["peak_gib"])
    return out


# ---------------------------------------------------------------------------------------------------------
# Report


def print_tables(run: Run) -> None:
    recs = run.records
    print("\n== correctness (attention, hybrid) ==")
    print(f"{'status':<6} {'check':<78} {'out err':>9} {'grad err':>9}")
    for r in recs:
        if r["section"] in ("attention", "hybrid"):
            e1 = r.get("out_rel_err", r.get("logits_rel_err"))
            e2 = r.get("grad_rel_err")
            print(f"{r['status']:<6} {r['name'][:78]:<78} {_fmt(e1):>9} {_fmt(e2):>9}")
    for r in recs:
        if r["section"] == "decode" and "logits_rel_err" in r:
            print(f"{r['status']:<6} {r['name'][:78]:<78} {_fmt(r['logits_rel_err']):>9}")
    for r in recs:
        if r["section"] == "decode" and r["status"] == "info" and "variants" in r:
            print(f"\n== decode: prompt {r['prompt']}, batch {r['batch']}, {r['new']} new tokens ==")
            print(f"{'variant':<21} {'tok/s':>8} {'KV GiB':>8} {'peak GiB':>9} {'ops/step':>8} "
                  f"{'max batch in ' + str(r['budget_gb']) + ' GB':>18}")
            for name, v in r["variants"].items():
                print(f"{name:<21} {v['tokens_per_s']:>8.1f} {_gib(v['kv_bytes']):>8.2f} "
                      f"{_fmt(_gib(v['peak_bytes'])):>9} {v['ops_per_step']:>8} {str(v['max_batch_in_budget']):>18}")
            print(f"hybrid / static {r['hybrid_vs_static']:.2f}x, hybrid / dynamic {r['hybrid_vs_dynamic']:.2f}x, "
                  f"compiled hybrid / compiled static {r['compiled_hybrid_vs_compiled_static']:.2f}x, "
                  f"bytes bound vs static {r['bytes_bound_vs_static']:.2f}x ({r['fraction_of_bound']:.0%} of it), "
                  f"ops per step hybrid / static {r['ops_hybrid_vs_static']:.2f}x")
    rows = [r for r in recs if r["section"] == "train" and r["status"] == "info"]
    if rows:
        print("\n== training step (tokens/s; peak GiB) ==")
        for r in rows:
            parts = ", ".join(f"{v} {tps:.0f} tok/s ({r['speedup_vs_full'][v]:.2f}x) peak {_fmt(r['peak_gib'].get(v))}"
                              for v, tps in r["tokens_per_s"].items())
            print(f"{r['mode']:<5} T={r['T']:<6} {parts}")
    bad = [r for r in recs if r["status"] == "fail"]
    skipped = [r for r in recs if r["status"] == "skip"]
    print(f"\n{len(recs)} records: {len(bad)} failed, {len(skipped)} skipped; {run.elapsed():.0f}s; "
          f"{os.path.join(run.args.out, 'gpu_check.json')}")
    for r in bad:
        print(f"FAILED {r['section']}: {r['name']}: {(r.get('error') or json.dumps({k: r[k] for k in r if k.endswith('err')}))[:400]}")


def _fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.2e}" if isinstance(x, float) and abs(x) < 1e-2 else (f"{x:.3f}" if isinstance(x, float) else str(x))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/gpu_check")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU test of every code path)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a first smoke run on the GPU")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip remaining items after this many seconds")
    ap.add_argument("--budget-gb", type=float, default=80.0, help="memory budget for the largest-batch figure")
    ap.add_argument("--profile-decode", action="store_true", help="also write torch.profiler tables of decode steps")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA device; use --device cpu --tiny on a machine without a GPU")
    dev = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # one graph per shape
    run = Run(args)
    sz = sizes(args)
    print(json.dumps(run.meta), flush=True)
    steps = {"attention": section_attention, "hybrid": section_hybrid, "decode": section_decode,
             "train": section_train}
    for s in SECTIONS:
        if s in only:
            run.start_section(s)
            try:
                steps[s](run, sz, dev)
            except Exception as e:  # noqa: BLE001
                run.add(s, "section", "fail", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            _free()
    print_tables(run)
    return 1 if any(r["status"] == "fail" for r in run.records) else 0


if __name__ == "__main__":
    sys.exit(main())
