"""What every `fedoppu` command shares: its stderr console and the run-config flags of commands that
start runs (simulate, compare-privacy and a deployed `run`)."""

from __future__ import annotations

import argparse
import contextlib
import signal
from collections.abc import Iterator

from rich.console import Console

console = Console(stderr=True)


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped a command; the message says how to continue."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so it stops a run as cleanly as Ctrl-C does."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_run_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The --config / --set overrides that `common.config.load_run_config` applies."""
    parser.add_argument("--config", help="TOML file of run-config overrides (flat keys, as in pyproject)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one run-config key (repeatable)"
    )
