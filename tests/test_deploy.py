"""Deployment: certificates, the wrapped Flower commands, and a real federation on 127.0.0.1.

The federation (tests/deployment.py) is a SuperLink and two SuperNodes started through `fedoppu` with
TLS and SuperNode authentication, the tiny model and two users per node. One deployment carries the
whole story, since each message costs a ClientApp process (torch's imports) and a dead node costs the
SuperLink a minute of missing heartbeats: a run that waits for its nodes; node-2 killed while it trains;
a node with an unregistered key, one that trusts another CA and an `--insecure` one refused; both nodes
restarted, one stored adapter truncated; the resumed run trains only what is missing. It checks what
each node kept on its own disk and what reached the server (pseudonyms only). Every ClientApp is
launched by the nodes' own SuperExec, which runs only the app package their checkout builds.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from deployment import ONLINE_POLL, Federation, deployment, kill, pseudonyms, wait_for

from client.commands import supernode_command
from client.store import STATE_DIR
from client.superexec import app_hash, trusting
from common.flower_processes import DeployError
from common.io import file_sha256, read_json
from common.profiles import history_fingerprint
from server.certs import CertDir, CertError, ensure_certs, server_hosts
from server.commands import superlink_command
from simulations.cli import main

pytestmark = pytest.mark.federation  # minutes of whole federations: scheduled first (conftest.py)

# -- certificates and command lines (fast) -------------------------------------------------------------


def test_certs_are_created_once_and_fit_flower(tmp_path):
    written = ensure_certs(tmp_path, ["server.example.org", "10.0.0.7"], ["node-1", "node-2"])
    certs = CertDir(tmp_path)
    assert len(written) == 8 and ensure_certs(tmp_path, [], ["node-1"]) == []
    assert ensure_certs(tmp_path, [], ["node-3"]) == [
        certs.node_key("node-3"),
        certs.node_public_key("node-3"),
    ]
    assert set(server_hosts(certs.server_cert)) == {
        "localhost",
        "127.0.0.1",
        "server.example.org",
        "10.0.0.7",
    }
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    for private in (certs.ca_key, certs.server_key, certs.node_key("node-1")):
        assert private.stat().st_mode & 0o077 == 0, private
    key = load_ssh_private_key(certs.node_key("node-1").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert certs.node_public_key("node-1").read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(CertError, match=r"not valid for \['other.example.org'\]"):
        ensure_certs(tmp_path, ["other.example.org"], [])
    with pytest.raises(CertError, match="node name"):
        ensure_certs(tmp_path, [], ["../escape"])


def _args(**values) -> argparse.Namespace:
    return argparse.Namespace(**values)


def test_superlink_is_secure_unless_asked_and_names_missing_files(tmp_path):
    ensure_certs(tmp_path / "certs", [], [])
    secure = superlink_command(
        _args(host="0.0.0.0", port=9000, insecure=False, certs=str(tmp_path / "certs"), database="s.db")
    )
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert secure[secure.index("--ssl-certfile") + 1] == str(tmp_path / "certs" / "server.pem")
    assert "--disable-runtime-dependency-installation" in secure
    insecure = superlink_command(
        _args(host="127.0.0.1", port=9000, insecure=True, certs="nowhere", database="s.db")
    )
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(DeployError, match="fedoppu certs create"):
        superlink_command(_args(host="h", port=1, insecure=False, certs=str(tmp_path / "none"), database="d"))


def test_supernode_gets_its_data_directory_and_needs_tls_and_a_key(tmp_path):
    ensure_certs(tmp_path / "certs", [], ["n1"])
    certs = CertDir(tmp_path / "certs")
    data = tmp_path / "my data"
    data.mkdir()
    base = dict(superlink="server:9092", port=9095, state_dir=None, insecure=False, data=str(data), task=None)
    base["policy"] = None
    command = supernode_command(
        _args(**base, root_certificates=str(certs.ca_cert), key=str(certs.node_key("n1")))
    )
    assert command[command.index("--node-config") + 1] == f'data-path="{data}"'
    assert command[command.index("--isolation") + 1] == "process"  # ClientApps come from our SuperExec
    policy = tmp_path / "policy.toml"
    policy.write_text("max-epsilon = 8.0\n")
    with_policy = supernode_command(
        _args(
            **{**base, "policy": str(policy), "task": "rating", "insecure": True},
            root_certificates=None,
            key=None,
        )
    )
    assert with_policy[with_policy.index("--node-config") + 1] == (
        f'data-path="{data}" policy-path="{policy}" task="rating"'
    )
    with pytest.raises(DeployError, match="--policy"):
        supernode_command(
            _args(**{**base, "policy": str(tmp_path / "none.toml")}, root_certificates=None, key=None)
        )
    assert command[command.index("--auth-supernode-private-key") + 1] == str(certs.node_key("n1"))
    with pytest.raises(DeployError, match="required unless --insecure"):
        supernode_command(_args(**base, root_certificates=str(certs.ca_cert), key=None))
    assert "--insecure" in supernode_command(
        _args(**{**base, "insecure": True}, root_certificates=None, key=None)
    )
    with pytest.raises(DeployError, match=r"--data .*not found"):
        supernode_command(_args(**{**base, "data": str(tmp_path / "nope")}, root_certificates=None, key=None))


def test_the_node_launches_only_the_app_packages_it_trusts():
    from flwr.proto.task_pb2 import Task
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult

    launched = []

    class Executor:
        def launch(self, spec):
            launched.append(spec.fab_hash)
            return LaunchResult.accepted()

    plugin = trusting(["a" * 64])(
        runtime_api_address="127.0.0.1:1", insecure=True, root_certificates_path=None, executor=Executor()
    )
    untrusted = plugin.launch_task("token", Task(task_id=1, type=TaskType.CLIENT_APP, fab_hash="b" * 64))
    assert untrusted.status == "failed" and launched == []
    plugin.launch_task("token", Task(task_id=2, type=TaskType.CLIENT_APP, fab_hash="a" * 64))
    assert launched == ["a" * 64]


def test_the_trusted_hash_is_the_code_the_checkout_ships(tmp_path):
    """`fedoppu run` ships (and a node trusts) only the apps' code: files beside it, results or docs,
    leave the hash alone; a changed line of code changes it."""
    import hashlib
    import shutil

    from flwr.cli.build import build_fab_from_disk

    from common.config import PROJECT_DIR

    assert app_hash() == hashlib.sha256(build_fab_from_disk(PROJECT_DIR)).hexdigest()  # Flower's own walk
    copy = tmp_path / "checkout"
    for part in ("client", "common", "server"):
        shutil.copytree(PROJECT_DIR / part, copy / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_DIR / "pyproject.toml", copy)
    assert app_hash(copy) == app_hash(PROJECT_DIR)
    (copy / "results").mkdir()
    (copy / "results" / "metrics.json").write_text("{}")
    (copy / "NOTES.md").write_text("a node operator's notes")
    assert app_hash(copy) == app_hash(PROJECT_DIR)
    mods = copy / "client" / "mods.py"
    mods.write_text(mods.read_text().replace("check_reply(msg, reply, self.rules(msg, context))", "pass"))
    assert app_hash(copy) != app_hash(PROJECT_DIR)


def test_run_rejects_an_unknown_key_before_submitting(capsys):
    assert main(["run", "--connection", "nowhere", "--set", "no-such-key=1"]) == 2
    assert "no-such-key" in capsys.readouterr().err


# -- a real federation -----------------------------------------------------------------------------
@dataclasses.dataclass
class Story:
    """What the two runs of the deployment left, read between them."""

    fed: Federation
    first_run: int
    first_metrics: dict
    checkpoints: dict[str, bytes]  # round -> the shared adapter's bytes after the first run
    manifests: list[dict]  # each node's personal adapters after the first run
    corrupt_key: str  # the adapter truncated before the second run (node-1's)
    second_run: int


def _checkpoints(run_dir: Path) -> dict[str, bytes]:
    return {
        p.parent.name: p.read_bytes() for p in run_dir.glob("checkpoints/round-*/adapter_model.safetensors")
    }


@pytest.fixture(scope="module")
def story(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deploy")
    # wrong-ca's key is registered: TLS alone must keep it out.
    with deployment(
        root, tiny_model_dir, certified=("intruder", "wrong-ca"), registered=("wrong-ca",)
    ) as fed:
        settings = {
            # Round 0's evaluation is each node's first reply: it names the node's users, so the server
            # can report by name the users of a node that dies afterwards (a node that never answered
            # is only a node id: its users' pseudonyms are its own).
            "eval-every-round": "true",
            "min-nodes": 2,
            "min-nodes-timeout": 300,
            # Generous: the SuperLink reports the dead node unavailable once its heartbeats stop (~1 min).
            "train-timeout": 300,
            "personalize-timeout": 300,
            "evaluate-timeout": 300,
            "train-retries": 0,
        }
        args = [*fed.run_args, *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))]
        run = fed.procs.start("run-1", *args)
        wait_for(
            lambda: "waiting for nodes: 0 of 2 connected" in fed.procs.log("run-1"),
            120,
            "the run to wait",
            run,
        )
        fed.start_nodes()
        other_ca = CertDir(root / "other-certs")  # a CA the SuperLink's certificate does not come from
        ensure_certs(other_ca.root, [], [])
        wrong_ca = (
            "--root-certificates",
            str(other_ca.ca_cert),
            "--key",
            str(fed.certs.node_key("wrong-ca")),
        )
        fed.intruder = fed.start_node("intruder", fed.data[0])
        fed.untrusting = [
            fed.start_node("wrong-ca", fed.data[0], *wrong_ca),
            fed.start_node("insecure", fed.data[0], "--insecure"),
        ]
        wait_for(lambda: "Receiving: train message" in fed.procs.log("node-2"), 240, "node-2 to train", run)
        kill(fed.nodes[1])
        first_run = run.wait(600)
        first_metrics = read_json(fed.run_dir / "metrics.json")
        checkpoints, manifests = _checkpoints(fed.run_dir), [fed.manifest(0), {}]

        fed.procs.stop(fed.nodes[0])
        wait_for(lambda: "online" not in fed.online(), 120, "both nodes offline", every=ONLINE_POLL)
        corrupt_key = next(iter(manifests[0]))
        weights = fed.data[0] / STATE_DIR / manifests[0][corrupt_key]["path"] / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-16])
        fed.start_nodes()  # the resumed run waits for both (min-nodes) while they connect
        second_run = fed.procs.run("run-2", *args, "--set", "resume=true", timeout=420)
        yield Story(fed, first_run, first_metrics, checkpoints, manifests, corrupt_key, second_run)


def test_a_node_with_an_unregistered_key_is_refused(story):
    story.fed.intruder.wait(60)
    assert story.fed.intruder.returncode != 0
    assert "Failed to activate SuperNode" in story.fed.procs.log("intruder")
    assert story.first_metrics["rounds"][-1]["train"]["sampled"] == 2  # the registered TLS nodes alone


def test_nodes_without_the_federations_tls_never_connect(story):
    """A registered key is not enough: a node that does not trust the server's CA (it could be talking
    to anyone) stops at the handshake; a node without TLS (its traffic could be read) never gets a
    message across the whole run."""
    wrong_ca, insecure = story.fed.untrusting
    assert wrong_ca.wait(60) != 0  # Flower says "Exit Code: 305" and exits
    log = story.fed.procs.log("wrong-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log and "SuperNode ID" not in log
    assert insecure.poll() is None or insecure.returncode != 0
    log = story.fed.procs.log("insecure")  # plaintext against TLS: it retries, and never gets an id
    assert "Starting insecure channel" in log and "Connection attempt failed" in log
    assert "SuperNode ID" not in log and "Receiving:" not in log
    assert "SuperNode ID" in story.fed.procs.log("node-1")  # what getting in looks like


def test_a_node_killed_while_training_is_dropped_and_its_users_are_named(story):
    """The run waited for `min-nodes`; the round is aggregated from node-1, and personalization and
    evaluation report node-2's users as missing by name."""
    fed, metrics = story.fed, story.first_metrics
    assert story.first_run == 0, fed.procs.log("run-1")[-3000:]
    node_1, node_2 = (pseudonyms(fed, index, metrics["user_scope"]) for index in range(2))
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
    assert "round-0001" in story.checkpoints


def test_the_resumed_run_trains_only_what_is_missing_and_nothing_personal_leaves_a_node(story):
    """Both nodes restarted, one of node-1's adapters truncated: the resumed run trains no round again,
    personalizes node-2's users and retrains the corrupt adapter, and reuses the other one as it is.
    Users reach the server under pseudonyms only, without their history sizes (the default policy)."""
    fed = story.fed
    assert story.second_run == 0, fed.procs.log("run-2")[-3000:]
    metrics = read_json(fed.run_dir / "metrics.json")
    node_1, node_2 = (pseudonyms(fed, index, metrics["user_scope"]) for index in range(2))
    trained = story.first_metrics["rounds"][-1]
    assert metrics["status"] == "complete"
    assert metrics["rounds"][-1] == {**trained, "dropped": metrics["rounds"][-1]["dropped"]}
    assert metrics["rounds"][-1]["dropped"][0]["users"] == node_2  # named once node-2 answered again
    assert _checkpoints(fed.run_dir) == story.checkpoints  # no round trained again
    for method in ("shared", "oppu"):
        assert sorted(metrics["methods"][method]["users"]) == sorted(node_1 + node_2), method
        assert metrics["methods"][method]["missing"] == {"users": [], "nodes": []}, method
    personalize = metrics["personalize"]["oppu"]
    assert (personalize["users-reused"], personalize["users-trained"]) == (1, 3)
    assert metrics["history"] == {}
    results = (fed.run_dir / "metrics.json").read_text()
    assert not any(user.user_id in results for node in fed.users for user in node)
    assert not list(fed.run_dir.rglob("manifest.json"))  # only shared-adapter checkpoints and metrics

    digests = set()
    for index, node_users in enumerate(fed.users):
        manifest = fed.manifest(index)
        assert set(manifest) == {f"oppu/{u.user_id}" for u in node_users}
        for user in node_users:
            entry = manifest[f"oppu/{user.user_id}"]
            adapter = fed.data[index] / STATE_DIR / entry["path"]
            assert file_sha256(adapter / "adapter_model.safetensors") == entry["sha256"]
            assert entry["data_fingerprint"] == history_fingerprint(user.history)
            assert entry["shared_version"] == 1 and entry["created"] > 0
            digests.add(entry["shared_digest"])
            before = story.manifests[index].get(f"oppu/{user.user_id}")
            if f"oppu/{user.user_id}" == story.corrupt_key:  # a new version replaced the corrupt one
                assert entry["created"] > before["created"] and entry["path"] != before["path"]
                assert not (fed.data[index] / STATE_DIR / before["path"]).exists()
            elif before is not None:
                assert entry == before  # reused as is: same file, same record
    assert len(digests) == 1  # every user built on the same federated base adapter
