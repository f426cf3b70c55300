"""Bars and points with their 95% intervals, drawn the same way in every report."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from simulations.statistics import Estimate


def error_bars(found: Sequence[Estimate | None]) -> list[list[float]]:
    """Error bar lengths below and above each value; none where there is no interval."""
    below = [e.value - e.lo if e and not math.isnan(e.lo) else 0.0 for e in found]
    above = [e.hi - e.value if e and not math.isnan(e.hi) else 0.0 for e in found]
    return [below, above]


def grouped_bars(axis, labels: Sequence[str], series: Mapping[str, Sequence[Estimate | None]]) -> None:
    """One group of bars per label, one bar per series (with its interval), and a legend."""
    width = 0.8 / max(1, len(series))
    for index, (name, found) in enumerate(series.items()):
        values = [e.value if e else math.nan for e in found]
        positions = np.arange(len(labels)) + (index - (len(series) - 1) / 2) * width
        axis.bar(positions, values, width, yerr=error_bars(found), capsize=3, label=name)
    axis.set_xticks(range(len(labels)), labels, rotation=30)
    axis.legend(fontsize=8)
