"""Greedy answers to query prompts, batched with left padding."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from client.adapters import ResidentModel


@torch.inference_mode()
def generate_answers(
    resident: ResidentModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_prompt_tokens: int,
    batch_size: int = 8,
    autocast_bf16: bool = False,
) -> list[str]:
    """Greedy decoding (deterministic, as evaluation must be); long prompts keep their newest tokens."""
    tokenizer = resident.tokenizer
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
            for p in prompts[start : start + batch_size]
        ]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            attention[i, width - len(row) :] = 1
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        with autocast:
            output = resident.peft.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        answers.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    return answers
