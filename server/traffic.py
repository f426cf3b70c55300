"""Bytes each client uploads for the shared adapter, measured where the server receives them.

Counting on the server side covers every protocol alike: one reply per round for the Message-API
strategies, four per round (keys, shares, masked vector, unmasking shares) for SecAgg+.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message
from flwr.app.message_type import MessageType
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid


class TrafficMeter:
    """A Grid that passes everything through and counts the serialized size of train replies."""

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
            if reply.metadata.message_type == MessageType.TRAIN and reply.has_content():
                self._bytes[reply.metadata.src_node_id] += recorddict_to_proto(reply.content).ByteSize()
        return replies

    def take_per_client(self) -> float | None:
        """Mean bytes uploaded per client since the last call (one round), then start counting anew."""
        counts, self._bytes = self._bytes, defaultdict(int)
        return sum(counts.values()) / len(counts) if counts else None
