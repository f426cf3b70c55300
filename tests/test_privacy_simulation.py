"""`fedoppu compare-privacy` with the tiny model: every setting end to end, epsilon, and a budget stop.

One comparison runs zero-shot and local once (its reference run) and the six privacy settings (2 users,
2 rounds, 2 local steps each; `none` is tests/test_simulation.py's, and the table's and summary's
arithmetic is tests/test_privacy_comparison.py's). Its budget,
max-epsilon = 12, fits both rounds of every DP setting but local-dp, whose second round would reach
epsilon 16.5: that run must stop after round 1 and still personalize, evaluate and report.
"""

from __future__ import annotations

import csv

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from common.io import read_json
from simulations.cli import main

pytestmark = pytest.mark.federation  # minutes of whole federations: scheduled first (conftest.py)

SETTINGS = ("central-dp", "client-dp", "adaptive-dp", "local-dp", "secagg", "secagg+dp")
LABELS = ("central-dp-z1", "client-dp-z1", "adaptive-dp-z1", "local-dp-z1", "secagg", "secagg+dp-z1")
OVERRIDES = {
    "eval-every-round": "false",
    "clipping-norm": 0.15,  # the tiny model's updates after 2 local steps measure about 0.145
    "max-epsilon": 12.0,
}


@pytest.fixture(scope="module")
def comparison(tiny_run, in_process, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("privacy") / "compare"
    overrides = {**tiny_run, **OVERRIDES}
    argv = ["compare-privacy", "--federation", "run-config", "--settings", ",".join(SETTINGS)]
    argv += ["--run-dir", str(run_dir), "--cpus-per-client", str(in_process.cpus_per_client)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    return run_dir


def _metrics(run_dir, label):
    return read_json(run_dir / "runs" / label / "metrics.json")


def test_every_setting_trains_personalizes_and_is_reported(comparison):
    for label, setting in zip(LABELS, SETTINGS, strict=True):
        metrics = _metrics(comparison, label)
        assert metrics["privacy"]["setting"] == setting, label
        assert set(metrics["methods"]) == {"shared", "oppu"}, label
        assert all(m["overall"]["n"] == 4 for m in metrics["methods"].values()), label
        assert metrics["personalize"]["oppu"]["users-trained"] == 2, label
    # zero-shot and local depend on no privacy setting: one run for all of them
    reference = comparison / "runs" / "reference"
    assert set(read_json(reference / "metrics.json")["methods"]) == {"zero-shot", "local"}
    assert read_json(reference / "config.json")["run_config"]["privacy"] == "none"
    with open(comparison / "privacy" / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["run"], r["method"]) for r in table] == [
        ("reference", "zero-shot"),
        ("reference", "local"),
        *((label, method) for label in LABELS for method in ("shared", "oppu")),
    ]
    rows = {row["run"]: row for row in table if row["method"] == "shared"}
    assert rows["secagg"]["epsilon"] == ""  # no DP: no epsilon claimed
    assert float(rows["central-dp-z1"]["epsilon"]) > 0 and rows["central-dp-z1"]["delta"] == "1e-05"
    # SecAgg+ uploads public keys, key shares and a masked vector: more than the plain adapter
    assert int(rows["secagg"]["bytes_per_client_round"]) > int(
        rows["central-dp-z1"]["bytes_per_client_round"]
    )
    assert (comparison / "privacy" / "utility_vs_epsilon.png").stat().st_size > 1000
    assert "No 'none' run to compare with" in (comparison / "privacy" / "summary.txt").read_text()


def test_a_rerun_keeps_every_finished_federation(comparison, tiny_run, monkeypatch):
    def rerun(*args, **kwargs):
        raise AssertionError("a finished federation ran again")

    monkeypatch.setattr("simulations.simulate.simulate", rerun)
    argv = ["compare-privacy", "--federation", "run-config", "--settings", ",".join(SETTINGS)]
    argv += ["--run-dir", str(comparison)]
    for key, value in {**tiny_run, **OVERRIDES}.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0


def test_recorded_epsilon_matches_an_independent_accountant(comparison):
    for label in ("central-dp-z1", "client-dp-z1", "secagg+dp-z1", "local-dp-z1", "adaptive-dp-z1"):
        metrics = _metrics(comparison, label)
        info = metrics["privacy"]
        z = info["noise_multiplier"]
        if label.startswith("local-dp"):
            events = [dp_event.GaussianDpEvent(z / 2)]
        elif label.startswith("adaptive-dp"):
            events = [
                dp_event.GaussianDpEvent(info["update_noise_multiplier"]),
                dp_event.GaussianDpEvent(info["count_noise_stddev"]),
            ]
        elif label.startswith("secagg+dp"):  # z * C / (C + SecAgg+'s rounding bound)
            clip, bound = OVERRIDES["clipping-norm"], info["quantization_l2_bound"]
            assert 0 < bound < 0.01 * clip  # with max_weight = 1 (at 1000 it would exceed C)
            assert info["accounted_noise_multiplier"] == pytest.approx(z * clip / (clip + bound))
            events = [dp_event.GaussianDpEvent(info["accounted_noise_multiplier"])]
        else:
            events = [dp_event.GaussianDpEvent(z)]
        trained = [r for r in metrics["rounds"] if r["round"] > 0]
        assert trained, label
        for entry in trained:
            reference = RdpAccountant()
            for event in events:
                reference.compose(event, entry["round"])
            assert entry["privacy"]["epsilon"] == pytest.approx(reference.get_epsilon(info["delta"])), label


def test_a_run_that_exhausts_its_budget_stops_cleanly_and_keeps_its_results(comparison):
    metrics = _metrics(comparison, "local-dp-z1")
    assert metrics["status"] == "stopped-early" and metrics["stopped_early"] is True
    assert (metrics["privacy"]["rounds_run"], metrics["privacy"]["rounds_planned"]) == (1, 2)
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert metrics["rounds"][1]["privacy"]["epsilon"] <= 12.0
    run = comparison / "runs" / "local-dp-z1"
    assert (run / "checkpoints" / "round-0001").exists() and not (run / "checkpoints" / "round-0002").exists()
    assert metrics["methods"]["shared"]["overall"] == metrics["rounds"][1]["eval"]  # the last round, scored
    assert metrics["methods"]["oppu"]["overall"]["n"] == 4  # personalized on the last shared adapter
    for label in ("central-dp-z1", "secagg+dp-z1"):
        assert _metrics(comparison, label)["stopped_early"] is False
    with open(comparison / "privacy" / "table.csv") as handle:
        row = next(r for r in csv.DictReader(handle) if r["run"] == "local-dp-z1" and r["method"] == "oppu")
    assert row["stopped_early"] == "True" and row["rounds"] == "1/2"
    summary = (comparison / "privacy" / "summary.txt").read_text()
    assert "Stopped early by the privacy budget (results kept): local-dp-z1 after 1/2 rounds." in summary
