"""`fedoppu compare-privacy`: the same users and seeds under several privacy settings, one report.

Each grid point is a full federation (`simulate`, methods shared and oppu) in its own directory under
`<run-dir>/runs/`; a point whose metrics.json is already finished is not run again, so an interrupted
comparison continues where it stopped. The report goes to `<run-dir>/privacy/`.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from common.cli import Interrupted, add_run_config_arguments, console, sigterm_interrupts
from common.config import PRIVACY_SETTINGS, ConfigError, RunConfig, load_run_config
from common.io import read_json
from simulations.placement import EngineOptions, add_engine_arguments
from simulations.privacy_report import write_privacy_report
from simulations.simulate import new_run_dir, simulate

# Five federations: the no-privacy reference, central DP at a weak and a standard noise level, local DP and
# SecAgg+. client-dp and secagg+dp release the same noised mean as central-dp (only who clips differs).
DEFAULT_SETTINGS = "none,central-dp@0.1,central-dp@1,local-dp@1,secagg"
FINISHED = ("complete", "stopped-early")
NOISELESS = ("none", "secagg")


@dataclass(frozen=True)
class GridPoint:
    setting: str
    noise_multiplier: float

    @property
    def label(self) -> str:
        return self.setting if self.setting in NOISELESS else f"{self.setting}-z{self.noise_multiplier:g}"


def parse_grid(settings: str, noise_multipliers: str | None, default_noise: float) -> list[GridPoint]:
    """`setting` or `setting@z` items; bare DP settings run once per noise multiplier given."""
    try:
        noises = [float(z) for z in noise_multipliers.split(",")] if noise_multipliers else [default_noise]
    except ValueError as err:
        raise ConfigError(
            f"--noise-multipliers {noise_multipliers!r}: expected a comma list of numbers"
        ) from err
    points: list[GridPoint] = []
    for item in (part.strip() for part in settings.split(",") if part.strip()):
        name, _, noise = item.partition("@")
        if name not in PRIVACY_SETTINGS:
            raise ConfigError(f"--settings has {name!r}; expected settings from {PRIVACY_SETTINGS}")
        if name in NOISELESS:
            points.append(GridPoint(name, 0.0))
            continue
        try:
            points += [GridPoint(name, float(noise))] if noise else [GridPoint(name, z) for z in noises]
        except ValueError as err:
            raise ConfigError(f"--settings item {item!r}: expected setting@noise-multiplier") from err
    unique = list(dict.fromkeys(points))
    if not unique:
        raise ConfigError("--settings names no setting")
    return unique


def run_point(base: RunConfig, point: GridPoint, run_dir: Path, engine: EngineOptions) -> Path:
    point_dir = run_dir / "runs" / point.label
    metrics = point_dir / "metrics.json"
    if metrics.exists() and read_json(metrics).get("status") in FINISHED:
        console.print(f"[bold]{point.label}[/]: already finished in {point_dir}, kept")
        return point_dir
    noise = point.noise_multiplier if point.setting not in NOISELESS else base.noise_multiplier
    config = base.replace(
        privacy=point.setting,
        noise_multiplier=noise,
        methods="shared,oppu",
        run_dir=str(point_dir),
        resume=False,
    )
    config.validate(f"--settings {point.label}")
    console.rule(f"[bold]{point.label}")
    return simulate(config, centralized=False, engine=engine)


def compare_privacy_command(args: argparse.Namespace) -> int:
    base = load_run_config(args.config, list(args.set or []))
    points = parse_grid(args.settings, args.noise_multipliers, base.noise_multiplier)
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(args.results_dir, f"privacy-{base.task}")
    console.print(f"[bold]compare-privacy[/]: {len(points)} federations -> {run_dir}")
    console.print(", ".join(p.label for p in points))
    engine = EngineOptions.from_args(args)
    try:
        with sigterm_interrupts():
            point_dirs = {point.label: run_point(base, point, run_dir, engine) for point in points}
    except KeyboardInterrupt:
        rerun = args.argv if "--run-dir" in args.argv else [*args.argv, "--run-dir", str(run_dir)]
        raise Interrupted(f"finished settings are kept; continue with: fedoppu {shlex.join(rerun)}") from None
    out = Console()
    write_privacy_report(run_dir, point_dirs, out if out.is_terminal else Console(width=160))
    return 0


def register(subparsers) -> None:
    compare = subparsers.add_parser(
        "compare-privacy",
        help="run several privacy settings on the same users and seeds; write <run-dir>/privacy/",
        description="One federation (methods shared and oppu) per privacy setting and noise level, then a "
        "table, plots and a summary of how much of DP's cost to the shared adapter OPPU's personal "
        "adapters win back. Threat model: docs/privacy.md.",
    )
    compare.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help=f"comma list of {', '.join(PRIVACY_SETTINGS)}; 'setting@z' fixes its noise multiplier "
        "(default: %(default)s)",
    )
    compare.add_argument(
        "--noise-multipliers",
        help="comma list: each DP setting given without @z runs once per value (default: the run config's)",
    )
    add_run_config_arguments(compare)
    compare.add_argument(
        "--results-dir", default="results", help="where run directories are created (default: results)"
    )
    compare.add_argument(
        "--run-dir", help="exact directory (default: results/<timestamp>-privacy-<task>); reruns continue it"
    )
    add_engine_arguments(compare)
    compare.set_defaults(func=compare_privacy_command)
