"""A whole federation with the tiny model: 2 clients, 2 rounds, every method, resume after the server
was killed, privacy audit."""

import contextlib
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from common.config import load_run_config
from common.io import read_json
from simulations.cli import main
from simulations.engine import FederationFailed
from simulations.simulate import centralized_config, resume, simulate
from tests import faults

pytestmark = pytest.mark.federation  # minutes of whole federations: scheduled first (conftest.py)

USERS = 2  # benchmark-users in the tiny_run fixture


def _config(tiny_run, run_dir, **extra):
    overrides = {
        **tiny_run,
        "methods": '"zero-shot,rag,shared,local,oppu,oppu-rag,oppu-pag"',
        "run-dir": f'"{run_dir}"',
    }
    overrides.update(extra)
    return load_run_config(overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def finished_run(tiny_run, in_process, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sim") / "run"
    audit = tmp_path_factory.mktemp("audit")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDOPPU_AUDIT_LOG", str(audit))
        simulate(_config(tiny_run, run_dir), centralized=True, engine=in_process)
    return run_dir, audit


def test_every_method_is_scored_per_user_and_reported(finished_run):
    run_dir, _ = finished_run
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "complete" and metrics["task"] == "tagging"
    expected = {
        "zero-shot",
        "rag",
        "shared",
        "local",
        "oppu",
        "oppu-rag",
        "oppu-pag",
        "centralized-shared",
        "centralized",
    }
    assert set(metrics["methods"]) == expected
    for name, entry in metrics["methods"].items():
        assert entry["overall"]["n"] == USERS * 2, name
        assert set(entry["users"]) == {"u000", "u001"}, name
        assert 0.0 <= entry["overall"]["accuracy"] <= 1.0
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert all("train-loss" in r["train"] and r["train"]["clients"] == USERS for r in metrics["rounds"][1:])
    assert metrics["personalize"]["oppu"]["users-trained"] == USERS
    with open(run_dir / "summary.csv") as handle:
        methods = [row["method"] for row in csv.DictReader(handle)]
    assert methods[:3] == ["zero-shot", "rag", "shared"] and methods[-1] == "centralized"
    for plot in ("methods.png", "rounds.png", "user_gain.png"):
        assert (run_dir / plot).stat().st_size > 1000
    assert (run_dir / "checkpoints" / "round-0002" / "adapter_config.json").exists()


def test_personal_adapters_stay_on_their_clients_disk(finished_run):
    run_dir, _ = finished_run
    for pid, user in enumerate(["u000", "u001"]):
        manifest = read_json(run_dir / "clients" / f"partition-{pid}" / "manifest.json")["adapters"]
        assert set(manifest) == {f"{m}/{user}" for m in ("local", "oppu", "oppu-rag", "oppu-pag")}
        # OPPU variants record the shared adapter's round (2 rounds here); `local` has no shared one.
        assert [manifest[f"{m}/{user}"]["shared_version"] for m in ("local", "oppu", "oppu-rag")] == [
            None,
            2,
            2,
        ]


def test_clients_send_only_the_shared_adapter_and_scalar_metrics(finished_run):
    _, audit = finished_run
    replies = [
        json.loads(line) for path in Path(audit).glob("*.jsonl") for line in path.read_text().splitlines()
    ]
    kinds = {r["message_type"] for r in replies}
    assert kinds == {"train", "train.personalize", "evaluate"}
    for reply in replies:
        assert reply["configs"] == []
        assert all(t in {"int", "float"} for record in reply["metrics"].values() for t in record.values())
        if reply["message_type"] == "train":
            assert list(reply["arrays"]) == ["arrays"]
            sent = reply["sent_arrays"]["arrays"]
            got = {k: v[0] for k, v in reply["arrays"]["arrays"].items()}
            assert got == {k: list(v) for k, v in sent.items()}
            assert all(".lora_" in k for k in got) and not any("personal" in k for k in got)
        else:
            assert reply["arrays"] == {}


def _train_replies(audit: Path) -> int:
    """How many train replies the nodes sent (audit_mod logs every reply)."""
    lines = [line for path in audit.glob("*.jsonl") for line in path.read_text().splitlines()]
    return sum(json.loads(line)["message_type"] == "train" for line in lines)


def test_resume_continues_from_the_last_checkpoint_and_gives_the_uninterrupted_runs_numbers(
    tiny_run, in_process, finished_run, tmp_path, monkeypatch
):
    """The server is killed (SIGKILL) when round 2's updates arrive; resume trains round 2 and nothing
    before it: round 1's checkpoint file, its record and its training stay as they were. Same seed,
    same numbers: its training and personalization equal those of the run that was not interrupted."""
    run_dir, audit = tmp_path / "run", tmp_path / "audit"
    monkeypatch.setenv("FEDOPPU_AUDIT_LOG", str(audit))
    monkeypatch.setenv(faults.KILL_AT_ROUND, "2")
    killing = replace(in_process, server_app="tests.faults:killed_server")
    config = _config(tiny_run, run_dir, methods='"shared,oppu"')
    with pytest.raises(FederationFailed, match="exit code -9"):
        simulate(config, centralized=False, engine=killing)
    killed = read_json(run_dir / "metrics.json")
    assert killed["status"] == "running" and [r["round"] for r in killed["rounds"]] == [0, 1]
    checkpoints = run_dir / "checkpoints"
    assert read_json(checkpoints / "latest.json")["round"] == 1 and not (checkpoints / "round-0002").exists()
    round_1 = checkpoints / "round-0001" / "adapter_model.safetensors"
    before = (round_1.read_bytes(), round_1.stat().st_mtime_ns)
    trained = _train_replies(audit)
    assert trained == 2 * USERS  # rounds 1 and 2 trained; round 2 was lost with the server

    resume(run_dir, engine=in_process)
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "complete"
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    assert metrics["rounds"][1] == killed["rounds"][1]  # round 1 not trained or recorded again
    assert (round_1.read_bytes(), round_1.stat().st_mtime_ns) == before
    assert _train_replies(audit) - trained == USERS  # one round of training: round 2
    assert (checkpoints / "round-0002").exists()
    assert read_json(checkpoints / "latest.json")["round"] == 2

    uninterrupted = read_json(finished_run[0] / "metrics.json")
    for a, b in zip(uninterrupted["rounds"][1:], metrics["rounds"][1:], strict=True):
        assert a["train"]["train-loss"] == b["train"]["train-loss"]
    oppu = metrics["personalize"]["oppu"]
    assert uninterrupted["personalize"]["oppu"]["personal-loss"] == oppu["personal-loss"]
    assert uninterrupted["methods"]["oppu"]["users"] == metrics["methods"]["oppu"]["users"]


def _processes_with(marker: str) -> list[int]:
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if marker.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
    return found


def test_ctrl_c_stops_every_process_says_how_to_resume_and_the_run_resumes(tiny_run, in_process, tmp_path):
    """Ctrl-C in the terminal (SIGINT to the foreground process group) during round 2 or later."""
    run_dir = tmp_path / "run"
    marker = f"FEDOPPU_INTERRUPT_TEST={uuid.uuid4().hex}"
    overrides = {**tiny_run, "num-rounds": 50, "eval-every-round": "false", "methods": '"shared"'}
    command = [sys.executable, "-m", "simulations.cli", "simulate", "--run-dir", str(run_dir)]
    command += ["--cpus-per-client", str(in_process.cpus_per_client)]
    command += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    process = subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        # As in a terminal: Python turns SIGINT into KeyboardInterrupt only where it is not ignored, and
        # a shell's background job (pytest started with `&`) hands its children an ignored SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        # latest.json: written after round 1's checkpoint (a Ctrl-C between them resumes from round 0)
        while not (run_dir / "checkpoints" / "latest.json").exists() and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert "Traceback" not in out + err
    assert re.search(r"round 1/50: 2 of 2 sampled clients aggregated, train loss \d+\.\d{3} \(\d+ s\)", err)
    said = "".join(err.split())
    assert said.endswith("".join(f"interrupted: resume it with: fedoppu simulate --resume {run_dir}".split()))
    deadline = time.monotonic() + 20
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_with(marker) == []  # the federation and every process it started are gone

    done = read_json(run_dir / "checkpoints" / "latest.json")["round"]
    assert done < 50
    recorded = read_json(run_dir / "config.json")
    recorded["run_config"]["num-rounds"] = done + 1  # the rest of the run, shortened for the test
    (run_dir / "config.json").write_text(json.dumps(recorded))
    resume(run_dir, engine=in_process)
    metrics = read_json(run_dir / "metrics.json")
    assert [r["round"] for r in metrics["rounds"]] == list(range(done + 2))
    assert (run_dir / "checkpoints" / f"round-{done + 1:04d}").exists()
    assert read_json(run_dir / "checkpoints" / "latest.json")["round"] == done + 1
    assert metrics["status"] == "complete"


def test_an_interrupted_comparison_says_how_to_continue(tiny_run, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("simulations.simulate.simulate", interrupted)
    argv = ["compare-privacy", "--federation", "run-config", "--settings", "none", "--set", "num-rounds=1"]
    argv += ["--results-dir", str(tmp_path)]
    assert main(argv) == 130
    said = "".join(capsys.readouterr().err.split())
    rerun = f"continue with: fedoppu {shlex.join([*argv, '--run-dir'])} {tmp_path}/"  # + a new run dir
    assert "".join(rerun.split()) in said and "Traceback" not in said


def test_the_report_gives_intervals_and_oppus_paired_differences(finished_run):
    run_dir, _ = finished_run
    metrics = read_json(run_dir / "metrics.json")
    uncertainty = metrics["uncertainty"]
    for name, entry in metrics["methods"].items():
        interval = uncertainty["methods"][name]["accuracy"]
        assert interval["value"] == entry["overall"]["accuracy"], name
        # 2 users are too few for a bootstrap interval (tests/test_statistics.py checks the intervals)
        assert interval["users"] == USERS and interval["lo"] is None and interval["hi"] is None
    pairs = {(d["first"], d["second"]) for d in uncertainty["differences"]}
    assert {("oppu", "shared"), ("oppu", "local"), ("oppu-rag", "rag"), ("oppu-pag", "oppu")} <= pairs
    assert {("centralized", "oppu"), ("centralized-shared", "shared")} <= pairs  # federated vs pooled
    assert set(uncertainty["groups"]) <= {"light", "medium", "heavy"}
    with open(run_dir / "summary.csv") as handle:
        row = next(csv.DictReader(handle))
    assert {"accuracy", "accuracy_lo", "accuracy_hi"} <= set(row)


def test_seeds_repeat_the_run_and_report_the_spread(tiny_run, in_process, tmp_path):
    from simulations.cli import main

    overrides = {**tiny_run, "num-rounds": 1, "local-steps": 1, "methods": '"zero-shot,shared"'}
    argv = ["simulate", "--seeds", "2", "--run-dir", str(tmp_path)]
    argv += ["--cpus-per-client", str(in_process.cpus_per_client)]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    assert main(argv) == 0
    assert {p.name for p in tmp_path.glob("seed-*")} == {"seed-0", "seed-1"}
    spread = read_json(tmp_path / "seeds.json")
    assert spread["seeds"] == [0, 1]
    values = [
        read_json(tmp_path / f"seed-{s}" / "metrics.json")["methods"]["shared"]["overall"] for s in (0, 1)
    ]
    assert spread["methods"]["shared"]["mean"] == sum(v["accuracy"] for v in values) / 2
    assert spread["differences"]["shared - zero-shot"]["runs"] == 2


def test_the_centralized_reference_is_plain_training_whatever_the_server_optimizer(tmp_path):
    """Pooled on one node with the steps of a round's clients; the server keeps that node's adapter, so a
    federation tuned to fedadam or fedavgm is compared with plain training, not with server Adam."""
    overrides = [
        'strategy="fedadam"',
        "server-learning-rate=0.05",
        "local-steps=4",
        'methods="zero-shot,shared,oppu-rag"',
        f'run-dir="{tmp_path}"',
    ]
    config = load_run_config(overrides=overrides)
    central = centralized_config(config, users=12, nodes=3)
    assert (central.strategy, central.local_steps, central.users_per_client) == ("fedavg", 12, 12)
    assert (central.min_nodes, central.methods, central.run_dir) == (
        1,
        "shared,oppu",
        str(tmp_path / "centralized"),
    )
    assert central.learning_rate == config.learning_rate and central.num_rounds == config.num_rounds
    assert central.max_update_norm == 0  # its update sums every node's steps: no honest-client bound
    # The same client steps as a federation that samples: the round's clients' steps, on average.
    for sampling, steps in (("clients-per-round=2", 8), ("sample-rate=0.5", 6), ("fraction-train=0.5", 8)):
        sampled = centralized_config(load_run_config(overrides=[*overrides, sampling]), users=12, nodes=3)
        assert sampled.local_steps == steps, sampling
        assert (sampled.clients_per_round, sampled.sample_rate, sampled.fraction_train) == (0, 0, 1)
    # Without a personalized method on the shared adapter it trains the shared adapter alone.
    for methods in ("shared", "zero-shot,shared,local"):
        alone = centralized_config(config.replace(methods=methods), users=12, nodes=3)
        assert alone.methods == "shared"
