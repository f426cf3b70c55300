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

from common.data import IN_HISTORY, QUERY_GROUPS, SHIFTED
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
    # the federated shared adapter against the same adapter trained with every history pooled
    ("centralized-shared", "shared"),
)
# Behaviour shift (OPPU's paper): on queries whose topic the history does not cover, retrieval brings
# back unrelated items; does retrieval lose more there than a personal adapter does?
SHIFT_COMPARISONS = (("rag", "oppu"), ("oppu-rag", "oppu"))


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


def estimate_from(values: Mapping[str, float | None] | None) -> Estimate | None:
    """An estimate as reports keep it (`Estimate.as_dict`), or None where there is none."""
    return Estimate.from_dict(values) if values else None


def estimate_text(values: Mapping[str, float | None] | None) -> str:
    """A kept estimate in words, "-" where there is none."""
    return Estimate.from_dict(values).text() if values else "-"


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


def find_difference(part: Mapping, first: str, second: str) -> dict | None:
    """The difference first - second among a summary part's `differences`, or None."""
    return next(
        (d for d in part.get("differences", []) if (d["first"], d["second"]) == (first, second)), None
    )


def history_groups(history: Mapping[str, int]) -> dict[str, str]:
    """Users split into light / medium / heavy thirds by history size."""
    ranked = sorted(history, key=lambda uid: (history[uid], uid))
    return {uid: GROUPS[min(2, rank * 3 // max(1, len(ranked)))] for rank, uid in enumerate(ranked)}


def summarize(task: Task, metrics: Mapping, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """Intervals for every method's metrics, the paired differences of COMPARISONS, and both again per
    light / medium / heavy group; what the report prints and metrics.json keeps under `uncertainty`.
    Each method is resampled over the users it was scored on, each difference over the users both were.
    Where the queries come in groups (the behaviour-shift benchmark) `query_groups` has the same per
    query group, with SHIFT_COMPARISONS too, and `shift` each method's and each difference's change
    from in-history to shifted queries (`shift_effects`)."""
    methods = {name: entry["counts"] for name, entry in metrics["methods"].items() if entry.get("counts")}
    groups = history_groups(metrics.get("history", {}))
    summary: dict = {"confidence": CONFIDENCE, "resamples": resamples, "unit": "user", "groups": {}}
    for group in (None, *GROUPS):
        users = None if group is None else {uid for uid, g in groups.items() if g == group}
        part = _part(task, methods, COMPARISONS, users, seed, resamples)
        if group is None:
            summary.update(part)
        elif part["methods"]:
            summary["groups"][group] = part
    by_query = query_group_counts(metrics)
    if by_query:
        comparisons = SHIFT_COMPARISONS + COMPARISONS
        summary["query_groups"] = {
            group: _part(task, counts, comparisons, None, seed, resamples)
            for group, counts in by_query.items()
        }
        summary["shift"] = shift_effects(task, by_query, comparisons, seed, resamples)
    return summary


def _part(
    task: Task,
    methods: Mapping[str, Mapping[str, Mapping[str, float]]],
    comparisons: Sequence[tuple[str, str]],
    members: set[str] | None,
    seed: int,
    resamples: int,
) -> dict:
    """Each method's metrics with intervals and the paired differences of `comparisons`, over the users
    in `members` (None: every user)."""
    part: dict = {"methods": {}, "differences": []}
    for name, counts in methods.items():
        users = sorted(uid for uid in counts if members is None or uid in members)
        if users:
            weights = resample_weights(len(users), resamples, seed)
            scored = [counts[uid] for uid in users]
            part["methods"][name] = {
                metric: estimate(task, metric, scored, weights).as_dict()
                for metric in metrics_from_counts(task, scored[0])
                if metric != "n"
            }
    for better, than in comparisons:
        if better not in part["methods"] or than not in part["methods"]:
            continue
        users = sorted(
            uid for uid in methods[better] if uid in methods[than] and (members is None or uid in members)
        )
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
    return part


def query_group_counts(metrics: Mapping) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """{query group: {method: {user: counts}}} from metrics.json, in QUERY_GROUPS order; {} without groups."""
    return {
        group: {
            name: entry["groups"][group]["counts"]
            for name, entry in metrics["methods"].items()
            if entry.get("groups", {}).get(group, {}).get("counts")
        }
        for group in QUERY_GROUPS
        if any(group in entry.get("groups", {}) for entry in metrics["methods"].values())
    }


def shift_effects(
    task: Task,
    by_query: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    comparisons: Sequence[tuple[str, str]],
    seed: int = 0,
    resamples: int = RESAMPLES,
) -> dict:
    """What a behaviour shift does, on the users who have both kinds of query: each method's primary
    metric on shifted minus in-history queries, and for each comparison (first, second) whose methods
    both ran, how much more the first changes than the second: (first - second on shifted queries) -
    (first - second on in-history queries). The same users are resampled for both query groups, so a
    user's level cancels out."""
    metric = task.primary_metric
    before, after = by_query.get(IN_HISTORY, {}), by_query.get(SHIFTED, {})
    result: dict = {"metric": metric, "methods": {}, "differences": []}

    def users(*names: str) -> list[str]:
        return sorted(set.intersection(*(set(before[n]) & set(after[n]) for n in names)))

    def change(name: str, scored: list[str], weights: np.ndarray) -> tuple[float, np.ndarray]:
        shifted = resampled(task, metric, [after[name][uid] for uid in scored], weights)
        usual = resampled(task, metric, [before[name][uid] for uid in scored], weights)
        return shifted[0] - usual[0], shifted[1] - usual[1]

    for name in (n for n in after if n in before):
        if scored := users(name):
            weights = resample_weights(len(scored), resamples, seed)
            result["methods"][name] = sampled_estimate(*change(name, scored, weights), len(scored)).as_dict()
    for first, second in comparisons:
        if (
            first not in result["methods"]
            or second not in result["methods"]
            or not (scored := users(first, second))
        ):
            continue
        weights = resample_weights(len(scored), resamples, seed)
        (value_a, samples_a), (value_b, samples_b) = (change(n, scored, weights) for n in (first, second))
        diff = sampled_estimate(value_a - value_b, samples_a - samples_b, len(scored))
        result["differences"].append({"first": first, "second": second, "metric": metric, **diff.as_dict()})
    return result


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
