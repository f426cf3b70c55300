"""Deployment: certificates, the wrapped Flower commands, and a real federation on 127.0.0.1.

The federation test starts a SuperLink and two SuperNodes through `fedoppu` with TLS and SuperNode
authentication (tests/deployment.py), runs a round and personalization with the tiny model, restarts
the nodes, runs again and checks what each node kept on its own disk and what reached the server
(pseudonyms only); a node with an unregistered key, a node that trusts another CA and an `--insecure`
node are refused. Every ClientApp is launched by the nodes' own SuperExec, which runs only the app
package their checkout builds. Failures on purpose are in tests/test_deploy_failures.py.
"""

from __future__ import annotations

import argparse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from deployment import ONLINE_POLL, deployment, wait_for

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
@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deploy")
    # wrong-ca's key is registered: TLS alone must keep it out.
    with deployment(
        root, tiny_model_dir, certified=("intruder", "wrong-ca"), registered=("wrong-ca",)
    ) as fed:
        other_ca = CertDir(root / "other-certs")  # a CA the SuperLink's certificate does not come from
        ensure_certs(other_ca.root, [], [])
        fed.start_nodes()
        fed.intruder = fed.start_node("intruder", fed.data[0])
        wrong_ca = (
            "--root-certificates",
            str(other_ca.ca_cert),
            "--key",
            str(fed.certs.node_key("wrong-ca")),
        )
        fed.untrusting = [
            fed.start_node("wrong-ca", fed.data[0], *wrong_ca),
            fed.start_node("insecure", fed.data[0], "--insecure"),
        ]
        wait_for(
            lambda: fed.online().count("online") == 2, 180, "both nodes online", *fed.nodes, every=ONLINE_POLL
        )
        fed.first_run = fed.procs.run("run-1", *fed.run_args, timeout=420)
        yield fed


def test_a_node_with_an_unregistered_key_is_refused(federation):
    federation.intruder.wait(60)
    assert federation.intruder.returncode != 0
    assert "Failed to activate SuperNode" in federation.procs.log("intruder")
    assert federation.online().count("online") == 2  # the registered TLS nodes never got in


def test_nodes_without_the_federations_tls_never_connect(federation):
    """A registered key is not enough: a node that does not trust the server's CA (it could be talking
    to anyone) stops at the handshake; a node without TLS (its traffic could be read) never gets a
    message across the whole run."""
    assert federation.first_run == 0
    wrong_ca, insecure = federation.untrusting
    assert wrong_ca.wait(60) != 0  # Flower says "Exit Code: 305" and exits
    log = federation.procs.log("wrong-ca")
    assert "CERTIFICATE_VERIFY_FAILED" in log and "SuperNode ID" not in log
    assert insecure.poll() is None or insecure.returncode != 0
    log = federation.procs.log("insecure")  # plaintext against TLS: it retries, and never gets an id
    assert "Starting insecure channel" in log and "Connection attempt failed" in log
    assert "SuperNode ID" not in log and "Receiving:" not in log
    assert "SuperNode ID" in federation.procs.log("node-1")  # what getting in looks like


def test_run_keeps_each_users_personal_adapter_on_their_node(federation):
    log = federation.procs.log("run-1")
    assert federation.first_run == 0, log[-3000:]
    assert "finished:completed" in log
    metrics = read_json(federation.run_dir / "metrics.json")
    all_users = {u.user_id for node in federation.users for u in node}
    assert metrics["status"] == "complete"
    # Users reach the server under pseudonyms only, without their history sizes (the default policy).
    scored = set(metrics["methods"]["oppu"]["users"])
    assert len(scored) == len(all_users) and all(uid.startswith("p-") for uid in scored)
    assert scored == set(metrics["methods"]["shared"]["users"])  # one name per user across the run
    assert metrics["history"] == {}
    results = (federation.run_dir / "metrics.json").read_text()
    assert not any(user in results for user in all_users)
    assert metrics["personalize"]["oppu"]["users-trained"] == len(all_users)
    assert [r["round"] for r in metrics["rounds"] if "train" in r] == [1]
    assert all(r["train"]["clients"] == 2 for r in metrics["rounds"] if "train" in r)
    digests = set()
    for index, node_users in enumerate(federation.users):
        manifest = federation.manifest(index)
        assert set(manifest) == {f"oppu/{u.user_id}" for u in node_users}
        for user in node_users:
            entry = manifest[f"oppu/{user.user_id}"]
            adapter = federation.data[index] / STATE_DIR / entry["path"]
            assert (adapter / "adapter_config.json").is_file()
            assert file_sha256(adapter / "adapter_model.safetensors") == entry["sha256"]
            assert entry["data_fingerprint"] == history_fingerprint(user.history)
            assert entry["shared_version"] == 1 and entry["created"] > 0
            digests.add(entry["shared_digest"])
    assert len(digests) == 1  # every user built on the same federated base adapter
    # Nothing personal on the server: only shared-adapter checkpoints and metrics.
    assert not list(federation.run_dir.rglob("manifest.json"))


def test_restarted_nodes_reuse_their_adapters_and_retrain_a_corrupt_one(federation):
    assert federation.first_run == 0
    for node in federation.nodes:
        federation.procs.stop(node)
    wait_for(lambda: "online" not in federation.online(), 60, "both nodes offline", every=ONLINE_POLL)
    before = [federation.manifest(i) for i in range(2)]
    corrupt_key = f"oppu/{federation.users[1][0].user_id}"
    weights = federation.data[1] / STATE_DIR / before[1][corrupt_key]["path"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])

    federation.start_nodes()
    wait_for(
        lambda: federation.online().count("online") == 2,
        120,
        "both nodes online",
        *federation.nodes,
        every=ONLINE_POLL,
    )
    assert federation.procs.run("run-2", *federation.run_args, "--set", "resume=true", timeout=300) == 0, (
        federation.procs.log("run-2")[-3000:]
    )

    summary = read_json(federation.run_dir / "metrics.json")["personalize"]["oppu"]
    assert (summary["users-reused"], summary["users-trained"]) == (3, 1)
    after = [federation.manifest(i) for i in range(2)]
    for index in range(2):
        for key, entry in before[index].items():
            if key == corrupt_key:
                retrained = after[index][key]
                assert retrained["created"] > entry["created"]
                new_weights = (
                    federation.data[index] / STATE_DIR / retrained["path"] / "adapter_model.safetensors"
                )
                assert file_sha256(new_weights) == retrained["sha256"]
                assert not weights.parent.exists()  # a new version replaced the corrupt one
                assert retrained["shared_digest"] == entry["shared_digest"]
            else:
                assert after[index][key] == entry  # reused as is: same file, same record
