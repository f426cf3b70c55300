"""Prompts: the user's profile and retrieved history, then the task's question; and the target after it.

Training and evaluation both build prompts here, so an adapter is always asked in the shape it learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from common.data import Item
from common.tasks import Task


def count_tokens(text: str, tokenizer=None) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False))


def cut_text(text: str, max_tokens: int, tokenizer=None) -> str:
    """The first `max_tokens` tokens of `text` (whitespace words without a tokenizer), as OPPU cuts items."""
    if tokenizer is None:
        words = text.split()
        return text if len(words) <= max_tokens else " ".join(words[:max_tokens])
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def build_prompt(
    task: Task,
    input: str,
    *,
    retrieved: Sequence[Item] = (),
    profile: str | None = None,
    tokenizer=None,
    max_item_tokens: int = 64,
    max_context_tokens: int = 512,
) -> str:
    """Profile, then retrieved items (most relevant first) while they fit the budget, then the question.

    Each retrieved item's input and output are cut to `max_item_tokens`; the question itself is never cut.
    """
    blocks: list[str] = []
    budget = max_context_tokens
    if profile and profile.strip():
        text = cut_text(profile.strip(), budget, tokenizer)
        budget -= count_tokens(text, tokenizer)
        blocks.append(text)
    lines: list[str] = []
    for item in retrieved:
        short = replace(
            item,
            input=cut_text(item.input, max_item_tokens, tokenizer),
            output=cut_text(item.output, max_item_tokens, tokenizer),
        )
        line = task.format_retrieved(short)
        cost = count_tokens(line, tokenizer)
        if cost > budget:
            break
        budget -= cost
        lines.append(line)
    if lines:
        blocks.append("\n".join(lines))
    blocks.append(task.query_prompt(input))
    return "\n".join(blocks)


def target_text(task: Task, item: Item) -> str:
    """What follows the prompt: prompts end with "tag:", "score:"..., so the answer starts with a space."""
    return " " + item.output
