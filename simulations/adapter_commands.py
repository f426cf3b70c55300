"""`fedoppu adapter list|export|import|delete`: a user's personal adapters belong to the user.

Run on the node that hosts the user. Export hands the user a portable archive (peft adapters plus
their manifest entries); import puts one on this node (for example after the user moved here);
delete removes every trace of the user the node made: adapters, cached profiles, manifest entries.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from common.io import DataError

if TYPE_CHECKING:
    from client.store import PersonalAdapterStore

console = Console(stderr=True)


def _store(args: argparse.Namespace, *, existing: bool = True) -> PersonalAdapterStore:
    """The node's adapter store, from --state-dir or --data as `fedoppu node start` was given them."""
    from client.store import PersonalAdapterStore, node_state_dir  # torch and peft: only when used

    if not args.data and not args.state_dir:
        raise DataError("pass --data (the node's data directory) or --state-dir (its state directory)")
    root = node_state_dir(args.data or "", args.state_dir)
    if existing and not root.is_dir():
        raise DataError(f"{root}: no node state here (expected the directory a node keeps its adapters in)")
    return PersonalAdapterStore(root)


def list_command(args: argparse.Namespace) -> int:
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
            f"data {r.data_fingerprint[:12]}  {created} UTC  {status}"
        )
    return 0


def export_command(args: argparse.Namespace) -> int:
    records = _store(args).export_user(args.user, args.out, args.variant)
    console.print(
        f"wrote {args.out}: {', '.join(r.variant for r in records)} adapters of user {escape(args.user)}"
    )
    return 0


def import_command(args: argparse.Namespace) -> int:
    store = _store(args, existing=False)
    records = store.import_archive(args.archive, user_id=args.user, overwrite=args.overwrite)
    console.print(
        f"imported {', '.join(r.variant for r in records)} adapters of user {escape(records[0].user_id)} "
        f"into {store.root}"
    )
    return 0


def delete_command(args: argparse.Namespace) -> int:
    from client.store import PROFILES
    from common.profiles import ProfileCache

    store = _store(args)
    adapters = store.delete(args.user)
    profiles = ProfileCache(store.root / PROFILES).delete(args.user)
    if adapters == profiles == 0:
        console.print(f"nothing of user {escape(args.user)} in {store.root}")
    else:
        console.print(
            f"deleted user {escape(args.user)} from {store.root}: {adapters} adapter(s) with their manifest "
            f"entries, {profiles} cached profile(s)"
        )
    return 0


def register(subparsers) -> None:
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
        list_command,
        user_required=False,
    )
    export = command(
        "export", "write a user's adapters to a portable .tar.gz", export_command, user_required=True
    )
    export.add_argument("--out", required=True, type=Path, help="archive to write, e.g. u001.tar.gz")
    export.add_argument(
        "--variant", action="append", help="only this method's adapter (repeatable; default: all)"
    )
    imported = command(
        "import", "add an exported archive's adapters to this node", import_command, user_required=False
    )
    imported.add_argument("archive", type=Path, help="a .tar.gz from `fedoppu adapter export`")
    imported.add_argument("--overwrite", action="store_true", help="replace the user's adapters already here")
    command(
        "delete",
        "remove every trace of a user on this node: adapters, profiles, manifest",
        delete_command,
        user_required=True,
    )
