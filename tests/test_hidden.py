"""Adapters on the top layers: the frozen layers below run once per example, and that changes nothing
but the time (fp32: the same loss and gradients as the whole model), in memory and across processes."""

import os

import pytest
import torch
from conftest import random_adapter, tiny_llama

from client.hidden import HiddenStates, HiddenStore, persisted
from client.resident import SHARED, ResidentModel
from client.training import collate, encode_example, shared_prefix_len, target_loss, train_slot
from common.adapters import AdapterSpec, adapted_layers, clone_state

INSTRUCTION = "Which tag does this movie relate to among the following tags? tags: [a, b, c] description:"


def _top_layer_resident(tiny_model) -> ResidentModel:
    model, tokenizer = tiny_model
    spec = AdapterSpec(target_modules=("q_proj", "v_proj", "up_proj"), layers=(1,))
    resident = ResidentModel(model, tokenizer, spec)
    generator = torch.Generator().manual_seed(3)
    resident.load(
        SHARED,
        {
            k: torch.randn(v.shape, generator=generator) * 0.1 if "lora_B" in k else v
            for k, v in resident.fresh(SHARED, 0).items()
        },
    )
    return resident


def _examples(tokenizer, texts=("a heist", "two lovers in a long story", "space")):
    return [encode_example(tokenizer, f"{INSTRUCTION} {text}", " drama", 96) for text in texts]


def test_adapters_sit_on_the_top_layers_only(tiny_model, tiny_model_dir):
    resident = _top_layer_resident(tiny_model)
    assert resident.specs.first_layer == 1
    assert all(".layers.1." in key for key in resident.state(SHARED))
    assert adapted_layers(str(tiny_model_dir), 1) == (1,)
    assert adapted_layers(str(tiny_model_dir), "all") == ()
    assert adapted_layers(str(tiny_model_dir), 2) == adapted_layers(str(tiny_model_dir), 8) == ()  # all 2


def test_cached_states_give_the_whole_models_loss_and_gradients(tiny_model):
    resident = _top_layer_resident(tiny_model)
    examples = _examples(resident.tokenizer)
    ids, attention, mask = collate(examples, resident.tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    labels[:, 1:][mask[:, :-1]] = ids[:, 1:][mask[:, :-1]]
    params = resident.trainable(SHARED)
    whole = resident.peft(input_ids=ids, attention_mask=attention, labels=labels).loss
    whole_grads = torch.autograd.grad(whole, params)
    prefix = shared_prefix_len(examples)
    assert prefix > 0
    kept = HiddenStates(resident, limit_bytes=2**30)
    # States computed whole, computed with the shared prefix run once, and found in memory.
    for prefix_len, hidden in ((0, HiddenStates(resident, 2**30)), (prefix, kept), (prefix, kept)):
        inputs = hidden.inputs(resident, examples, ids, attention, bf16=False, prefix_len=prefix_len)
        loss = target_loss(resident, ids, attention, mask, prefix_len, inputs)
        grads = torch.autograd.grad(loss, params)
        assert torch.allclose(loss, whole, atol=1e-6, rtol=0)
        for ours, reference in zip(grads, whole_grads, strict=True):
            assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-5)
    assert len(kept) == len(examples)
    assert any(g.abs().max() > 1e-3 for g in whole_grads)  # the comparison is not between zero gradients


def test_training_on_kept_states_equals_training_on_fresh_ones(tiny_model):
    resident = _top_layer_resident(tiny_model)
    start = clone_state(resident.state(SHARED))
    examples = _examples(resident.tokenizer, [f"film number {i}" + " long" * i for i in range(6)])
    options = {"steps": 3, "batch_size": 4, "learning_rate": 0.01}
    kept = HiddenStates(resident, limit_bytes=2**30)
    results = {}
    for name, hidden in (("fresh", None), ("kept", kept), ("kept again", kept)):
        resident.load(SHARED, start)
        for seed in (0, 1):  # two rounds
            train_slot(resident, SHARED, examples, seed=seed, hidden=hidden, **options)
        results[name] = clone_state(resident.state(SHARED))
    for name in ("kept", "kept again"):
        assert all(torch.allclose(results[name][k], results["fresh"][k], atol=1e-6) for k in start)
    assert not all(torch.equal(results["fresh"][k], start[k]) for k in start)


def test_states_reach_a_new_process_through_the_nodes_disk(tiny_model, tmp_path, monkeypatch):
    resident = _top_layer_resident(tiny_model)
    per_user = {
        "u1": _examples(resident.tokenizer, ["a heist", "a long heist"]),
        "u2": _examples(resident.tokenizer, ["space", "deep space", "outer space"]),
    }
    examples = [e for user_examples in per_user.values() for e in user_examples]
    store = HiddenStore(tmp_path)
    first = HiddenStates(resident, limit_bytes=2**30)
    with persisted(first, store, per_user, bf16=False):
        train_slot(
            resident, SHARED, examples, steps=2, batch_size=5, learning_rate=0.01, seed=0, hidden=first
        )
    variant = first.variant(bf16=False)
    assert {len(store.read(user, variant)) for user in per_user} == {2, 3}

    fresh = HiddenStates(resident, limit_bytes=2**30)  # what a new ClientApp process starts with

    def computed(*args, **kwargs):
        raise AssertionError("recomputed states the node's disk holds")

    monkeypatch.setattr(fresh, "_compute", computed)
    with persisted(fresh, store, per_user, bf16=False):
        train_slot(
            resident, SHARED, examples, steps=2, batch_size=5, learning_rate=0.01, seed=1, hidden=fresh
        )
    assert len(fresh) == len(examples)
    for user, damage in (("u1", "truncate"), ("u2", "flip")):  # a damaged file is dropped, then recomputed
        path = store.user_dir(user) / f"{variant}.safetensors"
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[:-20]
        else:
            data[-7] ^= 0x01
        path.write_bytes(bytes(data))
        assert store.read(user, variant) == {} and not path.exists()
    assert HiddenStates(resident, limit_bytes=2**30).variant(bf16=False) == variant  # same model, same files


def test_memory_and_disk_are_bounded_by_size(tiny_model, tmp_path):
    resident = _top_layer_resident(tiny_model)
    examples = _examples(resident.tokenizer, ["one", "two", "three", "four"])
    ids, attention, _ = collate(examples, resident.tokenizer.pad_token_id)
    one = len(examples[0].input_ids) * resident.peft.base_model.model.config.hidden_size * 4
    hidden = HiddenStates(resident, limit_bytes=2 * one)
    hidden.inputs(resident, examples, ids, attention, bf16=False)
    assert len(hidden) == 2  # the two most recent of four
    store = HiddenStore(tmp_path)
    state = {"k": torch.zeros(1000)}
    for age, user in enumerate(("old", "middle", "new")):
        store.write(user, "v", state, limit_bytes=2**20)
        os.utime(store.user_dir(user) / "v.safetensors", (1000 + age, 1000 + age))
    size = (store.user_dir("new") / "v.safetensors").stat().st_size
    store.write("newest", "v", state, limit_bytes=2 * size)
    assert [bool(store.read(u, "v")) for u in ("old", "middle", "new", "newest")] == [
        False,
        False,
        True,
        True,
    ]


def test_bf16_states_are_kept_apart_from_fp32_ones_and_give_the_bf16_loss(tiny_model):
    resident = _top_layer_resident(tiny_model)
    examples = _examples(resident.tokenizer)
    ids, attention, mask = collate(examples, resident.tokenizer.pad_token_id)
    hidden = HiddenStates(resident, limit_bytes=2**30)
    fp32 = hidden.inputs(resident, examples, ids, attention, bf16=False)
    bf16 = hidden.inputs(resident, examples, ids, attention, bf16=True)
    assert len(hidden) == 2 * len(examples) and hidden.variant(True) != hidden.variant(False)
    assert fp32.dtype == bf16.dtype == torch.float32  # the residual stream stays fp32 under autocast
    assert torch.allclose(fp32, bf16, atol=0.05) and not torch.equal(fp32, bf16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        whole = target_loss(resident, ids, attention, mask)
        cached = target_loss(resident, ids, attention, mask, inputs=bf16)
    assert torch.allclose(cached, whole, atol=1e-5, rtol=0)


def test_a_stored_adapter_on_other_layers_is_retrained_from_scratch(
    tiny_model_dir, tmp_path, flower_identity
):
    """A node keeps users' adapters across runs; one from a run with other adapter-layers cannot be
    continued by a run with adapters on the top layer, so the user starts from a fresh adapter."""
    from flwr.app import Context, RecordDict

    from client import client_app
    from client.store import PersonalAdapterStore
    from common import protocol
    from common.config import load_run_config

    overrides = [
        f'model="{tiny_model_dir}"',
        "adapter-layers=1",
        "benchmark-users=1",
        f'run-dir="{tmp_path}"',
    ]
    config = load_run_config(overrides=[*overrides, "benchmark-min-history=8", "benchmark-max-history=8"])
    context = Context(1, 1, {"partition-id": 0}, RecordDict(), config.to_flower())
    _, resident, node = client_app.setup(context)
    every_layer = ResidentModel(tiny_llama(resident.tokenizer), resident.tokenizer, AdapterSpec())
    store = PersonalAdapterStore(node.state_dir)
    user = node.contexts[0].user.user_id
    old = every_layer.fresh(SHARED, 0)
    store.save(
        "local",
        user,
        old,
        every_layer.specs.personal.peft_config(),
        shared_digest="old",
        data_fingerprint="x",
    )
    assert resident.mismatch("personal", old) is not None
    (message,) = protocol.requests(protocol.PERSONALIZE, [1], method="local")
    reply = client_app.personalize(message, context)
    assert reply.content[protocol.METRICS]["users-trained"] == 1
    assert set(store.load("local", user)[1]) == set(resident.state("personal"))
    assert list((node.state_dir / "hidden-states").glob("*/*.safetensors"))  # kept for the next message


@pytest.mark.parametrize("peft_type", ["lora", "ia3"])
def test_the_states_variant_names_the_base_weights_not_the_adapters(tiny_model, tokenizer, peft_type):
    """A new process finds a node's stored states only if their variant does not change with the
    adapters loaded (the shared adapter changes every round)."""
    model, _ = tiny_model
    spec = AdapterSpec(peft_type=peft_type, target_modules=("q_proj", "v_proj"), layers=(1,))
    resident = ResidentModel(model, tokenizer, spec)
    before = HiddenStates(resident, limit_bytes=2**20).variant(False)
    resident.load(SHARED, random_adapter(resident, SHARED, 0, torch.Generator().manual_seed(2)))
    assert HiddenStates(resident, limit_bytes=2**20).variant(False) == before
    other_base = ResidentModel(tiny_llama(tokenizer, seed=1), tokenizer, spec)
    assert HiddenStates(other_base, limit_bytes=2**20).variant(False) != before
