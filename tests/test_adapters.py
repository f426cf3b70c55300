import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import lora_layout, random_adapter, tiny_llama
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from client.inference import answer_users, generate_answers
from client.resident import PERSONAL, SHARED, ResidentModel, weighted
from client.store import GateDecision, PersonalAdapterStore
from common.adapters import AdapterSpec, AdapterSpecs, fresh_adapter_from_config, state_digest
from common.config import load_run_config
from server.checkpoints import CheckpointStore
from simulations.gates import gate_decisions, gate_line

IA3 = AdapterSpec(
    peft_type="ia3", target_modules=("q_proj", "v_proj", "down_proj"), feedforward_modules=("down_proj",)
)


@pytest.fixture(
    params=[AdapterSpec(), AdapterSpec(layers=(1,)), IA3, replace(IA3, layers=(1,))],
    ids=["lora-every-layer", "lora-top-layer", "ia3-every-layer", "ia3-top-layer"],
)
def resident(tiny_model, request):
    """Adapters on both layers of the tiny model, or on its top layer only (adapter-layers = 1)."""
    model, tokenizer = tiny_model
    return ResidentModel(model, tokenizer, request.param)


def _logits(resident, ids):
    with torch.no_grad():
        return resident.peft(ids).logits


def _random_adapter(resident, slot, seed):
    return random_adapter(resident, slot, seed, torch.Generator().manual_seed(seed + 1))


def test_identity_adapters_leave_the_base_model_unchanged(resident):
    ids = torch.randint(0, 1000, (2, 7))
    with resident.peft.disable_adapter(), torch.no_grad():
        base = resident.peft(ids).logits
    resident.use(personal=True)
    assert torch.equal(_logits(resident, ids), base)
    resident.load(SHARED, resident.fresh(SHARED, seed=3))  # fresh: random A, zero B (IA3: ones) -> identity
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


def test_two_ia3_slots_scale_the_base_by_their_product(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, IA3)
    ids = torch.randint(0, 1000, (2, 7))
    shared, personal = _random_adapter(resident, SHARED, 1), _random_adapter(resident, PERSONAL, 2)
    resident.load(SHARED, shared)
    resident.load(PERSONAL, personal)
    resident.use(personal=True)
    both = _logits(resident, ids)
    resident.load(SHARED, {key: shared[key] * personal[key] for key in shared})
    resident.load(PERSONAL, None)
    assert torch.allclose(_logits(resident, ids), both, atol=1e-5)
    assert all(torch.equal(v, torch.ones_like(v)) for v in resident.state(PERSONAL).values())


def test_only_the_chosen_slot_is_trainable(resident):
    params = resident.trainable(PERSONAL)
    names = {n for n, p in resident.peft.named_parameters() if p.requires_grad}
    assert names and all(PERSONAL in n.split(".") for n in names)
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


def test_store_round_trip_loads_with_plain_peft(resident, tokenizer, tmp_path):
    store = PersonalAdapterStore(tmp_path)
    personal = _random_adapter(resident, PERSONAL, 5)
    record = store.save(
        "oppu",
        "u/1 odd id",
        personal,
        resident.specs.personal.peft_config(),
        shared_digest="abc",
        data_fingerprint="f",
    )
    loaded_record, loaded = store.load("oppu", "u/1 odd id")
    assert loaded_record == record and len(Path(record.path).parts) == 4  # adapters/oppu/<user>/<version>
    assert all(torch.equal(loaded[k], personal[k]) for k in personal)
    # The stored directory is an ordinary peft adapter, loaded onto another copy of the base model
    # (on the resident's own model, peft would add it beside the slots, which stay the active ones).
    ids = torch.randint(0, 1000, (1, 6))
    peft_model = PeftModel.from_pretrained(tiny_llama(tokenizer), tmp_path / record.path)
    assert set(get_peft_model_state_dict(peft_model)) == set(personal)  # the same modules and layers
    base = _logits(resident, ids)
    resident.load(PERSONAL, personal)
    resident.use(personal=True)
    resident.load(SHARED, None)
    with torch.no_grad():
        plain = peft_model(ids).logits
    assert torch.allclose(plain, _logits(resident, ids), atol=1e-5) and not torch.allclose(plain, base)


def test_answers_are_the_same_after_saving_and_loading_both_adapters(resident, tokenizer, tmp_path):
    """The shared adapter through the server's checkpoints and the personal one through the node's
    store, loaded into a new resident model (a new process's) on another copy of the base model."""
    shared, personal = _random_adapter(resident, SHARED, 1), _random_adapter(resident, PERSONAL, 2)
    prompts = [[f"user {u} asks about film {q}:" for q in range(2)] for u in range(2)]
    options = {"max_new_tokens": 5, "max_prompt_tokens": 32}
    resident.load(SHARED, shared)
    before = answer_users(resident, prompts, [personal, None], **options)
    config = resident.specs.personal.peft_config()
    CheckpointStore(tmp_path / "run").save(1, shared, config)
    store = PersonalAdapterStore(tmp_path / "node")
    store.save("oppu", "u0", personal, config, shared_digest=state_digest(shared), data_fingerprint="f")

    restarted = ResidentModel(tiny_llama(tokenizer), tokenizer, resident.specs)
    assert answer_users(restarted, prompts, [None, None], **options) != before  # the adapters matter
    _, saved_shared, _ = CheckpointStore(tmp_path / "run").latest()
    restarted.load(SHARED, saved_shared)
    assert answer_users(restarted, prompts, [store.load("oppu", "u0")[1], None], **options) == before


def test_the_gate_decision_is_kept_in_the_manifest_and_the_users_export(resident, tmp_path):
    store = PersonalAdapterStore(tmp_path / "node")
    state = resident.fresh(PERSONAL, 1)
    config = resident.specs.personal.peft_config()
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
    config = resident.specs.personal.peft_config()
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
    from_config = fresh_adapter_from_config(str(tiny_model_dir), resident.specs.shared, seed=7)
    expected = resident.fresh(SHARED, seed=7)
    assert list(from_config) == list(expected)
    assert all(torch.equal(from_config[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="dora adapter needs the base weights"):
        fresh_adapter_from_config(str(tiny_model_dir), AdapterSpec(peft_type="dora"), seed=7)


def test_ia3_scales_the_input_of_the_mlps_down_projection_and_the_output_of_the_others(tiny_model_dir):
    """IA3 from the run config on the top layer only: a vector per target (all ones, the identity), of
    the down projection's input width, and of every other target's output width."""
    config = load_run_config(overrides=[f'model="{tiny_model_dir}"', "peft-type=ia3", "adapter-layers=1"])
    spec = AdapterSpecs.from_config(config).shared
    assert spec.feedforward_modules == ("down_proj",)
    initial = fresh_adapter_from_config(config.model, spec, 0)
    shapes = {key.split(".layers.")[1].removesuffix(".ia3_l"): tuple(v.shape) for key, v in initial.items()}
    attention = {"q_proj": (64, 1), "k_proj": (32, 1), "v_proj": (32, 1), "o_proj": (64, 1)}
    mlp = {"gate_proj": (128, 1), "up_proj": (128, 1), "down_proj": (1, 128)}
    assert shapes == {f"1.self_attn.{k}": v for k, v in attention.items()} | {
        f"1.mlp.{k}": v for k, v in mlp.items()
    }
    assert all(torch.equal(v, torch.ones_like(v)) for v in initial.values())


def test_the_default_config_gives_both_adapters_one_spec_as_before(tiny_model_dir):
    """Unset `shared-*` keys: the shared spec is the personal one, built as the single spec was, and
    the answer adapter is rank 2r at alpha 2 alpha (alpha / r unchanged)."""
    for peft_type in ("lora", "ia3"):
        overrides = [f'model="{tiny_model_dir}"', "adapter-layers=1", f"peft-type={peft_type}"]
        config = load_run_config(overrides=overrides)
        specs = AdapterSpecs.from_config(config)
        targets = tuple(config.target_module_list)
        single = AdapterSpec(
            peft_type,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            targets,
            (1,),
            ("down_proj",) if peft_type == "ia3" else (),
        )
        assert specs.shared == specs.personal == single
        assert specs.first_layer == 1 and specs.answer_shared_factor == 1.0
    answer = AdapterSpecs.both(AdapterSpec(r=8, alpha=8, layers=(1,))).answer_config()
    assert (answer.r, answer.lora_alpha, answer.layers_to_transform) == (16, 16, [1])
    assert set(answer.target_modules) == {"q_proj", "v_proj"}


# A small shared adapter (rank 2 on q and v of the top layer, alpha / r = 2) and a larger personal one
# (rank 4 on q, k, up and down of both layers, alpha / r = 1): they share q on layer 1 alone.
TWO_SPECS = AdapterSpecs(
    shared=AdapterSpec(r=2, alpha=4, target_modules=("q_proj", "v_proj"), layers=(1,)),
    personal=AdapterSpec(r=4, alpha=4, target_modules=("q_proj", "k_proj", "up_proj", "down_proj")),
)


def test_each_slot_follows_its_own_spec(tiny_model, tmp_path, tiny_model_dir):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, TWO_SPECS)
    assert lora_layout(resident.state(SHARED)) == {("1", "q_proj"): 2, ("1", "v_proj"): 2}
    personal_modules = ("q_proj", "k_proj", "up_proj", "down_proj")
    assert lora_layout(resident.state(PERSONAL)) == {
        (layer, m): 4 for layer in "01" for m in personal_modules
    }
    assert TWO_SPECS.first_layer == 0  # the personal adapter reaches layer 0: nothing below is frozen
    assert set(fresh_adapter_from_config(str(tiny_model_dir), TWO_SPECS.shared, seed=7)) == set(
        resident.state(SHARED)
    )
    personal = _random_adapter(resident, PERSONAL, 5)
    record = PersonalAdapterStore(tmp_path).save(
        "oppu", "u", personal, TWO_SPECS.personal.peft_config(), shared_digest="s", data_fingerprint="f"
    )
    stored = json.loads((tmp_path / record.path / "adapter_config.json").read_text())
    assert (stored["r"], stored["lora_alpha"], sorted(stored["target_modules"])) == (
        4,
        4,
        sorted(personal_modules),
    )
    assert resident.mismatch(SHARED, personal) is not None  # a personal adapter does not fit the shared slot


def test_mixed_batches_answer_as_each_user_does_with_two_specs(tiny_model):
    """The answer adapter (rank 2 + 4 on the union of modules and layers, each part at its own scale,
    the shared part weighted per user) gives each user's rows what the two slots give that user."""
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, TWO_SPECS)
    generator = torch.Generator().manual_seed(0)
    shared = random_adapter(resident, SHARED, 1, generator)
    resident.load(SHARED, shared)
    personals = [
        random_adapter(resident, PERSONAL, 10, generator),
        None,
        random_adapter(resident, PERSONAL, 11, generator),
    ]
    weights = [1.0, 0.5, 0.25]
    names = resident.answer_slots(personals, weights)
    ids = torch.randint(0, 1000, (len(names), 9), generator=generator)
    with torch.no_grad():
        mixed = resident.peft(ids, adapter_names=names).logits
    prompts = [[f"user {u} asks question {q} about films:" for q in range(2)] for u in range(3)]
    options = {"max_new_tokens": 6, "max_prompt_tokens": 64}
    answers = answer_users(resident, prompts, personals, shared_weights=weights, users_per_batch=3, **options)
    for row, (state, weight) in enumerate(zip(personals, weights, strict=True)):
        resident.load(SHARED, weighted(shared, weight))
        resident.load(PERSONAL, state)
        resident.use(personal=True)
        assert torch.allclose(mixed[row], _logits(resident, ids[row : row + 1])[0], atol=1e-5), row
        assert answers[row] == [generate_answers(resident, [p], **options)[0] for p in prompts[row]]
    resident.load(SHARED, shared)
    resident.load(PERSONAL, None)
    resident.use(personal=False)
    assert not torch.allclose(mixed[0], _logits(resident, ids[:1])[0], atol=1e-3)  # the personal part counts


def test_the_report_counts_the_gates_choices_from_every_nodes_manifest(tiny_model, tmp_path):
    """A simulation holds every node's disk: how many users kept the shared adapter, at which weight,
    and with a personal adapter; OPPU's original (gate "none") and unasked methods are not counted."""
    resident = ResidentModel(*tiny_model, AdapterSpec())
    state, config = resident.fresh(PERSONAL, 1), resident.specs.personal.peft_config()
    choices = {
        "partition-0": [("a", GateDecision("mix:x", 1.0)), ("b", GateDecision("mix:x", 0.0))],
        "partition-1": [
            ("c", GateDecision("mix:x", 0.5, uses_personal=False)),
            ("d", GateDecision("mix:x", uses_personal=False, reason="short-history")),
        ],
    }
    for node, users in choices.items():
        store = PersonalAdapterStore(tmp_path / node)
        for user, gate in users:
            store.save("oppu", user, state, config, shared_digest="s", data_fingerprint=user, gate=gate)
        store.save("local", "z", state, config, shared_digest="none", data_fingerprint="z")
        store.save("oppu-rag", "z", state, config, shared_digest="s", data_fingerprint="z", gate=gate)
    summary = gate_decisions(tmp_path, ["oppu", "local"])
    assert summary == {
        "oppu": {
            "setting": "mix:x",
            "users": 4,
            "personal": 2,
            "short_history": 1,
            "shared_weight": {"0": 1, "0.5": 1, "1": 2},
        }
    }
    assert gate_line("oppu", summary["oppu"]) == (
        "oppu's gate (mix): of 4 users, 3 kept the shared adapter (weight 1: 2, weight 0.5: 1), "
        "1 dropped it; 2 kept a personal adapter; 1 too short to hold any out"
    )
