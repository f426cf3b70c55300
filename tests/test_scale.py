"""A federation of many users with the tiny model: a round samples a few clients, while personalization
and evaluation reach every user, and the report says how long a round took."""

from __future__ import annotations

import pytest
from rich.console import Console

from common.config import load_run_config
from common.io import read_json
from simulations.report import round_time_line, write_report
from simulations.simulate import simulate

pytestmark = pytest.mark.federation  # minutes of whole federations: scheduled first (conftest.py)

USERS = 16
SAMPLED = 4  # clients-per-round: 4 of 16 clients


def test_a_round_samples_a_few_of_many_clients_and_every_user_is_personalized_and_scored(
    tiny_run, in_process, tmp_path
):
    overrides = {
        **tiny_run,
        "benchmark-users": USERS,
        "benchmark-min-history": 2,
        "benchmark-max-history": 6,
        "benchmark-queries": 1,
        "clients-per-round": SAMPLED,
        "eval-every-round": "false",
        "methods": '"shared,oppu"',
        "run-dir": f'"{tmp_path / "run"}"',
    }
    config = load_run_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    simulate(config, centralized=False, engine=in_process)
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["status"] == "complete"
    trained = [r for r in metrics["rounds"] if "train" in r]
    assert [(r["train"]["sampled"], r["train"]["clients"]) for r in trained] == [(SAMPLED, SAMPLED)] * 2
    assert all(r["train"]["seconds"] > 0 for r in trained)
    assert [r["round"] for r in metrics["rounds"] if "eval" in r] == [2]  # the last round only
    assert metrics["rounds"][-1]["seconds"]["evaluate"] > 0
    assert metrics["personalize"]["oppu"]["users-trained"] == USERS
    for method in ("shared", "oppu"):
        assert (
            len(metrics["methods"][method]["users"]) == USERS
            and metrics["methods"][method]["overall"]["n"] == USERS
        )
        assert metrics["methods"][method]["missing"]["users"] == []
    line = round_time_line(metrics)
    assert line.startswith("time per round:") and "over 2 rounds" in line and "4.0 clients sampled" in line
    out = Console(record=True, width=200)
    write_report(tmp_path / "run", out)
    assert line in out.export_text()
    for plot in ("rounds.png", "user_gain.png", "methods.png"):
        assert (tmp_path / "run" / plot).stat().st_size > 1000
