"""A real federation on 127.0.0.1 for the deployment tests (tests/test_deploy*.py).

A SuperLink and SuperNodes started through `fedoppu` with TLS and SuperNode authentication, the tiny
model, two nodes of two users each. Every process is started in its own session, logged to a file
and stopped by pid (and its process group), also when a test fails; a marker in their environment
proves that nothing they started is left running.
"""

from __future__ import annotations

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
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.policy import node_secret, pseudonym
from client.store import STATE_DIR
from common.io import read_json
from common.synthetic import BenchmarkConfig, make_benchmark, write_benchmark
from server.certs import CertDir, ensure_certs

CONNECTION = "fedoppu-test"
USERS_PER_NODE = 2
MARKER = "FEDOPPU_DEPLOY_TEST"
ONLINE_POLL = 5.0  # seconds between `Federation.online()` calls: each runs Flower's CLI (~1.2 s of a core)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(pid: int) -> list[int]:
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
        started = descendants(proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in started:
                send(pid, sig)
            send(proc.pid, sig, group=True)
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


def send(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def wait_for(condition, timeout: float, what: str, *watched: subprocess.Popen, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in watched):
            pytest.fail(f"a process exited while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def listening(port: int) -> bool:
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
            *(*tls, "--port", str(free_port())),
        )

    def start_nodes(self) -> None:
        self.nodes = [self.start_node(f"node-{i + 1}", data) for i, data in enumerate(self.data)]

    def manifest(self, index: int) -> dict[str, dict]:
        return read_json(self.data[index] / STATE_DIR / "manifest.json")["adapters"]


@contextlib.contextmanager
def deployment(
    root: Path, model_dir: Path, certified: tuple[str, ...] = (), registered: tuple[str, ...] = ()
) -> Iterator[Federation]:
    """A SuperLink with node-1's and node-2's keys registered (and `registered`'s), certificates for
    them and for `certified`, and each node's data; no node started yet."""
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
    nodes = ("node-1", "node-2")
    ensure_certs(certs.root, [], [*nodes, *certified])
    bench = make_benchmark(BenchmarkConfig(num_users=4, min_history=8, max_history=12, queries_per_user=2))
    users = [bench.users[i * USERS_PER_NODE : (i + 1) * USERS_PER_NODE] for i in range(2)]
    data = [root / f"{node}-data" for node in nodes]
    for path, node_users in zip(data, users, strict=True):
        write_benchmark(dataclasses.replace(bench, users=node_users), path)
    port = free_port()
    settings = {
        "model": f'"{model_dir}"',
        "run-dir": f'"{root / "run"}"',
        "task": "tagging",
        "num-rounds": 1,  # each round starts a ClientApp process per node (torch's imports: ~7 s of a core)
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
        wait_for(lambda: listening(port), 60, "the SuperLink", superlink)
        keys = [str(certs.node_public_key(name)) for name in (*nodes, *registered)]
        assert procs.run("register", "certs", "register", "--connection", CONNECTION, *keys, timeout=60) == 0
        yield Federation(root, procs, certs, port, data, users, run_args)
    finally:
        procs.stop_all()
        deadline = time.monotonic() + 20
        while procs.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = procs.leftovers()
        for pid in left:
            send(pid, signal.SIGKILL)
        assert not left, f"processes left running after the test: {left}"


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a node and everything it started (its ClientApp): a machine that dies mid-work."""
    for pid in descendants(proc.pid):
        send(pid, signal.SIGKILL)
    send(proc.pid, signal.SIGKILL, group=True)
    proc.wait(20)


def pseudonyms(federation, index: int, scope: str) -> list[str]:
    """The names node `index`'s users reach the server under (the default policy: pseudonyms)."""
    secret = node_secret(federation.data[index] / STATE_DIR)
    return sorted(pseudonym(secret, scope, user.user_id) for user in federation.users[index])
