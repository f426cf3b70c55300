"""`fedoppu tune`: choose run-config values on the validation split (each user's newest history items
as queries, common/loaders.py `validation_split`), never on the test queries.

Every combination of the `--vary` values is one federation, run as a study of variants
(simulations/variants.py) in `<run-dir>/<key=value+...>/`; the combination with the best primary metric
for the target method wins, and each other one is compared with it paired over the same users, so the
report says which combinations the validation data cannot tell apart from the best.
"""

from __future__ import annotations

import itertools
import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.config import VALIDATION, ConfigError, parse_override
from common.io import atomic_write_json, read_json
from simulations.statistics import estimate_text
from simulations.variants import compare_variants

# Keys a tuning grid cannot vary: the split it is scored on, and where its runs go.
_FIXED = ("split", "run-dir", "resume", "state-dir")


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def grid(varies: list[str]) -> dict[str, dict[str, Any]]:
    """`--vary KEY=[V1, V2]` (TOML values; a single value is a list of one), or keys that move together,
    `--vary K1,K2=[[V1, W1], [V2, W2]]`, -> {name: keys} for every combination, the first values first;
    a name is `key=value+key=value`, also its run directory."""
    axes: list[list[dict[str, Any]]] = []
    seen: set[str] = set()
    for text in varies:
        joined, values = parse_override(text)
        keys = [key.strip() for key in joined.split(",")]
        for key in keys:
            if key in _FIXED:
                raise ConfigError(f"--vary {text!r}: {key} is not a setting to tune (fedoppu tune fixes it)")
            if key in seen:
                raise ConfigError(f"--vary {text!r}: {key} is varied twice; give all its values in one list")
        seen.update(keys)
        values = values if isinstance(values, list) else [values]
        if len(keys) > 1 and not all(isinstance(v, list) and len(v) == len(keys) for v in values):
            raise ConfigError(
                f"--vary {text!r}: {len(keys)} keys move together; expected a list of {len(keys)}-value "
                f"lists, e.g. {joined}=[[...], [...]]"
            )
        if not values or len({_text(v) for v in values}) != len(values):
            raise ConfigError(f"--vary {text!r}: expected a list of distinct values, e.g. {joined}=[1, 2]")
        together = values if len(keys) > 1 else [[v] for v in values]
        axes.append([dict(zip(keys, v, strict=True)) for v in together])
    combinations = {}
    for parts in itertools.product(*axes):
        keys = {key: value for part in parts for key, value in part.items()}
        name = "+".join(f"{key}={_text(value)}" for key, value in keys.items()).replace("/", "_")
        combinations[name] = keys
    return combinations


def carried_flags(methods: str | None, config: str | None, sets: list[str], varied: set[str]) -> list[str]:
    """The tune's own flags a test run of its winner needs (its methods, config file and the --set
    keys it does not vary), shell-quoted: without them the printed command would score the winner on
    other data or another layout."""
    flags = [*(["--methods", methods] if methods else []), *(["--config", config] if config else [])]
    for setting in sets:
        if parse_override(setting)[0] not in varied:
            flags += ["--set", setting]
    return [shlex.quote(flag) for flag in flags]


def choose(
    run_dir: Path,
    variants: dict[str, dict[str, Any]],
    target: str,
    console: Console,
    carried: Sequence[str] = (),
) -> dict:
    """The best combination for `target`'s primary metric, every other one minus it (paired over users),
    written to `<run_dir>/tune.json` and shown as a table, with the command that scores it on the test
    queries (`carried`: the tune's own flags, carried_flags)."""
    runs = {name: read_json(run_dir / name / "metrics.json") for name in variants}
    first = next(iter(runs.values()))
    metric, higher = first["primary_metric"], first["higher_is_better"]
    missing = [name for name, run in runs.items() if target not in run["methods"]]
    if missing:
        raise ConfigError(
            f"fedoppu tune --target {target}: not scored in {missing}; the runs scored {list(first['methods'])}"
        )
    score = {name: run["methods"][target]["overall"][metric] for name, run in runs.items()}
    ranking = sorted(variants, key=score.__getitem__, reverse=higher)
    best = ranking[0]
    against_best = compare_variants(runs, baseline=best)
    intervals = against_best["methods"].get(target, {})
    differences = against_best["differences"].get(target, {})
    result = {
        "split": VALIDATION,
        "target": target,
        "metric": metric,
        "higher_is_better": higher,
        "best": best,
        "keys": variants[best],
        "set": [f"{key}={_text(value)}" for key, value in variants[best].items()],
        "ranking": [
            {
                "variant": name,
                "keys": variants[name],
                metric: score[name],
                "interval": intervals.get(name),
                "minus_best": differences.get(name),
            }
            for name in ranking
        ],
    }
    atomic_write_json(run_dir / "tune.json", result)
    table = Table(title=f"{target}: {metric} on the validation split (95% interval), and minus the best")
    table.add_column("variant", overflow="fold")  # the whole name: it is the setting to use
    for column in (metric, "minus best (same users)"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in result["ranking"]:
        value = estimate_text(row["interval"]) if row["interval"] else f"{row[metric]:.3f}"
        table.add_row(row["variant"], value, estimate_text(row["minus_best"]))
    console.print(table)
    tied = [
        row["variant"]
        for row in result["ranking"][1:]
        # without an interval (fewer users than statistics.MIN_USERS) nothing is told apart
        if not row["minus_best"]
        or row["minus_best"]["lo"] is None
        or row["minus_best"]["lo"] <= 0 <= row["minus_best"]["hi"]
    ]
    console.print(
        f"best on validation: [bold]{best}[/]"
        + (f"; not told apart from it: {', '.join(tied)}" if tied else "")
        + "\nscore it on the test queries: fedoppu simulate "
        + " ".join([*carried, *(f"--set {shlex.quote(setting)}" for setting in result["set"])]),
        soft_wrap=True,  # a command to copy: never broken across lines
    )
    return result
