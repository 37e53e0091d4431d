"""Run one model over a benchmark: generate the missing samples batch by batch, grade, store, summarise."""
from __future__ import annotations

import logging

import torch

from .benchmarks import Problem
from .grader import Grader, extract_answer
from .metrics import aggregate, problem_metrics
from .sampling import BatchOutput, GenSettings, build_prompt, generate_batch, plan_batches, sample_seed
from .store import SampleStore

log = logging.getLogger(__name__)


def generate_missing(model, tokenizer, problems: list[Problem], gs: GenSettings, mode: str, store: SampleStore,
                     grader: Grader, progress: bool = True, desc: str = "eval", rank: int = 0, world: int = 1
                     ) -> int:
    """Generate and grade every sample `store` does not hold yet; returns how many this process generated.

    A batch with any missing sample is generated whole (its rows with their own seeds), so they come out as
    they would have in an uninterrupted run; only the missing rows are written. With `world` processes, each
    takes every world-th of the unfinished batches (all processes see the same store, so they agree on the
    list)."""
    from tqdm.auto import tqdm

    prompts = [build_prompt(tokenizer, p.question, gs.instruction, gs.system_prompt) for p in problems]
    plan = plan_batches(len(problems), gs.n_samples, gs.batch_size)
    todo = [(b, rows) for b, rows in enumerate(plan) if any(not store.done(problems[p].id, s) for p, s in rows)]
    todo = todo[rank::world]
    missing = sum(not store.done(problems[p].id, s) for _, rows in todo for p, s in rows)
    if len(store.records) and rank == 0:
        log.info("%s: resuming, %d samples done, this process generates %d more", desc, len(store.records), missing)
        earlier = {r.get("batch_size") for r in store.records.values()} - {gs.batch_size}
        if earlier and missing:
            log.warning("%s: earlier samples were generated in batches of %s, the rest in batches of %d: each "
                        "sample keeps its own seed, but a different batch shape can still flip a near-tie",
                        desc, sorted(earlier), gs.batch_size)
    bar = tqdm(total=missing, desc=desc, unit="sample", disable=not progress)
    tokens = seconds = 0.0
    for b, rows in todo:
        seeds = [sample_seed(gs.seed, p, s, gs.n_samples) for p, s in rows]
        splits: list[int] = []
        out = generate_halving(model, tokenizer, [prompts[p] for p, _ in rows], gs, seeds, splits)
        records = []
        for (p, s), seed, text, n_tok, fin in zip(rows, seeds, out.texts, out.tokens, out.finished):
            prob = problems[p]
            if store.done(prob.id, s):
                continue
            before, crashes = grader.timeouts, grader.crashes
            records.append({
                "problem": prob.id, "index": p, "sample": s, "batch": b, "batch_size": gs.batch_size, "seed": seed,
                "answer": extract_answer(text, mode), "correct": grader.grade(text, prob.answer, mode),
                "grade_timeout": grader.timeouts > before, "grade_crash": grader.crashes > crashes,
                "oom_splits": splits, "tokens": n_tok, "finished": fin,
                "batch_tokens": sum(out.tokens), "batch_seconds": round(out.seconds, 4),
                "kv_bytes": out.kv_bytes, "output": text})
        store.append(records)
        tokens += sum(out.tokens)
        seconds += out.seconds
        bar.update(len(records))
        bar.set_postfix(tok_s=f"{tokens / max(seconds, 1e-9):.1f}", kv_MiB=f"{out.kv_bytes / 2**20:.0f}")
    bar.close()
    return missing


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def generate_halving(model, tokenizer, prompts: list[str], gs: GenSettings, seeds: list[int], splits: list[int]
                     ) -> BatchOutput:
    """`generate_batch`, and on an out-of-memory error the two halves of the batch one after the other (down to
    one row; then a clear error). Each row samples with its own seed, so its tokens do not depend on the split.
    The sizes of the batches that were split are appended to `splits`."""
    try:
        return generate_batch(model, tokenizer, prompts, gs, seeds)
    except Exception as e:  # noqa: BLE001 - only out-of-memory errors are handled; the rest re-raise
        if not _is_oom(e):
            raise
        if len(prompts) == 1:
            raise RuntimeError(f"out of memory generating one sample alone (max_new_tokens={gs.max_new_tokens}): "
                               "lower eval.max_new_tokens, or use a device with more memory") from e
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(prompts) // 2
    log.warning("out of memory in a batch of %d: generating it as %d + %d", len(prompts), half, len(prompts) - half)
    splits.append(len(prompts))
    a = generate_halving(model, tokenizer, prompts[:half], gs, seeds[:half], splits)
    b = generate_halving(model, tokenizer, prompts[half:], gs, seeds[half:], splits)
    return BatchOutput(a.texts + b.texts, a.tokens + b.tokens, a.finished + b.finished, a.seconds + b.seconds,
                       max(a.kv_bytes, b.kv_bytes))


def summarize(records: dict, problems: list[Problem], gs: GenSettings, mode: str, grader: Grader
              ) -> tuple[dict, list[dict]]:
    """Accuracy, length, throughput and memory of a finished run; and one row per problem."""
    rows, all_recs = [], []
    for prob in problems:
        recs = [records.get((prob.id, s)) for s in range(gs.n_samples)]
        if any(r is None for r in recs):
            raise ValueError(f"problem {prob.id!r} has {sum(r is not None for r in recs)}/{gs.n_samples} "
                             "samples; the run is incomplete")
        all_recs += recs
        m = problem_metrics([r["correct"] for r in recs], [r["answer"] for r in recs], mode,
                            grader.equivalent if mode == "math" else None)
        rows.append(dict(id=prob.id, reference=prob.answer, **m,
                         mean_tokens=sum(r["tokens"] for r in recs) / len(recs),
                         truncated=sum(not r["finished"] for r in recs)))
    summary = aggregate(rows)
    # per-batch statistics ride on each of the batch's samples (a resume may have changed the batch size)
    batches = {(r.get("batch_size"), r["batch"]): r for r in all_recs}
    gen_tokens = sum(r["batch_tokens"] for r in batches.values())
    gen_seconds = sum(r["batch_seconds"] for r in batches.values())
    n = len(all_recs)
    summary.update({
        "samples": n,
        "mean_output_tokens": sum(r["tokens"] for r in all_recs) / n,
        "truncated": sum(not r["finished"] for r in all_recs),
        "no_answer": sum(r["answer"] is None for r in all_recs),
        "grader_timeouts": sum(bool(r.get("grade_timeout")) for r in all_recs),
        "grader_crashes": sum(bool(r.get("grade_crash")) for r in all_recs),
        "oom_splits": sum(len(r.get("oom_splits") or []) for r in batches.values()),
        "tokens_per_s": gen_tokens / gen_seconds if gen_seconds > 0 else float("nan"),
        "generation_seconds": gen_seconds,
        "peak_kv_bytes": max(r["kv_bytes"] for r in all_recs),
        "batch_size": gs.batch_size,
    })
    return summary, rows
