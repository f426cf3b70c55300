"""A shared adapter with its own, smaller layout (the `shared-*` keys) in one tiny federation: the
server, the wire, FFA-LoRA's frozen A and the checkpoints follow the shared spec; the personal adapters
are trained and stored with the personal one."""

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

pytestmark = pytest.mark.federation  # a whole federation: scheduled first (conftest.py)

# Personal: rank 4 on all seven linear maps of both layers; shared: rank 2 on q and v of the top layer.
OVERRIDES = {
    "num-rounds": 1,
    "lora-r": 4,
    "lora-alpha": 4,
    "adapter-layers": '"all"',
    "shared-lora-r": 2,
    "shared-lora-alpha": 4,
    "shared-target-modules": '"q_proj,v_proj"',
    "shared-adapter-layers": 1,
    "shared-ffa-lora": "true",
    "methods": '"shared,local,oppu"',
    "eval-every-round": "false",
}
PERSONAL_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.fixture(scope="module")
def run(tiny_run, one_actor, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("shared-layout") / "run"
    return simulate_tiny(tiny_run, OVERRIDES, one_actor, run_dir), run_dir


def test_the_server_sends_and_keeps_the_small_shared_adapter(run):
    config, run_dir = run
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["status"] == "complete"
    shared = AdapterSpecs.from_config(config).shared
    initial = initial_adapter(config.model, config.dtype, shared, config.seed)
    assert lora_layout(initial) == {("1", "q_proj"): 2, ("1", "v_proj"): 2}
    # d = B alone: q_proj's 64 x 2 and v_proj's 32 x 2 (two key-value heads of 16).
    assert metrics["privacy"]["params_per_client"] == 64 * 2 + 32 * 2
    assert metrics["privacy"]["shared_adapter"].startswith(
        "lora r 2 alpha 4 on q_proj,v_proj of layer 1 (FFA-LoRA"
    )
    last_round, final, _ = CheckpointStore(run_dir).latest()
    assert last_round == 1 and set(final) == set(initial)
    for key in initial:
        if FFA_FROZEN in key:
            assert torch.equal(final[key], initial[key]), key  # A as drawn, bit for bit
    assert any(not torch.equal(final[k], initial[k]) for k in on_the_wire(initial, True))


def test_personal_adapters_are_stored_with_the_personallora_layout(run):
    _, run_dir = run
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


@pytest.mark.usefixtures("flower_identity")
def test_a_client_sends_only_the_shared_adapters_b_with_the_servers_a(run):
    config, _ = run
    initial, wire, sent, trained = ffa_client_round(config)
    assert list(sent) == list(wire)  # the shared adapter's B, nothing of the personal slot
    assert any(not np.array_equal(sent[k], wire[k].numpy()) for k in wire)
    assert set(trained) == set(initial)
    assert all(torch.equal(trained[k].float(), initial[k]) for k in initial if FFA_FROZEN in k)
