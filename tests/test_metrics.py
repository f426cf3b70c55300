import math

import pytest

from common import protocol
from common.data import IN_HISTORY, SHIFTED
from common.metrics import (
    compute_metrics,
    grouped_metric_counts,
    merge_counts,
    metric_counts,
    metrics_from_counts,
    split_groups,
)
from common.tasks import TASKS


def test_accuracy_and_macro_f1_by_hand():
    # extracted: [1], [2], unparseable, [1]  against golds [1], [2], [2], [2]
    metrics = compute_metrics(
        TASKS["LaMP-1"], ["[1]", "Reference 2.", "no idea", " [1]"], ["[1]", "[2]", "[2]", "[2]"]
    )
    # [1]: tp 1, fp 1, fn 0 -> F1 2/3.  [2]: tp 1, fp 0, fn 2 (the unparseable answer is a miss) -> F1 1/2.
    assert metrics == pytest.approx({"n": 4, "accuracy": 0.5, "f1": (2 / 3 + 1 / 2) / 2})


def test_macro_f1_averages_over_the_whole_label_set():
    # Two of LaMP-2M's 15 tags occur, both always right: labels never seen nor predicted score 0, as in LaMP.
    metrics = compute_metrics(
        TASKS["LaMP-2M"], ["comedy", "action", "comedy"], ["comedy", "action", "comedy"]
    )
    assert metrics["accuracy"] == 1.0
    assert metrics["f1"] == pytest.approx(2 / 15)


def test_classification_counts_are_per_label():
    counts = metric_counts(TASKS["tagging"], ["vexa", "kelso", "?"], ["vexa", "orin", "kelso"])
    assert counts["n"] == 3 and counts["correct"] == 1
    assert (counts["tp/vexa"], counts["fp/kelso"], counts["fn/orin"], counts["fn/kelso"]) == (1, 1, 1, 1)
    assert counts["fp/vexa"] == counts["tp/kelso"] == 0
    with pytest.raises(ValueError, match="gold 'thriller' is not one of the task's labels"):
        metric_counts(TASKS["tagging"], ["vexa"], ["thriller"])


def test_mae_and_rmse_by_hand_with_lamps_rule_for_unparseable_ratings():
    # values 4, 2, (gold 4: unparseable -> 1, the farther end), 5  against golds 5, 2, 4, 1
    metrics = compute_metrics(TASKS["LaMP-3"], ["4", "score: 2", "no idea", "5 stars"], ["5", "2", "4", "1"])
    assert metrics == pytest.approx(
        {"n": 4, "mae": (1 + 0 + 3 + 4) / 4, "rmse": math.sqrt((1 + 0 + 9 + 16) / 4)}
    )
    # gold 3 is as far from 1 as from 5: LaMP then picks 5; gold 2 -> 5; gold 5 -> 1
    assert compute_metrics(TASKS["LaMP-3"], ["?", "?", "?"], ["3", "2", "5"])["mae"] == pytest.approx(
        (2 + 3 + 4) / 3
    )


def test_rouge_by_hand():
    # "the cat sat" vs "the cat sat on the mat": 3 shared words, P 1, R 1/2 -> F 2/3 (LCS also 3).
    # "a dog" (first line only) vs "dog runs": P 1/2, R 1/2 -> 1/2.
    # "b a" vs "a b": unigrams F 1, longest common subsequence 1 -> ROUGE-L 1/2.
    metrics = compute_metrics(
        TASKS["LaMP-4"],
        ["the cat sat", "a dog\nignored line", "b a"],
        ["the cat sat on the mat", "dog runs", "a b"],
    )
    assert metrics == pytest.approx(
        {"n": 3, "rouge-1": (2 / 3 + 1 / 2 + 1) / 3, "rouge-l": (2 / 3 + 1 / 2 + 1 / 2) / 3}
    )


def test_rouge_does_not_stem_like_lamp():
    assert compute_metrics(TASKS["generic"], ["runs"], ["running"])["rouge-1"] == 0.0


@pytest.mark.parametrize(
    ("task", "predictions", "golds"),
    [
        (
            "LaMP-2N",
            ["sports", "politics", "women", "??", "crime"],
            ["sports", "crime", "women", "travel", "crime"],
        ),
        ("LaMP-3", ["1", "5", "x", "3", "2"], ["2", "5", "1", "4", "2"]),
        (
            "LaMP-5",
            ["deep nets", "a b c", "", "x y", "graph"],
            ["deep learning nets", "c b a", "q", "x", "graphs"],
        ),
    ],
)
def test_merged_client_counts_give_the_pooled_metrics(task, predictions, golds):
    task = TASKS[task]
    parts = [metric_counts(task, predictions[:2], golds[:2]), metric_counts(task, predictions[2:], golds[2:])]
    merged = merge_counts(*parts)
    assert metrics_from_counts(task, merged) == pytest.approx(compute_metrics(task, predictions, golds))
    values = [value for part in parts for value in part.values()]
    assert all(type(value) in (int, float) for value in values)  # they travel in Flower MetricRecords


def test_no_predictions_gives_nan_metrics_with_n():
    metrics = metrics_from_counts(TASKS["LaMP-3"], {})
    assert metrics["n"] == 0 and math.isnan(metrics["mae"]) and math.isnan(metrics["rmse"])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 predictions for 1 golds"):
        metric_counts(TASKS["LaMP-4"], ["a", "b"], ["a"])


def test_query_groups_are_counted_apart_and_add_up_within_the_total():
    task = TASKS["tagging"]
    predictions = ["vexa", "orin", "talu", "kelso", "??", "vexa", "pelo"]
    golds = ["vexa", "vexa", "talu", "kelso", "orin", "pelo", "pelo"]
    groups = [IN_HISTORY, SHIFTED, SHIFTED, IN_HISTORY, None, SHIFTED, IN_HISTORY]
    counts = grouped_metric_counts(task, predictions, golds, groups)
    total, by_group = split_groups(counts)
    assert total == metric_counts(task, predictions, golds)
    for group in (IN_HISTORY, SHIFTED):
        picked = [i for i, g in enumerate(groups) if g == group]
        assert by_group[group] == metric_counts(
            task, [predictions[i] for i in picked], [golds[i] for i in picked]
        )
    # every count of the groups sums to the total's over the grouped answers; the ungrouped one is in the total only
    summed = merge_counts(*by_group.values())
    assert summed == merge_counts(
        total, {key: -value for key, value in metric_counts(task, ["??"], ["orin"]).items()}
    )
    assert (summed["n"], summed["correct"]) == (6, 4)
    assert set(counts) <= protocol.evaluate_metric_names(task, labels=True, history=False)
    assert grouped_metric_counts(task, predictions, golds, [None] * 7) == total
