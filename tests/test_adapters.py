import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from client.resident import PERSONAL, SHARED, ResidentModel
from client.store import GateDecision, PersonalAdapterStore
from common.adapters import AdapterSpec, fresh_lora_from_config, state_digest


@pytest.fixture(params=[(), (1,)], ids=["every-layer", "top-layer"])
def resident(tiny_model, request):
    """Adapters on both layers of the tiny model, or on its top layer only (adapter-layers = 1)."""
    model, tokenizer = tiny_model
    return ResidentModel(model, tokenizer, AdapterSpec(layers=request.param))


def _logits(resident, ids):
    with torch.no_grad():
        return resident.peft(ids).logits


def _random_adapter(resident, slot, seed):
    state = resident.fresh(slot, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for key in state:
        if "lora_B" in key:
            state[key] = torch.randn(state[key].shape, generator=generator) * 0.5
    return state


def test_identity_adapters_leave_the_base_model_unchanged(resident):
    ids = torch.randint(0, 1000, (2, 7))
    with resident.peft.disable_adapter(), torch.no_grad():
        base = resident.peft(ids).logits
    resident.use(personal=True)
    assert torch.equal(_logits(resident, ids), base)
    resident.load(SHARED, resident.fresh(SHARED, seed=3))  # fresh: random A, zero B -> still identity
    assert torch.allclose(_logits(resident, ids), base)


def test_slots_add_up_and_swap_by_weight_copy(resident):
    ids = torch.randint(0, 1000, (2, 7))
    base = _logits(resident, ids)
    shared, personal = _random_adapter(resident, SHARED, 1), _random_adapter(resident, PERSONAL, 2)
    resident.load(SHARED, shared)
    with_shared = _logits(resident, ids)
    assert not torch.allclose(with_shared, base)
    resident.load(PERSONAL, personal)
    assert torch.equal(_logits(resident, ids), with_shared)  # personal slot inactive
    resident.use(personal=True)
    both = _logits(resident, ids)
    assert not torch.allclose(both, with_shared)
    resident.load(PERSONAL, None)
    assert torch.allclose(_logits(resident, ids), with_shared)
    assert {k: v.shape for k, v in resident.state(SHARED).items()} == {k: v.shape for k, v in shared.items()}
    assert state_digest(resident.state(SHARED)) == state_digest(shared)


def test_only_the_chosen_slot_is_trainable(resident):
    params = resident.trainable(PERSONAL)
    names = {n for n, p in resident.peft.named_parameters() if p.requires_grad}
    assert names and all(".personal." in n for n in names)
    assert sum(p.numel() for p in params) == sum(v.numel() for v in resident.state(PERSONAL).values())


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: s.pop(next(iter(s))), "does not match: missing"),
        (lambda s: s.update({next(iter(s)): torch.zeros(3, 3)}), "shape (3, 3)"),
        (lambda s: next(iter(s.values())).fill_(float("nan")), "NaN or infinite"),
    ],
)
def test_bad_adapters_are_refused(resident, corrupt, message):
    state = resident.fresh(SHARED, 0)
    corrupt(state)
    with pytest.raises(ValueError, match=None) as err:
        resident.load(SHARED, state)
    assert message in str(err.value)


def test_store_round_trip_loads_with_plain_peft(resident, tiny_model, tmp_path):
    store = PersonalAdapterStore(tmp_path)
    personal = _random_adapter(resident, PERSONAL, 5)
    record = store.save(
        "oppu", "u/1 odd id", personal, resident.spec.peft_config(), shared_digest="abc", data_fingerprint="f"
    )
    loaded_record, loaded = store.load("oppu", "u/1 odd id")
    adapter_config = json.loads((tmp_path / record.path / "adapter_config.json").read_text())
    assert adapter_config["layers_to_transform"] == (list(resident.spec.layers) or None)
    assert loaded_record == record and len(Path(record.path).parts) == 4  # adapters/oppu/<user>/<version>
    assert all(torch.equal(loaded[k], personal[k]) for k in personal)
    # The stored directory is an ordinary peft adapter.
    model, _ = tiny_model
    ids = torch.randint(0, 1000, (1, 6))
    peft_model = PeftModel.from_pretrained(model, tmp_path / record.path)
    resident.load(PERSONAL, personal)
    resident.use(personal=True)
    resident.load(SHARED, None)
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, resident.peft(ids).logits, atol=1e-5)


def test_the_gate_decision_is_kept_in_the_manifest_and_the_users_export(resident, tmp_path):
    store = PersonalAdapterStore(tmp_path / "node")
    state = resident.fresh(PERSONAL, 1)
    config = resident.spec.peft_config()
    gate = GateDecision(
        "mix:x", shared_weight=0.5, uses_personal=True, epochs=1.5, holdout_loss=2.25, holdout_items=3
    )
    store.save("oppu", "u1", state, config, shared_digest="a", data_fingerprint="b", gate=gate)
    assert store.record("oppu", "u1").gate == gate
    store.export_user("u1", tmp_path / "u1.tar.gz")
    imported = PersonalAdapterStore(tmp_path / "other").import_archive(tmp_path / "u1.tar.gz", user_id="u1")
    assert [r.gate for r in imported] == [gate]
    # A manifest written before the gate existed reads as OPPU's original: weight 1, personal adapter used.
    manifest = json.loads(store.manifest_path.read_text())
    del manifest["adapters"]["oppu/u1"]["gate"]
    store.manifest_path.write_text(json.dumps(manifest))
    assert store.record("oppu", "u1").gate == GateDecision()


def test_store_detects_corruption_and_deletes_every_trace(resident, tmp_path):
    store = PersonalAdapterStore(tmp_path)
    state = resident.fresh(PERSONAL, 1)
    config = resident.spec.peft_config()
    record = store.save("oppu", "u1", state, config, shared_digest="a", data_fingerprint="b")
    store.save("local", "u1", state, config, shared_digest="none", data_fingerprint="b")
    store.save("oppu", "u2", state, config, shared_digest="a", data_fingerprint="b")
    weights = tmp_path / record.path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    assert store.load("oppu", "u1") is None  # never loaded, and dropped from the manifest
    assert store.record("oppu", "u1") is None and not (tmp_path / record.path).exists()
    assert store.delete("u1") == 1
    assert [r.user_id for r in store.records()] == ["u2"]


def test_the_first_shared_adapter_comes_from_the_config_alone(resident, tiny_model_dir, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("the base weights were loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    from_config = fresh_lora_from_config(str(tiny_model_dir), resident.spec, seed=7)
    expected = resident.fresh(SHARED, seed=7)
    assert list(from_config) == list(expected)
    assert all(torch.equal(from_config[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="dora adapter needs the base weights"):
        fresh_lora_from_config(str(tiny_model_dir), AdapterSpec(peft_type="dora"), seed=7)
