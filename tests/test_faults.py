"""Fault injection: a simulated federation (tiny model, 3 nodes of 2 users) that loses nodes, receives
bad updates and is resumed; and disks that fill up while state is written.

One run goes through three federations (module fixture `runs`), each resuming the one before:
1. bad updates (tests/faults.py): round 1 gets a NaN update (every attempt), an Inf one (first attempt)
   and a node that never answers in time (first attempt), so it is sent again to the missing and
   aggregated from the two that recover; round 2 gets a wrong-shape, a missing-key and an x1000 update
   from every node, every attempt, so training stops early with round 1 checkpointed;
2. the resume, with dying nodes: a node killed in round 2's training, a node killed half-way through
   writing a personal adapter (the engine restarts it), a ClientApp that raises in personalization and
   a node killed while evaluating;
3. the resume with no faults, after one stored personal adapter was truncated.
Each step checks what the run did, who was dropped and why, and that no checkpoint or adapter was lost.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import torch

import common.peft_io
from client.store import PersonalAdapterStore, user_dir_name
from common import protocol
from common.adapters import AdapterSpec
from common.config import load_run_config
from common.io import StorageError, atomic_write_json, read_json
from server.checkpoints import CheckpointStore
from simulations.engine_options import EngineOptions
from simulations.report import failure_lines, summary_rows
from simulations.simulate import resume, simulate
from tests import faults

pytestmark = pytest.mark.federation  # minutes of whole federations: scheduled first (conftest.py)

USERS = {0: ["u000", "u001"], 1: ["u002", "u003"], 2: ["u004", "u005"]}  # by partition
ALL_USERS = sorted(u for users in USERS.values() for u in users)
FAULTY = EngineOptions(client_app="tests.faults:app")
TRAIN_TIMEOUT = 10.0  # round 1's nodes are warm (round 0 evaluated): they answer in ~1 s


def _fault(phase: str, partition: int, fault: str, **where) -> dict:
    return {"phase": phase, "partition": partition, "fault": fault, **where}


BAD_UPDATES = [
    _fault("train", 0, "nan", round=1),
    _fault("train", 1, "inf", round=1, once=True),
    _fault("train", 2, "sleep", round=1, seconds=TRAIN_TIMEOUT + 5, once=True),
    _fault("train", 0, "wrong-shape", round=2),
    _fault("train", 1, "missing-key", round=2),
    _fault("train", 2, "scaled", round=2),
]
DYING_NODES = [
    _fault("train", 2, "kill", round=2),
    _fault("personalize", 0, "kill-while-saving", method="oppu", once=True),
    _fault("personalize", 1, "raise", method="oppu"),
    _fault("evaluate", 2, "kill", method="oppu"),
]


def _dropped(entries: list[dict]) -> list[tuple[tuple[str, ...], str]]:
    """(users, reason) of each drop: node ids differ in every simulated run, users do not."""
    return [(tuple(d["users"] or ()), d["reason"]) for d in entries]


def _adapters_intact(run_dir: Path) -> dict[str, str]:
    """Every stored personal adapter by user: it matches its checksum, and only it is on disk."""
    found = {}
    for partition in USERS:
        store = PersonalAdapterStore(run_dir / "clients" / f"partition-{partition}")
        for record in store.records():
            assert store.intact(record), record
            user_dir = (store.root / record.path).parent
            assert [p.name for p in user_dir.iterdir()] == [Path(record.path).name]  # no leftovers
            found[record.user_id] = record.sha256
    return found


def _checkpoints(run_dir: Path) -> dict[str, bytes]:
    store = CheckpointStore(run_dir)
    assert store.latest() is not None  # the latest one passes its checksum
    return {
        p.name: (p / "adapter_model.safetensors").read_bytes() for p in sorted(store.root.glob("round-*"))
    }


def _set(run_dir: Path, **values) -> None:
    """Change the recorded config a resumed run will use (e.g. a longer timeout)."""
    recorded = read_json(run_dir / "config.json")
    recorded["run_config"].update(values)
    atomic_write_json(run_dir / "config.json", recorded)


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    run_dir = root / "run"
    overrides = {
        **tiny_run,
        "benchmark-users": 6,
        "users-per-client": 2,
        "methods": '"zero-shot,shared,oppu"',
        "eval-every-round": "false",
        "run-dir": f'"{run_dir}"',
        "train-timeout": TRAIN_TIMEOUT,
        "min-train-fraction": 0.5,  # 2 of 3
        "train-retries": 1,
        "max-update-norm": 20.0,  # an honest update of the tiny model: ~0.2
    }
    config = load_run_config(overrides=[f"{k}={v}" for k, v in overrides.items()])
    seconds, snapshots = [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(faults.FAULTS_DIR, str(root / "markers"))
        for step, injected in enumerate((BAD_UPDATES, DYING_NODES, [])):
            patch.setenv(faults.FAULTS, json.dumps(injected))
            started = time.perf_counter()
            if step == 0:
                simulate(config, centralized=False, engine=FAULTY)
            else:
                resume(run_dir, engine=FAULTY)
            seconds.append(time.perf_counter() - started)
            snapshots.append(
                {
                    "metrics": read_json(run_dir / "metrics.json"),
                    "checkpoints": _checkpoints(run_dir),
                    "adapters": _adapters_intact(run_dir),
                    "summary": summary_rows(read_json(run_dir / "metrics.json")),
                }
            )
            if step == 0:  # a long timeout for the runs whose killed nodes restart cold
                _set(run_dir, **{"train-timeout": 300.0})
            if step == 1:
                truncated = PersonalAdapterStore(run_dir / "clients" / "partition-0").record("oppu", "u000")
                weights = run_dir / "clients" / "partition-0" / truncated.path / "adapter_model.safetensors"
                weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    print(f"fault-injection federations took {', '.join(f'{s:.0f} s' for s in seconds)}")
    return snapshots


def test_bad_updates_are_dropped_a_short_round_is_retried_and_a_failed_one_stops_training(runs):
    metrics = runs[0]["metrics"]
    assert metrics["status"] == "stopped-early"
    assert metrics["stop_reason"].startswith("round 2: 0 of 3 sampled clients delivered a valid update")
    round_1 = metrics["rounds"][1]
    assert round_1["round"] == 1 and (round_1["train"]["sampled"], round_1["train"]["clients"]) == (3, 2)
    dropped = _dropped(round_1["dropped"])
    reasons = {users: [r for u, r in dropped if u == users] for users, _ in dropped}
    assert len(reasons[("u000", "u001")]) == 2 and all("NaN or Inf" in r for r in reasons[("u000", "u001")])
    assert len(reasons[("u002", "u003")]) == 1 and "NaN or Inf" in reasons[("u002", "u003")][0]
    assert reasons[("u004", "u005")] == [f"no reply within {TRAIN_TIMEOUT:g} s (train-timeout)"]
    [stop] = metrics["stops"]
    assert stop["round"] == 2 and len(stop["dropped"]) == 6  # 3 nodes, 2 attempts
    by_users = {users: reason for users, reason in _dropped(stop["dropped"])}
    assert "shape (" in by_users[("u000", "u001")]
    assert "keys differ from the shared adapter's: missing [" in by_users[("u002", "u003")]
    assert (
        "update norm" in by_users[("u004", "u005")] and "exceeds the bound 20" in by_users[("u004", "u005")]
    )
    assert list(runs[0]["checkpoints"]) == ["round-0001"]  # what was trained is kept
    assert [r["round"] for r in metrics["rounds"]] == [0, 1] and "shared" not in metrics["methods"]


def test_the_resumed_run_goes_on_without_the_nodes_that_die_and_names_the_users_it_missed(runs):
    metrics = runs[1]["metrics"]
    assert metrics["status"] == "complete" and "stop_reason" not in metrics
    round_2 = metrics["rounds"][2]
    assert (round_2["train"]["sampled"], round_2["train"]["clients"]) == (3, 2)
    [(users, reason)] = _dropped(round_2["dropped"])
    assert users == ("u004", "u005") and reason.startswith("error:")  # its process died
    assert set(metrics["methods"]["shared"]["users"]) == set(ALL_USERS)
    # Personalization: the node killed while writing was restarted and trained only its unfinished user;
    # the node whose ClientApp raised is reported with its users.
    personalize = metrics["personalize"]["oppu"]
    assert (personalize["users-trained"], personalize["users-reused"]) == (3, 1)
    assert personalize["missing"]["users"] == ["u002", "u003"]
    [node] = personalize["missing"]["nodes"]
    # The exception's own text stays on the node: the server gets Flower's code only (this test app raises
    # outside the node's error_code_mod; inside it, the production app answers with its own code).
    assert node["users"] == ["u002", "u003"] and node["reason"] == "error: Flower error code 2"
    oppu = metrics["methods"]["oppu"]
    assert sorted(oppu["users"]) == ["u000", "u001"] and oppu["overall"]["n"] == 4
    assert oppu["missing"]["users"] == ["u002", "u003", "u004", "u005"]
    reasons = dict((users, reason) for users, reason in _dropped(oppu["missing"]["nodes"]))
    assert reasons[("u002", "u003")] == f"error: failed: {protocol.NodeError.FAILED.text}"  # no adapter
    assert reasons[("u004", "u005")].startswith("error:")
    row = next(r for r in runs[1]["summary"] if r["method"] == "oppu")
    assert (row["users"], row["missing"]) == (2, 4)
    lines = failure_lines(metrics)  # printed under the table
    assert any(
        line.startswith("scoring oppu missed users ['u002', 'u003', 'u004', 'u005']") for line in lines
    )
    assert any(line.startswith("personalizing oppu missed users ['u002', 'u003']") for line in lines)
    assert set(runs[1]["adapters"]) == {
        "u000",
        "u001",
        "u004",
        "u005",
    }  # whole adapters, nothing half-written


def test_no_checkpoint_or_adapter_is_lost_and_the_last_resume_completes_every_user(runs):
    first, second, last = runs
    # Training resumed from round 1's checkpoint and never rewrote it.
    assert second["checkpoints"]["round-0001"] == first["checkpoints"]["round-0001"]
    assert last["checkpoints"] == second["checkpoints"] and list(last["checkpoints"]) == [
        "round-0001",
        "round-0002",
    ]
    assert last["metrics"]["rounds"][1] == first["metrics"]["rounds"][1]
    metrics = last["metrics"]
    assert metrics["status"] == "complete"
    # Only the users without a valid adapter were trained: the truncated one and the two never stored.
    personalize = metrics["personalize"]["oppu"]
    assert (personalize["users-trained"], personalize["users-reused"]) == (3, 3)
    assert personalize["missing"] == {"users": [], "nodes": []}
    assert set(last["adapters"]) == set(ALL_USERS)
    assert all(last["adapters"][u] == second["adapters"][u] for u in ("u001", "u004", "u005"))  # reused
    for method in ("zero-shot", "shared", "oppu"):
        assert sorted(metrics["methods"][method]["users"]) == ALL_USERS, method
        assert metrics["methods"][method]["missing"]["users"] == [], method
    assert [s["round"] for s in metrics["stops"]] == [2]  # the history of the stop is kept


# -- full and read-only disks ---------------------------------------------------------------------


def _full_disk_after_half(path_part: str, monkeypatch) -> None:
    """os.write writes half of what it is given to files under `path_part`, then fails: disk full."""
    real = os.write

    def write(fd, data):
        if path_part in os.readlink(f"/proc/self/fd/{fd}"):
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_names_the_file_and_leaves_the_old_one_whole(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"round": 1})
    _full_disk_after_half(str(tmp_path), monkeypatch)
    with pytest.raises(StorageError, match=rf"\[Errno 28\] cannot write {target}: No space left on device"):
        atomic_write_json(target, {"round": 2, "padding": "x" * 10_000})
    monkeypatch.undo()
    assert read_json(target) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def _dying_weights_writer(tensors, filename, *args, **kwargs):
    Path(filename).write_bytes(b"\0" * 100)  # half a file, then the disk is full
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(tmp_path, monkeypatch, resident_spec):
    state, peft_config = resident_spec
    store = CheckpointStore(tmp_path)
    store.save(1, state, peft_config)
    monkeypatch.setattr(common.peft_io, "save_file", _dying_weights_writer)
    with pytest.raises(StorageError, match=rf"cannot write {tmp_path / 'checkpoints' / 'round-0002'}"):
        store.save(2, {k: v + 1 for k, v in state.items()}, peft_config)
    assert sorted(p.name for p in store.root.iterdir()) == ["latest.json", "round-0001"]
    latest_round, latest, _ = store.latest()
    assert latest_round == 1 and all(torch.equal(latest[k], state[k]) for k in state)


def test_a_read_only_disk_names_the_adapter_it_could_not_write(tmp_path, monkeypatch, resident_spec):
    state, peft_config = resident_spec
    store = PersonalAdapterStore(tmp_path)
    first = store.save("oppu", "u1", state, peft_config, shared_digest="a", data_fingerprint="f")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    with pytest.raises(
        StorageError, match=r"cannot write .*adapters/oppu/u-[0-9a-f]+/version-\w+: Read-only file system"
    ):
        store.save("oppu", "u1", state, peft_config, shared_digest="b", data_fingerprint="f")
    monkeypatch.undo()
    assert store.record("oppu", "u1") == first and store.load("oppu", "u1") is not None


@pytest.mark.parametrize(
    "crash_at", ["writing the weights", "writing the manifest", "removing the old version"]
)
def test_a_node_killed_while_saving_an_adapter_keeps_the_old_or_the_new_one(
    tmp_path, monkeypatch, resident_spec, crash_at
):
    state, peft_config = resident_spec
    store = PersonalAdapterStore(tmp_path)
    old = store.save("oppu", "u1", state, peft_config, shared_digest="old", data_fingerprint="f")
    killed = BaseException("the process died here")  # nothing below catches it, as with SIGKILL
    target = {
        "writing the weights": (common.peft_io, "save_file"),
        "writing the manifest": (PersonalAdapterStore, "_write_manifest"),
        "removing the old version": (PersonalAdapterStore, "_prune"),
    }[crash_at]

    def die(*args, **kwargs):
        if target[1] == "save_file":
            Path(args[1]).write_bytes(b"\0" * 100)  # half-written weights
        raise killed

    monkeypatch.setattr(*target, die)
    with pytest.raises(BaseException, match="the process died here"):
        store.save(
            "oppu",
            "u1",
            {k: v + 1 for k, v in state.items()},
            peft_config,
            shared_digest="new",
            data_fingerprint="f",
        )
    monkeypatch.undo()
    record, loaded = store.load("oppu", "u1")
    expected = "new" if crash_at == "removing the old version" else "old"
    assert record.shared_digest == expected and store.intact(record)
    assert (record == old) == (expected == "old")
    offset = 1 if expected == "new" else 0
    assert all(torch.equal(loaded[k], v + offset) for k, v in state.items())
    # The next save removes what the crash left.
    store.save("oppu", "u1", state, peft_config, shared_digest="again", data_fingerprint="f")
    assert [p.name for p in (tmp_path / "adapters" / "oppu" / user_dir_name("u1")).iterdir()] == [
        Path(store.record("oppu", "u1").path).name
    ]


@pytest.fixture()
def resident_spec():
    """A small LoRA state and its peft config, without loading a model."""
    state = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(2, 4)}
    return state, AdapterSpec().peft_config()
