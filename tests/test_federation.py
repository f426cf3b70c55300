"""Merging the nodes' evaluation replies into per-user counts; the order replies reach aggregation."""

import random
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from server.federation import ClientFailure, user_counts
from server.grid import MeteredSortedGrid


def _reply(node_id: int, records: dict[str, dict[str, float]]):
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node_id), content=SimpleNamespace(metric_records=records)
    )


def test_each_users_counts_come_from_their_node_and_totals_are_skipped():
    replies = [
        _reply(11, {"user:a": {"n": 2, "correct": 1}, "metrics": {"n": 2}}),
        _reply(12, {"user:b": {"n": 3, "correct": 3}, "metrics": {"n": 3}}),
    ]
    assert user_counts(replies, "evaluating oppu") == {
        "a": {"n": 2, "correct": 1},
        "b": {"n": 3, "correct": 3},
    }


def test_a_user_reported_by_two_nodes_is_an_error_naming_both():
    replies = [_reply(11, {"user:a": {"n": 2}}), _reply(12, {"user:a": {"n": 2}})]
    with pytest.raises(ClientFailure, match=r"evaluating oppu: user 'a' is reported by node 11 and node 12"):
        user_counts(replies, "evaluating oppu")


def test_replies_reach_aggregation_in_the_same_order_whatever_order_they_arrive_in():
    def arriving(order):
        replies = [_reply(node, {}) for node in order]
        for reply in replies:
            reply.metadata.message_type, reply.has_content = "train", lambda: True
            node = reply.metadata.src_node_id
            reply.content = RecordDict(
                {
                    "arrays": ArrayRecord({"w": torch.full((2,), float(node))}),
                    "metrics": MetricRecord({"train-seconds": random.random()}),  # differs every run
                }
            )
        grid = SimpleNamespace(send_and_receive=lambda messages, timeout=None: iter(replies))
        meter = MeteredSortedGrid(grid)
        return [r.metadata.src_node_id for r in meter.send_and_receive([], timeout=None)], meter

    first, meter = arriving([30, 10, 20])
    assert sorted(first) == [10, 20, 30]
    assert all(arriving(order)[0] == first for order in ([10, 20, 30], [20, 30, 10]))
    assert meter.take_per_client() > 0  # the train replies were counted on the way
