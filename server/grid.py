"""The Grid every round goes through: it meters the bytes each client uploads and sorts the replies.

Counting on the server side covers every protocol alike: one reply per round for the Message-API
strategies, four per round (keys, shares, masked vector, unmasking shares) for SecAgg+. Replies are
handed on ordered by a digest of their arrays, not by arrival (nor by node id: simulation draws node
ids anew each run; nor by whole content: metrics hold timings), so aggregation adds the same updates
in the same order every run and a seed reproduces the shared adapter bit for bit.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from common import protocol


class MeteredSortedGrid:
    """A Grid that counts the serialized size of train replies and hands replies on sorted by their arrays."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self._bytes: dict[int, int] = defaultdict(int)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.metadata.message_type == protocol.TRAIN and reply.has_content():
                self._bytes[reply.metadata.src_node_id] += recorddict_to_proto(reply.content).ByteSize()
        return sorted(replies, key=_arrays_digest)

    def take_per_client(self) -> float | None:
        """Mean bytes uploaded per client since the last call (one round), then start counting anew."""
        counts, self._bytes = self._bytes, defaultdict(int)
        return sum(counts.values()) / len(counts) if counts else None


def _arrays_digest(reply: Message) -> bytes:
    digest = hashlib.sha256()
    if reply.has_content():
        for name, record in sorted(reply.content.array_records.items()):
            for key, array in record.items():
                digest.update(f"{name}/{key}".encode())
                digest.update(array.data)
    return digest.digest()
