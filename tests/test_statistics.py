"""The report's intervals: a cluster bootstrap over users, checked against closed forms."""

import math

import numpy as np
import pytest

from common.data import IN_HISTORY, SHIFTED
from common.metrics import metric_counts
from common.tasks import TASKS
from simulations.statistics import (
    estimate,
    find_difference,
    history_groups,
    paired_difference,
    resample_weights,
    seed_spread,
    summarize,
)

TAGGING = TASKS["tagging"]


def _users(correct_per_user, n=10):
    return [{"n": n, "correct": c} for c in correct_per_user]


def test_accuracy_interval_matches_the_closed_form_cluster_standard_error():
    # 400 users with 10 queries each; with equal n the pooled accuracy is the mean of the users'
    # accuracies, and resampling users gives it the standard error sd_users / sqrt(users).
    rng = np.random.default_rng(1)
    accuracies = rng.beta(2, 3, size=400).round(1)
    counts = _users((accuracies * 10).round().astype(int).tolist())
    result = estimate(TAGGING, "accuracy", counts, resample_weights(len(counts), 4000, seed=0))
    se = accuracies.std(ddof=0) / math.sqrt(len(accuracies))
    assert result.value == pytest.approx(accuracies.mean())
    assert result.lo == pytest.approx(accuracies.mean() - 1.96 * se, abs=0.1 * 1.96 * se)
    assert result.hi == pytest.approx(accuracies.mean() + 1.96 * se, abs=0.1 * 1.96 * se)
    assert result.users == 400


def test_users_not_queries_are_the_unit():
    # Six users, half always right and half always wrong, 50 queries each: counting the 300 queries as
    # independent would give about +-0.06; resampling users gives the honest, much wider interval.
    result = estimate(TAGGING, "accuracy", _users([50, 0] * 3, n=50), resample_weights(6, 4000, seed=0))
    assert result.value == 0.5
    assert result.lo <= 0.5 - 0.3 and result.hi >= 0.5 + 0.3


def test_too_few_users_get_no_interval():
    result = estimate(TAGGING, "accuracy", _users([5, 7, 9, 1]), resample_weights(4, 100, seed=0))
    assert result.value == 0.55 and math.isnan(result.lo) and math.isnan(result.hi)
    assert result.text() == "0.550 (n<5: no interval)"


def test_paired_differences_remove_what_the_methods_share():
    # The second method gets exactly one more query right for every user: the difference is 0.1 in
    # every resample, although each method alone varies widely between users.
    first = _users([1, 9, 3, 7, 5, 2, 8])
    second = _users([c + 1 for c in [1, 9, 3, 7, 5, 2, 8]])
    weights = resample_weights(len(first), 1000, seed=0)
    difference = paired_difference(TAGGING, "accuracy", second, first, weights)
    assert (difference.value, difference.lo, difference.hi) == pytest.approx((0.1, 0.1, 0.1))
    alone = estimate(TAGGING, "accuracy", first, weights)
    assert alone.hi - alone.lo > 0.3


def test_macro_f1_is_recomputed_from_the_resampled_counts():
    right = metric_counts(TAGGING, ["vexa", "kelso"], ["vexa", "kelso"])
    confused = metric_counts(TAGGING, ["orin", "orin"], ["vexa", "orin"])
    counts = [right, confused, right, confused, right]
    # three resamples: only the 'right' users, only the 'confused' ones, everyone once
    weights = np.array([[2, 0, 2, 0, 1], [0, 3, 0, 2, 0], [1, 1, 1, 1, 1]])
    result = estimate(TAGGING, "f1", counts, weights)
    # 'right' alone: vexa and kelso always right -> 2 of 8 labels at F1 1 -> 0.25
    # 'confused' alone: orin tp 1, fp 1; vexa fn 1 -> orin F1 2/3 -> 2/3 / 8
    assert (result.lo, result.hi) == pytest.approx(
        tuple(np.percentile([0.25, 2 / 3 / 8, result.value], [2.5, 97.5]))
    )


def _metrics(users=15):
    history = {f"u{i}": 10 + i for i in range(users)}
    shared = {uid: {"n": 4, "correct": 1} for uid in history}
    oppu = {uid: {"n": 4, "correct": 1 + (i < 5)} for i, uid in enumerate(history)}  # light users gain
    return {
        "task": "tagging",
        "primary_metric": "accuracy",
        "history": history,
        "methods": {"shared": {"counts": shared}, "oppu": {"counts": oppu}},
    }


def test_summary_has_intervals_differences_and_groups():
    summary = summarize(TAGGING, _metrics(), resamples=500)
    assert summary["methods"]["shared"]["accuracy"]["value"] == 0.25
    (difference,) = summary["differences"]
    assert (difference["first"], difference["second"], difference["users"]) == ("oppu", "shared", 15)
    assert difference["value"] == pytest.approx(5 / 60)
    light = summary["groups"]["light"]["differences"][0]
    heavy = summary["groups"]["heavy"]["differences"][0]
    assert (light["value"], light["lo"], light["hi"]) == pytest.approx((0.25, 0.25, 0.25))
    assert (heavy["value"], heavy["lo"], heavy["hi"]) == (0.0, 0.0, 0.0)


def test_a_method_scored_on_fewer_users_is_compared_on_the_users_both_have():
    metrics = _metrics()
    del metrics["methods"]["oppu"]["counts"]["u8"]
    summary = summarize(TAGGING, metrics, resamples=200)
    assert summary["methods"]["oppu"]["accuracy"]["users"] == 14
    assert summary["differences"][0]["users"] == 14


def test_history_groups_are_thirds_and_seed_spread():
    groups = history_groups({"a": 5, "b": 1, "c": 9, "d": 3, "e": 7, "f": 2})
    assert [uid for uid in "bfdaec" if groups[uid] == "light"] == ["b", "f"]
    assert groups["c"] == groups["e"] == "heavy"
    spread = seed_spread([0.4, 0.5, 0.6])
    assert spread == pytest.approx({"mean": 0.5, "sd": 0.1, "min": 0.4, "max": 0.6, "runs": 3})


def _shift_metrics(users=6):
    """rag loses half its accuracy on shifted queries for half the users, everything for the others;
    oppu loses a quarter for everyone."""
    ids = [f"u{i}" for i in range(users)]

    def method(in_history, shifted):
        groups = {
            IN_HISTORY: {uid: {"n": 4, "correct": in_history} for uid in ids},
            SHIFTED: {uid: {"n": 4, "correct": shifted(i)} for i, uid in enumerate(ids)},
        }
        counts = {uid: {"n": 8, "correct": in_history + shifted(i)} for i, uid in enumerate(ids)}
        return {"counts": counts, "groups": {g: {"counts": c} for g, c in groups.items()}}

    return {
        "task": "tagging",
        "methods": {"rag": method(3, lambda i: 0 if i < users // 2 else 2), "oppu": method(3, lambda i: 2)},
    }


def test_the_shift_changes_each_method_and_difference_on_the_same_users():
    summary = summarize(TAGGING, _shift_metrics(), resamples=500)
    shifted = summary["query_groups"][SHIFTED]
    assert shifted["methods"]["rag"]["accuracy"]["value"] == 0.25
    assert find_difference(summary["query_groups"][IN_HISTORY], "rag", "oppu")["value"] == 0.0
    assert find_difference(shifted, "rag", "oppu")["value"] == -0.25
    oppu = summary["shift"]["methods"]["oppu"]
    assert (oppu["value"], oppu["lo"], oppu["hi"], oppu["users"]) == (-0.25, -0.25, -0.25, 6)
    change = find_difference(summary["shift"], "rag", "oppu")
    # per user rag - oppu changes by -0.5 or 0: the pooled change is their mean, and resampling users
    # spreads it
    assert change["value"] == pytest.approx(-0.25) and change["users"] == 6
    assert change["lo"] < -0.3 and change["hi"] > -0.2
    assert "query_groups" not in summarize(TAGGING, _metrics(), resamples=50)


def test_the_shift_is_measured_on_the_users_with_both_kinds_of_query():
    metrics = _shift_metrics()
    del metrics["methods"]["rag"]["groups"][SHIFTED]["counts"]["u0"]
    summary = summarize(TAGGING, metrics, resamples=100)
    assert summary["shift"]["methods"]["rag"]["users"] == 5
    assert summary["shift"]["methods"]["oppu"]["users"] == 6
    assert find_difference(summary["shift"], "rag", "oppu")["users"] == 5
