"""Merging the nodes' evaluation replies into per-user counts; the order replies reach aggregation."""

from types import SimpleNamespace

import pytest

from server.federation import ClientFailure, user_counts


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
