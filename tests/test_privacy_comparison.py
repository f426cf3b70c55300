"""`fedoppu compare-privacy`'s design on recorded metrics: the grid, the table with zero-shot and local
computed once, the share of the non-private gain retained, and the sentence that answers the question.
(The federations themselves run in tests/test_privacy_simulation.py.)"""

from __future__ import annotations

import csv
import json

import pytest

from common.config import POISSON_SAMPLING, ConfigError, load_run_config
from common.io import atomic_write_json
from common.metrics import merge_counts, metric_counts, metrics_from_counts
from common.tasks import get_task
from simulations.privacy_commands import (
    DEFAULT_SETTINGS,
    FEDERATIONS,
    GridPoint,
    parse_grid,
    point_config,
    run_reference,
)
from simulations.privacy_report import Scores, comparison_rows, research_answer, write_privacy_report

USERS = 20  # 2 queries each: a pooled accuracy is a multiple of 1/40
TAGGING = get_task("tagging")


def test_the_grid_expands_noise_levels_takes_target_epsilons_and_keeps_noiseless_settings_once():
    points = parse_grid(
        "none,central-dp,local-dp@0.3,central-dp@eps4,secagg,none", "0.5,1", default_noise=1.0
    )
    assert [p.label for p in points] == [
        "none",
        "central-dp-z0.5",
        "central-dp-z1",
        "local-dp-z0.3",
        "central-dp-eps4",
        "secagg",
    ]
    assert points[4].overrides() == {"privacy": "central-dp", "target-epsilon": 4.0}
    assert points[1].overrides() == {"privacy": "central-dp", "noise-multiplier": 0.5}
    assert GridPoint("secagg").overrides() == {"privacy": "secagg"}
    with pytest.raises(ConfigError, match="expected settings"):
        parse_grid("none,dp", None, 1.0)
    with pytest.raises(ConfigError, match="setting@eps<epsilon>"):
        parse_grid("central-dp@epsfour", None, 1.0)


@pytest.mark.parametrize("federation", sorted(FEDERATIONS))
def test_every_default_setting_is_a_valid_run_config_of_each_federation(federation, tmp_path):
    """Settings whose wrappers cannot take Poisson sampling get the same expected cohort by fraction."""
    base = load_run_config(None, ["num-rounds=1"], preset=FEDERATIONS[federation])
    assert base.num_rounds == 1  # --set applies over the preset
    for point in parse_grid(DEFAULT_SETTINGS, None, base.noise_multiplier):
        config = point_config(base, point.overrides(), tmp_path / point.label, point.label)
        if base.sample_rate and config.privacy not in POISSON_SAMPLING:
            assert (config.sample_rate, config.fraction_train) == (0.0, base.sample_rate)
        else:
            assert config.sample_rate == base.sample_rate


def test_the_reference_is_kept_across_shared_adapter_keys_and_refused_across_personal_ones(tmp_path):
    """zero-shot and local never read the shared adapter's training or privacy keys: a reference
    finished under other values of them is the same reference; under another personal layout it is not."""
    base = load_run_config(None, [], preset=FEDERATIONS["run-config"])
    reference_dir = tmp_path / "runs" / "reference"
    atomic_write_json(reference_dir / "metrics.json", {"status": "complete"})
    recorded = point_config(base, {"privacy": "none", "methods": "zero-shot,local"}, reference_dir, "r")
    changed = {"learning-rate": 20.0, "shared-optimizer": "sgd", "shared-lora-r": 2, "num-rounds": 30}
    atomic_write_json(reference_dir / "config.json", {"run_config": {**recorded.to_flower(), **changed}})
    assert run_reference(base, tmp_path, engine=None) == reference_dir  # kept: nothing was run
    atomic_write_json(
        reference_dir / "config.json", {"run_config": {**recorded.to_flower(), **changed, "lora-r": 2}}
    )
    with pytest.raises(ConfigError, match="lora-r = 2 there, 8 asked"):
        run_reference(base, tmp_path, engine=None)


def _entry(task, correct: int, wrong: str = "orin", gold: str = "vexa") -> dict:
    """A method's record: `correct` right answers of 2 * USERS, the first users answering right."""
    counts = {}
    for user in range(USERS):
        right = min(2, max(0, correct - 2 * user))
        counts[f"u{user:03d}"] = metric_counts(task, [gold] * right + [wrong] * (2 - right), [gold, gold])
    overall = metrics_from_counts(task, merge_counts(*counts.values()))
    return {"overall": overall, "counts": counts, "users": {}, "seconds": 1.0}


def _run(methods: dict[str, int], setting: str = "none", epsilon: float | None = None) -> dict:
    dp = epsilon is not None
    return {
        "task": "tagging",
        "primary_metric": "accuracy",
        "higher_is_better": True,
        "methods": {name: _entry(TAGGING, correct) for name, correct in methods.items()},
        "rounds": [
            {"round": 0},
            {
                "round": 1,
                "train": {"clients": 4, "sampled": 4, "seconds": 2.5},
                "privacy": {"epsilon": epsilon, "bytes-per-client": 1000},
            },
        ],
        "privacy": {
            "setting": setting,
            "delta": 1e-5 if dp else None,
            "noise_multiplier": 1.1 if dp else 0.0,
            "clipping_norm": 6.0 if dp else None,
            "rounds_run": 1,
            "rounds_planned": 1,
        },
        "stopped_early": False,
        "wall_seconds": 10.0,
    }


# zero-shot 4/40 = 0.1, local 0.6; without DP shared 0.5 and OPPU 0.8; at epsilon 4 shared 0.3, OPPU 0.7
REFERENCE = _run({"zero-shot": 4, "local": 24})
GATE = {"setting": "mix:x", "users": 20, "personal": 20, "shared_weight": {"0": 6, "1": 14}}
RUNS = {
    "none": _run({"shared": 20, "oppu": 32}),
    "central-dp-eps4": _run({"shared": 12, "oppu": 28}, "central-dp", 4.0) | {"gates": {"oppu": GATE}},
    "secagg": _run({"shared": 20, "oppu": 32}, "secagg"),
}


def _rows(reference=REFERENCE, runs=RUNS):
    return comparison_rows(reference, runs, Scores(reference, runs, resamples=200))


def test_zero_shot_and_local_are_reported_once_for_every_setting():
    rows = _rows()
    assert [(r["run"], r["method"]) for r in rows] == [
        ("reference", "zero-shot"),
        ("reference", "local"),
        ("none", "shared"),
        ("none", "oppu"),
        ("central-dp-eps4", "shared"),
        ("central-dp-eps4", "oppu"),
        ("secagg", "shared"),
        ("secagg", "oppu"),
    ]
    assert {r["setting"] for r in rows[:2]} == {"(every setting)"}
    assert [r["utility"] for r in rows] == pytest.approx([0.1, 0.6, 0.5, 0.8, 0.3, 0.7, 0.5, 0.8])
    assert rows[4]["epsilon"] == 4.0 and rows[2]["epsilon"] is None and rows[4]["clients_per_round"] == 4
    # the users whose own held-out history kept the shared adapter: where a gate decided (oppu under mix)
    assert [r["users_keeping_shared"] for r in rows] == [None] * 5 + ["14/20", None, None]


def test_the_share_of_the_non_private_gain_retained_with_intervals():
    rows = {(r["run"], r["method"]): r for r in _rows()}
    assert rows[("none", "shared")]["gain_retained"] == pytest.approx(1.0)
    assert rows[("central-dp-eps4", "shared")]["gain_retained"] == pytest.approx((0.3 - 0.1) / (0.5 - 0.1))
    oppu = rows[("central-dp-eps4", "oppu")]
    assert oppu["gain_retained"] == pytest.approx((0.7 - 0.1) / (0.8 - 0.1))
    assert oppu["gain_retained_lo"] <= oppu["gain_retained"] <= oppu["gain_retained_hi"]
    assert oppu["utility_lo"] < oppu["utility"] < oppu["utility_hi"]
    assert rows[("reference", "zero-shot")]["gain_retained"] is None  # no privacy setting changes it


def test_the_summary_says_how_much_of_dps_cost_the_personal_adapters_win_back():
    lines = research_answer(REFERENCE, RUNS, Scores(REFERENCE, RUNS, resamples=200))
    # DP costs shared 0.2, OPPU 0.1: the personal adapters win back half of it
    assert lines[0].startswith("Of what DP costs the shared adapter, the personal adapters win back 50%")
    assert lines[0].endswith("at epsilon 4 (central-dp-eps4).")
    assert "Zero-shot 0.1000, local 0.6000: computed once" in lines[1]
    assert "shared 0.5000 (0.4000 [" in lines[2] and "over zero-shot), OPPU 0.8000 (0.7000 [" in lines[2]
    dp = next(line for line in lines if line.startswith("central-dp-eps4"))
    assert (
        "costs the shared adapter 0.2000" in dp
        and "Kept of the non-private gain over zero-shot: shared 50%" in dp
    )
    assert "OPPU 86%" in dp and "OPPU - local 0.1000" in dp
    secagg = next(line for line in lines if line.startswith("secagg"))
    assert "nothing to win back" in secagg


def test_the_summary_and_table_without_a_gain_to_share_or_a_cost_to_win_back():
    runs = {
        "none": _run({"shared": 4, "oppu": 32}),  # the shared adapter gains nothing over zero-shot
        "central-dp-eps2": _run({"shared": 6, "oppu": 30}, "central-dp", 2.0),  # DP "costs" -0.05
    }
    lines = research_answer(REFERENCE, runs, Scores(REFERENCE, runs, resamples=200))
    assert any(
        line.startswith("Without DP the shared adapter's gain over zero-shot, 0.0000 [")
        and line.endswith(
            "is not above zero at 95%: there is no gain to retain, so its share of the "
            "non-private gain is undefined."
        )
        for line in lines
    )
    assert lines[0].startswith("DP cost the shared adapter nothing measurable")
    dp = next(line for line in lines if line.startswith("central-dp-eps2"))
    assert "nothing to win back" in dp and "Kept of the non-private gain over zero-shot: OPPU" in dp
    rows = {(r["run"], r["method"]): r for r in _rows(REFERENCE, runs)}
    assert rows[("central-dp-eps2", "shared")]["gain_retained"] is None
    assert rows[("central-dp-eps2", "oppu")]["gain_retained"] == pytest.approx((0.75 - 0.1) / (0.8 - 0.1))
    without_none = {"central-dp-eps2": runs["central-dp-eps2"]}
    assert research_answer(REFERENCE, without_none, Scores(REFERENCE, without_none)) == [
        "No 'none' run to compare with: add it to --settings to measure what DP costs."
    ]


def test_a_gain_the_data_cannot_tell_from_zero_has_no_share():
    """Shared gains 1 answer of 40 over zero-shot without DP (its interval includes 0): a share of it
    would read "-400% retained" after DP; it is undefined instead, in the table and the summary."""
    runs = {
        "none": _run({"shared": 5, "oppu": 32}),
        "central-dp-eps2": _run({"shared": 0, "oppu": 30}, "central-dp", 2.0),
    }
    scores = Scores(REFERENCE, runs, resamples=200)
    gain = scores.gain(scores.of("none", "shared"), scores.of(None, "zero-shot"))
    assert gain.value == pytest.approx(1 / 40) and gain.lo <= 0 < gain.hi
    rows = {(r["run"], r["method"]): r for r in _rows(REFERENCE, runs)}
    assert rows[("central-dp-eps2", "shared")]["gain_retained"] is None
    assert rows[("central-dp-eps2", "oppu")]["gain_retained"] == pytest.approx((0.75 - 0.1) / (0.8 - 0.1))
    dp = next(line for line in research_answer(REFERENCE, runs, scores) if line.startswith("central-dp"))
    assert "Kept of the non-private gain over zero-shot: OPPU" in dp and "shared -" not in dp


def test_a_lower_is_better_metric_counts_gains_downwards():
    rating = get_task("rating")

    def run(methods, setting="none", epsilon=None):
        recorded = _run({}, setting, epsilon) | {"task": "rating", "primary_metric": rating.primary_metric}
        recorded["higher_is_better"] = rating.higher_is_better
        recorded["methods"] = {
            name: _entry(rating, right, wrong="1", gold="3") for name, right in methods.items()
        }
        return recorded

    assert not rating.higher_is_better
    reference = run({"zero-shot": 0, "local": 20})
    runs = {
        "none": run({"shared": 20, "oppu": 30}),
        "central-dp-eps8": run({"shared": 10, "oppu": 30}, "central-dp", 8.0),
    }
    rows = {(r["run"], r["method"]): r for r in _rows(reference, runs)}
    assert 0 < rows[("central-dp-eps8", "shared")]["gain_retained"] < 1
    assert rows[("central-dp-eps8", "oppu")]["gain_retained"] == pytest.approx(1.0)
    lines = research_answer(reference, runs, Scores(reference, runs, resamples=200))
    assert lines[0].startswith("Of what DP costs the shared adapter, the personal adapters win back 100%")


def test_the_report_files(tmp_path):
    dirs = {}
    for label, metrics in {"reference": REFERENCE, **RUNS}.items():
        (tmp_path / label).mkdir()
        (tmp_path / label / "metrics.json").write_text(json.dumps(metrics))
        dirs[label] = tmp_path / label
    reference = dirs.pop("reference")
    result = write_privacy_report(tmp_path, reference, dirs)
    out = tmp_path / "privacy"
    with open(out / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 8 and rows[0]["method"] == "zero-shot" and rows[0]["gain_retained"] == ""
    table = json.loads((out / "table.json").read_text())
    assert table["users"] == USERS and table["reused"]["methods"] == ["zero-shot", "local"]
    assert (out / "summary.txt").read_text().splitlines() == result["answer"]
    assert (out / "utility_vs_epsilon.png").stat().st_size > 1000
