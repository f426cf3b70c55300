"""Deployment: certificates, the wrapped Flower commands, and a real federation on 127.0.0.1.

The federation test starts a SuperLink and two SuperNodes through `fedoppu` with TLS and SuperNode
authentication, runs 2 rounds and personalization with the tiny model, restarts the nodes, runs
again and checks what each node kept on its own disk and what reached the server (pseudonyms only);
a node with an unregistered key, a node that trusts another CA and an `--insecure` node are refused.
Every ClientApp is launched by the nodes' own SuperExec, which runs only the app package their
checkout builds. Then failures on purpose: a run that waits for its nodes, a node killed while it
trains, and the resume that brings its users back.
Every process is started in its own session and stopped by pid (and its process group), also when
a test fails; a marker in their environment proves that nothing they started is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from client.commands import supernode_command
from client.policy import node_secret, pseudonym
from client.store import STATE_DIR
from client.superexec import app_hash, trusting
from common.flower_processes import DeployError
from common.io import file_sha256, read_json
from common.profiles import history_fingerprint
from common.synthetic import BenchmarkConfig, make_benchmark, write_benchmark
from server.certs import CertDir, CertError, ensure_certs, server_hosts
from server.commands import superlink_command
from simulations.cli import main

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
    import shutil

    from common.config import PROJECT_DIR

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
CONNECTION = "fedoppu-test"
USERS_PER_NODE = 2
MARKER = "FEDOPPU_DEPLOY_TEST"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Every descendant of pid, from /proc (Flower's SuperExec runs in a session of its own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


class Processes:
    """Every process the test starts, each in its own session, logged to a file and stopped by pid."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env, self.started = root, env, []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "simulations.cli", *args],
                cwd=self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def run(self, name: str, *args: str, timeout: float) -> int:
        proc = self.start(name, *args)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            pytest.fail(f"`fedoppu {args[0]}` took over {timeout:.0f} s; log:\n{self.log(name)[-3000:]}")

    def stop(self, proc: subprocess.Popen) -> None:
        descendants = _children(proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in descendants:
                _send(pid, sig)
            _send(proc.pid, sig, group=True)
            try:
                proc.wait(20)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)

    def leftovers(self) -> list[int]:
        """Processes still running with this test's marker in their environment."""
        mine = f"{MARKER}={self.env[MARKER]}".encode()
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mine in environ.read_bytes().split(b"\0"):
                    found.append(int(environ.parent.name))
            except OSError:
                continue
        return found


def _send(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def _wait_for(condition, timeout: float, what: str, *watched: subprocess.Popen, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in watched):
            pytest.fail(f"a process exited while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclasses.dataclass
class Federation:
    root: Path
    procs: Processes
    certs: CertDir
    port: int
    data: list[Path]
    users: list[list]
    run_args: list[str]
    nodes: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    intruder: subprocess.Popen | None = None
    untrusting: list[subprocess.Popen] = dataclasses.field(default_factory=list)
    first_run: int | None = None

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def online(self) -> list[str]:
        listed = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "supernode", "list", CONNECTION, "--format", "json"],
            env=self.procs.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        try:
            nodes = json.loads(listed.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return []
        return [n["status"] for n in nodes]

    def start_node(self, name: str, data: Path, *tls: str) -> subprocess.Popen:
        """A node with TLS flags `tls`; by default the federation's CA and the node's own key."""
        tls = tls or ("--root-certificates", str(self.certs.ca_cert), "--key", str(self.certs.node_key(name)))
        return self.procs.start(
            name,
            *("node", "start", "--data", str(data), "--superlink", f"127.0.0.1:{self.port}"),
            *(*tls, "--port", str(_free_port())),
        )

    def start_nodes(self) -> None:
        self.nodes = [self.start_node(f"node-{i + 1}", data) for i, data in enumerate(self.data)]

    def manifest(self, index: int) -> dict[str, dict]:
        return read_json(self.data[index] / STATE_DIR / "manifest.json")["adapters"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("deploy")
    env = {
        **os.environ,
        "FLWR_HOME": str(root / "flwr-home"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        MARKER: uuid.uuid4().hex,
    }
    procs = Processes(root, env)
    certs = CertDir(root / "certs")
    ensure_certs(certs.root, [], ["node-1", "node-2", "intruder", "wrong-ca"])
    other_ca = CertDir(root / "other-certs")  # a CA the SuperLink's certificate does not come from
    ensure_certs(other_ca.root, [], [])
    bench = make_benchmark(BenchmarkConfig(num_users=4, min_history=8, max_history=12, queries_per_user=2))
    users = [bench.users[i * USERS_PER_NODE : (i + 1) * USERS_PER_NODE] for i in range(2)]
    data = [root / f"node-{i + 1}-data" for i in range(2)]
    for path, node_users in zip(data, users, strict=True):
        write_benchmark(dataclasses.replace(bench, users=node_users), path)
    port = _free_port()
    settings = {
        "model": f'"{tiny_model_dir}"',
        "run-dir": f'"{root / "run"}"',
        "task": "tagging",
        "num-rounds": 2,
        "local-steps": 2,
        "batch-size": 4,
        "personal-epochs": 0.5,
        "methods": "shared,oppu",
        "eval-every-round": "false",
    }
    run_args = [
        "run",
        "--connection",
        CONNECTION,
        *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")),
    ]
    try:
        superlink = procs.start(
            "superlink",
            *("server", "start", "--port", str(port), "--certs", str(certs.root)),
            *("--database", str(root / "superlink.db"), "--connection", CONNECTION),
        )
        _wait_for(lambda: _listening(port), 60, "the SuperLink", superlink)
        # wrong-ca's key is registered: TLS alone must keep it out.
        keys = [str(certs.node_public_key(name)) for name in ("node-1", "node-2", "wrong-ca")]
        assert procs.run("register", "certs", "register", "--connection", CONNECTION, *keys, timeout=60) == 0
        fed = Federation(root, procs, certs, port, data, users, run_args)
        fed.start_nodes()
        fed.intruder = fed.start_node("intruder", data[0])
        wrong_ca = ("--root-certificates", str(other_ca.ca_cert), "--key", str(certs.node_key("wrong-ca")))
        fed.untrusting = [
            fed.start_node("wrong-ca", data[0], *wrong_ca),
            fed.start_node("insecure", data[0], "--insecure"),
        ]
        _wait_for(lambda: fed.online().count("online") == 2, 180, "both nodes online", *fed.nodes, every=2)
        fed.first_run = procs.run("run-1", *run_args, timeout=420)
        yield fed
    finally:
        procs.stop_all()
        deadline = time.monotonic() + 20
        while procs.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = procs.leftovers()
        for pid in left:
            _send(pid, signal.SIGKILL)
        assert not left, f"processes left running after the test: {left}"


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
    assert [r["round"] for r in metrics["rounds"] if "train" in r] == [1, 2]
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
            assert entry["shared_version"] == 2 and entry["created"] > 0
            digests.add(entry["shared_digest"])
    assert len(digests) == 1  # every user built on the same federated base adapter
    # Nothing personal on the server: only shared-adapter checkpoints and metrics.
    assert not list(federation.run_dir.rglob("manifest.json"))


def test_restarted_nodes_reuse_their_adapters_and_retrain_a_corrupt_one(federation):
    assert federation.first_run == 0
    for node in federation.nodes:
        federation.procs.stop(node)
    _wait_for(lambda: "online" not in federation.online(), 60, "both nodes offline", every=2)
    before = [federation.manifest(i) for i in range(2)]
    corrupt_key = f"oppu/{federation.users[1][0].user_id}"
    weights = federation.data[1] / STATE_DIR / before[1][corrupt_key]["path"] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])

    federation.start_nodes()
    _wait_for(
        lambda: federation.online().count("online") == 2, 120, "both nodes online", *federation.nodes, every=2
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


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL a node and everything it started (its ClientApp): a machine that dies mid-work."""
    for pid in _children(proc.pid):
        _send(pid, signal.SIGKILL)
    _send(proc.pid, signal.SIGKILL, group=True)
    proc.wait(20)


def _pseudonyms(federation, index: int, scope: str) -> list[str]:
    """The names node `index`'s users reach the server under (the default policy: pseudonyms)."""
    secret = node_secret(federation.data[index] / STATE_DIR)
    return sorted(pseudonym(secret, scope, user.user_id) for user in federation.users[index])


def test_a_node_killed_while_training_is_dropped_and_its_users_come_back_on_resume(federation):
    """Failures on purpose, on one loopback deployment: the run waits for `min-nodes` before training,
    node-2 is killed (SIGKILL) while it trains, the round is aggregated from node-1, personalization and
    evaluation report node-2's users as missing by name, and once node-2 is back a resumed run trains
    and scores only them; no checkpoint or adapter is lost."""
    procs, run_dir = federation.procs, federation.run_dir
    for node in federation.nodes:
        procs.stop(node)
    _wait_for(lambda: "online" not in federation.online(), 90, "both nodes offline", every=2)
    before = read_json(run_dir / "metrics.json")
    last = max(r["round"] for r in before["rounds"])
    checkpoints = {
        p.parent.name: p.read_bytes() for p in run_dir.glob("checkpoints/round-*/adapter_model.safetensors")
    }
    settings = {
        "resume": "true",
        "num-rounds": last + 1,  # one more round, in which node-2 dies
        "min-nodes": 2,
        "min-nodes-timeout": 300,
        # Generous: the SuperLink reports the dead node unavailable once its heartbeats stop (~1 min).
        "train-timeout": 300,
        "personalize-timeout": 300,
        "evaluate-timeout": 300,
        "train-retries": 0,
    }
    args = [*federation.run_args, *(a for k, v in settings.items() for a in ("--set", f"{k}={v}"))]
    run = procs.start("run-3", *args)
    _wait_for(
        lambda: "waiting for nodes: 0 of 2 connected" in procs.log("run-3"), 120, "the run to wait", run
    )
    received = procs.log("node-2").count("Receiving: train message")
    federation.start_nodes()
    _wait_for(
        lambda: procs.log("node-2").count("Receiving: train message") > received, 240, "node-2 to train", run
    )
    _kill(federation.nodes[1])
    assert run.wait(600) == 0, procs.log("run-3")[-3000:]

    metrics = read_json(run_dir / "metrics.json")
    node_1, node_2 = (_pseudonyms(federation, index, metrics["user_scope"]) for index in range(2))
    assert metrics["status"] == "complete"
    trained = metrics["rounds"][-1]
    assert trained["round"] == last + 1 and (trained["train"]["sampled"], trained["train"]["clients"]) == (
        2,
        1,
    )
    [dropped] = trained["dropped"]
    assert dropped["reason"] == "no reply within 60 s (train-timeout)" or dropped["reason"].startswith(
        "error:"
    )
    for method in ("shared", "oppu"):
        assert sorted(metrics["methods"][method]["users"]) == node_1, method
        assert metrics["methods"][method]["missing"]["users"] == node_2, method
    personalize = metrics["personalize"]["oppu"]
    assert personalize["missing"]["users"] == node_2 and personalize["users-trained"] == 2
    assert "waiting for nodes: 0 of 2 connected" in procs.log("run-3")

    federation.nodes[1] = federation.start_node("node-2", federation.data[1])
    _wait_for(lambda: federation.online().count("online") == 2, 120, "node-2 back online", every=2)
    assert procs.run("run-4", *args, timeout=420) == 0, procs.log("run-4")[-3000:]
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
    assert len(after) == len(checkpoints) + 1 and all(
        after[name] == data for name, data in checkpoints.items()
    )
