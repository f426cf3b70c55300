"""Tuning on validation data: the validation split never holds a test query, and `fedoppu tune` runs
every combination on it and picks the best for the target method."""

from pathlib import Path

import pytest

from common.config import ConfigError, load_run_config
from common.data import Dataset, Item, User
from common.io import DataError, atomic_write_json, read_json
from common.loaders import load_run_dataset, validation_split
from simulations.cli import main
from simulations.tuning import grid
from tests.test_variants import USERS, _metrics


def _items(prefix: str, count: int) -> list[Item]:
    return [Item(f"{prefix}{i}", f"in {prefix}{i}", f"out {prefix}{i}", date=float(i)) for i in range(count)]


def test_the_newest_history_items_stand_in_for_the_queries():
    users = [User("heavy", _items("h", 10), _items("q", 3)), User("light", _items("l", 3), _items("r", 3))]
    split = validation_split(Dataset("tagging", users, "mem"))
    heavy, light = split.users
    assert [i.id for i in heavy.history] == [f"h{i}" for i in range(7)]
    assert [i.id for i in heavy.queries] == ["h7", "h8", "h9"]  # as many as the user's test queries
    assert [i.id for i in light.history] == ["l0", "l1"] and [i.id for i in light.queries] == ["l2"]  # half
    assert users[0].queries[0].id == "q0"  # the data set itself is left as it was
    with pytest.raises(DataError, match=r"mem: user 'one' has 1 history item\(s\); split = 'validation'"):
        validation_split(Dataset("tagging", [User("one", _items("o", 1), _items("p", 1))], "mem"))


def test_a_validation_run_never_reads_a_test_query():
    overrides = ["benchmark-users=4", "benchmark-min-history=16", "benchmark-max-history=20"]
    test = load_run_dataset(load_run_config(overrides=overrides))
    validation = load_run_dataset(load_run_config(overrides=[*overrides, "split='validation'"]))
    test_queries = {q.id for u in test.users for q in u.queries}
    for before, after in zip(test.users, validation.users, strict=True):
        assert not {q.id for q in after.queries + after.history} & test_queries
        assert after.history + after.queries == before.history
        assert len(after.queries) == len(before.queries)
    with pytest.raises(ConfigError, match="split = 'dev'; expected one of"):
        load_run_config(overrides=["split='dev'"])


def test_the_grid_has_every_combination_named_by_its_values():
    combinations = grid(["learning-rate=[0.001, 0.004]", "target-modules=['q_proj,v_proj', 'q_proj']"])
    assert list(combinations) == [
        "learning-rate=0.001+target-modules=q_proj,v_proj",
        "learning-rate=0.001+target-modules=q_proj",
        "learning-rate=0.004+target-modules=q_proj,v_proj",
        "learning-rate=0.004+target-modules=q_proj",
    ]
    assert combinations["learning-rate=0.004+target-modules=q_proj"] == {
        "learning-rate": 0.004,
        "target-modules": "q_proj",
    }
    assert list(grid(["adapter-layers='all'"])) == ["adapter-layers=all"]
    layouts = grid(["adapter-layers,target-modules=[[8, 'q_proj'], ['all', 'q_proj,v_proj']]", "lora-r=[4]"])
    assert list(layouts.values()) == [
        {"adapter-layers": 8, "target-modules": "q_proj", "lora-r": 4},
        {"adapter-layers": "all", "target-modules": "q_proj,v_proj", "lora-r": 4},
    ]
    for bad, message in (
        (["split=['test']"], "split is not a setting to tune"),
        (["lora-r=[4, 4]"], "a list of distinct values"),
        (["lora-r=[4]", "lora-r,lora-alpha=[[8, 8]]"], "lora-r is varied twice"),
        (["lora-r,lora-alpha=[8, 16]"], "2 keys move together; expected a list of 2-value lists"),
    ):
        with pytest.raises(ConfigError, match=message):
            grid(bad)


def test_tune_runs_each_combination_on_the_validation_split_and_picks_the_best(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_simulate(config, *, centralized, engine):
        ran.append((config.split, config.learning_rate, config.lora_r, Path(config.run_dir).name))
        # shared is best at learning-rate 0.004 with rank 8 by one answer per user; oppu prefers 0.001
        shared = 3 + (config.learning_rate == 0.004 and config.lora_r == 8)
        oppu = 3 + (config.learning_rate == 0.001)
        atomic_write_json(
            Path(config.run_dir) / "metrics.json",
            _metrics({"shared": [shared] * len(USERS), "oppu": [oppu] * len(USERS)}),
        )
        return Path(config.run_dir)

    monkeypatch.setattr("simulations.simulate.simulate", fake_simulate)
    run_dir = tmp_path / "tune"
    args = ["tune", "--run-dir", str(run_dir), "--methods", "shared,oppu"]
    args += ["--set", 'task=""', "--set", "lora-r=2"]  # the data's own task; lora-r is varied below
    args += ["--vary", "learning-rate=[0.001, 0.004]", "--vary", "lora-r=[4, 8]"]
    assert main(args) == 0
    assert [r[0] for r in ran] == ["validation"] * 4
    assert [r[1:3] for r in ran] == [(0.001, 4), (0.001, 8), (0.004, 4), (0.004, 8)]
    result = read_json(run_dir / "tune.json")
    assert result["target"] == "shared" and result["best"] == "learning-rate=0.004+lora-r=8"
    assert result["set"] == ["learning-rate=0.004", "lora-r=8"]
    assert result["ranking"][0]["minus_best"] is None
    assert result["ranking"][1]["minus_best"]["value"] == pytest.approx(-1 / 8)
    out = capsys.readouterr().err  # fedoppu's console, like every progress line
    assert "best on validation: learning-rate=0.004+lora-r=8" in out
    # the tune's own flags go with it (quoted for a shell), the varied key's --set gives way to the winner
    assert (
        "fedoppu simulate --methods shared,oppu --set 'task=\"\"' --set learning-rate=0.004 --set lora-r=8"
        in out
    )
    assert (run_dir / "variants.png").stat().st_size > 0

    ran.clear()
    assert main([*args, "--target", "oppu", "--run-dir", str(tmp_path / "tune-oppu")]) == 0
    assert read_json(tmp_path / "tune-oppu" / "tune.json")["best"].startswith("learning-rate=0.001")

    assert main([*args, "--set", "split='test'"]) == 2
    assert main([*args, "--target", "rag"]) == 2
    err = capsys.readouterr().err
    assert "tuning reads the validation split only" in err
    assert "--target rag: not among the methods run (shared, oppu)" in err


def test_tune_chooses_the_centralized_references_own_learning_rate(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_simulate(config, *, centralized, engine):
        ran.append((config.method_list, centralized, config.learning_rate))
        pooled = 3 + (config.learning_rate == 0.005)  # the pooled node wants the smaller rate
        atomic_write_json(
            Path(config.run_dir) / "metrics.json", _metrics({"centralized-shared": [pooled] * len(USERS)})
        )
        return Path(config.run_dir)

    monkeypatch.setattr("simulations.simulate.simulate", fake_simulate)
    args = ["tune", "--run-dir", str(tmp_path / "tune"), "--methods", "centralized"]
    assert main([*args, "--vary", "learning-rate=[0.01, 0.005]"]) == 0
    assert ran == [([], True, 0.01), ([], True, 0.005)]  # the reference alone, no federation
    assert read_json(tmp_path / "tune" / "tune.json")["best"] == "learning-rate=0.005"
    assert "fedoppu simulate --methods centralized --set learning-rate=0.005" in capsys.readouterr().err
    # pooled OPPU is run, and can be a target, only with a method that personalizes the shared adapter
    assert main([*args, "--target", "centralized", "--vary", "learning-rate=[0.01]"]) == 2
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "--target centralized: not among the methods run (centralized-shared)" in err
