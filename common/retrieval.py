"""BM25 retrieval over one user's own history (the RAG part of OPPU's PEFT + RAG).

Only that user's items are indexed, so retrieval never touches anyone else's data. `before` restricts the
corpus to the items older than the one being trained on: its own target must not appear in its prompt,
and the index is built over that prefix alone, as OPPU does, so even term statistics come from the past.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

from common.data import Item
from common.tasks import Task

_STOPWORDS = frozenset(STOPWORDS_EN)
# bm25s sets its own logger to DEBUG when imported: wherever a handler listens (Ray's workers forward
# every record to the run's log), each index built printed "Building index from tokens".
logging.getLogger("bm25s").setLevel(logging.WARNING)


def tokenize_words(text: str) -> list[str]:
    """Lower-cased word tokens without English stopwords."""
    return [word for word in re.findall(r"\w+", text.lower()) if word not in _STOPWORDS]


class HistoryRetriever:
    def __init__(self, task: Task, history: Sequence[Item]) -> None:
        self._history = list(history)
        self._tokens = [tokenize_words(task.retrieval_text(item)) for item in self._history]
        self._index = functools.lru_cache(maxsize=4)(self._build_index)

    def top_k(self, query: str, k: int, *, before: int | None = None) -> list[Item]:
        """The k most relevant items, most relevant first; ties go to the newer item.

        A query that shares no word with the corpus still gets k items (the newest), as BM25's top-n in
        OPPU does, so prompts keep one shape whatever the query.
        """
        size = len(self._history) if before is None else max(0, min(before, len(self._history)))
        if k <= 0 or size == 0:
            return []
        scores = self._scores(tokenize_words(query), size)
        order = sorted(range(size), key=lambda i: (-scores[i], -i))
        return [self._history[i] for i in order[:k]]

    def _scores(self, query_tokens: list[str], size: int) -> np.ndarray:
        index = self._index(size)
        known = [token for token in query_tokens if index is not None and token in index.vocab_dict]
        if not known:
            return np.zeros(size)
        return index.get_scores(known)

    def _build_index(self, size: int) -> bm25s.BM25 | None:
        corpus = self._tokens[:size]
        if not any(corpus):
            return None
        index = bm25s.BM25()
        index.index(corpus, show_progress=False)
        return index
