"""Uncertainty for every reported number: a cluster bootstrap over users, queries nested in them.

A user's queries share the user's history and adapters, so they are not independent draws: the unit
of resampling is the user. Each resample draws users with replacement, keeps each drawn user's
queries, and recomputes the pooled metric from the summed counts exactly as the point estimate is
computed (so macro-F1 and RMSE get intervals too). A paired difference resamples the same users for
both methods, which removes the between-user variance the two share. Intervals are 95% percentile
intervals; the resamples are seeded, so a report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.metrics import metrics_from_counts
from common.tasks import Task

CONFIDENCE = 0.95
RESAMPLES = 2000
# Below this many users a percentile bootstrap says little (with 2 users it has 3 possible values):
# the estimate is reported without an interval.
MIN_USERS = 5
GROUPS = ("light", "medium", "heavy")
# The comparisons OPPU's paper makes: (better?, than), each where both methods ran.
COMPARISONS = (
    ("shared", "zero-shot"),
    ("oppu", "shared"),
    ("oppu", "local"),
    ("oppu-rag", "rag"),
    ("oppu-pag", "oppu"),
    ("centralized", "oppu"),
)


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float
    users: int

    @classmethod
    def from_dict(cls, values: Mapping[str, float | None]) -> Estimate:
        lo, hi = (math.nan if values[k] is None else values[k] for k in ("lo", "hi"))
        return cls(values["value"], lo, hi, int(values["users"]))

    def as_dict(self) -> dict[str, float | None]:
        """JSON-ready: a missing interval is null (NaN is not JSON)."""
        lo, hi = (None if math.isnan(x) else x for x in (self.lo, self.hi))
        return {"value": self.value, "lo": lo, "hi": hi, "users": self.users}

    def text(self, digits: int = 3) -> str:
        if math.isnan(self.value):
            return "-"
        if math.isnan(self.lo):
            return f"{self.value:.{digits}f} (n<{MIN_USERS}: no interval)"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def resample_weights(num_users: int, resamples: int, seed: int) -> np.ndarray:
    """How often each user is drawn in each resample: shape (resamples, num_users)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_users, np.full(num_users, 1.0 / num_users), size=resamples)


def _matrix(counts: Sequence[Mapping[str, float]]) -> tuple[list[str], np.ndarray]:
    keys = sorted({key for user in counts for key in user})
    return keys, np.array([[user.get(key, 0.0) for key in keys] for user in counts], dtype=float)


def _metric_per_resample(task: Task, metric: str, keys: list[str], sums: np.ndarray) -> np.ndarray:
    return np.array([metrics_from_counts(task, dict(zip(keys, row, strict=True)))[metric] for row in sums])


def _interval(samples: np.ndarray, users: int) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0 or users < MIN_USERS:
        return math.nan, math.nan
    tail = 100 * (1 - CONFIDENCE) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def resampled(
    task: Task, metric: str, counts: Sequence[Mapping[str, float]], weights: np.ndarray
) -> tuple[float, np.ndarray]:
    """The pooled `metric` over these users' counts, and its value in each resample (one weight column
    per user, in the same order): what every estimate here is made of."""
    keys, matrix = _matrix(counts)
    value = metrics_from_counts(task, dict(zip(keys, matrix.sum(axis=0), strict=True)))[metric]
    return float(value), _metric_per_resample(task, metric, keys, weights @ matrix)


def estimate(task: Task, metric: str, counts: Sequence[Mapping[str, float]], weights: np.ndarray) -> Estimate:
    """The pooled `metric` over these users' counts, with its bootstrap interval."""
    return sampled_estimate(*resampled(task, metric, counts, weights), len(counts))


def sampled_estimate(value: float, samples: np.ndarray, users: int) -> Estimate:
    """A value with the percentile interval of its resamples (none below MIN_USERS users)."""
    return Estimate(value, *_interval(samples, users), users)


def paired_difference(
    task: Task,
    metric: str,
    first: Sequence[Mapping[str, float]],
    second: Sequence[Mapping[str, float]],
    weights: np.ndarray,
) -> Estimate:
    """first - second on the same users (same order), resampling users once for both."""
    value_a, samples_a = resampled(task, metric, first, weights)
    value_b, samples_b = resampled(task, metric, second, weights)
    return sampled_estimate(value_a - value_b, samples_a - samples_b, len(first))


def ratio(
    numerator: tuple[float, np.ndarray], denominator: tuple[float, np.ndarray], users: int, sign: float = 1.0
) -> Estimate:
    """numerator / denominator of paired quantities (value and resamples, from the same weights), e.g.
    the share of a gain kept. Defined only where sign * denominator > 0 (a gain to share): NaN when the
    point estimate's is not, and resamples whose is not are left out of the interval."""
    (top, tops), (bottom, bottoms) = numerator, denominator
    value = top / bottom if sign * bottom > 0 else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = np.where(sign * bottoms > 0, tops / bottoms, np.nan)
    return sampled_estimate(value, samples, users)


def history_groups(history: Mapping[str, int]) -> dict[str, str]:
    """Users split into light / medium / heavy thirds by history size."""
    ranked = sorted(history, key=lambda uid: (history[uid], uid))
    return {uid: GROUPS[min(2, rank * 3 // max(1, len(ranked)))] for rank, uid in enumerate(ranked)}


def summarize(task: Task, metrics: Mapping, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Intervals for every method's metrics, the paired differences of COMPARISONS, and both again per
    light / medium / heavy group; what the report prints and metrics.json keeps under `uncertainty`.
    Each method is resampled over the users it was scored on, each difference over the users both were."""
    methods = {name: entry["counts"] for name, entry in metrics["methods"].items() if entry.get("counts")}
    groups = history_groups(metrics.get("history", {}))
    summary: dict = {"confidence": CONFIDENCE, "resamples": resamples, "unit": "user", "groups": {}}
    for group in (None, *GROUPS):

        def member(uid: str, group: str | None = group) -> bool:
            return group is None or groups.get(uid) == group

        part: dict = {"methods": {}, "differences": []}
        for name, counts in methods.items():
            users = sorted(uid for uid in counts if member(uid))
            if users:
                weights = resample_weights(len(users), resamples, seed)
                scored = [counts[uid] for uid in users]
                part["methods"][name] = {
                    metric: estimate(task, metric, scored, weights).as_dict()
                    for metric in metrics_from_counts(task, scored[0])
                    if metric != "n"
                }
        for better, than in COMPARISONS:
            if better not in part["methods"] or than not in part["methods"]:
                continue
            users = sorted(uid for uid in methods[better] if uid in methods[than] and member(uid))
            weights = resample_weights(len(users), resamples, seed)
            diff = paired_difference(
                task,
                task.primary_metric,
                [methods[better][uid] for uid in users],
                [methods[than][uid] for uid in users],
                weights,
            )
            part["differences"].append(
                {"first": better, "second": than, "metric": task.primary_metric, **diff.as_dict()}
            )
        if group is None:
            summary.update(part)
        elif part["methods"]:
            summary["groups"][group] = part
    return summary


def seed_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of one number over runs with different seeds."""
    array = np.array(values, dtype=float)
    return {
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "runs": len(array),
    }
