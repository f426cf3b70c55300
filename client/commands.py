"""The node's commands: `fedoppu node start`, and `fedoppu adapter list|export|import|delete`.

`node start` wraps Flower's flower-supernode (every flag keeps Flower's meaning) and passes the node's
data directory and privacy policy in its node config, so its users' adapters stay on its disk and the
node, not the run, decides what privacy it accepts (docs/deploy.md). Beside it runs the node's own
SuperExec (client/superexec.py), which launches only the app packages the node trusts.
A user's personal adapters belong to the user; run the `adapter` commands on the node that hosts them.
Export hands the user a portable archive (peft adapters plus their manifest entries); import puts one
on this node (for example after the user moved here); delete removes every trace of the user the node
made: adapters, cached profiles, manifest entries.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from common.cli import console
from common.flower_processes import DeployError, exec_flower, existing_path, flower_binary, flower_env
from common.io import DataError

if TYPE_CHECKING:
    from client.store import GateDecision, PersonalAdapterStore

NODE_PORT = 9094  # a SuperNode's local ClientApp API: unique per machine


def _toml_string(value: str, flag: str) -> str:
    """A TOML string for Flower's `--node-config key="value"` pairs, which cannot escape quotes."""
    if '"' in value or "\\" in value:
        raise DeployError(
            f"{flag} {value}: a path with '\"' or '\\' cannot be passed in Flower's node config"
        )
    return f'"{value}"'


def supernode_command(args: argparse.Namespace) -> list[str]:
    data = existing_path(Path(args.data), "--data", "expected this node's data directory (or .jsonl file)")
    node_config = [f"data-path={_toml_string(str(data), '--data')}"]
    if args.state_dir:
        node_config.append(f"state-dir={_toml_string(str(Path(args.state_dir).resolve()), '--state-dir')}")
    elif data.is_file():
        raise DeployError(f"--data {data} is a file: pass --state-dir for this node's adapters and profiles")
    if args.policy:
        policy = existing_path(Path(args.policy), "--policy", "expected the node's privacy policy (TOML)")
        node_config.append(f"policy-path={_toml_string(str(policy), '--policy')}")
    if args.task:
        node_config.append(f"task={_toml_string(args.task, '--task')}")
    command = [
        flower_binary("flower-supernode"),
        "--superlink",
        args.superlink,
        "--port",
        str(args.port),
        "--node-config",
        " ".join(node_config),
        "--isolation",
        "process",  # the ClientApps are launched by the node's own SuperExec: trusted apps only
    ]
    if args.insecure:
        command.append("--insecure")
    else:
        if not args.root_certificates or not args.key:
            raise DeployError(
                "--root-certificates (the federation's ca.crt) and --key (this node's private key) are "
                "required unless --insecure"
            )
        ca = existing_path(
            Path(args.root_certificates), "--root-certificates", "expected the federation's ca.crt"
        )
        command += ["--root-certificates", str(ca)]
    if args.key:
        key = existing_path(Path(args.key), "--key", "create one with `fedoppu certs create --node NAME`")
        command += ["--auth-supernode-private-key", str(key)]
    return command


def superexec_command(port: int, trusted: list[str], parent_pid: int) -> list[str]:
    """The node's SuperExec (client/superexec.py) for the SuperNode's local Runtime API."""
    command = [sys.executable, "-m", "client.superexec", "--runtime-api-address", f"127.0.0.1:{port}"]
    command += ["--parent-pid", str(parent_pid)]
    return command + [arg for digest in trusted for arg in ("--trusted", digest)]


def node_start_command(args: argparse.Namespace) -> int:
    from client.policy import NodePolicy, load_policy
    from client.superexec import trusted_apps

    command = supernode_command(args)
    policy = load_policy(args.policy) if args.policy else NodePolicy()  # checked before anything starts
    trusted = trusted_apps(policy)
    console.print(f"this node runs only the app package(s) {', '.join(t[:12] for t in trusted) or '(none)'}")
    # Started first, it outlives nothing: once this process becomes the SuperNode (same pid), the
    # SuperExec exits with it.
    subprocess.Popen(superexec_command(args.port, trusted, os.getpid()), env=flower_env())
    return exec_flower(command)


def _store(args: argparse.Namespace, *, existing: bool = True) -> PersonalAdapterStore:
    """The node's adapter store, from --state-dir or --data as `fedoppu node start` was given them."""
    from client.store import PersonalAdapterStore, node_state_dir  # torch and peft: only when used

    if not args.data and not args.state_dir:
        raise DataError("pass --data (the node's data directory) or --state-dir (its state directory)")
    root = node_state_dir(args.data or "", args.state_dir)
    if existing and not root.is_dir():
        raise DataError(f"{root}: no node state here (expected the directory a node keeps its adapters in)")
    return PersonalAdapterStore(root)


def adapter_list_command(args: argparse.Namespace) -> int:
    """One line per adapter (grep-friendly): user, method, base round and digest, data, time, checksum."""
    store = _store(args)
    records = sorted(
        (r for r in store.records() if args.user is None or r.user_id == args.user),
        key=lambda r: (r.user_id, r.variant),
    )
    out = Console(soft_wrap=True)
    out.print(f"{len(records)} personal adapter(s) in {escape(str(store.root))}")
    for r in records:
        created = datetime.datetime.fromtimestamp(r.created, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S"
        )
        base_round = "?" if r.shared_version is None else r.shared_version
        status = "ok" if store.intact(r) else "[red]CORRUPT (retrained in the next run)[/red]"
        out.print(
            f"{escape(r.user_id)}  {r.variant}  base round {base_round}  base {r.shared_digest}  "
            f"data {r.data_fingerprint[:12]}  {created} UTC  {status}  gate {gate_summary(r.gate)}"
        )
    return 0


def gate_summary(gate: GateDecision) -> str:
    """How the user is answered (client/gate.py), in one word group: 'none' under OPPU's original."""
    from client.store import GateDecision

    if gate.setting == GateDecision().setting:
        return "none"
    used = f"personal {gate.epochs:g} epochs" if gate.uses_personal else "no personal"
    reason = f" ({gate.reason})" if gate.reason else ""
    loss = (
        ""
        if gate.holdout_loss is None
        else f", held-out loss {gate.holdout_loss:.3f} on {gate.holdout_items}"
    )
    return f"shared x{gate.shared_weight:g}, {used}{loss}{reason}"


def adapter_export_command(args: argparse.Namespace) -> int:
    records = _store(args).export_user(args.user, args.out, args.variant)
    console.print(
        f"wrote {args.out}: {', '.join(r.variant for r in records)} adapters of user {escape(args.user)}"
    )
    return 0


def adapter_import_command(args: argparse.Namespace) -> int:
    store = _store(args, existing=False)
    records = store.import_archive(args.archive, user_id=args.user, overwrite=args.overwrite)
    console.print(
        f"imported {', '.join(r.variant for r in records)} adapters of user {escape(records[0].user_id)} "
        f"into {store.root}"
    )
    return 0


def adapter_delete_command(args: argparse.Namespace) -> int:
    from client.hidden import HIDDEN_DIR, HiddenStore
    from client.store import PROFILES
    from common.profiles import ProfileCache

    store = _store(args)
    adapters = store.delete(args.user)
    profiles = ProfileCache(store.root / PROFILES).delete(args.user)
    hidden = HiddenStore(store.root / HIDDEN_DIR).delete(args.user)
    if adapters == profiles == hidden == 0:
        console.print(f"nothing of user {escape(args.user)} in {store.root}")
    else:
        console.print(
            f"deleted user {escape(args.user)} from {store.root}: {adapters} adapter(s) with their manifest "
            f"entries, {profiles} cached profile(s), {hidden} file(s) of cached hidden states"
        )
    return 0


def register(subparsers) -> None:
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
    node_start_parser.add_argument(
        "--policy",
        metavar="TOML",
        help="this node's privacy policy (docs/deploy.md); default: the deployed default of client/policy.py",
    )
    node_start_parser.add_argument(
        "--task", help="the task of data that names none (a .jsonl file); the run config cannot change it"
    )
    node_start_parser.set_defaults(func=node_start_command)

    adapter = subparsers.add_parser(
        "adapter", help="list, export, import or delete a user's personal adapters"
    )
    commands = adapter.add_subparsers(dest="adapter_command", required=True)

    def command(name: str, help_text: str, func, *, user_required: bool) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text)
        parser.add_argument("--data", help="the node's data directory (its state is <data>/.fedoppu)")
        parser.add_argument("--state-dir", help="the node's state directory, if it was started with one")
        parser.add_argument("--user", required=user_required, help="the user's id")
        parser.set_defaults(func=func)
        return parser

    command(
        "list",
        "the node's personal adapters and whether each passes its checksum",
        adapter_list_command,
        user_required=False,
    )
    export = command(
        "export", "write a user's adapters to a portable .tar.gz", adapter_export_command, user_required=True
    )
    export.add_argument("--out", required=True, type=Path, help="archive to write, e.g. u001.tar.gz")
    export.add_argument(
        "--variant", action="append", help="only this method's adapter (repeatable; default: all)"
    )
    imported = command(
        "import",
        "add an exported archive's adapters to this node, for the user it was exported for",
        adapter_import_command,
        user_required=True,
    )
    imported.add_argument("archive", type=Path, help="a .tar.gz from `fedoppu adapter export`")
    imported.add_argument("--overwrite", action="store_true", help="replace the user's adapters already here")
    command(
        "delete",
        "remove every trace of a user on this node: adapters, profiles, manifest",
        adapter_delete_command,
        user_required=True,
    )
