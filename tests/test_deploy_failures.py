"""Deployment failures on purpose, on a loopback federation of its own (tests/deployment.py): a run
that waits for its nodes, a node killed while it trains, and the resume that brings its users back.
Apart from tests/test_deploy.py so that the two federations run side by side (most of this one's
time is the SuperLink noticing a dead node by its missing heartbeats)."""

from __future__ import annotations

import pytest
from deployment import ONLINE_POLL, deployment, kill, pseudonyms, wait_for

from client.store import STATE_DIR
from common.io import file_sha256, read_json

pytestmark = pytest.mark.federation  # minutes of whole federations: scheduled first (conftest.py)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    with deployment(tmp_path_factory.mktemp("deploy-failures"), tiny_model_dir) as fed:
        yield fed


def test_a_node_killed_while_training_is_dropped_and_its_users_come_back_on_resume(federation):
    """The run waits for `min-nodes` before training, node-2 is killed (SIGKILL) while it trains, the
    round is aggregated from node-1, personalization and evaluation report node-2's users as missing by
    name, and once node-2 is back a resumed run trains and scores only them; no checkpoint or adapter
    is lost or rewritten."""
    procs, run_dir = federation.procs, federation.run_dir
    settings = {
        "num-rounds": 1,  # the round in which node-2 dies
        # Round 0's evaluation is each node's first reply: it names the node's users, so the server can
        # report by name the users of a node that dies afterwards (a node that never answered is only
        # a node id: its users' pseudonyms are its own).
        "eval-every-round": "true",
        "min-nodes": 2,
        "min-nodes-timeout": 300,
        # Generous: the SuperLink reports the dead node unavailable once its heartbeats stop (~1 min).
        "train-timeout": 300,
        "personalize-timeout": 300,
        "evaluate-timeout": 300,
        "train-retries": 0,
    }
    args = [*federation.run_args, *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))]
    run = procs.start("run-1", *args)
    wait_for(lambda: "waiting for nodes: 0 of 2 connected" in procs.log("run-1"), 120, "the run to wait", run)
    federation.start_nodes()
    wait_for(lambda: "Receiving: train message" in procs.log("node-2"), 240, "node-2 to train", run)
    kill(federation.nodes[1])
    assert run.wait(600) == 0, procs.log("run-1")[-3000:]

    metrics = read_json(run_dir / "metrics.json")
    node_1, node_2 = (pseudonyms(federation, index, metrics["user_scope"]) for index in range(2))
    assert metrics["status"] == "complete"
    trained = metrics["rounds"][-1]
    assert trained["round"] == 1 and (trained["train"]["sampled"], trained["train"]["clients"]) == (2, 1)
    [dropped] = trained["dropped"]
    assert dropped["reason"] == "no reply within 60 s (train-timeout)" or dropped["reason"].startswith(
        "error:"
    )
    for method in ("shared", "oppu"):
        assert sorted(metrics["methods"][method]["users"]) == node_1, method
        assert metrics["methods"][method]["missing"]["users"] == node_2, method
    personalize = metrics["personalize"]["oppu"]
    assert personalize["missing"]["users"] == node_2 and personalize["users-trained"] == 2
    checkpoints = {
        p.parent.name: p.read_bytes() for p in run_dir.glob("checkpoints/round-*/adapter_model.safetensors")
    }
    assert "round-0001" in checkpoints

    federation.nodes[1] = federation.start_node("node-2", federation.data[1])
    wait_for(lambda: federation.online().count("online") == 2, 120, "node-2 back online", every=ONLINE_POLL)
    assert procs.run("run-2", *args, "--set", "resume=true", timeout=420) == 0, procs.log("run-2")[-3000:]
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "complete" and metrics["rounds"][-1] == {
        **trained,
        "dropped": metrics["rounds"][-1]["dropped"],
    }
    assert metrics["rounds"][-1]["dropped"][0]["users"] == node_2  # named once node-2 answered again
    for method in ("shared", "oppu"):
        assert sorted(metrics["methods"][method]["users"]) == sorted(node_1 + node_2), method
        assert metrics["methods"][method]["missing"] == {"users": [], "nodes": []}, method
    personalize = metrics["personalize"]["oppu"]
    assert (personalize["users-trained"], personalize["users-reused"]) == (2, 2)  # only node-2's users
    for index in range(2):
        for entry in federation.manifest(index).values():
            adapter = federation.data[index] / STATE_DIR / entry["path"]
            assert file_sha256(adapter / "adapter_model.safetensors") == entry["sha256"]
    after = {
        p.parent.name: p.read_bytes() for p in run_dir.glob("checkpoints/round-*/adapter_model.safetensors")
    }
    assert after == checkpoints  # the resumed run trained no round again
