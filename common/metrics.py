"""LaMP's metrics, computed from additive counts.

Clients send only sums and counts (never predictions), the server adds them up, and the metrics that
come out are exactly those of the pooled predictions. The definitions follow LaMP's evaluation code:
accuracy and sklearn-style macro F1 over the task's label set, MAE and RMSE for ratings, and the
ROUGE-1 / ROUGE-L F-measure of rouge-score without stemming (LaMP's `evaluate` "rouge" default). LaMP
averages ROUGE with a bootstrap aggregator whose midpoint is, up to resampling noise, the plain mean
used here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence

from rouge_score import rouge_scorer

from common.data import QUERY_GROUPS
from common.tasks import CLASSIFICATION, RATING, Task

GROUP_SEPARATOR = ":"  # a query group's own counts: `shifted:n`, `in-history:correct`, ...


def grouped_metric_counts(
    task: Task, predictions: Sequence[str], golds: Sequence[str], groups: Sequence[str | None]
) -> dict[str, float]:
    """`metric_counts` over every answer, and each query group's own under `<group>:<name>` (answers of
    no group count in the total only): each group's counts add up within the total."""
    counts = metric_counts(task, predictions, golds)
    for group in QUERY_GROUPS:
        picked = [i for i, g in enumerate(groups) if g == group]
        if picked:
            own = metric_counts(task, [predictions[i] for i in picked], [golds[i] for i in picked])
            counts |= group_counts(group, own)
    return counts


def metric_counts(task: Task, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    """Sufficient statistics of raw generations against gold outputs."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    extracted = [task.extract(prediction) for prediction in predictions]
    golds = [gold.strip() for gold in golds]
    if task.kind == CLASSIFICATION:
        return _classification_counts(task.labels, extracted, golds)
    if task.kind == RATING:
        return _rating_counts(extracted, golds)
    return _rouge_counts(extracted, golds)


def label_count_names(task: Task) -> tuple[str, ...]:
    """The per-label breakdown of a classification task's counts (tp/fp/fn per label)."""
    if task.kind != CLASSIFICATION:
        return ()
    return tuple(f"{kind}/{label}" for label in task.labels for kind in ("tp", "fp", "fn"))


def count_names(task: Task) -> tuple[str, ...]:
    """Every name `metric_counts` can produce for the task: what an evaluate reply may carry."""
    if task.kind == CLASSIFICATION:
        return ("n", "correct", *label_count_names(task))
    if task.kind == RATING:
        return ("n", "abs_err_sum", "sq_err_sum")
    return ("n", "rouge1_sum", "rougeL_sum")


def group_counts(group: str, counts: Mapping[str, float]) -> dict[str, float]:
    """One query group's counts as a record carries them beside the total: `<group>:<name>`."""
    return {f"{group}{GROUP_SEPARATOR}{name}": value for name, value in counts.items()}


def group_count_names(names: Iterable[str]) -> frozenset[str]:
    """The names of `names` for each query group (common.data.QUERY_GROUPS)."""
    return frozenset(key for group in QUERY_GROUPS for key in group_counts(group, dict.fromkeys(names)))


def split_groups(counts: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(the counts over every query, {query group: its own counts}) from one record."""
    plain: dict[str, float] = {}
    groups: dict[str, dict[str, float]] = {}
    for key, value in counts.items():
        group, separator, name = key.partition(GROUP_SEPARATOR)
        if separator and group in QUERY_GROUPS:
            groups.setdefault(group, {})[name] = value
        else:
            plain[key] = value
    return plain, groups


def merge_counts(*counts: Mapping[str, float]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for part in counts:
        for key, value in part.items():
            merged[key] = merged.get(key, 0) + value
    return merged


def metrics_from_counts(task: Task, counts: Mapping[str, float]) -> dict[str, float]:
    n = counts.get("n", 0)
    if task.kind == CLASSIFICATION:
        values = {"accuracy": _ratio(counts.get("correct", 0), n), "f1": _macro_f1(task.labels, counts, n)}
    elif task.kind == RATING:
        values = {
            "mae": _ratio(counts.get("abs_err_sum", 0), n),
            "rmse": math.sqrt(_ratio(counts.get("sq_err_sum", 0), n)),
        }
    else:
        values = {
            "rouge-1": _ratio(counts.get("rouge1_sum", 0), n),
            "rouge-l": _ratio(counts.get("rougeL_sum", 0), n),
        }
    return {"n": n, **values}


def compute_metrics(task: Task, predictions: Sequence[str], golds: Sequence[str]) -> dict[str, float]:
    return metrics_from_counts(task, metric_counts(task, predictions, golds))


def _ratio(total: float, n: float) -> float:
    return total / n if n else math.nan


def _classification_counts(
    labels: tuple[str, ...], predictions: list[str], golds: list[str]
) -> dict[str, float]:
    """Per-label tp/fp/fn; a prediction outside the label set is wrong and counts only as a miss (fn)."""
    counts: dict[str, float] = {"n": len(golds), "correct": 0}
    counts |= {f"{kind}/{label}": 0 for label in labels for kind in ("tp", "fp", "fn")}
    for prediction, gold in zip(predictions, golds, strict=True):
        if gold not in labels:
            raise ValueError(f"gold {gold!r} is not one of the task's labels {list(labels)}")
        if prediction == gold:
            counts["correct"] += 1
            counts[f"tp/{gold}"] += 1
            continue
        counts[f"fn/{gold}"] += 1
        if prediction in labels:
            counts[f"fp/{prediction}"] += 1
    return counts


def _macro_f1(labels: tuple[str, ...], counts: Mapping[str, float], n: float) -> float:
    """Mean F1 over the whole label set; a label never seen nor predicted scores 0, as sklearn does.
    Counts without the per-label breakdown (a node's policy can withhold it) have no F1."""
    if not n or not any(key.startswith("tp/") for key in counts):
        return math.nan
    scores = []
    for label in labels:
        tp = counts.get(f"tp/{label}", 0)
        denominator = 2 * tp + counts.get(f"fp/{label}", 0) + counts.get(f"fn/{label}", 0)
        scores.append(2 * tp / denominator if denominator else 0.0)
    return sum(scores) / len(scores)


def _rating_counts(predictions: list[str], golds: list[str]) -> dict[str, float]:
    abs_sum = sq_sum = 0.0
    for prediction, gold in zip(predictions, golds, strict=True):
        error = _rating_value(prediction, float(gold)) - float(gold)
        abs_sum += abs(error)
        sq_sum += error * error
    return {"n": len(golds), "abs_err_sum": abs_sum, "sq_err_sum": sq_sum}


def _rating_value(prediction: str, gold: float) -> float:
    """LaMP's rule: an output that is not a number counts as the end of the 1-5 scale farthest from the gold."""
    try:
        value = float(prediction)
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return value
    return 1.0 if abs(1 - gold) > abs(5 - gold) else 5.0


@functools.cache
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def _rouge_counts(predictions: list[str], golds: list[str]) -> dict[str, float]:
    rouge1 = rouge_l = 0.0
    for prediction, gold in zip(predictions, golds, strict=True):
        scores = _scorer().score(gold, prediction)
        rouge1 += scores["rouge1"].fmeasure
        rouge_l += scores["rougeL"].fmeasure
    return {"n": len(golds), "rouge1_sum": rouge1, "rougeL_sum": rouge_l}
