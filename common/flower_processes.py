"""Starting Flower's own processes (flower-superlink, flower-supernode, flwr) for a deployed federation.

The server's and the node's commands are thin wrappers over them, so every flag keeps Flower's meaning;
both find the binaries and the environment they run in here.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from rich.markup import escape

from common.cli import console
from common.io import DataError


class DeployError(DataError):
    """A flag or file the deployment needs is missing or wrong; the message names it."""


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


def exec_flower(command: list[str]) -> NoReturn:
    """Become the Flower process, so its pid is this command's and signals reach it directly."""
    console.print(f"[dim]$ {escape(shlex.join(command))}[/dim]", soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, flower_env())


def run_flwr(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [flower_binary("flwr"), *args], env=flower_env(), text=True, capture_output=capture, check=False
    )


def existing_path(path: Path, flag: str, hint: str) -> Path:
    if not path.exists():
        raise DeployError(f"{flag} {path}: not found; {hint}")
    return path.resolve()
