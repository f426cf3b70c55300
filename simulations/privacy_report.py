"""The privacy comparison's report: the table (CSV + JSON), the plot and the research question in numbers.

The question: of the utility that DP costs the shared adapter (shared-only without privacy minus
shared-only under DP), how much do the private personal adapters win back, i.e. how much less does
OPPU lose? Each number comes with a 95% interval from the cluster bootstrap over users
(simulations/statistics.py): every run scored the same users, so one resample of users serves every
run and method, and differences and ratios of them are paired.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker
from rich.console import Console
from rich.table import Table

from common.io import atomic_write_json, atomic_write_text, read_json
from common.tasks import get_task
from simulations.gates import users_keeping_shared
from simulations.report import save_figure
from simulations.statistics import RESAMPLES, Estimate, ratio, resample_weights, resampled, sampled_estimate

NOT_PRIVATE = "none"
ONCE = ("zero-shot", "local")  # methods no privacy setting changes: computed once, in the reference run
PER_SETTING = ("shared", "oppu")
COLUMNS = (
    "run",
    "setting",
    "method",
    "epsilon",
    "delta",
    "clients_per_round",
    "rounds",
    "stopped_early",
    "noise",
    "clip",
    "utility",
    "utility_lo",
    "utility_hi",
    "gain_retained",
    "gain_retained_lo",
    "gain_retained_hi",
    "users_keeping_shared",
    "shared_adapter",
    "params_per_client",
    "bytes_per_client_round",
    "seconds_per_round",
    "wall_seconds",
)
Sampled = tuple[float, np.ndarray]  # a pooled metric and its value in each resample of users


def run_info(label: str, metrics: dict) -> dict:
    """What a run's privacy setting was and cost: the columns every method of the run shares."""
    privacy = metrics.get("privacy", {})
    trained = [r for r in metrics["rounds"] if r.get("train")]
    released = [r["privacy"] for r in metrics["rounds"] if r.get("privacy")]
    sent = [p["bytes-per-client"] for p in released if p.get("bytes-per-client")]
    # No DP guarantee: None (infinite epsilon); a DP run whose budget afforded no round released nothing.
    epsilon = released[-1]["epsilon"] if released else (0.0 if privacy.get("delta") else None)
    return {
        "run": label,
        "setting": privacy.get("setting", NOT_PRIVATE),
        "epsilon": epsilon,
        "delta": privacy.get("delta"),
        "clients_per_round": _mean([r["train"].get("sampled", r["train"]["clients"]) for r in trained]),
        "rounds": f"{privacy.get('rounds_run', len(trained))}/{privacy.get('rounds_planned', len(trained))}",
        "stopped_early": bool(metrics.get("stopped_early")),
        "noise": privacy.get("noise_multiplier"),
        "clip": privacy.get("clipping_norm"),
        "shared_adapter": privacy.get("shared_adapter"),  # its layout; d = the weights each client sends
        "params_per_client": privacy.get("params_per_client"),
        "bytes_per_client_round": round(sum(sent) / len(sent)) if sent else None,
        "seconds_per_round": _mean([r["train"]["seconds"] for r in trained if "seconds" in r["train"]]),
        "wall_seconds": round(metrics.get("wall_seconds", 0.0)),
    }


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


@dataclass
class Scores:
    """Every (run, method)'s pooled metric over the users that every run scored, each with its values
    under the same resamples of those users; where a run has no per-user counts (a node policy withheld
    them), its overall metric and no interval."""

    reference: dict
    runs: dict[str, dict]
    resamples: int = RESAMPLES
    seed: int = 0

    def __post_init__(self) -> None:
        self.task = get_task(self.reference["task"])
        self.metric = self.reference["primary_metric"]
        self.sign = 1.0 if self.reference["higher_is_better"] else -1.0
        entries = [self.reference["methods"][m] for m in ONCE if m in self.reference["methods"]]
        entries += [r["methods"][m] for r in self.runs.values() for m in PER_SETTING if m in r["methods"]]
        counted = [set(e["counts"]) for e in entries if e.get("counts")]
        self.users = sorted(set.intersection(*counted)) if len(counted) == len(entries) and counted else []
        self.weights = resample_weights(len(self.users), self.resamples, self.seed)

    def of(self, label: str | None, method: str) -> Sampled | None:
        """`label` None: the reference run."""
        metrics = self.reference if label is None else self.runs[label]
        entry = metrics["methods"].get(method)
        if entry is None:
            return None
        if not self.users:
            return entry["overall"].get(self.metric, math.nan), np.full(self.resamples, np.nan)
        return resampled(self.task, self.metric, [entry["counts"][u] for u in self.users], self.weights)

    def estimate(self, value: Sampled) -> Estimate:
        return sampled_estimate(*value, len(self.users))

    def gain(self, nonprivate: Sampled, zero_shot: Sampled) -> Estimate:
        """The non-private gain over zero-shot, in the direction in which the metric improves."""
        return self.estimate(_scaled(_minus(nonprivate, zero_shot), self.sign))

    def gain_retained(self, private: Sampled, nonprivate: Sampled, zero_shot: Sampled) -> Estimate:
        """(private - zero-shot) / (non-private - zero-shot); undefined (NaN) unless the non-private
        gain is above zero at 95%: a share of a gain the data cannot tell from zero says nothing (a
        gain of 0.005 against a loss of 0.16 made "-3100% retained")."""
        if not self.gain(nonprivate, zero_shot).lo > 0:  # NaN (no interval) is not a gain either
            return Estimate(math.nan, math.nan, math.nan, len(self.users))
        return ratio(_minus(private, zero_shot), _minus(nonprivate, zero_shot), len(self.users), self.sign)

    def won_back(self, shared: Sampled, oppu: Sampled, nonprivate: dict[str, Sampled]) -> Estimate:
        """1 - OPPU's loss under DP / the shared adapter's: the part of what DP costs the shared
        adapter that the personal adapters win back; reported only where that cost is above zero at 95%."""
        cost_shared = _scaled(_minus(nonprivate["shared"], shared), self.sign)
        cost_oppu = _scaled(_minus(nonprivate["oppu"], oppu), self.sign)
        return ratio(_minus(cost_shared, cost_oppu), cost_shared, len(self.users))

    def difference(self, first: Sampled, second: Sampled) -> Estimate:
        return self.estimate(_minus(first, second))


def _minus(a: Sampled, b: Sampled) -> Sampled:
    return a[0] - b[0], a[1] - b[1]


def _scaled(a: Sampled, factor: float) -> Sampled:
    return factor * a[0], factor * a[1]


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


def comparison_rows(reference: dict, runs: dict[str, dict], scores: Scores) -> list[dict]:
    """One row per method and setting; zero-shot and local once, as the reference run measured them."""
    rows = []
    zero_shot = scores.of(None, "zero-shot")
    nonprivate = {m: scores.of(NOT_PRIVATE, m) for m in PER_SETTING} if NOT_PRIVATE in runs else {}
    for method in ONCE:
        if (value := scores.of(None, method)) is not None:
            info = run_info("reference", reference) | {"setting": "(every setting)", "method": method}
            rows.append(info | _utility(scores.estimate(value), None))
    for label, metrics in runs.items():
        for method in PER_SETTING:
            value = scores.of(label, method)
            if value is None:
                continue
            retained = None
            if zero_shot is not None and nonprivate.get(method) is not None:
                retained = scores.gain_retained(value, nonprivate[method], zero_shot)
            gate = metrics.get("gates", {}).get(method)
            kept = f"{users_keeping_shared(gate)}/{gate['users']}" if gate else None
            rows.append(
                run_info(label, metrics)
                | {"method": method, "users_keeping_shared": kept}
                | _utility(scores.estimate(value), retained)
            )
    return [{column: row.get(column) for column in COLUMNS} for row in rows]


def _utility(utility: Estimate, retained: Estimate | None) -> dict:
    values = {"utility": utility.value, "utility_lo": utility.lo, "utility_hi": utility.hi}
    if retained is not None:
        values |= {
            "gain_retained": retained.value,
            "gain_retained_lo": retained.lo,
            "gain_retained_hi": retained.hi,
        }
    return {key: _json_float(value) for key, value in values.items()}


def _percent(estimate: Estimate) -> str:
    if math.isnan(estimate.lo):
        return f"{100 * estimate.value:.0f}%"
    return f"{100 * estimate.value:.0f}% [{100 * estimate.lo:.0f}%, {100 * estimate.hi:.0f}%]"


def _epsilon(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def research_answer(reference: dict, runs: dict[str, dict], scores: Scores) -> list[str]:
    """The answer first (one sentence over the DP runs), then one line per run with its numbers."""
    if NOT_PRIVATE not in runs:
        return ["No 'none' run to compare with: add it to --settings to measure what DP costs."]
    s = scores.sign
    nonprivate = {m: scores.of(NOT_PRIVATE, m) for m in PER_SETTING}
    zero_shot, local = scores.of(None, "zero-shot"), scores.of(None, "local")
    lines = []
    if zero_shot is not None:
        once = f"Zero-shot {zero_shot[0]:.4f}" + (f", local {local[0]:.4f}" if local is not None else "")
        lines.append(f"{once}: computed once (runs/reference); no privacy setting changes them.")
        gains = {m: scores.gain(nonprivate[m], zero_shot) for m in PER_SETTING}
        lines.append(
            f"Without DP: shared {nonprivate['shared'][0]:.4f} ({gains['shared'].text(4)} over zero-shot), "
            f"OPPU {nonprivate['oppu'][0]:.4f} ({gains['oppu'].text(4)})."
        )
        lines += [
            f"Without DP {name}'s gain over zero-shot, {gains[m].text(4)}, is not above zero at 95%: "
            "there is no gain to retain, so its share of the non-private gain is undefined."
            for m, name in (("shared", "the shared adapter"), ("oppu", "OPPU"))
            if not gains[m].lo > 0
        ]
    answers = []
    private = sorted(
        (label for label in runs if run_info(label, runs[label])["epsilon"] is not None),
        key=lambda label: run_info(label, runs[label])["epsilon"],
    )
    for label in [*private, *(lb for lb in runs if lb not in private and lb != NOT_PRIVATE)]:
        info = run_info(label, runs[label])
        private_run = {m: scores.of(label, m) for m in PER_SETTING}
        shared, oppu = private_run["shared"], private_run["oppu"]
        if shared is None or oppu is None:
            continue
        cost = scores.estimate(_scaled(_minus(nonprivate["shared"], shared), s))
        head = (
            f"{label} (epsilon {_epsilon(info['epsilon'])}, delta {info['delta']:g})"
            if info["delta"]
            else f"{label} (no DP)"
        )
        if cost.lo > 0:  # a cost the data cannot tell from zero has no share to win back (NaN: no interval)
            won = scores.won_back(shared, oppu, nonprivate)
            answer = f"the personal adapters win back {_percent(won)} of it"
            if label in private:
                answers.append(f"{_percent(won)} at epsilon {_epsilon(info['epsilon'])} ({label})")
        else:
            answer = "nothing to win back"
        kept = []
        if zero_shot is not None:
            for method, name in (("shared", "shared"), ("oppu", "OPPU")):
                retained = scores.gain_retained(private_run[method], nonprivate[method], zero_shot)
                if not math.isnan(retained.value):
                    kept.append(f"{name} {_percent(retained)}")
        line = f"{head} costs the shared adapter {cost.text(4)}; {answer}."
        if kept:
            line += f" Kept of the non-private gain over zero-shot: {', '.join(kept)}."
        if local is not None:
            line += f" OPPU - local {scores.difference(oppu, local).text(4)}."
        lines.append(line)
    if answers:
        lines.insert(
            0,
            "Of what DP costs the shared adapter, the personal adapters win back " + "; ".join(answers) + ".",
        )
    elif private:
        lines.insert(
            0,
            "DP cost the shared adapter nothing measurable here: the personal adapters had nothing to win back.",
        )
    return lines


# The share panel's view: a share far below 0 (DP left a method below zero-shot by several times its
# gain) with its wide interval would squeeze every other curve flat; such points sit on the edge, marked.
SHARE_VIEW = (-1.0, 1.5)


def plot_utility_vs_epsilon(rows: list[dict], metric: str, path: Path) -> None:
    """Left: shared-only (solid) and OPPU (dashed) against epsilon per DP setting, 95% intervals, with
    the levels that do not depend on epsilon as lines. Right: the share of the non-private gain over
    zero-shot that each keeps, shown within SHARE_VIEW (points beyond it on the edge, with their value)."""
    figure, (utility_axis, share_axis) = plt.subplots(1, 2, figsize=(12, 4.2))
    private = sorted(
        (r for r in rows if r["epsilon"] is not None and r["epsilon"] > 0), key=lambda r: r["epsilon"]
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {"shared": ("-", "o"), "oppu": ("--", "s")}
    for index, setting in enumerate(dict.fromkeys(r["setting"] for r in private)):
        color = colors[index % len(colors)]
        for axis, column in ((utility_axis, "utility"), (share_axis, "gain_retained")):
            for method, (style, marker) in styles.items():
                points = [r for r in private if r["setting"] == setting and r["method"] == method]
                points = [r for r in points if r[column] is not None]
                if not points:
                    continue
                xs, ys = [r["epsilon"] for r in points], [r[column] for r in points]
                lo = [
                    y - r[f"{column}_lo"] if r[f"{column}_lo"] is not None else 0
                    for y, r in zip(ys, points, strict=True)
                ]
                hi = [
                    r[f"{column}_hi"] - y if r[f"{column}_hi"] is not None else 0
                    for y, r in zip(ys, points, strict=True)
                ]
                axis.errorbar(xs, ys, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], linestyle=style,
                              marker=marker, color=color, capsize=3)  # fmt: skip
                if axis is share_axis:
                    for x, y in zip(xs, ys, strict=True):
                        edge = min(max(y, SHARE_VIEW[0]), SHARE_VIEW[1])
                        if edge != y:
                            axis.plot([x], [edge], marker="v" if y < edge else "^", color=color, markersize=9)
                            axis.annotate(f"{y:.2g}", (x, edge), textcoords="offset points", xytext=(6, 0),
                                          color=color, fontsize=7, va="center")  # fmt: skip
            axis.plot([], [], color=color, label=setting)
    levels = {
        ("none", "shared"): ("gray", "-", "shared, no DP"),
        ("none", "oppu"): ("gray", "--", "OPPU, no DP"),
        ("(every setting)", "zero-shot"): ("black", ":", "zero-shot"),
        ("(every setting)", "local"): ("tab:green", "-.", "local"),
    }
    for row in rows:
        if (style := levels.get((row["setting"], row["method"]))) is not None and row["utility"] is not None:
            utility_axis.axhline(
                row["utility"], color=style[0], linestyle=style[1], linewidth=1, label=style[2]
            )
    for axis in (utility_axis, share_axis):
        axis.plot([], [], "k-", marker="o", label="shared-only")
        axis.plot([], [], "k--", marker="s", label="OPPU")
        if private:
            axis.set_xscale("log")
            axis.set_xticks(sorted({r["epsilon"] for r in private}))
            axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:.3g}"))  # 2, not 1.99994
            axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.legend(fontsize=7)
    share_axis.axhline(1.0, color="gray", linewidth=0.8)
    share_axis.axhline(0.0, color="gray", linewidth=0.8)
    low, high = share_axis.get_ylim()
    share_axis.set_ylim(max(low, SHARE_VIEW[0] - 0.1), min(high, SHARE_VIEW[1] + 0.1))
    utility_axis.set(
        xlabel="epsilon (user-level, at the run's delta)", ylabel=metric, title="Utility versus privacy"
    )
    share_axis.set(
        xlabel="epsilon (user-level, at the run's delta)",
        ylabel="(DP - zero-shot) / (no DP - zero-shot)",
        title="Share of the non-private gain retained (95% intervals)",
    )
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


def _interval(row: dict, column: str) -> str:
    if row[column] is None:
        return "-"
    if row[f"{column}_lo"] is None:
        return f"{row[column]:.3f}"
    return f"{row[column]:.3f} [{row[f'{column}_lo']:.3f}, {row[f'{column}_hi']:.3f}]"


def console_table(rows: list[dict], task: str, metric: str) -> Table:
    table = Table(
        title=f"Privacy settings: {task}, {metric}, 95% intervals over users (epsilon '-' = no DP guarantee; "
        "zero-shot and local: one run for every setting)"
    )
    # The terminal's: enough to read the answer; table.csv has every column.
    shown = ["run", "method", "epsilon", "clients_per_round", "rounds", "noise", "utility", "gain_retained"]
    shown += ["users_keeping_shared", "seconds_per_round"]
    for column in shown:
        table.add_column(
            column.replace("_", " "), justify="left" if column in ("run", "setting", "method") else "right"
        )
    for row in rows:
        cells = [_interval(row, c) if c in ("utility", "gain_retained") else _cell(row[c]) for c in shown]
        table.add_row(*cells)
    return table


def write_privacy_report(
    run_dir: str | Path,
    reference_dir: str | Path,
    point_dirs: Mapping[str, Path],
    console: Console | None = None,
) -> dict:
    out = Path(run_dir) / "privacy"
    reference = read_json(Path(reference_dir) / "metrics.json")
    runs = {label: read_json(Path(path) / "metrics.json") for label, path in point_dirs.items()}
    scores = Scores(reference, runs)
    rows = comparison_rows(reference, runs, scores)
    answer = research_answer(reference, runs, scores)
    stopped = [
        f"{label} after {run_info(label, m)['rounds']} rounds"
        for label, m in runs.items()
        if m.get("stopped_early")
    ]
    if stopped:
        answer.append("Stopped early by the privacy budget (results kept): " + ", ".join(stopped) + ".")
    metric, higher = reference["primary_metric"], reference["higher_is_better"]
    atomic_write_text(out / "table.csv", _csv(rows))
    atomic_write_json(
        out / "table.json",
        {
            "metric": metric,
            "higher_is_better": higher,
            "users": len(scores.users),
            "reused": {"methods": list(ONCE), "run": str(reference_dir)},
            "rows": rows,
            "answer": answer,
        },
    )
    atomic_write_text(out / "summary.txt", "\n".join(answer) + "\n")
    plot_utility_vs_epsilon(rows, metric, out / "utility_vs_epsilon.png")
    if console is not None:
        console.print(console_table(rows, reference["task"], metric))
        console.print(
            "[bold]How much of what DP costs the shared adapter do the personal adapters win back?[/]"
        )
        for line in answer:
            console.print(f"  {line}")
        console.print(f"report: {out}")
    return {"rows": rows, "answer": answer}
