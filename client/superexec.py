"""The node's SuperExec: Flower's own, except that it launches only app packages this node trusts.

A run ships its code: the SuperLink hands every node the run's app package (FAB) and the node runs
its ClientApp, guard included. Whoever reaches the SuperLink's Control API can submit one (open-source
Flower has no accounts there). Flower 1.42's own check, `flower-supernode --trusted-entities`, verifies
signatures that only Flower Hub adds to a FAB: an app built and submitted with `flwr run` (what
`fedoppu run` does) carries none, and a node that sets it refuses every such run.

So `fedoppu node start` runs the SuperNode with `--isolation process` and this SuperExec beside it:
Flower's own loop, with a plugin that launches a task only when its FAB's sha256 is in the node's
allowlist, by default the FAB this node's own checkout builds (Flower builds FABs byte for byte
reproducibly), i.e. exactly the code the node's operator installed. The SuperNode keeps a FAB only
under the sha256 of its content, so the hash names the code that would run.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import build_pathspec, load_gitignore_patterns
from flwr.supercore.superexec import run_superexec as flower_superexec
from flwr.supercore.superexec.executor import LaunchResult
from flwr.supercore.superexec.plugin.base_exec_plugin import AutoExecPlugin

from client.policy import NodePolicy
from common.config import PROJECT_DIR

log = logging.getLogger("fedoppu.node")


def app_hash(project_dir: Path = PROJECT_DIR) -> str:
    """The sha256 of the FAB `flwr run` builds from this checkout (what `fedoppu run` submits)."""
    with warnings.catch_warnings():  # pathspec's deprecation notices, inside Flower's build
        warnings.simplefilter("ignore", DeprecationWarning)
        fab, _ = build_fab_from_files(checkout_files(project_dir.resolve()))
    return hashlib.sha256(fab).hexdigest()


def checkout_files(root: Path) -> dict[str, Path]:
    """What Flower's `collect_files` returns for a FAB's build, without entering the directories the
    checkout's .gitignore excludes: the build drops their files anyway, and its own walk visits every
    file of a .venv inside the project (3.4 s of a core per node start, against milliseconds)."""
    gitignore = root / ".gitignore"
    ignored = build_pathspec(load_gitignore_patterns(gitignore.read_bytes() if gitignore.is_file() else b""))
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [
            d for d in dirnames if not ignored.match_file((here / d).relative_to(root).as_posix() + "/")
        ]
        for name in filenames:
            path = here / name
            if not path.is_symlink() and path.resolve().is_relative_to(root):  # as collect_files
                files[path.relative_to(root).as_posix()] = path
    return files


def trusted_apps(policy: NodePolicy) -> list[str]:
    """The app packages this node runs: its policy's list and, unless it says otherwise, its own."""
    return sorted({*policy.trusted_apps, *([app_hash()] if policy.trust_local_app else [])})


class TrustedAppPlugin(AutoExecPlugin):
    """Flower's plugin, refusing to launch a task whose app package is not in `trusted`."""

    trusted: frozenset[str] = frozenset()

    def launch_task(self, token, task) -> LaunchResult:
        if task.fab_hash not in self.trusted:
            log.error(
                "refused to run app package %s: it is not one of this node's trusted apps", task.fab_hash
            )
            return LaunchResult.failed("the app package is not one this node trusts")
        return super().launch_task(token, task)


def trusting(hashes: Iterable[str]) -> type[TrustedAppPlugin]:
    return type("TrustedAppPlugin", (TrustedAppPlugin,), {"trusted": frozenset(hashes)})


def _exit_with_parent(parent_pid: int) -> None:
    """Stop once the SuperNode (this process's parent) is gone, also while nobody has reaped it yet
    (Flower's own monitor waits for its pid to disappear)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    signal.raise_signal(signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's local Runtime API")
    parser.add_argument("--parent-pid", type=int, required=True, help="the SuperNode: exit with it")
    parser.add_argument("--trusted", action="append", default=[], metavar="SHA256", help="a FAB to run")
    args = parser.parse_args(argv)
    threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), daemon=True).start()
    # Flower 1.42's SuperExec builds its plugin from this module-level name; nothing else changes.
    flower_superexec.AutoExecPlugin = trusting(args.trusted)
    flower_superexec.run_superexec(
        runtime_api_address=args.runtime_api_address, insecure=True, parent_pid=args.parent_pid
    )


if __name__ == "__main__":
    main()
