"""The Grid every round of the shared adapter goes through: the one place each client's reply passes.

Flower's strategies (and SecAgg+'s workflow) send each round through `RoundGrid.send_and_receive`,
so whatever the strategy and privacy setting:
- a reply that is an error, or that has not arrived when the round's timeout (`train-timeout`) ends,
  is dropped; a late reply is never read;
- a train update is validated before the strategy sees it (`UpdateRules`): exactly the keys, shapes
  and dtype that were sent, finite values, the update's L2 norm within its bound, exactly the train
  metrics as finite numbers with a valid `num-examples`; an invalid one is dropped. SecAgg+'s masked
  replies cannot be checked here: under SecAgg+ each client checks its own update (client/mods.py);
- a round with fewer valid updates than `RoundPolicy.needed` is sent again to the sampled clients that
  did not deliver one, `train-retries` times, and then ends training with RoundFailed;
- every drop is kept, with its node id and reason, for the round's entry in metrics.json;
- the serialized bytes each client uploads are counted (one reply per round for the Message-API
  strategies, four per round for SecAgg+);
- replies are handed on ordered by a digest of their arrays, not by arrival (nor by node id:
  simulation draws node ids anew each run; nor by whole content: metrics hold timings), so
  aggregation adds the same updates in the same order every run and a seed reproduces the shared
  adapter bit for bit.
Flower's sampling waits without a limit until enough nodes are connected; `get_node_ids` ends that
wait after `min-nodes-timeout` with RoundFailed.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import Message
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from common import protocol
from common.cli import console
from common.config import RunConfig
from common.updates import Arrays, update_problem


class RoundFailed(RuntimeError):
    """A round cannot be aggregated (too few valid updates, or too few nodes): training stops early,
    every checkpoint is kept, and the run can be resumed."""


@dataclass(frozen=True)
class RoundPolicy:
    """When a round of the shared adapter may be aggregated, and how long it waits for nodes."""

    min_fraction: float
    min_clients: int
    retries: int
    every_sampled: bool  # a DP setting whose noise assumes every sampled client (server/privacy.py)
    node_wait: float | None

    @classmethod
    def from_config(cls, config: RunConfig, every_sampled: bool) -> RoundPolicy:
        return cls(
            config.min_train_fraction,
            config.min_train_clients,
            config.train_retries,
            every_sampled,
            config.timeout("min-nodes"),
        )

    def needed(self, sampled: int) -> int:
        """Valid updates a round of `sampled` clients needs before it is aggregated."""
        if self.every_sampled:
            return sampled
        return max(self.min_clients, math.ceil(round(self.min_fraction * sampled, 9)))


@dataclass(frozen=True)
class UpdateRules:
    """What a valid train reply holds besides the keys and shapes that were sent."""

    dtype: str
    max_norm: float | None
    uniform_weights: bool  # under a privacy setting every client reports num-examples = 1
    metrics: frozenset[str]  # protocol.reply_metric_names: under a privacy setting no data-dependent ones

    def problem(self, reply: Message, sent: Arrays) -> str | None:
        """Why the reply cannot be aggregated, or None."""
        content = reply.content
        if set(content.array_records) != {protocol.ARRAYS} or set(content.metric_records) != {
            protocol.METRICS
        }:
            names = sorted([*content.array_records, *content.metric_records, *content.config_records])
            return f"records {names}, expected an ArrayRecord '{protocol.ARRAYS}' and a MetricRecord '{protocol.METRICS}'"
        metrics = dict(content.metric_records[protocol.METRICS])
        if set(metrics) != self.metrics:
            return f"metrics {sorted(metrics)}, expected {sorted(self.metrics)}"
        not_numbers = [
            key
            for key, value in metrics.items()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ]
        if not_numbers:
            return f"metrics {not_numbers} are not finite numbers"
        weight = metrics[protocol.NUM_EXAMPLES]
        if weight <= 0 or (self.uniform_weights and weight != 1):
            expected = (
                "1 (every client weighs the same under a privacy setting)" if self.uniform_weights else "> 0"
            )
            return f"{protocol.NUM_EXAMPLES} = {weight}, expected {expected}"
        try:
            arrays = {key: array.numpy() for key, array in content.array_records[protocol.ARRAYS].items()}
        except (ValueError, TypeError) as err:
            return f"unreadable arrays ({err})"
        return update_problem(sent, arrays, dtype=self.dtype, max_norm=self.max_norm)


@dataclass(frozen=True)
class RoundTraffic:
    """One round as the grid saw it."""

    sampled: int  # distinct nodes the round sent messages to
    bytes_per_client: float | None
    dropped: list[dict]  # {"node", "reason", "attempt"}


class RoundGrid:
    """A Grid that applies the round's timeout, validation, retries and quorum, meters and sorts."""

    def __init__(self, grid: Grid, policy: RoundPolicy, rules: UpdateRules) -> None:
        self._grid = grid
        self.policy = policy
        self.rules = rules
        self.min_nodes = 1  # the nodes the strategy's sampling waits for (Federation sets it)
        self._short_since: float | None = None
        self._start_round()

    def _start_round(self) -> None:
        self._bytes: dict[int, int] = defaultdict(int)
        self._dropped: list[dict] = []
        self._sampled: set[int] = set()

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        nodes = list(self._grid.get_node_ids())
        if len(nodes) >= self.min_nodes:
            self._short_since = None
            return nodes
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
            console.print(f"waiting for nodes: {len(nodes)} connected, a round needs {self.min_nodes}")
        elif self.policy.node_wait is not None and now - self._short_since > self.policy.node_wait:
            raise RoundFailed(
                f"only {len(nodes)} node(s) connected for {self.policy.node_wait:g} s (min-nodes-timeout); "
                f"a round needs {self.min_nodes}"
            )
        return nodes

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if not messages:  # a Poisson round that sampled nobody
            return []
        self._sampled.update(m.metadata.dst_node_id for m in messages)
        if _is_update_request(messages[0]):
            replies = self._train(messages, timeout)
        else:  # SecAgg+'s stages: its workflow handles dropouts itself, errors included
            replies = [reply for _, reply in self._exchange(messages, timeout, attempt=1)]
        return sorted(replies, key=_arrays_digest)

    def _drop(self, node: int, reason: str, attempt: int) -> None:
        self._dropped.append({"node": node, "reason": reason, "attempt": attempt})
        console.print(f"[yellow]training: node {node} dropped[/] (attempt {attempt}): {reason}")

    def _exchange(
        self, messages: list[Message], timeout: float | None, attempt: int
    ) -> list[tuple[int, Message]]:
        """Send, collect the replies until the timeout, and record who did not answer or failed.
        Replies come with the node that was asked: the SuperLink itself answers for a node it has
        found offline."""
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        asked = {message.metadata.message_id: message.metadata.dst_node_id for message in messages}
        answers = [(asked.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
        answered = {node for node, _ in answers}
        for message in messages:
            if message.metadata.dst_node_id not in answered:
                self._drop(message.metadata.dst_node_id, no_reply(timeout, "train"), attempt)
        for node, reply in answers:
            if reply.has_error():
                self._drop(
                    node, f"error: {protocol.node_error(reply.error.code, reply.error.reason)}", attempt
                )
            elif reply.metadata.message_type == protocol.TRAIN:
                self._bytes[node] += recorddict_to_proto(reply.content).ByteSize()
        return answers

    def _train(self, messages: list[Message], timeout: float | None) -> list[Message]:
        sent = {key: array.numpy() for key, array in messages[0].content[protocol.ARRAYS].items()}
        needed = self.policy.needed(len(messages))
        valid: dict[int, Message] = {}
        pending = messages
        for attempt in range(1, self.policy.retries + 2):
            for node, reply in self._exchange(pending, timeout, attempt):
                if reply.has_error():
                    continue
                if (problem := self.rules.problem(reply, sent)) is not None:
                    self._drop(node, problem, attempt)
                else:
                    valid[node] = reply
            if len(valid) >= needed or attempt > self.policy.retries:
                break
            pending = [_again(m) for m in messages if m.metadata.dst_node_id not in valid]
            console.print(
                f"{len(valid)} of {len(messages)} clients delivered a valid update, {needed} needed: "
                f"sending the round again to {len(pending)} (retry {attempt} of {self.policy.retries})"
            )
        if len(valid) < needed:
            every = " (every sampled client under this DP setting)" if self.policy.every_sampled else ""
            raise RoundFailed(
                f"{len(valid)} of {len(messages)} sampled clients delivered a valid update, {needed} "
                f"needed{every}, after {self.policy.retries} retries"
            )
        return list(valid.values())

    @property
    def sampled(self) -> int:
        """Distinct nodes the round in progress has sent messages to."""
        return len(self._sampled)

    def take_round(self) -> RoundTraffic:
        """The round since the last call: sampled nodes, mean upload per client, drops; then reset."""
        counts = self._bytes
        traffic = RoundTraffic(
            len(self._sampled), sum(counts.values()) / len(counts) if counts else None, self._dropped
        )
        self._start_round()
        return traffic


def no_reply(timeout: float | None, phase: str) -> str:
    """The reason a node is dropped when its reply has not arrived by the phase's timeout."""
    return f"no reply within {timeout:g} s ({phase}-timeout)" if timeout is not None else "no reply"


def _is_update_request(message: Message) -> bool:
    """A Message-API train request carrying the shared adapter (SecAgg+'s legacy stages carry none)."""
    return (
        message.metadata.message_type == protocol.TRAIN and protocol.ARRAYS in message.content.array_records
    )


def _again(message: Message) -> Message:
    """The same request as a new message (a pushed message cannot be pushed twice)."""
    return Message(
        message.content,
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
        group_id=message.metadata.group_id,
    )


def _arrays_digest(reply: Message) -> bytes:
    digest = hashlib.sha256()
    if reply.has_content():
        for name, record in sorted(reply.content.array_records.items()):
            for key, array in record.items():
                digest.update(f"{name}/{key}".encode())
                digest.update(array.data)
    return digest.digest()
