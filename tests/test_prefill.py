"""The query prompts' prefill below the adapters, recorded once and replayed: the same scores as
running every layer, with the frozen layers skipped over the prompt, and bounded in size."""

import torch
from conftest import random_adapter

from client.inference import answer_users, generate_answers
from client.prefill import PromptPrefills
from client.resident import PERSONAL, SHARED, ResidentModel
from common.adapters import AdapterSpec

PROMPTS = [
    "Which tag does this movie relate to? description: a heist that goes wrong",
    "Which tag does this movie relate to? description: space",
    "Which tag does this movie relate to? description: two lovers and a very long story about them",
]


def _resident(tiny_model) -> ResidentModel:
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec(target_modules=("q_proj", "v_proj"), layers=(1,)))
    resident.load(SHARED, random_adapter(resident, SHARED, 0, torch.Generator().manual_seed(1)))
    return resident


def _scores(resident, prefills: PromptPrefills) -> torch.Tensor:
    """Greedy generation's per-step logits over the left-padded prompts (as generate_answers pads)."""
    batch = resident.tokenizer(PROMPTS, add_special_tokens=False, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the prompts are padded: replay must right-align them
    with prefills.around_generate(resident, batch["input_ids"], batch["attention_mask"], False):
        out = resident.peft.generate(
            **batch,
            max_new_tokens=4,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=resident.tokenizer.pad_token_id,
        )
    return torch.stack(out.scores)


def _tokens_seen_by_layer_0(resident, run) -> list[int]:
    seen = []
    mlp = resident.peft.base_model.model.model.layers[0].mlp  # runs only when the layer computes
    handle = mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_replayed_prefill_gives_every_layers_scores_without_running_the_frozen_layers(tiny_model):
    resident = _resident(tiny_model)
    plain = PromptPrefills(resident, limit_bytes=2**30)
    recorded_calls = _tokens_seen_by_layer_0(resident, lambda: _scores(resident, plain))
    assert len(plain) == len(PROMPTS)
    assert recorded_calls[0] > 1  # recording runs the frozen layer over the prompts
    reference = _scores(resident, PromptPrefills(resident, limit_bytes=0))  # records nothing: every layer
    replayed = []
    replay_calls = _tokens_seen_by_layer_0(resident, lambda: replayed.append(_scores(resident, plain)))
    assert replay_calls == [1] * len(replay_calls)  # decoding only: the prompt's prefill was replayed
    assert torch.allclose(replayed[0], reference, atol=1e-5, rtol=1e-5)
    # A different adapter on top: the recorded prefill holds for it too (the frozen layers ignore it).
    resident.load(SHARED, random_adapter(resident, SHARED, 5, torch.Generator().manual_seed(9)))
    other = _scores(resident, PromptPrefills(resident, limit_bytes=0))
    assert not torch.allclose(other, reference, atol=1e-3)
    assert torch.allclose(_scores(resident, plain), other, atol=1e-5, rtol=1e-5)


def test_mixed_adapter_answers_are_the_same_with_replayed_prefill(tiny_model):
    resident = _resident(tiny_model)
    generator = torch.Generator().manual_seed(4)
    personal = [random_adapter(resident, PERSONAL, seed, generator) for seed in (1, 2)]
    prompts = [PROMPTS[:2], PROMPTS[1:]]
    options = {"max_new_tokens": 6, "max_prompt_tokens": 64, "batch_size": 2}
    without = answer_users(resident, prompts, personal, **options)
    prefills = PromptPrefills(resident, limit_bytes=2**30)
    for _ in range(2):  # records, then replays (batches of 2 across the users: new compositions)
        assert answer_users(resident, prompts, personal, prefills=prefills, **options) == without
    assert len(prefills) == len(PROMPTS)


def test_prompts_beyond_the_bound_are_not_recorded_and_the_first_ones_stay(tiny_model):
    resident = _resident(tiny_model)
    one = PromptPrefills(resident, limit_bytes=2**30)
    generate_answers(resident, PROMPTS[:1], max_new_tokens=2, max_prompt_tokens=64, prefills=one)
    size = one.nbytes
    assert size > 0
    bounded = PromptPrefills(resident, limit_bytes=size + size // 2)  # room for the first prompt only
    answers = generate_answers(resident, PROMPTS, max_new_tokens=2, max_prompt_tokens=64, prefills=bounded)
    assert len(bounded) == 1 and bounded.nbytes <= bounded.limit_bytes
    assert answers == generate_answers(resident, PROMPTS, max_new_tokens=2, max_prompt_tokens=64)
