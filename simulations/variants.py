"""One federation per variant of a setting (a study's `variants`, e.g. the PEFT type of the adapters),
on the same users, queries and seed, and the report that compares them: each method's primary metric
per variant with its 95% interval, and each variant against the study's baseline variant as a paired
difference (the same users resampled for both runs, simulations/statistics.py).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from common.io import atomic_write_json, atomic_write_text, read_json
from common.tasks import get_task
from simulations.figures import grouped_bars
from simulations.report import reported_methods, save_figure
from simulations.statistics import (
    RESAMPLES,
    estimate_from,
    estimate_text,
    paired_difference,
    resample_weights,
)


def compare_variants(runs: dict[str, dict], baseline: str, seed: int = 0) -> dict:
    """{variant: metrics.json} -> each method's primary metric per variant (the run's own interval) and
    variant - baseline per method, paired over the users both runs scored."""
    reference = runs[baseline]
    task, metric = get_task(reference["task"]), reference["primary_metric"]
    methods = [m for m in reported_methods(reference) if all(m in run["methods"] for run in runs.values())]
    result: dict = {
        "metric": metric,
        "baseline": baseline,
        "variants": list(runs),
        "methods": {},
        "differences": {},
    }
    for method in methods:
        result["methods"][method] = {
            name: run.get("uncertainty", {}).get("methods", {}).get(method, {}).get(metric)
            for name, run in runs.items()
        }
        base_counts = reference["methods"][method].get("counts", {})
        for name, run in runs.items():
            counts = run["methods"][method].get("counts", {})
            users = sorted(set(counts) & set(base_counts))
            if name == baseline or not users:
                continue
            weights = resample_weights(len(users), RESAMPLES, seed)
            difference = paired_difference(
                task, metric, [counts[u] for u in users], [base_counts[u] for u in users], weights
            )
            result["differences"].setdefault(method, {})[name] = difference.as_dict()
    return result


def write_variants_report(
    run_dir: str | Path, variant_dirs: dict[str, Path], baseline: str, console: Console | None = None
) -> dict:
    """variants.json, variants.csv and variants.png in `run_dir`, and the table on the console."""
    runs = {name: read_json(Path(path) / "metrics.json") for name, path in variant_dirs.items()}
    result = compare_variants(runs, baseline)
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "variants.json", result)
    rows = []
    for method, per_variant in result["methods"].items():
        for name, value in per_variant.items():
            difference = result["differences"].get(method, {}).get(name)
            row = {"method": method, "variant": name}
            for prefix, kept in ((result["metric"], value), (f"minus_{baseline}", difference)):
                row |= {f"{prefix}{suffix}": (kept or {}).get(key) for suffix, key in _COLUMNS}
            rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["method"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "variants.csv", buffer.getvalue())
    save_figure(_plot(result), run_dir / "variants.png")
    if console is not None:
        console.print(_table(result))
    return result


_COLUMNS = (("", "value"), ("_lo", "lo"), ("_hi", "hi"))


def _table(result: dict) -> Table:
    baseline, metric = result["baseline"], result["metric"]
    table = Table(title=f"{metric} per variant (95% interval) and minus {baseline} (same users resampled)")
    table.add_column("method")
    for name in result["variants"]:
        table.add_column(name, justify="right")
    for method, per_variant in result["methods"].items():
        table.add_row(method, *(estimate_text(per_variant[name]) for name in result["variants"]))
        differences = result["differences"].get(method, {})
        table.add_row(
            f"  minus {baseline}",
            *(
                "" if name == baseline else estimate_text(differences.get(name))
                for name in result["variants"]
            ),
        )
    return table


def _plot(result: dict):
    """Grouped bars: methods along x, one bar per variant, 95% intervals as error bars."""
    methods, variants = list(result["methods"]), result["variants"]
    figure, axis = plt.subplots(figsize=(1.6 * max(1, len(methods)) + 2, 3.6))
    grouped_bars(
        axis,
        methods,
        {name: [estimate_from(result["methods"][m][name]) for m in methods] for name in variants},
    )
    axis.set_ylabel(f"{result['metric']} (95% interval, users resampled)")
    axis.set_title(f"{result['metric']} per method and variant ({', '.join(variants)})")
    return figure
