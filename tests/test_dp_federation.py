"""One tiny federation under central DP as issue 12 sets it up: Poisson sampling, a target epsilon, adaptive
clipping, server momentum and FFA-LoRA for the shared adapter; then a client's train handler in process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ffa_client_round, simulate_tiny

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
    "methods": '"shared"',
    "eval-every-round": "false",
}


@pytest.fixture(scope="module")
def dp_run(tiny_run, one_actor, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dp") / "run"
    return simulate_tiny(tiny_run, OVERRIDES, one_actor, run_dir), run_dir


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
    assert privacy["params_per_client"] == sum(t.numel() for t in wire.values())  # d: B only


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
    assert list(sent) == list(wire)  # exactly B's tensors on the wire
    assert any(not np.array_equal(sent[k], wire[k].numpy()) for k in wire)  # B trained
    for key, tensor in initial.items():
        if FFA_FROZEN in key:
            assert torch.equal(trained[key].float(), tensor), (
                key
            )  # the client's A is the server's, bit for bit
