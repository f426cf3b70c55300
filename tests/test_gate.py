"""The per-user gate (client/gate.py): a held-out slice of each user's own history decides how far the
personal adapter is trained and whether (and with what weight on the shared adapter) it answers, on
the node alone."""

import random

import pytest
import torch
from conftest import random_adapter

from client.gate import MIN_HOLDOUT, gated_personal_adapter, holdout_split
from client.inference import answer_users, generate_answers
from client.resident import PERSONAL, SHARED, ResidentModel, weighted
from client.training import encode_example, evaluation_loss, train_slot
from common.adapters import AdapterSpec, clone_state
from common.config import load_run_config
from common.loaders import load_run_dataset

WORDS = ("apple", "river", "stone", "cloud", "forest", "tiger", "piano", "lemon", "candle", "rocket")
SPEC = AdapterSpec(target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))


@pytest.fixture(autouse=True)
def one_thread():
    """These tests train for dozens of steps: on a busy 2-core machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(WORDS)} {rng.choice(WORDS)}:" for _ in range(count)]


def _gate_config(*overrides: str):
    return load_run_config(overrides=["personal-holdout=0.25", "batch-size=4", *overrides])


def test_the_split_is_seeded_disjoint_and_never_touches_the_queries():
    config = load_run_config(overrides=["benchmark-users=4"])
    for user in load_run_dataset(config).users:
        split = holdout_split(len(user.history), 0.2, 0, user.user_id)
        assert split == holdout_split(len(user.history), 0.2, 0, user.user_id)
        assert not set(split.train) & set(split.holdout)
        assert sorted(split.train + split.holdout) == list(range(len(user.history)))
        assert len(split.holdout) == max(MIN_HOLDOUT, round(0.2 * len(user.history)))
        held = {user.history[i].id for i in split.holdout} | {user.history[i].input for i in split.holdout}
        assert not held & ({q.id for q in user.queries} | {q.input for q in user.queries})
    assert holdout_split(40, 0.2, 0, "u1") != holdout_split(40, 0.2, 1, "u1")  # the run's seed draws it
    assert holdout_split(40, 0.2, 0, "u1") != holdout_split(40, 0.2, 0, "u2")
    assert holdout_split(2 * MIN_HOLDOUT - 1, 0.2, 0, "u1") is None
    assert holdout_split(2 * MIN_HOLDOUT, 0.2, 0, "u1") is not None


def test_a_history_too_short_to_hold_out_is_answered_with_the_shared_adapter_alone(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, SPEC)
    examples = [encode_example(tokenizer, p, " yes", 32) for p in _prompts(2 * MIN_HOLDOUT - 1, 0)]
    state, _, decision = gated_personal_adapter(
        _gate_config("personal-gate=mix"),
        resident,
        examples,
        resident.fresh(SHARED, 0),
        resident.fresh(PERSONAL, 1),
        user_id="u",
        seed=1,
        autocast_bf16=False,
        hidden=None,
    )
    assert (decision.uses_personal, decision.shared_weight, decision.reason) == (False, 1.0, "short-history")
    assert all(not tensor.any() for key, tensor in state.items() if "lora_B" in key)


def test_early_stopping_keeps_the_state_with_the_lowest_held_out_loss(tiny_model):
    """Random labels: after the first epochs the adapter memorizes the training items and its loss on
    the held-out ones rises again; the kept state is the best one seen, not the last."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, SPEC)
    rng = random.Random(0)
    examples = [encode_example(tokenizer, p, rng.choice([" yes", " no"]), 32) for p in _prompts(16, 0)]
    config = _gate_config(
        "personal-gate=choice",
        "personal-gate-refit=false",
        "personal-epochs=20",
        "personal-learning-rate=0.1",
        "personal-gate-evals=10",
    )
    start = resident.fresh(PERSONAL, 1)
    options = {"user_id": "u", "seed": 1, "autocast_bf16": False, "hidden": None}
    state, _, decision = gated_personal_adapter(config, resident, examples, None, start, **options)
    assert decision.uses_personal and 0 < decision.epochs < config.personal_epochs
    split = holdout_split(len(examples), config.personal_holdout, config.seed, "u")
    holdout = [examples[i] for i in split.holdout]
    train = [examples[i] for i in split.train]
    resident.load(PERSONAL, state)
    resident.use(personal=True)
    assert evaluation_loss(resident, holdout, batch_size=4) == pytest.approx(decision.holdout_loss, abs=1e-5)
    resident.load(PERSONAL, start)  # the same training, to the end of the budget
    train_slot(resident, PERSONAL, train, steps=len(train) * 20 // 4, batch_size=4, learning_rate=0.1, seed=1)
    assert evaluation_loss(resident, holdout, batch_size=4) > decision.holdout_loss + 0.01
    # Refit: the same share of the budget again, on the whole history.
    refit, _, again = gated_personal_adapter(
        config.replace(personal_gate_refit=True), resident, examples, None, start, **options
    )
    assert again.epochs == decision.epochs and again.holdout_loss == pytest.approx(decision.holdout_loss)
    kept_steps = round(decision.epochs * len(train) / 4)
    resident.load(PERSONAL, start)
    train_slot(
        resident,
        PERSONAL,
        examples,
        steps=round(80 * kept_steps / 60),
        batch_size=4,
        learning_rate=0.1,
        seed=1,
    )
    assert all(torch.allclose(refit[k], resident.state(PERSONAL)[k]) for k in refit)


def test_a_personal_adapter_that_hurts_on_held_out_history_is_not_used(tiny_model):
    """The population (the shared adapter) answers " yes"; this user's training items say " no" but
    its held-out ones say " yes": its personal adapter only makes the held-out loss worse."""
    torch.manual_seed(0)
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, SPEC)
    split = holdout_split(12, 0.25, 0, "u")
    examples = [
        encode_example(tokenizer, p, " yes" if i in split.holdout else " no", 32)
        for i, p in enumerate(_prompts(12, 1))
    ]
    population = [encode_example(tokenizer, p, " yes", 32) for p in _prompts(12, 2)]
    resident.load(SHARED, resident.fresh(SHARED, 0))
    train_slot(resident, SHARED, population, steps=20, batch_size=4, learning_rate=0.1, seed=0)
    shared = clone_state(resident.state(SHARED))
    config = _gate_config("personal-gate=mix", "personal-epochs=4", "personal-learning-rate=0.3")
    state, _, decision = gated_personal_adapter(
        config,
        resident,
        examples,
        shared,
        resident.fresh(PERSONAL, 1),
        user_id="u",
        seed=1,
        autocast_bf16=False,
        hidden=None,
    )
    assert not decision.uses_personal and decision.shared_weight > 0 and decision.epochs == 0
    assert all(not tensor.any() for key, tensor in state.items() if "lora_B" in key)  # stored: the identity
    resident.load(SHARED, weighted(shared, decision.shared_weight))
    resident.use(personal=False)
    holdout = [examples[i] for i in split.holdout]
    assert evaluation_loss(resident, holdout, batch_size=4) == pytest.approx(decision.holdout_loss, abs=1e-5)


@pytest.mark.parametrize("layers", [(), (1,)], ids=["every-layer", "top-layer"])
def test_a_mixed_batch_with_a_weight_per_user_answers_like_each_user_alone(tiny_model, layers):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec(layers=layers))
    generator = torch.Generator().manual_seed(0)

    def adapter(slot, seed):
        return random_adapter(resident, slot, seed, generator)

    shared = adapter(SHARED, 1)
    resident.load(SHARED, shared)
    personals = [adapter(PERSONAL, 10), None, adapter(PERSONAL, 11), None, adapter(PERSONAL, 12)]
    weights = [1.0, 0.5, 0.0, 1.0, 0.5]
    prompts = [[f"user {u} asks question {q} about films:" for q in range(3)] for u in range(5)]
    options = {"max_new_tokens": 6, "max_prompt_tokens": 64}
    mixed = answer_users(
        resident, prompts, personals, shared_weights=weights, users_per_batch=3, batch_size=4, **options
    )
    alone = []
    for user_prompts, state, weight in zip(prompts, personals, weights, strict=True):
        resident.load(SHARED, weighted(shared, weight))
        resident.load(PERSONAL, state)
        resident.use(personal=True)
        alone.append([generate_answers(resident, [p], **options)[0] for p in user_prompts])
    assert mixed == alone
    assert alone[1] != alone[3]  # the same (no) personal adapter, another weight: other answers


def test_the_gate_stays_on_the_node_and_is_reused_by_a_rerun(tiny_model_dir, tmp_path, flower_identity):
    """Personalize and evaluate through the whole ClientApp (its guard included): the replies carry
    the keys they carried without the gate and none of its values; the decision is stored with each
    adapter, reused by a re-run with the same setting and retaken under another."""
    from flwr.app import Context, RecordDict

    from client import client_app
    from client.store import PersonalAdapterStore
    from common import protocol

    def run(gate: str) -> tuple[list, list]:
        overrides = [
            f'model="{tiny_model_dir}"',
            "adapter-layers=1",
            "benchmark-users=2",
            "users-per-client=2",
            "benchmark-min-history=8",
            "benchmark-max-history=10",
            "benchmark-queries=2",
            "batch-size=4",
            "personal-epochs=1",
            f"personal-gate={gate}",
            f'run-dir="{tmp_path}"',
        ]
        config = load_run_config(overrides=overrides)
        context = Context(1, 1, {"partition-id": 0}, RecordDict(), config.to_flower())
        _, resident, node = client_app.setup(context)
        shared = resident.fresh(SHARED, 7)
        replies = []
        for kind, extra in ((protocol.PERSONALIZE, {}), (protocol.EVALUATE, {protocol.USER_SCOPE: "s"})):
            (message,) = protocol.requests(kind, [1], method="oppu", shared=shared, config=extra)
            reply = client_app.app(message, context)
            assert not reply.has_error()
            replies.append(reply.content)
        store = PersonalAdapterStore(node.state_dir)
        return replies, [store.record("oppu", ctx.user.user_id) for ctx in node.contexts]

    plain, _ = run("none")
    gated, records = run("mix")
    for before, after in zip(plain, gated, strict=True):
        assert not after.array_records and not after.config_records
        assert set(after.metric_records) == set(before.metric_records)
        for name, record in after.metric_records.items():
            assert set(record) == set(before.metric_records[name])
    assert set(gated[0].metric_records[protocol.METRICS]) <= set(protocol.PERSONALIZE_METRICS)
    assert gated[0].metric_records[protocol.METRICS]["users-trained"] == 2
    sent = {v for content in gated for record in content.metric_records.values() for v in record.values()}
    for record in records:
        assert record.gate.setting == load_run_config(overrides=["personal-gate=mix"]).gate_setting
        assert record.gate.holdout_items >= MIN_HOLDOUT and record.gate.holdout_loss not in sent
    again, records_again = run("mix")
    assert again[0].metric_records[protocol.METRICS]["users-reused"] == 2
    assert [r.gate for r in records_again] == [r.gate for r in records]
