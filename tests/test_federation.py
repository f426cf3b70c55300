"""Personalization and evaluation across nodes: per-user counts, nodes that fail, waiting for nodes."""

import uuid
from types import SimpleNamespace

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode

from common import protocol
from common.config import load_run_config
from server.federation import ClientFailure, Federation, NodesUnavailable, user_counts, wait_for_nodes


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


class BroadcastGrid:
    """Nodes that answer a personalize or evaluate message with `behaviour[node](msg)`; None: never."""

    def __init__(self, behaviour) -> None:
        self.behaviour, self.replies = behaviour, {}

    def get_node_ids(self):
        return list(self.behaviour)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if (reply := self.behaviour[msg.metadata.dst_node_id](msg)) is not None:
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def _scores(*users):
    def reply(msg):
        records = {f"user:{u}": MetricRecord({"n": 2, "correct": 1, "history": 8}) for u in users}
        return Message(RecordDict({"metrics": MetricRecord({"n": 2 * len(users)}), **records}), reply_to=msg)

    return reply


def _offline(msg):
    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node it found offline
    return reply


@pytest.mark.usefixtures("flower_identity")
def test_evaluation_goes_on_without_the_nodes_that_fail_and_names_their_users(tmp_path, capsys):
    config = load_run_config(overrides=[f'run-dir="{tmp_path}"', "evaluate-timeout=0.5"])
    behaviour = {1: _scores("a", "b"), 2: _scores("c"), 3: _scores("d")}
    federation = Federation(BroadcastGrid(behaviour), config)
    assert set(federation.evaluate("zero-shot", None).users) == {"a", "b", "c", "d"}
    # Not a terminal (a log file): each phase leaves a line where a terminal shows a bar.
    assert "evaluating zero-shot: 3 of 3 clients replied (" in capsys.readouterr().err
    behaviour.update({2: _offline, 3: lambda msg: None})  # node 3 never answers
    evaluation = federation.evaluate("zero-shot", None)
    assert set(evaluation.users) == {"a", "b"} and evaluation.overall["n"] == 4
    assert evaluation.missing.users == ["c", "d"]
    assert "evaluating zero-shot: 1 of 3 clients replied (" in capsys.readouterr().err
    assert evaluation.missing.nodes == [
        {"node": 2, "users": ["c"], "reason": "error: Node Unavailable"},
        {"node": 3, "users": ["d"], "reason": "no reply within 0.5 s (evaluate-timeout)"},
    ]


def test_the_server_waits_for_min_nodes_saying_how_many_it_has(capsys):
    class Arriving:
        calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [1] if self.calls < 3 else [1, 2]

    assert wait_for_nodes(Arriving(), 2, timeout=30) == [1, 2]
    assert "waiting for nodes: 1 of 2 connected" in capsys.readouterr().err
    with pytest.raises(
        NodesUnavailable, match=r"min-nodes = 3: only 1 node\(s\) connected after 0.5 s \(min-nodes-timeout\)"
    ):
        wait_for_nodes(Arriving(), 3, timeout=0.5)


@pytest.mark.usefixtures("flower_identity")
def test_a_resumed_run_names_the_users_of_a_node_that_dies_before_it_answers_again(tmp_path):
    """In evaluation and personalization. Replies without history sizes (a node's policy may withhold them): the users come from the scores
    the results file already holds."""
    overrides = [f'run-dir="{tmp_path}"', "evaluate-timeout=0.5"]

    def unsized(*users):
        def reply(msg):
            records = {f"user:{u}": MetricRecord({"n": 2, "correct": 1}) for u in users}
            return Message(
                RecordDict({"metrics": MetricRecord({"n": 2 * len(users)}), **records}), reply_to=msg
            )

        return reply

    Federation(
        BroadcastGrid({1: unsized("a"), 2: unsized("c")}), load_run_config(overrides=overrides)
    ).evaluate_method("zero-shot", None)
    resumed = Federation(
        BroadcastGrid({1: unsized("a"), 2: _offline}), load_run_config(overrides=[*overrides, "resume=true"])
    )
    evaluation = resumed.evaluate("zero-shot", None)
    assert set(evaluation.users) == {"a"} and evaluation.missing.users == ["c"]
    # personalization replies name no users: the node's users come from the replies of the earlier run
    assert resumed.missing({2: "error: Node Unavailable"}).users == ["c"]


@pytest.mark.usefixtures("flower_identity")
def test_a_resumed_run_does_not_score_again_a_personal_method_it_scored_for_every_user(tmp_path, capsys):
    """local was scored for both users before the stop: the resume sends it nothing; rag, which the
    first run never asked for, is scored."""
    overrides = [f'run-dir="{tmp_path}"', "methods=local"]
    sent: list[str] = []

    def scores(*users):
        answer = _scores(*users)

        def reply(msg):
            sent.append(msg.metadata.message_type)
            return answer(msg)

        return reply

    behaviour = {1: scores("a"), 2: scores("b")}
    Federation(BroadcastGrid(behaviour), load_run_config(overrides=overrides)).run(["local"])
    assert len(sent) == 4  # personalize and evaluate, on two nodes
    sent.clear()
    resumed = Federation(BroadcastGrid(behaviour), load_run_config(overrides=[*overrides, "resume=true"]))
    resumed.run(["local", "rag"])
    assert sent == [protocol.EVALUATE] * 2  # rag only
    assert "local: scored for every user before the resume, kept" in capsys.readouterr().err
    assert set(resumed.recorder.data["methods"]) == {"local", "rag"}
