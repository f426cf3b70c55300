"""The server's commands: `fedoppu server start`, `run` and `certs`: the federation on real machines.

Thin wrappers over Flower's own commands (flower-superlink, flwr), so every flag keeps Flower's
meaning. What they add: TLS and SuperNode authentication unless `--insecure` is asked for, a `run`
that exits non-zero when the federation fails, and the certificates and node keys. A node's own
command (`fedoppu node start`) is client/commands.py's. See docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import tomli_w
from rich.markup import escape

from common.cli import add_run_config_arguments, console
from common.config import PROJECT_DIR, load_run_config
from common.flower_processes import DeployError, exec_flower, existing_path, flower_binary, run_flwr
from server.certs import CertDir, ensure_certs

SUPERLINK_PORT = 9092  # Fleet, Control and Runtime APIs share it (Flower's own default, 8000, is often taken)
DEFAULT_CONNECTION = "fedoppu"


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
            str(existing_path(certs.ca_cert, "--certs", hint)),
            "--ssl-certfile",
            str(existing_path(certs.server_cert, "--certs", hint)),
            "--ssl-keyfile",
            str(existing_path(certs.server_key, "--certs", hint)),
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


def server_start_command(args: argparse.Namespace) -> int:
    command = superlink_command(args)
    local_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    ca = None if args.insecure else CertDir(Path(args.certs)).ca_cert
    write_connection(args.connection, f"{local_host}:{args.port}", ca)
    console.print(
        f"connection '{args.connection}' -> {local_host}:{args.port} written to Flower's config; "
        f"register nodes with `fedoppu certs register --connection {args.connection} NODE.pub`"
    )
    return exec_flower(command)


# -- runs ------------------------------------------------------------------------------------------
def run_command(args: argparse.Namespace) -> int:
    if args.superlink:
        if not args.insecure and not args.root_certificates:
            raise DeployError("--superlink needs --root-certificates (the federation's ca.crt) or --insecure")
        ca = None
        if not args.insecure:
            ca = existing_path(
                Path(args.root_certificates), "--root-certificates", "expected the federation's ca.crt"
            )
        write_connection(args.connection, args.superlink, ca)
    # Validated here, so a typo fails before anything is submitted; the run gets the whole config.
    config = load_run_config(args.config, args.set or [])
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as handle:
        tomli_w.dump(config.to_flower(), handle)
    try:
        started = run_flwr(
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
    run_flwr("log", str(run_id), args.connection, "--stream")
    return _report_status(run_id, args.connection)


def _report_status(run_id: str, connection: str) -> int:
    listed = run_flwr("list", connection, "--run-id", str(run_id), "--format", "json", capture=True)
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
def certs_create_command(args: argparse.Namespace) -> int:
    written = ensure_certs(args.dir, args.host or [], args.node or [])
    for path in written:
        console.print(f"wrote {path}")
    if not written:
        console.print(f"{args.dir}: nothing to create, every file exists")
    return 0


def certs_register_command(args: argparse.Namespace) -> int:
    for key in args.public_keys:
        existing_path(Path(key), "public key", "expected a node's .pub file from `fedoppu certs create`")
        result = run_flwr("supernode", "register", str(key), args.connection)
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
    start.set_defaults(func=server_start_command)

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
    run_parser.set_defaults(func=run_command)

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
    create.set_defaults(func=certs_create_command)
    register_parser = certs_commands.add_parser(
        "register", help="allow nodes' public keys on the SuperLink (flwr supernode register)"
    )
    register_parser.add_argument("public_keys", nargs="+", metavar="NODE.pub")
    register_parser.add_argument(
        "--connection", default=DEFAULT_CONNECTION, help="`flwr` connection (default: %(default)s)"
    )
    register_parser.set_defaults(func=certs_register_command)
