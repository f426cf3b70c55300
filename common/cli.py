"""What every `fedoppu` command shares: its stderr console and the run-config flags of commands that
start runs (simulate, compare-privacy and a deployed `run`)."""

from __future__ import annotations

import argparse

from rich.console import Console

console = Console(stderr=True)


def add_run_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The --config / --set overrides that `common.config.load_run_config` applies."""
    parser.add_argument("--config", help="TOML file of run-config overrides (flat keys, as in pyproject)")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one run-config key (repeatable)"
    )
