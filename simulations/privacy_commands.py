"""`fedoppu compare-privacy`: the same users and seeds under several privacy settings, one report.

The question (docs/privacy.md, "Comparing settings"): how much of what DP costs the shared adapter do
the personal adapters win back? By default the federation is 200 built-in users (`--federation sympy`:
the 266 real users of commit-subjects-sympy), each round sampling clients with Poisson rate 0.1, under
no DP, central DP at three target epsilons, local DP and SecAgg+.

zero-shot and local (a personal adapter on the bare model) never see the shared adapter, so no privacy
setting changes them: they run once, in `<run-dir>/runs/reference/`, and every setting reuses them.
Each setting is one federation (methods shared and oppu) in `<run-dir>/runs/<label>/`. A run whose
metrics.json is finished is not run again, so an interrupted comparison continues where it stopped.
The report goes to `<run-dir>/privacy/`. The shared adapter's layout is the run config's `shared-*` keys
(`--set`): a small shared adapter sends fewer weights and carries less noise, while the personal
adapters keep theirs (docs/privacy.md, "A small shared adapter").
"""

from __future__ import annotations

import argparse
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from common.cli import Interrupted, add_run_config_arguments, console, sigterm_interrupts
from common.config import (
    NOISELESS_PRIVACY,
    POISSON_SAMPLING,
    PRIVACY_SETTINGS,
    PROJECT_DIR,
    ConfigError,
    RunConfig,
    load_run_config,
)
from simulations.engine_options import EngineOptions, add_engine_arguments

# No DP, central DP at three target epsilons (the accountant derives z for the planned rounds and the
# sampling rate), local DP at the run config's z, and SecAgg+ (noiseless).
DEFAULT_SETTINGS = "none,central-dp@eps2,central-dp@eps4,central-dp@eps8,local-dp,secagg"
FINISHED = ("complete", "stopped-early")
EPSILON = "eps"  # `setting@eps4`: a target epsilon; `setting@1`: a noise multiplier
REFERENCE = "reference"  # the run of the methods no privacy setting changes
REFERENCE_METHODS = "zero-shot,local"
# What the shared adapter's training and its privacy read, and the reference's methods never do: a
# reference run finished under other values of these is the same reference.
SHARED_ADAPTER_KEYS = (
    *("num-rounds", "fraction-train", "clients-per-round", "sample-rate", "strategy", "proximal-mu"),
    *("server-learning-rate", "server-momentum", "trim-beta", "shared-ffa-lora", "shared-lora-r"),
    *("shared-lora-alpha", "shared-target-modules", "shared-adapter-layers", "local-steps"),
    *("learning-rate", "shared-optimizer", "wire-dtype", "privacy", "noise-multiplier", "clipping-norm"),
    *("dp-delta", "max-epsilon", "target-epsilon", "dp-clipping", "dp-server-momentum"),
)
SETTING_METHODS = "shared,oppu"

# What every setting of a default comparison shares: Poisson sampling at q = 0.1 (about 20 of 200
# clients per round; the accountant credits it), and a cheap training budget.
TRAINING: dict[str, Any] = {
    "sample-rate": 0.1,
    "num-rounds": 10,
    "personal-epochs": 1.0,
    "eval-every-round": False,
    # Each user keeps the shared adapter only as far as it helps on their own held-out history, so
    # OPPU under DP does not fall below `local` (client/gate.py).
    "personal-gate": "mix",
}
# The built-in users' shared adapter: the smallest layout that learned their population's tags on the
# validation split (docs/privacy.md, "Which small shared adapter learns"): 24,576 weights on the wire
# against 651,264 for the personal adapters' layout, which keep theirs. Its gain without DP, test
# queries: shared 0.217 against zero-shot 0.155, OPPU 0.350 (the personal layout shared: 0.160, 0.312);
# at epsilon 8, OPPU 0.295 (72% of its gain kept), shared 0.163.
SMALL_SHARED: dict[str, Any] = {
    "shared-ffa-lora": True,
    "shared-lora-r": 8,
    "shared-lora-alpha": 8,
    "shared-target-modules": "q_proj,v_proj",
    "shared-adapter-layers": 4,
    "local-steps": 8,
    "learning-rate": 0.1,
}
SYMPY = PROJECT_DIR.parent / "shared" / "data" / "commit-subjects-sympy"
FEDERATIONS: dict[str, dict[str, Any]] = {
    # LaMP-like light users: short histories, few queries (common/synthetic.py).
    "builtin": {
        "data": "builtin",
        "task": "tagging",
        "benchmark-users": 200,
        "benchmark-min-history": 4,
        "benchmark-max-history": 16,
        "benchmark-queries": 2,
        **TRAINING,
        **SMALL_SHARED,
    },
    # 266 real users with 20-100 commits each, 5 queries each (2 scored); its shared adapter's layout
    # and learning rate are not tuned yet: the personal adapters' layout, 2 local steps.
    "sympy": {"data": str(SYMPY), "task": "", "max-queries-per-user": 2, "local-steps": 2, **TRAINING},
    # The run config alone (pyproject, --config, --set): small federations, tests.
    "run-config": {},
}


@dataclass(frozen=True)
class GridPoint:
    setting: str
    noise_multiplier: float | None = None  # None: the run config's
    target_epsilon: float | None = None  # the dp settings derive z from it (`target-epsilon`)

    @property
    def label(self) -> str:
        if self.setting in NOISELESS_PRIVACY:
            return self.setting
        if self.target_epsilon is not None:
            return f"{self.setting}-{EPSILON}{self.target_epsilon:g}"
        return f"{self.setting}-z{self.noise_multiplier:g}"

    def overrides(self) -> dict[str, Any]:
        """The run-config keys this point sets over the comparison's base config."""
        values: dict[str, Any] = {"privacy": self.setting}
        if self.target_epsilon is not None:
            values["target-epsilon"] = self.target_epsilon
        elif self.noise_multiplier is not None:
            values["noise-multiplier"] = self.noise_multiplier
        return values


def parse_grid(settings: str, noise_multipliers: str | None, default_noise: float) -> list[GridPoint]:
    """`setting`, `setting@z` or `setting@eps<E>` items; bare DP settings run once per noise
    multiplier given."""
    try:
        noises = [float(z) for z in noise_multipliers.split(",")] if noise_multipliers else [default_noise]
    except ValueError as err:
        raise ConfigError(
            f"--noise-multipliers {noise_multipliers!r}: expected a comma list of numbers"
        ) from err
    points: list[GridPoint] = []
    for item in (part.strip() for part in settings.split(",") if part.strip()):
        name, _, level = item.partition("@")
        if name not in PRIVACY_SETTINGS:
            raise ConfigError(f"--settings has {name!r}; expected settings from {PRIVACY_SETTINGS}")
        if name in NOISELESS_PRIVACY:
            points.append(GridPoint(name))
            continue
        try:
            if level.startswith(EPSILON):
                points.append(GridPoint(name, target_epsilon=float(level.removeprefix(EPSILON))))
            else:
                points += [GridPoint(name, float(level))] if level else [GridPoint(name, z) for z in noises]
        except ValueError as err:
            raise ConfigError(
                f"--settings item {item!r}: expected setting@noise-multiplier or setting@{EPSILON}<epsilon>"
            ) from err
    unique = list(dict.fromkeys(points))
    if not unique:
        raise ConfigError("--settings names no setting")
    return unique


def point_config(base: RunConfig, overrides: dict[str, Any], run_dir: Path, label: str) -> RunConfig:
    """The base config with a run's own keys (through the run-config mapping, so keys the base's
    class does not name as fields are checked the same way)."""
    values = {**base.to_flower(), **overrides, "run-dir": str(run_dir), "resume": False}
    if base.sample_rate and values["privacy"] not in POISSON_SAMPLING:
        # Its wrappers need a fixed cohort: the same expected clients per round, no sampling credit.
        values.update({"sample-rate": 0.0, "fraction-train": base.sample_rate})
    config = RunConfig.from_mapping(values, f"compare-privacy run {label}")
    config.validate(f"compare-privacy run {label}")
    return config


def run_once(
    config: RunConfig, label: str, engine: EngineOptions, step: str, ignored: tuple[str, ...] = ()
) -> Path:
    """One federation, unless a finished run of this config (but for `ignored` keys) is there."""
    # The engine, torch and Flower: not for the CLI's parser.
    from simulations.simulate import finished_run, simulate

    run_dir = Path(config.run_dir)
    if finished_run(config, FINISHED, ignored):
        console.print(f"[bold]{step} {label}[/]: already finished in {run_dir}, kept")
        return run_dir
    console.rule(f"[bold]{step} {label}")
    return simulate(config, centralized=False, engine=engine)


def run_reference(base: RunConfig, run_dir: Path, engine: EngineOptions, step: str = "") -> Path:
    """zero-shot and local, once for every setting: neither uses the shared adapter."""
    overrides = {"privacy": "none", "methods": REFERENCE_METHODS}
    config = point_config(base, overrides, run_dir / "runs" / REFERENCE, REFERENCE)
    label = f"{REFERENCE} ({REFERENCE_METHODS}, shared by every setting)"
    return run_once(config, label, engine, step, SHARED_ADAPTER_KEYS)


def run_point(
    base: RunConfig, point: GridPoint, run_dir: Path, engine: EngineOptions, step: str = ""
) -> Path:
    overrides = {**point.overrides(), "methods": SETTING_METHODS}
    config = point_config(base, overrides, run_dir / "runs" / point.label, point.label)
    return run_once(config, point.label, engine, step)


def compare_privacy_command(args: argparse.Namespace) -> int:
    from simulations.privacy_report import write_privacy_report
    from simulations.simulate import new_run_dir

    base = load_run_config(args.config, list(args.set or []), preset=FEDERATIONS[args.federation])
    points = parse_grid(args.settings, args.noise_multipliers, base.noise_multiplier)
    name = f"privacy-{base.task or args.federation}"  # a data path's task is known once it is read
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(args.results_dir, name)
    total = len(points) + 1
    console.print(
        f"[bold]compare-privacy[/] ({args.federation} federation): {total} federations -> {run_dir}"
    )
    console.print(", ".join([REFERENCE, *(p.label for p in points)]))
    engine = EngineOptions.from_args(args)
    started = time.perf_counter()

    def step(index: int) -> str:
        return f"[{index}/{total}, {(time.perf_counter() - started) / 60:.0f} min]"

    try:
        with sigterm_interrupts():
            reference = run_reference(base, run_dir, engine, step(1))
            point_dirs = {
                point.label: run_point(base, point, run_dir, engine, step(index))
                for index, point in enumerate(points, 2)
            }
    except KeyboardInterrupt:
        rerun = args.argv if "--run-dir" in args.argv else [*args.argv, "--run-dir", str(run_dir)]
        raise Interrupted(f"finished settings are kept; continue with: fedoppu {shlex.join(rerun)}") from None
    out = Console()
    write_privacy_report(run_dir, reference, point_dirs, out if out.is_terminal else Console(width=160))
    return 0


def register(subparsers) -> None:
    compare = subparsers.add_parser(
        "compare-privacy",
        help="run several privacy settings on the same users and seeds; write <run-dir>/privacy/",
        description="zero-shot and local once, then one federation (methods shared and oppu) per privacy "
        "setting, then a table, a plot and the answer to: how much of what DP costs the shared adapter do "
        "the personal adapters win back? Threat model and design: docs/privacy.md.",
    )
    compare.add_argument(
        "--federation",
        choices=list(FEDERATIONS),
        default="builtin",
        help="builtin: 200 built-in users; sympy: the 266 users of commit-subjects-sympy; both sample "
        "clients with Poisson rate 0.1 on the comparison's own training budget; run-config: the run "
        "config alone (default: %(default)s). --config and --set apply on top",
    )
    compare.add_argument(
        "--settings",
        default=DEFAULT_SETTINGS,
        help=f"comma list of {', '.join(PRIVACY_SETTINGS)}; 'setting@z' fixes its noise multiplier, "
        f"'setting@{EPSILON}E' its target epsilon (default: %(default)s)",
    )
    compare.add_argument(
        "--noise-multipliers",
        help="comma list: each DP setting given without @ runs once per value (default: the run config's)",
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
