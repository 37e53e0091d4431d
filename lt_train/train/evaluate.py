"""Evaluation used by the training job: held-out NLL on response tokens, and accuracy on held-out problems of an
embedded task (`validation.task`: `demo` arithmetic or the long-range `recall`), for the model with every layer
full and as the hybrid (and, after training, with every layer streaming: the control).

Every rank takes part: the rows (problems) are shared out round-robin and the sums reduced, so no rank waits at
a collective while another evaluates alone. `lockstep` (a ZeRO-3 partitioned model, whose every module call
gathers its weights, a collective): each rank makes the same number of forwards with the same number of LM-head
calls, a rank with fewer rows repeating one and discarding it.
"""
from __future__ import annotations

import math
import time

import torch

from ..data import Example
from ..distributed import all_reduce_sum, share, world
from ..hybrid import HybridConfig, set_lazy_layers
from ..eval.grader import grade_integer
from ..eval.sampling import GenSettings, build_prompt, generate_batch
from ..nll import HEAD_CHUNK, token_nll


def heldout_nll(model, encoded, rank: int = 0, world: int = 1, lockstep: bool = False) -> float:
    """Mean NLL on the response tokens of encoded examples (token-weighted over all of them)."""
    dev = next(model.parameters()).device
    n_chunks = math.ceil(max(len(e.input_ids) for e in encoded) / HEAD_CHUNK) if lockstep else None
    total = count = 0.0
    for i, counted in share(len(encoded), rank, world, lockstep):
        e = encoded[i]
        t, c = token_nll(model, e.input_ids.to(dev), labels=e.labels[None].to(dev), chunk=HEAD_CHUNK,
                         n_chunks=n_chunks)
        if counted:
            total, count = total + t, count + c
    return all_reduce_sum(total, dev) / max(all_reduce_sum(count, dev), 1)


def demo_accuracy(model, tokenizer, problems: list[Example], max_new_tokens: int, batch_size: int = 8,
                  rank: int = 0, world: int = 1, lockstep: bool = False) -> float:
    """Greedy answers to demo problems (prompt through the chat template), graded on the boxed integer; batches
    shared out over the ranks."""
    if not problems:
        return float("nan")
    dev = next(model.parameters()).device
    gs = GenSettings(1, True, 0.0, 1.0, 0, max_new_tokens, batch_size, 0, None, None)
    batches = [problems[s : s + batch_size] for s in range(0, len(problems), batch_size)]
    correct = 0
    for b, counted in share(len(batches), rank, world, lockstep):
        chunk = batches[b]
        out = generate_batch(model, tokenizer, [build_prompt(tokenizer, p.question) for p in chunk], gs,
                             seeds=[0] * len(chunk), lockstep=lockstep)
        if counted:
            correct += sum(grade_integer(t, p.answer) for t, p in zip(out.texts, chunk))
    return all_reduce_sum(correct, dev) / len(problems)


TASKS = ("demo", "recall")
ANSWER_TOKENS = {"demo": 320, "recall": 48}  # a recall answer is one short sentence


def answer_tokens(vcfg) -> int:
    """`validation.max_new_tokens`, or the task's own when null."""
    n = vcfg.get("max_new_tokens")
    return int(n) if n is not None else ANSWER_TOKENS[vcfg.get("task", "demo")]


HELDOUT_SEED = 10_000  # the training data's tasks use seed 0: problems no training row holds


def accuracy_problems(vcfg, dcfg) -> list[Example]:
    """`validation.accuracy_problems` held-out problems of `validation.task`; a recall task takes its context
    sizes from the data config when that is recall too (the problems then look like the training rows)."""
    n = int(vcfg.get("accuracy_problems") or 0)
    task = vcfg.get("task", "demo")
    if task not in TASKS:
        raise ValueError(f"validation.task={task!r}: choose one of {TASKS}")
    if not n:
        return []
    if task == "recall":
        from ..data.sources import recall_examples_from

        return recall_examples_from(dcfg if dcfg.get("source") == "recall" else {}, n, HELDOUT_SEED)
    from ..data import demo_examples

    return demo_examples(n, seed=HELDOUT_SEED, min_steps=vcfg.accuracy_min_steps, max_steps=vcfg.accuracy_max_steps)


def evaluate(cfg, model, data, label: str, results: dict, lockstep: bool) -> None:
    """One evaluation on every rank (rows shared out, sums reduced); the result in `results[label]`."""
    rank, world_size = world()
    training = model.training
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        nll = heldout_nll(model, data.heldout, rank, world_size, lockstep)
        acc = demo_accuracy(model, data.tok, data.problems, answer_tokens(cfg.validation),
                            cfg.validation.batch_size, rank, world_size, lockstep) if data.problems else None
    model.train(training)
    results[label] = {"heldout_nll": round(nll, 4), "demo_accuracy": acc}
    if rank == 0:
        print(f"eval {label}: held-out NLL {nll:.4f}, {cfg.validation.get('task', 'demo')} accuracy {acc} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


def evaluate_pair(cfg, model, data, when: str, results: dict, lockstep: bool, control: bool = False) -> None:
    """The model with every layer full, then as the hybrid it is (its lazy layers back afterwards); with
    `control` and `validation.streaming_control`, also with every layer streaming (what the full layers add)."""
    if not cfg.validation.enabled:
        return
    hc = HybridConfig.from_model_config(model.config)
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    set_lazy_layers(model, HybridConfig([], hc.sink_tokens, hc.window, hc.backend))
    evaluate(cfg, model, data, f"full, {when}", results, lockstep)
    if control and cfg.validation.get("streaming_control", False):
        set_lazy_layers(model, HybridConfig(list(range(n)), hc.sink_tokens, hc.window, hc.backend))
        evaluate(cfg, model, data, f"every layer streaming, {when}", results, lockstep)
    set_lazy_layers(model, hc)
    evaluate(cfg, model, data, f"hybrid, {when}", results, lockstep)
