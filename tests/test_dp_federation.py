"""One tiny federation under central DP as issue 12 sets it up: Poisson sampling, a target epsilon, adaptive
clipping, server momentum and FFA-LoRA for a shared adapter with its own, smaller layout (the `shared-*`
keys: the server, the wire, the frozen A and the checkpoints follow the shared spec; the personal
adapters are trained and stored with the personal one); then a client's train handler in process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ffa_client_round, lora_layout, simulate_tiny

from client.store import PersonalAdapterStore
from common.adapters import FFA_FROZEN, AdapterSpecs, initial_adapter, on_the_wire
from common.io import read_json
from server.checkpoints import CheckpointStore

pytestmark = pytest.mark.federation  # minutes of whole federations: scheduled first (conftest.py)

OVERRIDES = {
    "privacy": '"central-dp"',
    "sample-rate": 0.5,
    "target-epsilon": 8.0,
    "num-rounds": 3,
    "clipping-norm": 0.15,  # the tiny model's updates after 2 local steps measure about 0.145
    "shared-ffa-lora": "true",
    # Personal: rank 4 on all seven linear maps of both layers; shared: rank 2 on q and v of the top layer.
    "lora-r": 4,
    "lora-alpha": 4,
    "adapter-layers": '"all"',
    "shared-lora-r": 2,
    "shared-lora-alpha": 4,
    "shared-target-modules": '"q_proj,v_proj"',
    "shared-adapter-layers": 1,
    "methods": '"shared,local,oppu"',
    "eval-every-round": "false",
}
PERSONAL_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def dp_run(tiny_run, in_process, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp") / "run"
    return simulate_tiny(tiny_run, OVERRIDES, in_process, run_dir), run_dir


def test_the_run_records_its_sampling_noise_and_epsilon(dp_run):
    config, run_dir = dp_run
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "complete"
    privacy = metrics["privacy"]
    assert privacy["sampling_assumption"] == "poisson" and privacy["sampling"]["expected_per_round"] == 1.0
    assert privacy["noise_multiplier_from"] == "target-epsilon" and privacy["clipping"] == "adaptive"
    epsilons = [r["privacy"]["epsilon"] for r in metrics["rounds"] if r.get("privacy")]
    assert len(epsilons) == 3 and epsilons[-1] == pytest.approx(privacy["epsilon_planned"])
    assert epsilons[-1] <= 8.0
    initial = initial_adapter(
        config.model, config.dtype, AdapterSpecs.from_config(config).shared, config.seed
    )
    wire = on_the_wire(initial, True)
    assert set(wire) == {k for k in initial if FFA_FROZEN not in k} and wire
    assert lora_layout(initial) == {("1", "q_proj"): 2, ("1", "v_proj"): 2}
    # d = B alone: q_proj's 64 x 2 and v_proj's 32 x 2 (two key-value heads of 16).
    assert privacy["params_per_client"] == sum(t.numel() for t in wire.values()) == 64 * 2 + 32 * 2
    assert privacy["shared_adapter"].startswith("lora r 2 alpha 4 on q_proj,v_proj of layer 1 (FFA-LoRA")


def test_personal_adapters_are_stored_with_the_personal_layout(dp_run):
    _, run_dir = dp_run
    stores = [PersonalAdapterStore(path) for path in sorted(Path(run_dir, "clients").glob("partition-*"))]
    records = [(store, record) for store in stores for record in store.records()]
    assert {record.variant for _, record in records} == {"local", "oppu"} and len(records) == 4
    for store, record in records:
        _, state = store.load(record.variant, record.user_id)
        assert lora_layout(state) == {(layer, m): 4 for layer in "01" for m in PERSONAL_MODULES}
        # Trained on layer 0 too: the states below the adapters start below the lower of the two.
        assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k and ".layers.0." in k)
    methods = read_json(run_dir / "metrics.json")["methods"]
    assert set(methods) == {"shared", "local", "oppu"} and all(
        m["overall"]["n"] > 0 for m in methods.values()
    )


def test_ffa_lora_keeps_a_as_drawn_and_trains_b(dp_run):
    config, run_dir = dp_run
    initial = initial_adapter(
        config.model, config.dtype, AdapterSpecs.from_config(config).shared, config.seed
    )
    last_round, final, _ = CheckpointStore(run_dir).latest()
    assert last_round == 3
    for key, tensor in initial.items():
        if FFA_FROZEN in key:
            assert torch.equal(final[key], tensor), key  # bit for bit: never sent, never noised
    assert any(not torch.equal(final[k], initial[k]) for k in on_the_wire(initial, True))


@pytest.mark.usefixtures("flower_identity")
def test_a_client_trains_and_sends_b_only_with_the_servers_a(dp_run):
    config, _ = dp_run
    initial, wire, sent, trained = ffa_client_round(config)
    assert list(sent) == list(wire)  # exactly the shared adapter's B on the wire, nothing personal
    assert any(not np.array_equal(sent[k], wire[k].numpy()) for k in wire)  # B trained
    for key, tensor in initial.items():
        if FFA_FROZEN in key:
            assert torch.equal(trained[key].float(), tensor), (
                key
            )  # the client's A is the server's, bit for bit
