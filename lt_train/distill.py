"""Self-distillation: train the hybrid to predict what the original model predicts.

The teacher is the same weights with every layer on full attention and, under LoRA, the adapters disabled: the
model before LightTransfer-Train, with no second copy in memory. Its decoder states come from one no-grad forward
(`teacher_states`); both models' logits are then made chunk by chunk from the states by the one LM head, so
neither the student's nor the teacher's T x vocab logits exist at once. The loss per target token is the forward
KL(teacher || student) of the next-token distributions at temperature `temperature` (times T^2, so that its
gradient keeps the scale of T=1), optionally on the teacher's `top_k` most likely tokens only (both distributions
renormalised over those tokens, so that the loss is 0 exactly when the student matches the teacher there), summed
over the tokens that have a target.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hybrid import attention_modules
from .nll import HEAD_CHUNK, _targets, chunked_sum, decoder_of, tiled_head_loss, tiled_shards


@dataclass(frozen=True)
class DistillSettings:
    temperature: float = 1.0
    top_k: int = 0  # 0: the exact KL over the whole vocabulary

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"train.distill.temperature must be > 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"train.distill.top_k must be an integer >= 0 (0: exact), got {self.top_k!r}")


@contextlib.contextmanager
def as_teacher(model):
    """Every layer on full attention and (peft models) the adapters off, for the duration."""
    mods = attention_modules(model)
    saved = [m.__dict__.get("lt_streaming") for m in mods]
    try:
        for m in mods:
            if "lt_streaming" in m.__dict__:
                m.lt_streaming = None
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield model
    finally:
        for m, s in zip(mods, saved):
            if s is not None:
                m.lt_streaming = s


@torch.no_grad()
def teacher_states(model, inputs: dict) -> torch.Tensor:
    """The original model's last decoder states [B, T, H] for `inputs` (no gradient, no logits)."""
    with as_teacher(model):
        return decoder_of(model)(**inputs).last_hidden_state


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
           s: DistillSettings) -> torch.Tensor:
    """Sum over masked positions of KL(teacher || student) between softmax(logits / T), times T^2."""
    t = s.temperature
    student, teacher = student_logits.float(), teacher_logits.float().detach()
    if t != 1.0:
        student, teacher = student / t, teacher / t
    if s.top_k:  # both over the teacher's k most likely tokens
        teacher, idx = teacher.topk(min(s.top_k, teacher.shape[-1]), dim=-1)
        student = student.gather(-1, idx)
    log_p, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
    per_token = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return (per_token * mask).sum() * t * t


def head_kl_sum(model, hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
                s: DistillSettings, chunk: int = HEAD_CHUNK, shifted: bool = False) -> torch.Tensor:
    """`kl_sum` of the positions that have a target (labels != -100; `shifted` as in `nll.lm_head_loss_sum`),
    the head applied per chunk and each chunk checkpointed (its logits are not kept for backward)."""
    head = model.get_output_embeddings()
    x, y = _targets(hidden, labels, shifted)
    xt, _ = _targets(teacher_hidden, labels, shifted)

    def part(h, ht, m):
        with torch.no_grad():
            teacher = head(ht)
        return kl_sum(head(h), teacher, m, s)

    return chunked_sum(part, (x, xt, (y != -100).float()), chunk)


def zero3_head_kl_sum(model, hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor,
                      s: DistillSettings, scale: float, chunk: int = HEAD_CHUNK, shifted: bool = False,
                      length: int | None = None) -> torch.Tensor:
    """`head_kl_sum` x `scale` under ZeRO-3, through DeepSpeed's tiled loss like `nll.zero3_head_loss_sum`: the
    teacher's states ride along as the tiled loss's `y`, the target mask as its `mask`, so each shard makes both
    logits while the head's weight is gathered once."""
    x, y = _targets(hidden, labels, shifted)
    xt, _ = _targets(teacher_hidden, labels, shifted)
    mask = (y != -100).float()
    shards, x, xt, mask = tiled_shards(chunk, length, x, xt, mask)

    def fn(head_module, xs, ts, ms):
        with torch.no_grad():
            teacher = head_module(ts)
        return kl_sum(head_module(xs), teacher, ms, s) * scale

    return tiled_head_loss(model, fn, x, xt, mask, shards)
