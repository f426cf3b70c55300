"""A round of the shared adapter as the server's grid runs it: validation, drops, retries, quorum, order."""

from __future__ import annotations

import random
import uuid

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode

from common import protocol
from common.config import load_run_config
from common.updates import update_norm, update_problem
from server.grid import RoundFailed, RoundGrid, RoundPolicy, UpdateRules
from server.privacy import PrivacyLayer
from tests.faults import corrupt

pytestmark = pytest.mark.usefixtures("flower_identity")

SENT = {"a.lora_A.weight": torch.zeros(2, 4), "a.lora_B.weight": torch.ones(4, 2)}
RULES = UpdateRules(
    "float32",
    max_norm=10.0,
    uniform_weights=False,
    metrics=protocol.reply_metric_names(protocol.TRAIN, "none"),
)


def request(node: int, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: v.clone() for k, v in SENT.items()}),
            protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: server_round}),
        }
    )
    return Message(content, dst_node_id=node, message_type=protocol.TRAIN)


def honest(msg: Message, step: float = 0.01) -> Message:
    """A valid reply: every weight moved by `step` (node-dependent), all train metrics."""
    arrays = ArrayRecord(
        {
            k: Array(v.numpy() + np.float32(step * msg.metadata.dst_node_id))
            for k, v in msg.content[protocol.ARRAYS].items()
        }
    )
    metrics = MetricRecord({key: 1.0 for key in protocol.TRAIN_METRICS} | {protocol.NUM_EXAMPLES: 4})
    return Message(RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: metrics}), reply_to=msg)


class FakeGrid:
    """Nodes that answer a request with `behaviour[node](msg, attempt)`; None means no reply."""

    def __init__(self, behaviour) -> None:
        self.behaviour = behaviour
        self.attempts: dict[int, int] = {}

    def get_node_ids(self):
        return list(self.behaviour)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = msg.metadata.dst_node_id
            self.attempts[node] = self.attempts.get(node, 0) + 1
            if (reply := self.behaviour[node](msg, self.attempts[node])) is not None:
                replies.append(reply)
        return replies


def round_grid(behaviour, *, retries=1, fraction=0.5, every_sampled=False, rules=RULES):
    policy = RoundPolicy(fraction, 1, retries, every_sampled, node_wait=None)
    return RoundGrid(FakeGrid(behaviour), policy, rules)


def corrupted(kind):
    def reply(msg, attempt):
        good = honest(msg)
        good.content[protocol.ARRAYS] = corrupt(
            kind, msg.content[protocol.ARRAYS], good.content[protocol.ARRAYS]
        )
        return good

    return reply


def with_metrics(**metrics):
    def reply(msg, attempt):
        good = honest(msg)
        good.content[protocol.METRICS] = MetricRecord({**dict(good.content[protocol.METRICS]), **metrics})
        return good

    return reply


def good(msg, attempt):
    return honest(msg)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (corrupted("nan"), "1 non-finite value(s) (NaN or Inf)"),
        (corrupted("inf"), "1 non-finite value(s) (NaN or Inf)"),
        (corrupted("wrong-shape"), "a.lora_A.weight: shape (3, 4), expected (2, 4)"),
        (corrupted("missing-key"), "missing ['a.lora_A.weight']"),
        (corrupted("scaled"), "exceeds the bound 10"),
        (with_metrics(**{protocol.NUM_EXAMPLES: 0}), "num-examples = 0, expected > 0"),
        (with_metrics(**{"train-loss": float("nan")}), "metrics ['train-loss'] are not finite numbers"),
        (with_metrics(extra=1.0), "metrics ['bytes-sent', 'extra'"),
        (lambda msg, attempt: Message(RecordDict({protocol.ARRAYS: ArrayRecord()}), reply_to=msg), "records"),
    ],
)
def test_an_invalid_update_is_dropped_with_its_node_and_reason(bad, reason):
    grid = round_grid({1: good, 2: good, 3: bad})
    replies = grid.send_and_receive([request(n) for n in (1, 2, 3)], timeout=5)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    traffic = grid.take_round()
    assert traffic.sampled == 3
    assert [(d["node"], d["attempt"]) for d in traffic.dropped] == [(3, 1)]
    assert reason in traffic.dropped[0]["reason"]


def test_the_dtype_on_the_wire_must_be_the_expected_one():
    def half(msg, attempt):
        reply = honest(msg)
        reply.content[protocol.ARRAYS] = ArrayRecord(
            {k: Array(v.numpy().astype(np.float16)) for k, v in reply.content[protocol.ARRAYS].items()}
        )
        return reply

    grid = round_grid({1: good, 2: half})
    grid.send_and_receive([request(1), request(2)], timeout=5)
    assert "dtype float16, expected float32" in grid.take_round().dropped[0]["reason"]


def test_errors_and_late_replies_are_dropped_and_a_short_round_is_sent_again_to_the_missing():
    recovering = {
        "error": lambda msg, attempt: honest(msg) if attempt > 1 else Message(_error(), reply_to=msg)
    }
    grid = round_grid(
        {
            1: good,
            2: lambda msg, attempt: honest(msg) if attempt > 1 else None,
            3: recovering["error"],
            4: good,
        },
        fraction=1.0,
    )
    replies = grid.send_and_receive([request(n) for n in (1, 2, 3, 4)], timeout=7)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4]
    assert grid._grid.attempts == {1: 1, 2: 2, 3: 2, 4: 1}  # only the missing were asked again
    dropped = grid.take_round().dropped
    assert dropped == [
        {"node": 2, "reason": "no reply within 7 s (train-timeout)", "attempt": 1},
        {"node": 3, "reason": "error: failed: the node failed; its own log has the details", "attempt": 1},
    ]


def test_the_superlinks_answer_for_an_offline_node_is_that_nodes_drop():
    def offline(msg, attempt):
        unavailable = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable")
        reply = Message(unavailable, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers, not the node
        return reply

    grid = round_grid({7: good, 8: offline}, retries=0)
    grid.send_and_receive([request(7), request(8)], timeout=5)
    assert grid.take_round().dropped == [{"node": 8, "reason": "error: Node Unavailable", "attempt": 1}]


def _error():
    """What a failing node sends: a code with its fixed text (client/mods.py: error_code_mod)."""
    return Error(code=protocol.NodeError.FAILED, reason=protocol.NodeError.FAILED.text)


def test_a_round_short_of_its_quorum_after_its_retries_fails_naming_the_counts():
    grid = round_grid({1: good, 2: corrupted("nan"), 3: lambda msg, attempt: None}, retries=2, fraction=0.6)
    with pytest.raises(
        RoundFailed, match=r"1 of 3 sampled clients delivered a valid update, 2 needed, after 2 retries"
    ):
        grid.send_and_receive([request(n) for n in (1, 2, 3)], timeout=1)
    assert grid._grid.attempts == {1: 1, 2: 3, 3: 3}
    assert len(grid.take_round().dropped) == 6


def test_under_dp_every_sampled_client_must_deliver():
    grid = round_grid({1: good, 2: good, 3: lambda msg, attempt: None}, retries=0, every_sampled=True)
    with pytest.raises(
        RoundFailed, match=r"2 of 3 .* 3 needed \(every sampled client under this DP setting\)"
    ):
        grid.send_and_receive([request(n) for n in (1, 2, 3)], timeout=1)


def test_the_quorum_is_a_fraction_of_the_sampled_and_at_least_a_count():
    assert RoundPolicy(0.5, 1, 0, False, None).needed(3) == 2
    assert RoundPolicy(0.7, 1, 0, False, None).needed(10) == 7  # no float rounding up to 8
    assert RoundPolicy(0.1, 3, 0, False, None).needed(4) == 3
    assert RoundPolicy(0.1, 1, 0, True, None).needed(4) == 4


def test_dp_settings_refuse_short_rounds_and_bound_updates_by_their_clip():
    def layer(privacy, **extra):
        overrides = [f"privacy={privacy}", "dp-delta=0.01", *(f"{k}={v}" for k, v in extra.items())]
        return PrivacyLayer(load_run_config(overrides=overrides), num_clients=4)

    assert [layer(p).needs_every_sampled_client for p in ("client-dp", "adaptive-dp")] == [True] * 2
    # central-dp divides by the expected count: a lost reply does not lower the noise per user
    assert not any(layer(p).needs_every_sampled_client for p in ("central-dp", "local-dp", "none"))
    assert layer("client-dp", **{"clipping-norm": 2.0}).update_norm_bound(100.0, 1000) == pytest.approx(2.002)
    noisy = layer("local-dp", **{"clipping-norm": 2.0, "noise-multiplier": 0.5}).update_norm_bound(
        100.0, 10_000
    )
    assert noisy == pytest.approx(2.0 + 0.5 * 2.0 * (100 + 8))
    assert layer("none").update_norm_bound(0.0, 10) is None


def test_sampling_waits_for_enough_nodes_only_so_long():
    grid = RoundGrid(FakeGrid({1: good}), RoundPolicy(0.5, 1, 0, False, node_wait=0.05), RULES)
    grid.min_nodes = 2
    assert grid.get_node_ids() == [1]  # Flower's sampling asks again every second
    with pytest.raises(RoundFailed, match=r"only 1 node\(s\) connected for 0.05 s \(min-nodes-timeout\)"):
        while True:
            grid.get_node_ids()


def test_replies_reach_aggregation_in_the_same_order_whatever_order_they_arrive_in():
    def arriving(order):
        def timed(msg, attempt):
            reply = honest(msg)
            reply.content[protocol.METRICS]["train-seconds"] = random.random()  # differs every run
            return reply

        grid = round_grid(dict.fromkeys(order, timed))
        replies = grid.send_and_receive([request(n) for n in order], timeout=5)
        return [r.metadata.src_node_id for r in replies], grid

    first, grid = arriving([30, 10, 20])
    assert sorted(first) == [10, 20, 30]
    assert all(arriving(order)[0] == first for order in ([10, 20, 30], [20, 30, 10]))
    assert grid.take_round().bytes_per_client > 0  # the train replies were counted on the way


def test_the_same_check_serves_the_client_before_masking():
    sent = {k: v.numpy() for k, v in SENT.items()}
    assert update_problem(sent, sent, dtype=None, max_norm=1.0) is None
    moved = {k: v + 1.0 for k, v in sent.items()}
    assert update_norm(sent, moved) == pytest.approx(np.sqrt(16))
    assert "exceeds the bound 3" in update_problem(sent, moved, dtype=None, max_norm=3.0)
    ints = {k: v.astype(np.int32) for k, v in sent.items()}
    assert "is not a float type" in update_problem(sent, ints, dtype=None, max_norm=None)
