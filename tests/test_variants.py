"""A study of variants: one federation per variant of a setting, compared with the first one by paired
differences over the same users (simulations/variants.py), and `fedoppu study peft-types` wiring."""

import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_run_config
from common.io import atomic_write_json, read_json
from common.tasks import get_task
from simulations.cli import main
from simulations.simulate import finished_run
from simulations.statistics import summarize
from simulations.variants import compare_variants, write_variants_report

USERS = [f"u{i:03d}" for i in range(10)]


def _metrics(correct: dict[str, list[int]]) -> dict:
    """A finished run's metrics.json with these per-user correct answers (of 8) per method."""
    methods = {
        method: {
            "overall": {"n": 8 * len(values), "accuracy": sum(values) / (8 * len(values))},
            "counts": {user: {"n": 8, "correct": c} for user, c in zip(USERS, values, strict=True)},
        }
        for method, values in correct.items()
    }
    metrics = {
        "task": "tagging",
        "primary_metric": "accuracy",
        "higher_is_better": True,
        "status": "complete",
        "methods": methods,
        "history": {user: 16 + i for i, user in enumerate(USERS)},
    }
    metrics["uncertainty"] = summarize(get_task("tagging"), metrics, resamples=200)
    return metrics


def test_each_variant_is_compared_with_the_baseline_on_the_same_users():
    base = [2, 3, 4, 2, 5, 3, 4, 6, 2, 3]
    runs = {
        "lora": _metrics({"oppu": base, "shared": base}),
        # every user one answer better: the paired difference is exactly 1/8 in every resample
        "dora": _metrics({"oppu": [c + 1 for c in base], "shared": base}),
        "ia3": _metrics({"oppu": base}),  # no shared row: shared is left out of the comparison
    }
    result = compare_variants(runs, baseline="lora")
    assert list(result["methods"]) == ["oppu"]
    assert set(result["differences"]["oppu"]) == {"dora", "ia3"}  # the baseline is not compared with itself
    dora = result["differences"]["oppu"]["dora"]
    assert dora["value"] == pytest.approx(1 / 8)
    assert dora["lo"] == pytest.approx(1 / 8) and dora["hi"] == pytest.approx(1 / 8)
    assert result["differences"]["oppu"]["ia3"]["value"] == 0.0
    assert result["methods"]["oppu"]["dora"]["value"] == pytest.approx(sum(base) / 80 + 1 / 8)


def test_the_study_runs_one_federation_per_variant_with_its_keys_and_writes_the_comparison(
    tmp_path, monkeypatch
):
    ran = []

    def fake_simulate(config, *, centralized, engine):
        ran.append((config.peft_type, config.method_list, Path(config.run_dir)))
        better = 1 if config.peft_type == "ia3" else 0
        atomic_write_json(
            Path(config.run_dir) / "metrics.json",
            _metrics({m: [3 + better] * len(USERS) for m in config.method_list}),
        )
        return Path(config.run_dir)

    monkeypatch.setattr("simulations.simulate.simulate", fake_simulate)
    run_dir = tmp_path / "study"
    args = ["study", "peft-types", "--run-dir", str(run_dir), "--set", "peft-type='dora'"]
    assert main(args) == 0
    # each variant's key wins over --set (it is what the study varies); the preset's methods apply
    assert [(peft, path.name) for peft, _, path in ran] == [
        ("lora", "lora"),
        ("dora", "dora"),
        ("ia3", "ia3"),
    ]
    assert all(methods == ["zero-shot", "shared", "local", "oppu"] for _, methods, _ in ran)
    result = read_json(run_dir / "variants.json")
    assert result["baseline"] == "lora"
    assert result["differences"]["oppu"]["ia3"]["value"] == pytest.approx(1 / 8)
    assert (run_dir / "variants.csv").read_text().splitlines()[0].startswith("method,variant,accuracy")
    assert (run_dir / "variants.png").stat().st_size > 0
    # a finished variant is not run again: rerunning the same command only reports
    ran.clear()
    assert main(args) == 0
    assert ran == []


def test_a_finished_run_of_another_config_is_refused_not_taken_for_the_asked_one(tmp_path, capsys):
    """`tune`, `study`, `--seeds` and compare-privacy keep a finished run; one recorded with other keys
    (a copied or stale directory) must not stand in for the run asked for, nor be run over."""
    config = load_run_config(overrides=[f'run-dir="{tmp_path}"', "learning-rate=0.01"])
    assert not finished_run(config)  # nothing there yet
    atomic_write_json(tmp_path / "metrics.json", _metrics({"shared": [4] * len(USERS)}))
    recorded = {**config.to_flower(), "task": "tagging", "device": "cpu"}  # as the run resolved them
    atomic_write_json(tmp_path / "config.json", {"run_config": recorded})
    assert finished_run(config.replace(task=""))  # "" = the data's own task: resolved, not a change
    atomic_write_json(tmp_path / "config.json", {"run_config": {**recorded, "learning-rate": 0.02}})
    with pytest.raises(ConfigError, match=r"learning-rate = 0.02 there, 0.01 asked"):
        finished_run(config)
    # a key its strategy never reads changes nothing: FedAvg has no server learning rate
    atomic_write_json(tmp_path / "config.json", {"run_config": {**recorded, "server-learning-rate": 1.0}})
    assert finished_run(config)
    with pytest.raises(ConfigError, match=r"server-learning-rate = 1.0 there, 0.01 asked"):
        finished_run(config.replace(strategy="fedavgm"))
    # nor do DP's keys without noise, or the gate's without a gate
    unread = {"noise-multiplier": 0.3, "dp-server-momentum": 0.5, "personal-holdout": 0.5}
    atomic_write_json(tmp_path / "config.json", {"run_config": {**recorded, **unread}})
    assert finished_run(config)
    secagg = {**recorded, **unread, "privacy": "secagg"}
    atomic_write_json(tmp_path / "config.json", {"run_config": secagg})
    assert finished_run(config.replace(privacy="secagg"))
    atomic_write_json(tmp_path / "config.json", {"run_config": {**recorded, **unread}})
    with pytest.raises(ConfigError, match=r"noise-multiplier = 0.3 there, 1.0 asked"):
        finished_run(config.replace(privacy="central-dp"))
    with pytest.raises(ConfigError, match=r"personal-holdout = 0.5 there, 0.2 asked"):
        finished_run(config.replace(personal_gate="choice"))
    # through a command: a clear error, and the run there is left as it was
    args = [
        "tune",
        "--methods",
        "shared",
        "--run-dir",
        str(tmp_path.parent / "t"),
        "--vary",
        "learning-rate=[0.01]",
    ]
    variant = tmp_path.parent / "t" / "learning-rate=0.01"
    atomic_write_json(variant / "metrics.json", _metrics({"shared": [4] * len(USERS)}))
    tuned = {**recorded, "split": "validation", "methods": "shared", "lora-r": 2}
    atomic_write_json(variant / "config.json", {"run_config": tuned})
    assert main(args) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert f"{variant} holds a finished run of another config (lora-r = 2 there, 8 asked)" in error
    assert read_json(variant / "config.json")["run_config"]["lora-r"] == 2


def test_a_study_of_variants_refuses_seeds(tmp_path, capsys):
    assert main(["study", "peft-types", "--run-dir", str(tmp_path / "s"), "--seeds", "2"]) == 2
    assert "a study of variants runs one seed" in capsys.readouterr().err


def test_the_report_files_are_written_from_the_variants_runs(tmp_path):
    dirs = {}
    for name, shift in (("lora", 0), ("ia3", -1)):
        dirs[name] = tmp_path / name
        atomic_write_json(dirs[name] / "metrics.json", _metrics({"oppu": [4 + shift] * len(USERS)}))
    result = write_variants_report(tmp_path, dirs, baseline="lora")
    assert json.loads((tmp_path / "variants.json").read_text()) == result
    assert result["differences"]["oppu"]["ia3"]["value"] == pytest.approx(-1 / 8)
