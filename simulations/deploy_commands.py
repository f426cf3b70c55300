"""`fedoppu server start`, `node start`, `run` and `certs`: the federation on real machines.

Thin wrappers over Flower's own commands (flower-superlink, flower-supernode, flwr), so every flag
keeps Flower's meaning. What they add: TLS and SuperNode authentication unless `--insecure` is
asked for, the node's data directory passed in its node config (so its users' adapters stay on its
disk), and a `run` that exits non-zero when the federation fails. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import tomli_w
from rich.console import Console
from rich.markup import escape

from common.config import PROJECT_DIR, add_run_config_arguments, load_run_config
from common.io import DataError
from simulations.certs import CertDir, ensure_certs

SUPERLINK_PORT = 9092  # Fleet, Control and Runtime APIs share it (Flower's own default, 8000, is often taken)
NODE_PORT = 9094  # a SuperNode's local ClientApp API: unique per machine
DEFAULT_CONNECTION = "fedoppu"
console = Console(stderr=True)


class DeployError(DataError):
    """A flag or file the deployment needs is missing or wrong; the message names it."""


# -- processes -------------------------------------------------------------------------------------
def flower_binary(name: str) -> str:
    """A Flower executable from this environment first, so nodes run the same versions as the CLI."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if found is None:
        raise DeployError(
            f"'{name}' not found next to {sys.executable} or on PATH: install flwr in this environment"
        )
    return found


def flower_env() -> dict[str, str]:
    """The environment for Flower's processes: they start further Flower processes by name, and app
    dependencies are this environment's, never installed at run time."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _exec(command: list[str]) -> NoReturn:
    """Become the Flower process, so its pid is this command's and signals reach it directly."""
    console.print(f"[dim]$ {escape(shlex.join(command))}[/dim]", soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, flower_env())


def _flwr(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_binary("flwr"), *args], env=flower_env(), text=True, capture_output=capture, check=False
    )


def _existing(path: Path, flag: str, hint: str) -> Path:
    if not path.exists():
        raise DeployError(f"{flag} {path}: not found; {hint}")
    return path.resolve()


# -- SuperLink ---------------------------------------------------------------------------------------
def superlink_command(args: argparse.Namespace) -> list[str]:
    command = [flower_binary("flower-superlink"), "--host", args.host, "--port", str(args.port)]
    if args.insecure:
        command.append("--insecure")
    else:
        certs = CertDir(Path(args.certs))
        hint = f"create it with `fedoppu certs create --dir {args.certs} --host <this server's name>`"
        command += [
            "--ssl-ca-certfile",
            str(_existing(certs.ca_cert, "--certs", hint)),
            "--ssl-certfile",
            str(_existing(certs.server_cert, "--certs", hint)),
            "--ssl-keyfile",
            str(_existing(certs.server_key, "--certs", hint)),
            "--enable-supernode-auth",
        ]
    return [*command, "--database", args.database, "--disable-runtime-dependency-installation"]


def write_connection(name: str, address: str, root_certificates: Path | None) -> None:
    """Record how `flwr` reaches a SuperLink in $FLWR_HOME/config.toml (Flower's own format)."""
    from flwr.cli.flower_config import write_superlink_connection
    from flwr.cli.typing import SuperLinkConnection

    certificates = str(root_certificates.resolve()) if root_certificates else None
    connection = SuperLinkConnection(
        name, address=address, root_certificates=certificates, insecure=True if certificates is None else None
    )
    write_superlink_connection(connection)


def server_start(args: argparse.Namespace) -> int:
    command = superlink_command(args)
    local_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    ca = None if args.insecure else CertDir(Path(args.certs)).ca_cert
    write_connection(args.connection, f"{local_host}:{args.port}", ca)
    console.print(
        f"connection '{args.connection}' -> {local_host}:{args.port} written to Flower's config; "
        f"register nodes with `fedoppu certs register --connection {args.connection} NODE.pub`"
    )
    return _exec(command)


# -- SuperNode -------------------------------------------------------------------------------------
def _toml_string(value: str, flag: str) -> str:
    """A TOML string for Flower's `--node-config key="value"` pairs, which cannot escape quotes."""
    if '"' in value or "\\" in value:
        raise DeployError(
            f"{flag} {value}: a path with '\"' or '\\' cannot be passed in Flower's node config"
        )
    return f'"{value}"'


def supernode_command(args: argparse.Namespace) -> list[str]:
    data = _existing(Path(args.data), "--data", "expected this node's data directory (or .jsonl file)")
    node_config = [f"data-path={_toml_string(str(data), '--data')}"]
    if args.state_dir:
        node_config.append(f"state-dir={_toml_string(str(Path(args.state_dir).resolve()), '--state-dir')}")
    elif data.is_file():
        raise DeployError(f"--data {data} is a file: pass --state-dir for this node's adapters and profiles")
    command = [
        flower_binary("flower-supernode"),
        "--superlink",
        args.superlink,
        "--port",
        str(args.port),
        "--node-config",
        " ".join(node_config),
    ]
    if args.insecure:
        command.append("--insecure")
    else:
        if not args.root_certificates or not args.key:
            raise DeployError(
                "--root-certificates (the federation's ca.crt) and --key (this node's private key) are "
                "required unless --insecure"
            )
        ca = _existing(
            Path(args.root_certificates), "--root-certificates", "expected the federation's ca.crt"
        )
        command += ["--root-certificates", str(ca)]
    if args.key:
        key = _existing(Path(args.key), "--key", "create one with `fedoppu certs create --node NAME`")
        command += ["--auth-supernode-private-key", str(key)]
    return command


def node_start(args: argparse.Namespace) -> int:
    return _exec(supernode_command(args))


# -- runs ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.superlink:
        if not args.insecure and not args.root_certificates:
            raise DeployError("--superlink needs --root-certificates (the federation's ca.crt) or --insecure")
        ca = None
        if not args.insecure:
            ca = _existing(
                Path(args.root_certificates), "--root-certificates", "expected the federation's ca.crt"
            )
        write_connection(args.connection, args.superlink, ca)
    # Validated here, so a typo fails before anything is submitted; the run gets the whole config.
    config = load_run_config(args.config, args.set or [])
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as handle:
        tomli_w.dump(config.to_flower(), handle)
    try:
        started = _flwr(
            "run",
            str(PROJECT_DIR),
            args.connection,
            "--run-config",
            handle.name,
            "--format",
            "json",
            capture=True,
        )
    finally:
        os.unlink(handle.name)
    try:
        run_id = json.loads(started.stdout)["run-id"]
    except (json.JSONDecodeError, KeyError, TypeError):
        console.print(escape(started.stdout + started.stderr), soft_wrap=True)
        console.print(f"[red]error:[/] the run was not started (flwr exit code {started.returncode})")
        return started.returncode or 1
    console.print(f"[bold]run {run_id}[/] submitted to '{args.connection}'; streaming its logs")
    _flwr("log", str(run_id), args.connection, "--stream")
    return _report_status(run_id, args.connection)


def _report_status(run_id: str, connection: str) -> int:
    listed = _flwr("list", connection, "--run-id", str(run_id), "--format", "json", capture=True)
    try:
        status = json.loads(listed.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        console.print(f"[red]error:[/] cannot read the status of run {run_id}: {escape(listed.stderr)}")
        return 1
    if status == "finished:completed":
        console.print(f"run {run_id}: [green]{status}[/]")
        return 0
    if not status.startswith("finished"):
        console.print(
            f"run {run_id} is {status} on the SuperLink: `flwr log {run_id} {connection}` follows it, "
            f"`flwr stop {run_id} {connection}` stops it"
        )
        return 1
    console.print(f"[red]run {run_id}: {status}[/]; its log above names the error")
    return 1


# -- certificates ----------------------------------------------------------------------------------
def certs_create(args: argparse.Namespace) -> int:
    written = ensure_certs(args.dir, args.host or [], args.node or [])
    for path in written:
        console.print(f"wrote {path}")
    if not written:
        console.print(f"{args.dir}: nothing to create, every file exists")
    return 0


def certs_register(args: argparse.Namespace) -> int:
    for key in args.public_keys:
        _existing(Path(key), "public key", "expected a node's .pub file from `fedoppu certs create`")
        result = _flwr("supernode", "register", str(key), args.connection)
        if result.returncode != 0:
            return result.returncode
    return 0


# -- the command line --------------------------------------------------------------------------------
def register(subparsers) -> None:
    server = subparsers.add_parser("server", help="run the federation's SuperLink on this machine")
    server_commands = server.add_subparsers(dest="server_command", required=True)
    start = server_commands.add_parser(
        "start",
        help="start flower-superlink with TLS and SuperNode authentication",
        description="Start the SuperLink (Fleet, Control and Runtime APIs on one port) with TLS and "
        "SuperNode authentication, and record a `flwr` connection to it in $FLWR_HOME/config.toml.",
    )
    start.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for other machines")
    start.add_argument("--port", type=int, default=SUPERLINK_PORT, help="port (default: %(default)s)")
    start.add_argument(
        "--certs", default="certs", help="directory from `fedoppu certs create` (default: certs)"
    )
    start.add_argument(
        "--insecure", action="store_true", help="no TLS and no node authentication (local tests)"
    )
    start.add_argument(
        "--database",
        default="superlink.db",
        help="SuperLink state file: registered nodes and runs survive restarts (default: %(default)s)",
    )
    start.add_argument(
        "--connection",
        default=DEFAULT_CONNECTION,
        help="name of the `flwr` connection to write (default: %(default)s)",
    )
    start.set_defaults(func=server_start)

    node = subparsers.add_parser("node", help="run a SuperNode that serves this machine's users")
    node_commands = node.add_subparsers(dest="node_command", required=True)
    node_start_parser = node_commands.add_parser(
        "start",
        help="start flower-supernode for the users in --data",
        description="Start a SuperNode whose ClientApp trains on the users in --data and keeps their "
        "personal adapters, profiles and manifest in <data>/.fedoppu (or --state-dir).",
    )
    node_start_parser.add_argument("--data", required=True, help="this node's users: OPPU/LaMP directory")
    node_start_parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink")
    node_start_parser.add_argument("--root-certificates", metavar="CA", help="the federation's ca.crt")
    node_start_parser.add_argument("--key", help="this node's private key from `fedoppu certs create --node`")
    node_start_parser.add_argument(
        "--insecure", action="store_true", help="no TLS (the SuperLink runs --insecure)"
    )
    node_start_parser.add_argument(
        "--port",
        type=int,
        default=NODE_PORT,
        help="local ClientApp API port, unique per machine (default: %(default)s)",
    )
    node_start_parser.add_argument(
        "--state-dir", help="where adapters and profiles go (default: <data>/.fedoppu)"
    )
    node_start_parser.set_defaults(func=node_start)

    run_parser = subparsers.add_parser(
        "run",
        help="submit this app to a SuperLink and stream its logs",
        description="Submit the app with `flwr run`, stream its logs, and exit 0 only if the run completed. "
        "Results (metrics.json, checkpoints) are written on the server machine, under run-dir.",
    )
    run_parser.add_argument(
        "--connection", default=DEFAULT_CONNECTION, help="`flwr` connection (default: %(default)s)"
    )
    run_parser.add_argument(
        "--superlink", metavar="HOST:PORT", help="(re)write the connection to this address first"
    )
    run_parser.add_argument(
        "--root-certificates", metavar="CA", help="with --superlink: the federation's ca.crt"
    )
    run_parser.add_argument("--insecure", action="store_true", help="with --superlink: no TLS")
    add_run_config_arguments(run_parser)
    run_parser.set_defaults(func=run)

    certs = subparsers.add_parser("certs", help="create TLS certificates and node keys; register node keys")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    create = certs_commands.add_parser(
        "create",
        help="create a CA, the server certificate and node key pairs (only what is missing)",
        description="Create DIR/ca.crt + ca.key (keep ca.key private), DIR/server.pem + server.key for "
        "the SuperLink, and DIR/nodes/NAME + NAME.pub per node. Existing files are never overwritten.",
    )
    create.add_argument("--dir", default="certs", help="output directory (default: certs)")
    create.add_argument(
        "--host",
        action="append",
        help="a name or IP nodes use to reach the server (repeatable; localhost is added)",
    )
    create.add_argument("--node", action="append", help="a node key pair to create (repeatable)")
    create.set_defaults(func=certs_create)
    register_parser = certs_commands.add_parser(
        "register", help="allow nodes' public keys on the SuperLink (flwr supernode register)"
    )
    register_parser.add_argument("public_keys", nargs="+", metavar="NODE.pub")
    register_parser.add_argument(
        "--connection", default=DEFAULT_CONNECTION, help="`flwr` connection (default: %(default)s)"
    )
    register_parser.set_defaults(func=certs_register)
