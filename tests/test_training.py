import math

import pytest
import torch
from conftest import random_adapter

from client.inference import answer_users, generate_answers
from client.resident import PERSONAL, SHARED, ResidentModel
from client.training import (
    MIN_SHARED_PREFIX,
    bucketed_batches,
    collate,
    encode_example,
    shared_prefix_len,
    target_loss,
    train_slot,
    training_attention,
)
from common.adapters import AdapterSpec


def test_encode_keeps_the_target_and_cuts_the_oldest_prompt_tokens(tokenizer):
    example = encode_example(tokenizer, "word " * 50, " comedy", max_len=16)
    target = tokenizer(" comedy", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(example.input_ids) == 16
    assert list(example.input_ids[example.prompt_len :]) == target


def test_target_only_loss_equals_the_full_masked_loss(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec())
    examples = [
        encode_example(tokenizer, p, t, 64)
        for p, t in [("a short prompt:", " yes"), ("longer prompt here is:", " no way")]
    ]
    ids, attention, mask = collate(examples, tokenizer.pad_token_id)
    labels = torch.full_like(ids, -100)
    labels[:, 1:][mask[:, :-1]] = ids[:, 1:][mask[:, :-1]]
    with torch.no_grad():
        full = resident.peft(input_ids=ids, attention_mask=attention, labels=labels).loss
        ours = target_loss(resident, ids, attention, mask)
    assert torch.allclose(full, ours, atol=1e-5)


def test_a_shared_prompt_prefix_run_once_gives_the_same_loss_and_gradients(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec(target_modules=("q_proj", "v_proj", "up_proj")))
    resident.load(SHARED, _with_random_b(resident.fresh(SHARED, 0)))
    instruction = "Which tag does this movie relate to among the following tags? tags: [a, b, c] description:"
    examples = [
        encode_example(tokenizer, f"{instruction} {text}", target, 96)
        for text, target in [
            ("a heist", " crime"),
            ("two lovers in a long story", " romance"),
            ("space", " sci"),
        ]
    ]
    prefix = shared_prefix_len(examples)
    assert MIN_SHARED_PREFIX <= prefix < min(e.prompt_len for e in examples)
    assert list(examples[0].input_ids[:prefix]) == tokenizer(instruction)["input_ids"][:prefix]
    ids, attention, mask = collate(examples, tokenizer.pad_token_id)
    params = resident.trainable(SHARED)
    results = []
    for prefix_len in (0, prefix):
        loss = target_loss(resident, ids, attention, mask, prefix_len)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    resident.peft.requires_grad_(False)
    (loss, grads), (shared_loss, shared_grads) = results
    assert torch.allclose(loss, shared_loss, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, shared_grads, strict=True))
    assert any(g.abs().max() > 1e-3 for g in grads)  # the comparison is not between zero gradients


def test_no_prefix_is_shared_when_it_is_short_or_would_reach_a_target(tokenizer):
    alike = [encode_example(tokenizer, "same words " * 20, t, 96) for t in (" x", " y")]
    assert shared_prefix_len(alike) == alike[0].prompt_len - 1  # stops before the first target
    assert shared_prefix_len(alike[:1]) == 0  # one row: nothing to share
    short = [encode_example(tokenizer, f"tag {i}: words " * 5, " x", 96) for i in range(2)]
    assert shared_prefix_len(short) == 0


def test_short_bf16_batches_train_with_eager_attention_and_long_or_fp32_ones_keep_sdpa(tiny_model):
    model, _ = tiny_model
    model.set_attn_implementation("sdpa")
    with training_attention(model, rows=8, width=128, layers=2, bf16=True):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
    with training_attention(model, rows=8, width=2048, layers=2, bf16=True):  # 8 x 4 x 2048^2 x 2: over
        assert model.config._attn_implementation == "sdpa"
    with training_attention(model, rows=8, width=1100, layers=2, bf16=True):  # 8 x 4 x 1100^2 x 2: over
        assert model.config._attn_implementation == "sdpa"
    with training_attention(model, rows=8, width=1100, layers=1, bf16=True):  # the top layer alone: fits
        assert model.config._attn_implementation == "eager"
    with training_attention(model, rows=8, width=128, layers=2, bf16=False):
        assert model.config._attn_implementation == "sdpa"


def test_bucketed_batches_cover_every_example_each_epoch():
    lengths = [5, 50, 7, 48, 6, 49, 8, 51]
    batches = list(bucketed_batches(lengths, batch_size=2, steps=8, seed=0))
    assert len(batches) == 8
    flat = [i for b in batches[:4] for i in b]
    assert sorted(flat) == list(range(8))
    assert max(abs(lengths[a] - lengths[b]) for a, b in batches[:4]) < 5  # grouped by length


def test_training_lowers_the_loss_and_touches_only_its_slot(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(
        model, tokenizer, AdapterSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    )
    shared_before = {k: v.clone() for k, v in resident.state(SHARED).items()}
    examples = [encode_example(tokenizer, f"item {i} tag:", " comedy", 32) for i in range(8)]
    resident.load(PERSONAL, resident.fresh(PERSONAL, 0))
    resident.use(personal=True)
    first = train_slot(resident, PERSONAL, examples, steps=1, batch_size=4, learning_rate=0.0, seed=0)
    result = train_slot(resident, PERSONAL, examples, steps=60, batch_size=4, learning_rate=0.05, seed=0)
    assert result.steps == 60 and result.examples == 240 and math.isfinite(result.loss)
    last = train_slot(resident, PERSONAL, examples, steps=1, batch_size=4, learning_rate=0.0, seed=0)
    assert last.loss < first.loss - 0.4  # a random 2-layer model learns slowly, but it must learn
    assert all(torch.equal(shared_before[k], v) for k, v in resident.state(SHARED).items())
    answers = generate_answers(
        resident, ["item 3 tag:", "item 99 tag: x y"], max_new_tokens=3, max_prompt_tokens=32
    )
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_fedprox_term_keeps_weights_closer_to_the_start(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec())
    examples = [encode_example(tokenizer, f"q{i}:", " answer", 32) for i in range(4)]
    start = resident.fresh(SHARED, 0)

    def drift(mu):
        resident.load(SHARED, start)
        train_slot(
            resident, SHARED, examples, steps=15, batch_size=2, learning_rate=0.02, seed=1, proximal_mu=mu
        )
        return sum(((resident.state(SHARED)[k] - start[k]) ** 2).sum() for k in start)

    assert drift(50.0) < drift(0.0)


def test_sgd_steps_follow_the_gradient_where_a_fresh_adamw_moves_every_weight_alike(tiny_model):
    """Why `shared-optimizer = sgd` exists: under DP a client's update is clipped to a norm, and AdamW's
    first step (lr * g / |g| per weight) spends that norm on every weight equally, signal or not."""
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec())
    examples = [encode_example(tokenizer, "prompt " * (i + 1), " target" * (1 + i % 3), 64) for i in range(6)]
    start = _with_random_b(resident.fresh(SHARED, 0))

    def update(optimizer, lr):
        resident.load(SHARED, start)
        train_slot(
            resident, SHARED, examples, steps=1, batch_size=6, learning_rate=lr, seed=0, optimizer=optimizer
        )
        return torch.cat([(resident.state(SHARED)[k] - start[k]).flatten() for k in start])

    sgd, half = update("sgd", 1.0), update("sgd", 0.5)
    assert torch.allclose(half, 0.5 * sgd, atol=1e-6)  # linear in the gradient: -lr * g
    moved = sgd.abs()[sgd != 0]
    assert moved.max() > 100 * moved.median()  # the gradient's own spread of magnitudes
    adamw = update("adamw", 1e-3).abs()
    adamw = adamw[adamw != 0]
    assert adamw.numel() == moved.numel() and adamw.max() <= 1.001e-3
    assert (adamw > 0.95e-3).float().mean() > 0.9  # nearly every weight by lr (eps damps the tiniest)


def mixed_and_per_user_answers(resident: ResidentModel) -> tuple[list[list[str]], list[list[str]]]:
    """Four users' answers (three with random personal adapters, one without) in mixed batches, and
    the same answered one user and one query at a time."""
    generator = torch.Generator().manual_seed(0)

    def adapter(slot, seed):
        return random_adapter(resident, slot, seed, generator)

    resident.load(SHARED, adapter(SHARED, 1))
    personals = [adapter(PERSONAL, 10 + i) for i in range(3)] + [None]
    prompts = [
        [f"user {u} asks question {q} about films:" + " and more" * (u + q) for q in range(3)]
        for u in range(4)
    ]
    options = {"max_new_tokens": 6, "max_prompt_tokens": 64}
    mixed = answer_users(resident, prompts, personals, users_per_batch=3, batch_size=5, **options)
    one_by_one = []
    for user_prompts, state in zip(prompts, personals, strict=True):
        resident.load(PERSONAL, state)
        resident.use(personal=True)
        one_by_one.append([generate_answers(resident, [p], **options)[0] for p in user_prompts])
    return mixed, one_by_one


@pytest.mark.parametrize("layers", [(), (1,)], ids=["every-layer", "top-layer"])
def test_mixed_adapter_batches_answer_exactly_like_one_user_at_a_time(tiny_model, layers):
    model, tokenizer = tiny_model
    mixed, one_by_one = mixed_and_per_user_answers(
        ResidentModel(model, tokenizer, AdapterSpec(layers=layers))
    )
    assert mixed == one_by_one
    assert len({tuple(a) for a in mixed}) > 1  # the users' adapters really differ


def test_gradient_accumulation_matches_the_full_batch(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec())
    examples = [encode_example(tokenizer, "prompt " * (i + 1), " target" * (1 + i % 3), 64) for i in range(6)]
    start = _with_random_b(resident.fresh(SHARED, 0))
    results = []
    for micro in (0, 1, 4):
        resident.load(SHARED, start)
        run = train_slot(
            resident,
            SHARED,
            examples,
            steps=2,
            batch_size=6,
            learning_rate=0.01,
            seed=0,
            micro_batch_size=micro,
        )
        results.append((run.loss, resident.state(SHARED)))
    for loss, state in results[1:]:
        assert abs(loss - results[0][0]) < 1e-4
        assert all(torch.allclose(state[k], results[0][1][k], atol=1e-6) for k in state)


def test_bf16_autocast_loss_tracks_fp32(tiny_model):
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec())
    examples = [encode_example(tokenizer, f"question {i}:", " an answer", 32) for i in range(8)]
    start = resident.fresh(SHARED, 0)
    losses = []
    for autocast in (False, True):
        resident.load(SHARED, start)
        losses.append(
            train_slot(
                resident,
                SHARED,
                examples,
                steps=5,
                batch_size=4,
                learning_rate=0.01,
                seed=0,
                autocast_bf16=autocast,
            ).loss
        )
    assert abs(losses[0] - losses[1]) / losses[0] < 0.02


def test_bf16_autocast_gives_autocasts_bits_and_leaves_the_fp32_model_as_it_was(tiny_model):
    """The resident's autocast runs the frozen weights from bf16 copies (autocast would cast them on
    every call): the same logits and gradients as plain autocast, and the fp32 weights (the tied
    embedding among them) are back, untouched, afterwards."""
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec())
    resident.load(SHARED, _with_random_b(resident.fresh(SHARED, 0)))
    ids = torch.tensor([tokenizer("a question and its answer")["input_ids"]])
    before = {name: p.clone() for name, p in resident.peft.named_parameters()}

    def logits_and_grads(autocast) -> tuple[torch.Tensor, list[torch.Tensor]]:
        params = resident.trainable(SHARED)
        for p in params:
            p.grad = None
        with autocast:
            logits = resident.peft(input_ids=ids).logits
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in params]

    plain = logits_and_grads(torch.autocast("cpu", dtype=torch.bfloat16))
    with resident.autocast(True):  # nested: the outer one swaps and restores
        swapped = logits_and_grads(resident.autocast(True))
        assert resident.peft.base_model.model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(plain[0], swapped[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], swapped[1], strict=True))
    after = dict(resident.peft.named_parameters())
    assert set(after) == set(before) and all(after[n].dtype == torch.float32 for n in after)
    assert all(torch.equal(after[n], before[n]) for n in before if "lora_" not in n)
    embedding = resident.peft.base_model.model.model.embed_tokens.weight
    assert resident.peft.base_model.model.lm_head.weight is embedding  # tied again, as loaded


def _with_random_b(state):
    generator = torch.Generator().manual_seed(3)
    return {
        k: torch.randn(v.shape, generator=generator) * 0.1 if "lora_B" in k else v for k, v in state.items()
    }
