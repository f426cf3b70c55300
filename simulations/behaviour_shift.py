"""The behaviour-shift study (`fedoppu study behaviour-shift`): OPPU's paper, "behavior shift".

When a user asks about something their history does not cover, retrieval over that history (RAG)
brings back unrelated items, while a personal adapter (OPPU) keeps what it learned of the user. The
built-in benchmark's `benchmark-shifted-queries` (common/synthetic.py) gives every user queries on
movie themes their history never shows (group `shifted`) beside the usual ones on themes it does
(`in-history`); one federation answers both, and each node reports the two groups' counts apart. A
shifted query's personal tag is in no history: the best answer there is the population's tag, right
with probability 1 - benchmark-personal-strength, so personalized methods are expected to score lower
there. The question is which loses more: (rag - oppu on shifted queries) - (rag - oppu on in-history
queries), the same users resampled for both (simulations/statistics.py, `shift_effects`).

The study's run config is in simulations/studies.py; this module is its part of the report, which
simulations/report.py adds to any run whose queries come in groups.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from rich.table import Table

from common.data import IN_HISTORY, QUERY_GROUPS, SHIFTED
from simulations.figures import error_bars, grouped_bars
from simulations.statistics import SHIFT_COMPARISONS, Estimate, estimate_from, estimate_text, find_difference

CHANGE = "change"  # shifted minus in-history, per method or difference


def has_groups(metrics: dict) -> bool:
    return bool(metrics.get("uncertainty", {}).get("query_groups"))


def summary_columns(metrics: dict, method: str) -> dict[str, float | None]:
    """summary.csv's columns for one method: the primary metric per query group and its change, each
    with its 95% interval."""
    primary = metrics["primary_metric"]
    uncertainty = metrics["uncertainty"]
    parts = {group: uncertainty["query_groups"].get(group, {}).get("methods", {}) for group in QUERY_GROUPS}
    found = {group: part.get(method, {}).get(primary) for group, part in parts.items()}
    found[CHANGE] = uncertainty["shift"]["methods"].get(method)
    columns: dict[str, float | None] = {}
    for name, values in found.items():
        columns[f"{primary}_{name}"] = values["value"] if values else None
        columns[f"{primary}_{name}_lo"] = values["lo"] if values else None
        columns[f"{primary}_{name}_hi"] = values["hi"] if values else None
    return columns


def _title(metrics: dict, what: str) -> str:
    better = "higher" if metrics["higher_is_better"] else "lower"
    return (
        f"Behaviour shift: {what} {metrics['primary_metric']} on queries whose topic the user's history "
        f"shows (in-history) and never shows (shifted); 95% intervals, users resampled; {better} is better"
    )


def methods_table(metrics: dict, methods: list[str]) -> Table:
    """Per method: each query group's score and the change from in-history to shifted queries."""
    primary, uncertainty = metrics["primary_metric"], metrics["uncertainty"]
    table = Table(title=_title(metrics, "each method's"))
    for column in ("method", *QUERY_GROUPS, f"{SHIFTED} - {IN_HISTORY}"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for method in methods:
        cells = [
            estimate_text(
                uncertainty["query_groups"].get(group, {}).get("methods", {}).get(method, {}).get(primary)
            )
            for group in QUERY_GROUPS
        ]
        table.add_row(method, *cells, estimate_text(uncertainty["shift"]["methods"].get(method)))
    return table


def differences_table(metrics: dict) -> Table:
    """Per paired difference: its value on each query group, and how the shift changes it."""
    uncertainty = metrics["uncertainty"]
    table = Table(title=_title(metrics, "paired differences in"))
    for column in ("difference", *QUERY_GROUPS, f"{SHIFTED} - {IN_HISTORY}"):
        table.add_column(column, justify="left" if column == "difference" else "right")
    for change in uncertainty["shift"]["differences"]:
        first, second = change["first"], change["second"]
        cells = [
            estimate_text(find_difference(uncertainty["query_groups"][g], first, second))
            for g in QUERY_GROUPS
        ]
        table.add_row(f"{first} - {second}", *cells, estimate_text(change))
    return table


def answer_lines(metrics: dict) -> list[str]:
    """The paper's question in words, for each of SHIFT_COMPARISONS that ran."""
    shift = metrics["uncertainty"]["shift"]
    sign = 1 if metrics["higher_is_better"] else -1
    lines = []
    for first, second in SHIFT_COMPARISONS:
        change = estimate_from(find_difference(shift, first, second))
        if change is None:
            continue
        if math.isnan(change.lo):
            verdict = "too few users for an interval"
        elif sign * change.hi < 0:
            verdict = f"{first} loses more than {second} when the topic is new"
        elif sign * change.lo > 0:
            verdict = f"{first} loses less than {second} when the topic is new"
        else:
            verdict = "no difference this study can tell apart from chance"
        lines.append(
            f"{first} - {second} changes by {change.text()} from in-history to shifted queries "
            f"({change.users} users): {verdict}"
        )
    return lines


def plot(metrics: dict, methods: list[str]) -> Figure:
    """Left: each method on both query groups; right: each difference's change under the shift."""
    primary, uncertainty = metrics["primary_metric"], metrics["uncertainty"]
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(1.2 * len(methods) + 8, 4), layout="constrained", width_ratios=(3, 2)
    )
    series = {
        group: [
            estimate_from(
                uncertainty["query_groups"].get(group, {}).get("methods", {}).get(m, {}).get(primary)
            )
            for m in methods
        ]
        for group in QUERY_GROUPS
    }
    grouped_bars(left, methods, series)
    left.set(ylabel=f"{primary} (95% interval)", title="Each method on both query groups")
    changes = uncertainty["shift"]["differences"]
    found = [Estimate.from_dict(d) for d in changes]
    labels = [f"{d['first']} - {d['second']}" for d in changes]
    asked = [(d["first"], d["second"]) in SHIFT_COMPARISONS for d in changes]  # the paper's question
    for index, (estimate, question) in enumerate(zip(found, asked, strict=True)):
        right.errorbar(
            estimate.value,
            index,
            xerr=error_bars([estimate]),
            fmt="D",
            capsize=4,
            color="#dd8452" if question else "#4c72b0",
        )
    right.axvline(0, color="gray", linewidth=0.8)
    right.set_yticks(range(len(found)), labels)
    right.invert_yaxis()
    right.set(
        xlabel=f"change in {primary}: {SHIFTED} - {IN_HISTORY}",
        title="How the shift changes each difference",
    )
    return figure


def seed_values(metrics: dict) -> dict[str, float]:
    """One run's numbers of the study, by row name, for the report over seeds."""
    primary, uncertainty = metrics["primary_metric"], metrics["uncertainty"]
    values = {
        f"{method} [{group}]": scores[primary]["value"]
        for group, part in uncertainty["query_groups"].items()
        for method, scores in part["methods"].items()
    }
    shift = uncertainty["shift"]
    values |= {f"{method} [{SHIFTED} - {IN_HISTORY}]": e["value"] for method, e in shift["methods"].items()}
    values |= {
        f"{d['first']} - {d['second']} [{SHIFTED} - {IN_HISTORY}]": d["value"] for d in shift["differences"]
    }
    return values
