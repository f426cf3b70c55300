"""A malicious server against real nodes: what reaches it when it tries to get personal data out.

tests/malicious_server.py's ServerApp runs in simulation with the deployed ClientApp, the tiny model
and two nodes of one user each. The nodes' policy ($FEDOPPU_NODE_POLICY, which no run config can
change) is the deployed default plus a DP minimum and an epsilon budget. Two runs of the same attacks:
`valid` asks for what the policy allows (local-dp) with max-queries-per-user = 1; `crafted` asks for
privacy "none" and a task the data is not. The tests read what reached the server (attacks.json) and
compare it with the nodes' data and disks. Two more attacks go straight at the deployed ClientApp
(`client.client_app.app`): a bug that replies with a personal adapter, and a deployed node asked for
another task.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import partition_context
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from malicious_server import tensor_digest

import client.client_app as client_app
from client.resident import SHARED
from client.store import PersonalAdapterStore
from client.training import TrainResult
from common import protocol
from common.config import load_run_config
from common.loaders import load_dataset
from common.synthetic import BenchmarkConfig, make_benchmark, write_benchmark
from common.tasks import get_task
from simulations.engine import run_federation

pytestmark = [pytest.mark.usefixtures("flower_identity"), pytest.mark.federation]  # federation: conftest.py

POLICY = """
allowed-privacy = ["local-dp", "secagg+dp"]
min-noise-multiplier = 1.0
max-clipping-norm = 0.2
max-epsilon = 12.0  # one local-dp round at z = 1 costs 10.7, a second would bring it to 16.5
"""
BAD_REQUEST, FAILED = protocol.NodeError.BAD_REQUEST, protocol.NodeError.FAILED
REFUSED = protocol.NodeError.REFUSED_BY_POLICY


def _config(overrides: dict):
    return load_run_config(overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def attacked(tiny_run, in_process, tmp_path_factory):
    root = tmp_path_factory.mktemp("attacked")
    bench = make_benchmark(BenchmarkConfig(num_users=2, min_history=8, max_history=12, queries_per_user=2))
    write_benchmark(bench, root / "data")
    (root / "policy.toml").write_text(POLICY)
    valid = {
        **tiny_run,
        "data": f'"{root / "data"}"',
        "task": '"tagging"',
        "privacy": '"local-dp"',
        "clipping-norm": 0.15,
        "max-queries-per-user": 1,
    }
    configs = {"valid": valid, "crafted": {**valid, "privacy": '"none"', "task": '"rating"'}}
    seen = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDOPPU_NODE_POLICY", str(root / "policy.toml"))
        for name, overrides in configs.items():
            config = _config({**overrides, "run-dir": f'"{root / name}"'})
            run_federation(config, 2, replace(in_process, server_app="tests.malicious_server:app"))
            seen[name] = json.loads((root / name / "attacks.json").read_text())
    return root, seen, _config({**valid, "run-dir": f'"{root / "valid"}"'})


def _replies(seen: list[dict], attack: str) -> list[dict]:
    found = [entry for entry in seen if entry["attack"] == attack]
    assert len(found) == 2, attack  # one reply from each node, whatever it holds
    return found


def _codes(seen: list[dict], attack: str) -> set[int | None]:
    return {entry.get("error", {}).get("code") for entry in _replies(seen, attack)}


def test_every_error_reaching_the_server_is_a_code_and_its_fixed_text(attacked):
    _, seen, _ = attacked
    for entry in seen["valid"] + seen["crafted"]:
        if "error" in entry:
            code = protocol.NodeError(entry["error"]["code"])
            assert entry["error"]["reason"] == code.text, entry


def test_unknown_message_types_and_methods_are_refused(attacked):
    _, seen, _ = attacked
    for run in ("valid", "crafted"):
        for attack in ("message type query", "message type train.exfiltrate", "message type evaluate.dump"):
            assert _codes(seen[run], attack) == {BAD_REQUEST}, (run, attack)
    for attack in ("method ../../etc/passwd", "method personal-dump"):
        assert _codes(seen["valid"], attack) == {BAD_REQUEST}, attack


def test_training_leaves_once_per_round_noised_within_the_budget_and_without_data_metrics(attacked):
    _, seen, _ = attacked
    valid = seen["valid"]
    for entry in _replies(valid, "train round 1"):
        assert set(entry["arrays"]) == {protocol.ARRAYS} and entry["configs"] == {}
        assert entry["metrics"] == {
            "metrics": {"num-examples": 1, "bytes-sent": entry["metrics"]["metrics"]["bytes-sent"]}
        }
    assert _codes(valid, "train round 1 again") == {REFUSED}  # averaging the local noise away
    assert _codes(valid, "train round 2, past the node's budget") == {REFUSED}
    assert _codes(valid, "train with keys of its own") == {FAILED}
    for entry in _replies(valid, "personalize oppu"):  # counts only: no loss, no timing under local-dp
        assert set(entry["metrics"]["metrics"]) <= {"num-users", "users-trained", "users-reused"}


def test_a_chosen_adapter_with_one_query_per_user_learns_nothing_per_user(attacked):
    _, seen, _ = attacked
    for attack in ("evaluate oppu, chosen adapter", "evaluate shared, chosen adapter", "evaluate zero-shot"):
        for entry in _replies(seen["valid"], attack):
            # one answer per node: below the policy's group size, so only the number of answers leaves
            assert entry["metrics"] == {"metrics": {"num-examples": 1}}, attack


def test_a_run_config_asking_for_less_gets_nothing_but_codes(attacked):
    _, seen, _ = attacked
    crafted = seen["crafted"]
    assert all("error" in entry for entry in crafted)
    for attack in ("train round 1", "train round 1 again", "train round 2, past the node's budget"):
        assert _codes(crafted, attack) == {REFUSED}, attack  # privacy "none" is not in allowed-privacy
    # the crafted task makes the node read its users' outputs as ratings: the error used to quote them
    for attack in ("personalize oppu", "evaluate oppu, chosen adapter", "method personal-dump"):
        assert _codes(crafted, attack) == {FAILED}, attack


def test_no_personal_text_tensor_or_user_id_reached_the_server(attacked):
    root, seen, _ = attacked
    dataset = load_dataset(root / "data")
    received = json.dumps(seen)
    labels = set(get_task(dataset.task).labels)  # public: they name the task's per-label counts
    for user in dataset.users:
        assert user.user_id not in received
        for item in [*user.history, *user.queries]:
            assert item.input not in received
            assert item.output in labels or item.output not in received
    digests = {
        d for entry in seen["valid"] for record in entry.get("arrays", {}).values() for d in record.values()
    }
    assert digests  # the round-1 adapters did reach the server
    personal = set()
    for store_dir in (root / "valid" / "clients").iterdir():
        store = PersonalAdapterStore(store_dir)
        for record in store.records():
            personal |= {
                tensor_digest(t.numpy()) for t in store.load(record.variant, record.user_id)[1].values()
            }
    assert len(personal) > 0 and not digests & personal


def test_the_deployed_client_app_guards_its_replies(attacked, monkeypatch):
    """A bug that trains into the shared slot and then copies a user's personal adapter there: same
    keys and shapes as the shared adapter. The deployed app must refuse it; without its guard the
    personal adapter would leave (noised by local DP, which is not the promise)."""
    root, _, config = attacked
    monkeypatch.delenv("FEDOPPU_NODE_POLICY", raising=False)  # the simulation default: no budget
    store = PersonalAdapterStore(root / "valid" / "clients" / "partition-0")
    (record,) = store.records()
    personal = store.load(record.variant, record.user_id)[1]
    context = partition_context(config, run_id=77, node_id=5)
    _, resident, _ = client_app.setup(context)

    def buggy_training(resident, slot, *args, **kwargs):
        resident.load(SHARED, personal)
        return TrainResult(0.5, 1, 1, 1)

    monkeypatch.setattr(client_app, "train_slot", buggy_training)
    shared = {k: v.clone() for k, v in resident.state(SHARED).items()}
    msg = Message(
        RecordDict({"arrays": ArrayRecord(shared), "config": ConfigRecord({protocol.SERVER_ROUND: 1})}),
        dst_node_id=5,
        message_type=protocol.TRAIN,
    )
    reply = client_app.app(msg, context)
    assert reply.has_error() and reply.error.code == protocol.NodeError.REPLY_REFUSED


def test_a_deployed_node_answers_its_datas_task_under_pseudonyms_only(attacked, monkeypatch):
    root, _, config = attacked
    node_config = {"data-path": str(root / "data"), "state-dir": str(root / "deployed-state")}
    dataset = load_dataset(root / "data")

    def evaluate(task: str) -> Message:
        run_config = config.replace(task=task, max_queries_per_user=0).to_flower()
        context = Context(
            run_id=78, node_id=6, node_config=node_config, state=RecordDict(), run_config=run_config
        )
        msg = Message(
            RecordDict({"config": ConfigRecord({"method": "zero-shot", protocol.USER_SCOPE: "s"})}),
            dst_node_id=6,
            message_type=protocol.EVALUATE,
        )
        return client_app.app(msg, context)

    assert evaluate("rating").error.code == BAD_REQUEST
    reply = evaluate("tagging")
    users = sorted(name for name in reply.content.metric_records if name != protocol.METRICS)
    assert len(users) == len(dataset.users) and all(n.startswith("user:p-") for n in users)
    for name in users:  # the deployed default: no history size, no per-label counts per user
        assert set(reply.content.metric_records[name]) == {"n", "correct"}
    assert not any(user.user_id in name for user in dataset.users for name in users)
    assert Path(node_config["state-dir"], "node-secret").is_file()
