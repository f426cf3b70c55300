"""The behaviour-shift study: nodes count each query group apart within min-group-size, the report
gives both groups and the shift's change, and `fedoppu study behaviour-shift` runs it end to end;
its federation is also the IA3 federation under central DP (the shared update clipped, not the vectors)."""

import contextlib
import csv
import io

import pytest
import torch
from safetensors.torch import load_file

from client.client_app import releasable
from common.data import IN_HISTORY, QUERY_GROUPS, SHIFTED
from common.io import atomic_write_json, read_json
from common.metrics import grouped_metric_counts, merge_counts
from common.tasks import TASKS
from simulations.cli import main
from simulations.report import write_report, write_seeds_report

TAGGING = TASKS["tagging"]


def test_a_group_below_the_nodes_minimum_is_left_out_of_the_record():
    counts = grouped_metric_counts(
        TAGGING, ["vexa", "orin", "talu"], ["vexa", "vexa", "talu"], [IN_HISTORY, IN_HISTORY, SHIFTED]
    )
    assert releasable(counts, 1) == counts
    kept = releasable(counts, 2)
    assert kept["n"] == 3 and kept[f"{IN_HISTORY}:n"] == 2
    assert not any(key.startswith(f"{SHIFTED}:") for key in kept)


def _run_metrics(users: int, rag_shifted: int) -> dict:
    """A finished run's metrics.json whose queries come in groups: rag and oppu right on 3 of 4
    in-history queries; on 4 shifted ones oppu on 2, rag on `rag_shifted`."""
    ids = [f"u{i}" for i in range(users)]
    methods = {}
    for name, shifted in (("rag", rag_shifted), ("oppu", 2)):
        parts = {IN_HISTORY: {"n": 4, "correct": 3}, SHIFTED: {"n": 4, "correct": shifted}}
        total = merge_counts(*parts.values())
        methods[name] = {
            "overall": {"n": 8 * users, "accuracy": total["correct"] / 8},
            "users": {uid: {"n": 8, "accuracy": total["correct"] / 8} for uid in ids},
            "counts": {uid: total for uid in ids},
            "seconds": 1.0,
            "groups": {g: {"counts": {uid: c for uid in ids}} for g, c in parts.items()},
        }
    return {"task": "tagging", "primary_metric": "accuracy", "higher_is_better": True, "methods": methods}


def test_the_report_and_the_seeds_report_give_both_query_groups(tmp_path):
    seed_dirs = {}
    for seed, rag_shifted in ((0, 0), (1, 1)):
        seed_dirs[seed] = tmp_path / f"seed-{seed}"
        atomic_write_json(seed_dirs[seed] / "metrics.json", _run_metrics(6, rag_shifted))
        rows = write_report(seed_dirs[seed])
        assert (seed_dirs[seed] / "behaviour_shift.png").stat().st_size > 1000
    assert {row["method"]: row["accuracy_shifted"] for row in rows} == {"rag": 0.25, "oppu": 0.5}
    assert {row["method"]: row["accuracy_change"] for row in rows} == {"rag": -0.5, "oppu": -0.25}
    seeds = write_seeds_report(tmp_path, seed_dirs)["behaviour_shift"]
    assert seeds[f"rag [{SHIFTED}]"] == pytest.approx(
        {"mean": 0.125, "sd": 0.1767767, "min": 0, "max": 0.25, "runs": 2}
    )
    assert seeds[f"rag - oppu [{SHIFTED} - {IN_HISTORY}]"]["mean"] == pytest.approx(-0.375)
    plain = _run_metrics(6, 0)
    for entry in plain["methods"].values():
        del entry["groups"]
    atomic_write_json(tmp_path / "plain" / "metrics.json", plain)
    (row, _) = write_report(tmp_path / "plain")
    assert not any(key.startswith("accuracy_") and key not in ("accuracy_lo", "accuracy_hi") for key in row)
    assert not (tmp_path / "plain" / "behaviour_shift.png").exists()


# The study's federation also carries the IA3 federation under central DP (its assertions are
# test_an_ia3_federation_...): one tiny federation less; neither property depends on the other's keys.
IA3_CENTRAL_DP = {
    "peft-type": '"ia3"',
    "privacy": '"central-dp"',
    "dp-clipping": '"fixed"',
    "clipping-norm": 0.15,
}
USERS = 2  # benchmark-users in the tiny_run fixture


@pytest.fixture(scope="module")
def study(tiny_run, in_process, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("study") / "run"
    overrides = {**tiny_run, "num-rounds": 1, "benchmark-shifted-queries": 3, **IA3_CENTRAL_DP}
    argv = ["study", "behaviour-shift", "--run-dir", str(run_dir), "--methods", "rag,local,oppu"]
    argv += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    said = io.StringIO()
    with contextlib.redirect_stderr(said):
        assert main([*argv, "--cpus-per-client", str(in_process.cpus_per_client)]) == 0
    return run_dir, said.getvalue()


@pytest.mark.federation
def test_the_study_scores_every_method_on_both_query_groups(study):
    run_dir, said = study
    metrics = read_json(run_dir / "metrics.json")
    assert read_json(run_dir / "config.json")["run_config"]["benchmark-shifted-queries"] == 3
    # oppu's shared adapter is scored too
    assert list(metrics["methods"]) == ["rag", "shared", "local", "oppu"]
    for entry in metrics["methods"].values():
        assert set(entry["groups"]) == set(QUERY_GROUPS)
        for uid, counts in entry["counts"].items():
            parts = [entry["groups"][g]["counts"][uid] for g in QUERY_GROUPS]
            assert [part["n"] for part in parts] == [2, 3]  # benchmark-queries, benchmark-shifted-queries
            assert merge_counts(*parts) == counts  # every count of the two groups adds up to the user's
        assert sum(entry["groups"][g]["overall"]["n"] for g in QUERY_GROUPS) == entry["overall"]["n"] == 10
    with open(run_dir / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["method"] for row in rows] == ["rag", "shared", "local", "oppu"]
    assert all(
        row["accuracy_in-history"] and row["accuracy_shifted"] and row["accuracy_change"] for row in rows
    )
    assert (run_dir / "behaviour_shift.png").stat().st_size > 1000
    assert "Behaviour shift" in said and "rag - oppu changes by" in said


@pytest.mark.federation
def test_an_ia3_federation_under_central_dp_clips_and_noises_the_update_not_the_vectors(study):
    """IA3's vectors start at one. DP-FedAvg clips and noises each update (after minus before): the
    shared vectors stay near one, where clipping the vectors themselves would have shrunk them to
    about clipping-norm / sqrt(576) each. The personal adapters (local on the bare model, oppu on the
    shared one) are IA3 adapters in peft's format on the clients' disks."""
    run_dir, _ = study
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "complete" and set(metrics["methods"]) == {"rag", "shared", "local", "oppu"}
    assert metrics["privacy"]["setting"] == "central-dp" and metrics["privacy"]["clipping"] == "fixed"
    assert all(m["overall"]["n"] == USERS * (2 + 3) for m in metrics["methods"].values())  # every query
    assert metrics["rounds"][1]["train"]["clients"] == USERS
    checkpoint = run_dir / "checkpoints" / "round-0001"
    assert read_json(checkpoint / "adapter_config.json")["peft_type"] == "IA3"
    shared = torch.cat([v.flatten() for v in load_file(checkpoint / "adapter_model.safetensors").values()])
    assert shared.numel() == 576 and abs(float(shared.mean()) - 1) < 0.05 and not torch.all(shared == 1)
    for pid in range(USERS):
        adapters = run_dir / "clients" / f"partition-{pid}" / "adapters"
        configs = [read_json(path) for path in adapters.glob("*/*/*/adapter_config.json")]
        assert sorted(c["peft_type"] for c in configs) == ["IA3", "IA3"]
