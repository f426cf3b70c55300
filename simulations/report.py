"""The run's report: summary.csv, plots, and a table on the terminal, all from metrics.json."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.io import atomic_write_bytes, atomic_write_text, read_json

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


def _methods(metrics: dict) -> list[str]:
    present = metrics["methods"]
    return [m for m in ORDER if m in present] + sorted(set(present) - set(ORDER))


def _metric_names(metrics: dict) -> list[str]:
    names: list[str] = []
    for entry in metrics["methods"].values():
        names += [k for k in entry["overall"] if k != "n" and k not in names]
    return names


def summary_rows(metrics: dict) -> list[dict]:
    names = _metric_names(metrics)
    rows = []
    for method in _methods(metrics):
        entry = metrics["methods"][method]
        row = {"method": method, **{n: entry["overall"].get(n) for n in names}}
        row.update(
            users=len(entry["users"]),  # the users it was scored on
            missing=len(entry.get("missing", {}).get("users", [])),  # users it could not reach
            queries=int(entry["overall"].get("n", 0)),
            seconds=round(entry["seconds"]),
        )
        rows.append(row)
    return rows


def history_groups(history: dict[str, int]) -> dict[str, str]:
    """Users split into light / medium / heavy thirds by history size."""
    ranked = sorted(history, key=lambda uid: (history[uid], uid))
    groups = {}
    for rank, uid in enumerate(ranked):
        groups[uid] = ("light", "medium", "heavy")[min(2, rank * 3 // max(1, len(ranked)))]
    return groups


def save_figure(figure, path: Path) -> None:
    """PNG written atomically, so a report being rewritten never leaves a half-drawn plot."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_methods(metrics: dict, path: Path) -> None:
    key = metrics["primary_metric"]
    methods = _methods(metrics)
    values = [metrics["methods"][m]["overall"].get(key, float("nan")) for m in methods]
    figure, axis = plt.subplots(figsize=(1.1 * len(methods) + 2, 3.6))
    bars = axis.bar(
        methods,
        values,
        color=["#4c72b0" if "oppu" not in m and m != "centralized" else "#dd8452" for m in methods],
    )
    axis.bar_label(bars, fmt="%.3f", fontsize=8)
    axis.set_ylabel(key)
    axis.set_title(
        f"{metrics['task']}: {key} per method ({'higher' if metrics['higher_is_better'] else 'lower'} is better)"
    )
    axis.tick_params(axis="x", rotation=30)
    save_figure(figure, path)


def plot_rounds(metrics: dict, path: Path) -> None:
    key = metrics["primary_metric"]
    rounds = metrics.get("rounds", [])
    figure, (loss_axis, eval_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
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
    save_figure(figure, path)


def plot_user_gain(metrics: dict, path: Path) -> bool:
    key = metrics["primary_metric"]
    methods = metrics["methods"]
    if "oppu" not in methods or "shared" not in methods:
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
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for index, group in enumerate(("light", "medium", "heavy")):
        members = [uid for uid in gains if groups[uid] == group]
        axis.scatter([index] * len(members), [gains[uid] for uid in members], alpha=0.7)
        if members:
            axis.hlines(
                sum(gains[u] for u in members) / len(members), index - 0.25, index + 0.25, color="black"
            )
    axis.axhline(0, color="gray", linewidth=0.8)
    axis.set_xticks(range(3), ["light", "medium", "heavy"])
    axis.set(xlabel="users grouped by history size", ylabel=f"OPPU - shared ({key}, better = up)")
    axis.set_title("Per-user gain of personal adapters over the shared adapter")
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
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    rows = summary_rows(metrics)
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(run_dir / "summary.csv", buffer.getvalue())
        plot_methods(metrics, run_dir / "methods.png")
        plot_user_gain(metrics, run_dir / "user_gain.png")
    if metrics.get("rounds"):
        plot_rounds(metrics, run_dir / "rounds.png")
    if console is not None:
        console.print(summary_table(metrics, rows))
        for line in failure_lines(metrics):
            console.print(f"[yellow]{escape(line)}[/]")
    return rows


def summary_table(metrics: dict, rows: list[dict]) -> Table:
    table = Table(
        title=f"{metrics['task']} ({metrics.get('status', '?')}): primary metric {metrics['primary_metric']}"
    )
    for column in rows[0] if rows else ["method"]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    return table
