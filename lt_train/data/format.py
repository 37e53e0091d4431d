"""Turning an example into token ids through the tokenizer's chat template, with a loss mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .example import Example


@dataclass
class EncodedExample:
    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T], -100 where no loss is taken
    truncated: bool = False


def encode_example(tokenizer, ex: Example, system_prompt: str | None = None, max_length: int | None = None,
                   policy: str = "truncate", loss_on_prompt: bool = False) -> EncodedExample | None:
    """prompt (chat template, generation prompt) + response + EOS. Loss on the response only by default.

    Longer than `max_length`: policy 'truncate' keeps the prompt and cuts the response; 'drop' returns None."""
    messages = []
    system = ex.system or system_prompt
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": ex.question})
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
            prompt = prompt["input_ids"]
    else:
        prompt = tokenizer((system + "\n\n" if system else "") + ex.question + "\n\n").input_ids
    response = tokenizer(ex.response, add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    prompt, response = list(prompt), list(response)
    truncated = False
    if max_length is not None and len(prompt) + len(response) > max_length:
        if policy == "drop":
            return None
        if policy != "truncate":
            raise ValueError(f"max_length policy must be 'truncate' or 'drop', got {policy!r}")
        if len(prompt) >= max_length:
            return None  # nothing of the response would remain: counted as dropped by the caller
        response = response[: max_length - len(prompt)]
        truncated = True
    ids = torch.tensor(prompt + response, dtype=torch.long)
    labels = ids.clone()
    if not loss_on_prompt:
        labels[: len(prompt)] = -100
    return EncodedExample(ids, labels, truncated)
