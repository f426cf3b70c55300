"""Textual user profiles (PAG): a short description of a user, built from their history on their client.

Two modes: the base model writes the profile from OPPU's profile prompt (slow, one generation per user,
so it is cached on the client's disk), or a deterministic summary of labels, ratings, words and lengths
(instant). Either way the text stays on the client: it is part of the prompt, never of an update.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from common.data import Item
from common.io import atomic_write_text
from common.prompts import cut_text
from common.retrieval import tokenize_words
from common.tasks import CLASSIFICATION, RATING, Task


def _top(counter: Counter, n: int, total: int | None = None) -> str:
    if total is None:
        return ", ".join(key for key, _ in counter.most_common(n))
    return ", ".join(f"{key} ({100 * count / total:.0f}%)" for key, count in counter.most_common(n))


def summary_profile(task: Task, history: Sequence[Item]) -> str:
    """Most frequent labels (or ratings, or opening words), topical words and typical lengths."""
    if not history:
        return "No history yet."
    n = len(history)
    outputs = [item.output for item in history]
    parts = [f"User profile from {n} past items."]
    if task.kind == CLASSIFICATION and task.input_fields:  # else the outputs are the user's own writing
        parts.append(f"Most frequent labels: {_top(Counter(outputs), 3, n)}.")
    elif task.kind == RATING:
        ratings = [float(output) for output in outputs]
        parts.append(
            f"Mean rating {statistics.mean(ratings):.1f}; most common ratings: {_top(Counter(outputs), 3, n)}."
        )
    else:
        words = [output.split() for output in outputs]
        openings = Counter(w[0].lower() for w in words if w)
        endings = Counter(w[-1].lower() for w in words if w)
        output_words = Counter(word for output in outputs for word in tokenize_words(output))
        parts.append(
            f"Typical output length {statistics.median(len(w) for w in words):.0f} words; "
            f"common first words: {_top(openings, 3, n)}; common last words: {_top(endings, 3, n)}; "
            f"frequent words: {_top(output_words, 8)}."
        )
    input_words = Counter(word for item in history for word in tokenize_words(item.input))
    if input_words:
        lengths = [len(item.input.split()) for item in history]
        parts.append(
            f"Frequent topics: {_top(input_words, 8)}; typical input length {statistics.median(lengths):.0f} words."
        )
    return " ".join(parts)


def profile_prompt(task: Task, history: Sequence[Item], *, max_items: int = 20, tokenizer=None) -> str:
    """OPPU's profile prompt over the user's newest items, each field cut to its first 48 tokens."""
    recent = history[-max_items:] if max_items > 0 else []
    lines = [
        task.format_retrieved(
            replace(
                item, input=cut_text(item.input, 48, tokenizer), output=cut_text(item.output, 48, tokenizer)
            )
        )
        for item in recent
    ]
    return task.profile_prompt.format(history="\n".join(lines))


def generated_profile(
    task: Task, history: Sequence[Item], model, tokenizer, *, max_items: int = 20, max_new_tokens: int = 96
) -> str:
    """The base model's own description of the user (greedy, so a cached profile is reproducible)."""
    prompt = profile_prompt(task, history, max_items=max_items, tokenizer=tokenizer)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def history_fingerprint(history: Sequence[Item]) -> str:
    """Changes whenever the history does, so a cached profile is never stale."""
    payload = json.dumps([asdict(item) for item in history], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ProfileCache:
    """Profiles on the client's disk, one file per user, mode and history fingerprint."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def get_or_build(self, user_id: str, mode: str, history: Sequence[Item], build: Callable[[], str]) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", mode):
            raise ValueError(f"profile mode must be letters, digits, '_' or '-', got {mode!r}")
        path = self._user_dir(user_id) / f"{mode}-{history_fingerprint(history)[:32]}.txt"
        if path.is_file():
            return path.read_text(encoding="utf-8")
        text = build()
        for stale in path.parent.glob(f"{mode}-*.txt"):
            stale.unlink()
        atomic_write_text(path, text)
        return text

    def delete(self, user_id: str) -> int:
        """Forget a user's profiles (e.g. when they withdraw); returns how many files were removed."""
        directory = self._user_dir(user_id)
        paths = list(directory.glob("*"))
        for path in paths:
            path.unlink()
        if directory.is_dir():
            directory.rmdir()
        return len(paths)

    def _user_dir(self, user_id: str) -> Path:
        # A readable prefix plus a hash: any user id maps to one safe directory name, without collisions.
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:48]
        return self.root / f"{safe}-{hashlib.sha256(user_id.encode('utf-8')).hexdigest()[:12]}"
