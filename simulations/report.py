"""The run's report: summary.csv, plots, and tables on the terminal, all from metrics.json.

Every method's score comes with its 95% interval and the paired differences OPPU's paper asks about
(simulations/statistics.py); they are also written back to metrics.json under `uncertainty`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json
from common.tasks import get_task
from simulations import behaviour_shift
from simulations.figures import error_bars
from simulations.gates import gate_line
from simulations.statistics import GROUPS, Estimate, find_difference, history_groups, seed_spread, summarize

ORDER = (
    "zero-shot",
    "rag",
    "shared",
    "local",
    "oppu",
    "oppu-rag",
    "oppu-pag",
    "centralized-shared",
    "centralized",
)


def reported_methods(metrics: dict) -> list[str]:
    present = metrics["methods"]
    return [m for m in ORDER if m in present] + sorted(set(present) - set(ORDER))


def _metric_names(metrics: dict) -> list[str]:
    names: list[str] = []
    for entry in metrics["methods"].values():
        names += [k for k in entry["overall"] if k != "n" and k not in names]
    return names


def summary_rows(metrics: dict) -> list[dict]:
    """One row per method: each metric, the primary metric's 95% interval, users and queries scored."""
    names = _metric_names(metrics)
    primary = metrics["primary_metric"]
    intervals = metrics.get("uncertainty", {}).get("methods", {})
    rows = []
    for method in reported_methods(metrics):
        entry = metrics["methods"][method]
        row = {"method": method, **{n: entry["overall"].get(n) for n in names}}
        interval = intervals.get(method, {}).get(primary)
        row[f"{primary}_lo"] = interval["lo"] if interval else None
        row[f"{primary}_hi"] = interval["hi"] if interval else None
        if behaviour_shift.has_groups(metrics):
            row.update(behaviour_shift.summary_columns(metrics, method))
        row.update(
            users=len(entry["users"]),  # the users it was scored on
            missing=len(entry.get("missing", {}).get("users", [])),  # users it could not reach
            queries=int(entry["overall"].get("n", 0)),
            seconds=round(entry["seconds"]),
        )
        rows.append(row)
    return rows


def save_figure(figure, path: Path) -> None:
    """PNG written atomically, so a report being rewritten never leaves a half-drawn plot."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_methods(metrics: dict, path: Path) -> None:
    """Each method's primary metric with its 95% interval as an error bar."""
    key = metrics["primary_metric"]
    methods = reported_methods(metrics)
    values = [metrics["methods"][m]["overall"].get(key, float("nan")) for m in methods]
    intervals = metrics.get("uncertainty", {}).get("methods", {})
    errors = error_bars([Estimate.from_dict(intervals[m][key]) if m in intervals else None for m in methods])
    figure, axis = plt.subplots(figsize=(1.1 * len(methods) + 2, 3.6))
    bars = axis.bar(
        methods,
        values,
        yerr=errors,
        capsize=4,
        color=["#4c72b0" if "oppu" not in m and m != "centralized" else "#dd8452" for m in methods],
    )
    axis.bar_label(bars, fmt="%.3f", fontsize=8, label_type="center")
    axis.set_ylabel(f"{key} (95% interval, users resampled)")
    axis.set_title(
        f"{metrics['task']}: {key} per method ({'higher' if metrics['higher_is_better'] else 'lower'} is better)"
    )
    axis.tick_params(axis="x", rotation=30)
    save_figure(figure, path)


def round_times(metrics: dict) -> dict:
    """Seconds per trained round: training (sending the round to its aggregate) and the evaluation
    after it, where there was one."""
    trained = [r for r in metrics.get("rounds", []) if "seconds" in r.get("train", {})]
    return {
        "round": [r["round"] for r in trained],
        "train": [r["train"]["seconds"] for r in trained],
        "evaluate": [r.get("seconds", {}).get("evaluate", 0.0) for r in trained],
        "recorded": any("seconds" in r for r in trained),  # runs before evaluation was timed: not
    }


def round_time_line(metrics: dict) -> str | None:
    """One line for the terminal: how long a round took, and what of it was training."""
    times = round_times(metrics)
    if not times["round"]:
        return None
    total = [t + e for t, e in zip(times["train"], times["evaluate"], strict=True)]
    sampled = [r["train"].get("sampled") for r in metrics["rounds"] if "seconds" in r.get("train", {})]
    clients = f", {sum(sampled) / len(sampled):.1f} clients sampled per round" if all(sampled) else ""
    evaluating = f" and evaluating {np.median(times['evaluate']):.1f} s" if times["recorded"] else ""
    return (
        f"time per round: {np.median(total):.1f} s median ({min(total):.1f}-{max(total):.1f}) over "
        f"{len(total)} rounds, of which training {np.median(times['train']):.1f} s{evaluating}{clients}"
    )


def plot_rounds(metrics: dict, path: Path) -> None:
    key = metrics["primary_metric"]
    rounds = metrics.get("rounds", [])
    figure, (loss_axis, eval_axis, time_axis) = plt.subplots(1, 3, figsize=(13, 3.4))
    trained = [r for r in rounds if "train" in r]
    loss_axis.plot([r["round"] for r in trained], [r["train"].get("train-loss") for r in trained], marker="o")
    loss_axis.set(xlabel="round", ylabel="train loss (shared adapter)", title="Local training loss")
    evaluated = [r for r in rounds if "eval" in r]
    eval_axis.plot(
        [r["round"] for r in evaluated], [r["eval"].get(key) for r in evaluated], marker="o", label="shared"
    )
    for method, style in (("oppu", "--"), ("centralized", ":")):
        if method in metrics["methods"]:
            eval_axis.axhline(
                metrics["methods"][method]["overall"][key], linestyle=style, color="gray", label=method
            )
    eval_axis.set(xlabel="round", ylabel=key, title=f"Shared adapter {key} per round")
    eval_axis.legend(fontsize=8)
    times = round_times(metrics)
    time_axis.bar(times["round"], times["train"], label="training")
    time_axis.bar(times["round"], times["evaluate"], bottom=times["train"], label="evaluating")
    time_axis.set(xlabel="round", ylabel="seconds", title="Time per round (the first loads the model)")
    time_axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_user_gain(metrics: dict, path: Path) -> bool:
    """Per-user gain of OPPU over the shared adapter, users grouped by history size; each group's
    pooled gain with its 95% interval (paired, users resampled). None where the nodes' policies
    withhold the users' history sizes (the deployed default)."""
    key = metrics["primary_metric"]
    methods = metrics["methods"]
    if "oppu" not in methods or "shared" not in methods or not metrics.get("history"):
        return False
    groups = history_groups(
        {uid: n for uid, n in metrics["history"].items() if uid in methods["oppu"]["users"]}
    )
    sign = 1 if metrics["higher_is_better"] else -1
    gains = {
        uid: sign * (methods["oppu"]["users"][uid][key] - methods["shared"]["users"][uid][key])
        for uid in groups
        if uid in methods["shared"]["users"]
    }
    by_group = metrics.get("uncertainty", {}).get("groups", {})
    figure, axis = plt.subplots(figsize=(6, 3.6))
    # Hundreds of users share a few distinct gains (few queries each): spread each group's dots
    # sideways (seeded) and shrink them, so that a crowd reads as a crowd, not as one dot.
    jitter = np.random.default_rng(0)
    size = 20 if len(gains) <= 60 else 6
    for index, group in enumerate(GROUPS):
        members = [uid for uid in gains if groups[uid] == group]
        offsets = jitter.uniform(-0.12, 0.12, len(members)) if len(members) > 1 else np.zeros(len(members))
        axis.scatter(index + offsets, [gains[uid] for uid in members], alpha=0.5, s=size)
        pooled = find_difference(by_group.get(group, {}), "oppu", "shared")
        if pooled is not None and pooled["lo"] is not None:
            value, lo, hi = (sign * pooled[k] for k in ("value", "lo", "hi"))
            axis.errorbar(index + 0.25, value, yerr=[[value - min(lo, hi)], [max(lo, hi) - value]],
                          fmt="D", color="black", capsize=5)  # fmt: skip
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xticks(range(3), list(GROUPS))
    axis.set(xlabel="users grouped by history size", ylabel=f"OPPU - shared ({key}, better = up)")
    axis.set_title(
        "Gain of personal adapters over the shared adapter\n(dots: users; diamonds: pooled, 95% interval)"
    )
    save_figure(figure, path)
    return True


def failure_lines(metrics: dict) -> list[str]:
    """What the run could not do: why training stopped, and which users each method missed."""
    lines = []
    if reason := metrics.get("stop_reason"):
        lines.append(
            f"training stopped early at {reason}; resume the run to continue from its last checkpoint"
        )
    phases = [("scoring", metrics["methods"]), ("personalizing", metrics.get("personalize", {}))]
    for phase, entries in phases:
        for method, entry in entries.items():
            missing = entry.get("missing", {})
            if missing.get("users") or missing.get("nodes"):
                reasons = "; ".join(f"node {n['node']}: {n['reason']}" for n in missing["nodes"])
                lines.append(f"{phase} {method} missed users {missing['users']} ({reasons})")
    return lines


def write_report(run_dir: str | Path, console: Console | None = None) -> list[dict]:
    """Intervals into metrics.json, then summary.csv, the plots and the terminal tables."""
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    if any(entry.get("counts") for entry in metrics["methods"].values()):
        metrics["uncertainty"] = summarize(get_task(metrics["task"]), metrics)
        atomic_write_json(run_dir / "metrics.json", metrics)
    rows = summary_rows(metrics)
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(run_dir / "summary.csv", buffer.getvalue())
        plot_methods(metrics, run_dir / "methods.png")
        plot_user_gain(metrics, run_dir / "user_gain.png")
        if behaviour_shift.has_groups(metrics):
            save_figure(
                behaviour_shift.plot(metrics, reported_methods(metrics)), run_dir / "behaviour_shift.png"
            )
    if metrics.get("rounds"):
        plot_rounds(metrics, run_dir / "rounds.png")
    if console is not None:
        console.print(summary_table(metrics, rows))
        if metrics.get("uncertainty", {}).get("differences"):
            console.print(differences_table(metrics))
        if behaviour_shift.has_groups(metrics):
            console.print(behaviour_shift.methods_table(metrics, reported_methods(metrics)))
            console.print(behaviour_shift.differences_table(metrics))
            for line in behaviour_shift.answer_lines(metrics):
                console.print(escape(line))
        if line := round_time_line(metrics):
            console.print(line)
        for method, entry in metrics.get("gates", {}).items():
            console.print(gate_line(method, entry))
        for line in failure_lines(metrics):
            console.print(f"[yellow]{escape(line)}[/]")
    return rows


def _cell(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_table(metrics: dict, rows: list[dict]) -> Table:
    """One row per method; the primary metric as `value [lo, hi]`, its 95% interval over users."""
    primary = metrics["primary_metric"]
    table = Table(
        title=f"{metrics['task']} ({metrics.get('status', '?')}): primary metric {primary}, "
        "95% interval over users"
    )
    intervals = metrics.get("uncertainty", {}).get("methods", {})
    # the primary metric's interval and its query groups' columns (behaviour_shift's table) stay in the csv
    columns = [c for c in (rows[0] if rows else {"method": None}) if not c.startswith(f"{primary}_")]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        cells = []
        for column in columns:
            interval = intervals.get(row["method"], {}).get(primary)
            if column == primary and interval is not None:
                cells.append(Estimate.from_dict(interval).text())
            else:
                cells.append(_cell(row[column]))
        table.add_row(*cells)
    return table


def differences_table(metrics: dict) -> Table:
    """OPPU's questions as paired differences, over all users and per history-size group."""
    uncertainty = metrics["uncertainty"]
    parts = {"all users": uncertainty}
    parts.update({f"{group} users": part for group, part in uncertainty.get("groups", {}).items()})
    table = Table(
        title=f"Paired differences in {metrics['primary_metric']} (95% interval; same users resampled)"
    )
    table.add_column("difference", justify="left")
    for label, part in parts.items():
        users = max((d["users"] for d in part.get("differences", [])), default=0)
        table.add_column(f"{label} (n={users})", justify="right")
    for first, second in [(d["first"], d["second"]) for d in uncertainty["differences"]]:
        found = [find_difference(part, first, second) for part in parts.values()]
        table.add_row(f"{first} - {second}", *(Estimate.from_dict(d).text() if d else "-" for d in found))
    return table


def write_seeds_report(
    run_dir: str | Path, seed_dirs: dict[int, Path], console: Console | None = None
) -> dict:
    """Each method's primary metric and each paired difference over the seeds: mean, sd, min, max."""
    runs = {seed: read_json(Path(path) / "metrics.json") for seed, path in seed_dirs.items()}
    first = next(iter(runs.values()))
    primary = first["primary_metric"]
    methods = [m for m in reported_methods(first) if all(m in r["methods"] for r in runs.values())]
    spread = {m: seed_spread([r["methods"][m]["overall"][primary] for r in runs.values()]) for m in methods}
    pairs = [(d["first"], d["second"]) for d in first.get("uncertainty", {}).get("differences", [])]
    differences = {
        f"{a} - {b}": seed_spread(
            [find_difference(r.get("uncertainty", {}), a, b)["value"] for r in runs.values()]
        )
        for a, b in pairs
        if all(find_difference(r.get("uncertainty", {}), a, b) for r in runs.values())
    }
    result = {"metric": primary, "seeds": list(runs), "methods": spread, "differences": differences}
    if all(behaviour_shift.has_groups(r) for r in runs.values()):
        values = [behaviour_shift.seed_values(r) for r in runs.values()]
        result["behaviour_shift"] = {
            name: seed_spread([v[name] for v in values])
            for name in values[0]
            if all(name in v for v in values)
        }
    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "seeds.json", result)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["row", "mean", "sd", "min", "max", "runs"])
    writer.writeheader()
    rows = {**spread, **differences, **result.get("behaviour_shift", {})}
    writer.writerows({"row": name, **values} for name, values in rows.items())
    atomic_write_text(run_dir / "seeds.csv", buffer.getvalue())
    if console is not None:
        table = Table(title=f"{first['task']}: {primary} over seeds {list(runs)} (mean, sd, min..max)")
        for column in ("method or difference", "mean", "sd", "min .. max"):
            table.add_column(column, justify="left" if column.startswith("method") else "right")
        for name, values in rows.items():
            table.add_row(
                name,
                f"{values['mean']:.4f}",
                f"{values['sd']:.4f}",
                f"{values['min']:.4f} .. {values['max']:.4f}",
            )
        console.print(table)
    return result
