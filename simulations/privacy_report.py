"""The privacy comparison's report: table (CSV + JSON), two plots and the research question in numbers.

The question: of the utility that DP costs the shared adapter (shared-only, no privacy minus shared-only
under DP), how much do the private personal adapters win back (OPPU under DP minus shared-only under DP)?
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from common.io import atomic_write_json, atomic_write_text, read_json
from simulations.report import save_figure

COLUMNS = (
    "run",
    "setting",
    "epsilon",
    "delta",
    "rounds",
    "stopped_early",
    "noise",
    "clip",
    "shared",
    "oppu",
    "bytes_per_client_round",
    "wall_seconds",
)


def table_row(label: str, metrics: dict) -> dict:
    key = metrics["primary_metric"]
    privacy = metrics.get("privacy", {})
    trained = [r for r in metrics["rounds"] if r.get("privacy")]
    sent = [r["privacy"]["bytes-per-client"] for r in trained if r["privacy"].get("bytes-per-client")]
    epsilon = trained[-1]["privacy"]["epsilon"] if trained else (0.0 if privacy.get("delta") else None)
    return {
        "run": label,
        "setting": privacy.get("setting", "none"),
        "epsilon": epsilon,  # None: no DP guarantee (infinite epsilon)
        "delta": privacy.get("delta"),
        "rounds": f"{privacy.get('rounds_run', len(trained))}/{privacy.get('rounds_planned', len(trained))}",
        "stopped_early": bool(metrics.get("stopped_early")),
        "noise": privacy.get("noise_multiplier", 0.0),
        "clip": privacy.get("clipping_norm"),
        "shared": metrics["methods"].get("shared", {}).get("overall", {}).get(key),
        "oppu": metrics["methods"].get("oppu", {}).get("overall", {}).get(key),
        "bytes_per_client_round": round(sum(sent) / len(sent)) if sent else None,
        "wall_seconds": round(metrics.get("wall_seconds", 0.0)),
    }


def research_answer(rows: list[dict], higher_is_better: bool) -> list[str]:
    """One line per DP run: DP's cost to shared-only, and the part OPPU's personal adapters win back."""
    baseline = next((r for r in rows if r["setting"] == "none"), None)
    if baseline is None or baseline["shared"] is None:
        return ["No 'none' run to compare with: add it to --settings to measure what DP costs."]
    sign = 1 if higher_is_better else -1
    lines = [
        f"Without privacy: shared-only {baseline['shared']:.4f}, OPPU {baseline['oppu']:.4f} "
        f"(personal adapters add {sign * (baseline['oppu'] - baseline['shared']):+.4f})."
    ]
    for row in rows:
        if row["setting"] in ("none", "secagg") or row["shared"] is None or row["oppu"] is None:
            continue
        cost = sign * (baseline["shared"] - row["shared"])
        won_back = sign * (row["oppu"] - row["shared"])
        if cost > 0:
            recovery = f"OPPU wins back {won_back:+.4f} ({100 * won_back / cost:.0f}% of it)"
        else:
            recovery = f"nothing to win back; personal adapters add {won_back:+.4f}"
        lines.append(
            f"{row['run']} (epsilon {'inf' if row['epsilon'] is None else format(row['epsilon'], '.3g')}): DP costs shared-only {cost:+.4f}; {recovery}; "
            f"OPPU vs OPPU without privacy {sign * (row['oppu'] - baseline['oppu']):+.4f}"
            + (" [stopped early: budget]" if row["stopped_early"] else "")
        )
    return lines


def plot_utility_vs_epsilon(rows: list[dict], metric: str, path: Path) -> None:
    """Per DP setting, shared-only (solid) and OPPU (dashed) against epsilon; no-privacy levels as lines."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    private = sorted(
        (r for r in rows if r["epsilon"] is not None and r["epsilon"] > 0), key=lambda r: r["epsilon"]
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, setting in enumerate(dict.fromkeys(r["setting"] for r in private)):
        points = [r for r in private if r["setting"] == setting]
        for column, style, marker in (("shared", "-", "o"), ("oppu", "--", "s")):
            xy = [(r["epsilon"], r[column]) for r in points if r[column] is not None]
            if xy:
                axis.plot(*zip(*xy, strict=True), style, marker=marker, color=colors[index % len(colors)])
        axis.plot([], [], color=colors[index % len(colors)], label=setting)
    for row in (r for r in rows if r["setting"] == "none"):
        for column, style in (("shared", "-"), ("oppu", "--")):
            if row[column] is not None:
                axis.axhline(row[column], linestyle=style, color="gray", linewidth=1)
    axis.plot([], [], "k-", marker="o", label="shared-only")
    axis.plot([], [], "k--", marker="s", label="OPPU")
    axis.plot([], [], color="gray", label="no privacy (lines)")
    if private:
        axis.set_xscale("log")
    axis.set(xlabel="epsilon (user-level, at the run's delta)", ylabel=metric)
    axis.set_title("Utility versus privacy: shared-only and OPPU")
    axis.legend(fontsize=7)
    save_figure(figure, path)


def plot_rounds(runs: dict[str, dict], metric: str, path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, metrics in runs.items():
        evaluated = [r for r in metrics["rounds"] if "eval" in r]
        line = axis.plot(
            [r["round"] for r in evaluated],
            [r["eval"].get(metric) for r in evaluated],
            marker="o",
            label=label,
        )
        if metrics.get("stopped_early") and evaluated:
            axis.plot(
                evaluated[-1]["round"], evaluated[-1]["eval"].get(metric), "x", color=line[0].get_color()
            )
    axis.set(
        xlabel="round", ylabel=f"shared adapter {metric}", title="Shared adapter per round (x: budget stop)"
    )
    axis.legend(fontsize=7)
    save_figure(figure, path)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "inf"
    return str(value)


def write_privacy_report(
    run_dir: str | Path, point_dirs: dict[str, Path], console: Console | None = None
) -> dict:
    out = Path(run_dir) / "privacy"
    runs = {label: read_json(Path(path) / "metrics.json") for label, path in point_dirs.items()}
    first = next(iter(runs.values()))
    metric, higher = first["primary_metric"], first["higher_is_better"]
    rows = [table_row(label, metrics) for label, metrics in runs.items()]
    answer = research_answer(rows, higher)
    stopped = [f"{r['run']} after {r['rounds']} rounds" for r in rows if r["stopped_early"]]
    if stopped:
        answer.append("Stopped early by the privacy budget (results kept): " + ", ".join(stopped) + ".")
    atomic_write_text(out / "table.csv", _csv(rows))
    atomic_write_json(out / "table.json", {"metric": metric, "higher_is_better": higher, "rows": rows})
    atomic_write_text(out / "summary.txt", "\n".join(answer) + "\n")
    plot_utility_vs_epsilon(rows, metric, out / "utility_vs_epsilon.png")
    plot_rounds(runs, metric, out / "rounds.png")
    if console is not None:
        table = Table(title=f"Privacy settings: {first['task']}, {metric} (epsilon '-' = no DP guarantee)")
        for column in COLUMNS:
            table.add_column(column, justify="left" if column in ("run", "setting") else "right")
        for row in rows:
            table.add_row(*(_cell(row[c]) for c in COLUMNS))
        console.print(table)
        console.print("[bold]How much of DP's cost to the shared adapter do personal adapters win back?[/]")
        for line in answer:
            console.print(f"  {line}")
        console.print(f"report: {out}")
    return {"rows": rows, "answer": answer}
