"""`fedoppu data`: write the built-in benchmark, and validate and summarize any per-user data set."""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.data import QUERY_GROUPS, Dataset
from common.io import DataError
from common.loaders import load_dataset
from common.synthetic import BUILTIN_TASKS, BenchmarkConfig, make_benchmark, write_benchmark
from common.tasks import get_task


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="make and inspect per-user data sets")
    commands = data.add_subparsers(dest="data_command", required=True)

    make = commands.add_parser(
        "make-benchmark", help="write the built-in synthetic benchmark in OPPU's per-user layout"
    )
    for config_field in fields(BenchmarkConfig):
        make.add_argument(
            "--" + config_field.name.replace("_", "-"),
            type=type(config_field.default),
            default=config_field.default,
            choices=BUILTIN_TASKS if config_field.name == "task" else None,
            help=f"{config_field.metadata['help']} (default: %(default)s)",
        )
    make.add_argument(
        "--out", required=True, type=Path, help="directory to write user_history.json and user_labels.json to"
    )
    make.set_defaults(func=data_make_benchmark_command)

    inspect = commands.add_parser("inspect", help="validate a data set and print a summary of it")
    inspect.add_argument("path", type=Path, help="a data directory (OPPU or LaMP layout) or a .jsonl file")
    inspect.add_argument("--task", default=None, help="task name; overrides the one the data names")
    inspect.add_argument(
        "--queries-per-user", type=int, default=3, help="JSONL only: each user's newest N items are queries"
    )
    inspect.add_argument(
        "--query-fraction",
        type=float,
        default=None,
        help="JSONL only: this fraction of each user's items are queries",
    )
    inspect.set_defaults(func=data_inspect_command)


def data_make_benchmark_command(args: argparse.Namespace) -> int:
    try:
        config = BenchmarkConfig(**{f.name: getattr(args, f.name) for f in fields(BenchmarkConfig)})
    except ValueError as err:  # a bad knob
        return _fail(str(err))
    dataset = make_benchmark(config)
    write_benchmark(dataset, args.out)
    print_summary(dataset, title=f"Wrote {args.out} (synthetic)")
    return 0


def data_inspect_command(args: argparse.Namespace) -> int:
    try:
        dataset = load_dataset(
            args.path, args.task, queries_per_user=args.queries_per_user, query_fraction=args.query_fraction
        )
    except DataError as err:
        return _fail(str(err))
    print_summary(dataset, title=str(args.path))
    return 0


def _fail(message: str) -> int:
    Console(stderr=True).print(f"[red]error: {escape(message)}[/red]", soft_wrap=True)  # paths stay whole
    return 2


def _spread(sizes: list[int]) -> str:
    return f"min {min(sizes)} / median {statistics.median(sizes):g} / max {max(sizes)}"


def _clip(text: str, width: int = 140) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def print_summary(dataset: Dataset, title: str) -> None:
    task = get_task(dataset.task)
    history = [len(user.history) for user in dataset.users]
    queries = [len(user.queries) for user in dataset.users]
    table = Table(title=escape(title), show_header=False)
    table.add_row("task", f"{task.name} ({task.kind}, metric {task.primary_metric})")
    table.add_row("source", escape(dataset.source))
    table.add_row("users", str(len(dataset.users)))
    table.add_row("history per user", _spread(history))
    table.add_row("history items", str(sum(history)))
    table.add_row("queries", f"{sum(queries)} ({_spread(queries)} per user)")
    groups = Counter(group for user in dataset.users for group in user.query_groups.values())
    if groups:
        table.add_row(
            "query groups", ", ".join(f"{group} {groups[group]}" for group in QUERY_GROUPS if group in groups)
        )
    console = Console()
    console.print(table)
    user = dataset.users[0]
    console.print(f"[bold]Examples from user {escape(user.user_id)}[/bold]")
    examples = [("history", item) for item in user.history[-2:]] + [
        ("query", item) for item in user.queries[:1]
    ]
    for label, item in examples:
        console.print(f"  [cyan]{label}[/cyan] {escape(_clip(item.input))}")
        console.print(f"    [green]->[/green] {escape(_clip(item.output))}")


def main(argv: Sequence[str] | None = None) -> int:
    """The `data` command on its own: python -m simulations.data_commands data inspect PATH."""
    parser = argparse.ArgumentParser(prog="fedoppu")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
