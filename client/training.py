"""Local training of one adapter slot: causal-LM loss on the target tokens only.

What keeps a step cheap on 2 CPU cores:
- with adapters on the top K layers only (`adapter-layers`), the frozen layers below run once per
  example and their output is reused (client/hidden.py): a step runs K layers, not all of them;
- logits only at positions that predict a target token (the 49k-row lm_head skips prompt tokens);
- batches bucketed by length (less padding);
- a prefix every example of a batch shares (LaMP prompts open with the task's instruction, about two
  thirds of a tagging example) runs once for the batch; every row reuses its keys and values, and
  autograd sums its gradient over the rows;
- under bf16 autocast on a CPU, eager attention for short batches, where SDPA's CPU backward is slower.

Batches are collated on the CPU and moved to the resident model's device for the step.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from client.hidden import HiddenStates, adapted_layers_forward, backbone_of
from client.resident import ResidentModel

# A shorter common prefix saves less than the extra pass through the layers costs.
MIN_SHARED_PREFIX = 16
# Under bf16 autocast eager attention trained 10-19% faster than SDPA's CPU kernels at batch widths
# 60-130 (8 rows, AVX512_BF16). In fp32 it measured 0.85-1.04x of SDPA's time there, and 0.97-1.08x
# with the AVX2 kernels a CPU without fast bf16 runs (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2):
# no gain to count on, so fp32 keeps SDPA. Eager keeps every layer's attention weights (rows x heads x
# width^2) for the backward pass: used only while they fit this budget.
EAGER_ATTENTION_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Example:
    """A tokenized training example: prompt tokens followed by target tokens (loss on the latter)."""

    input_ids: tuple[int, ...]
    prompt_len: int


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    examples: int
    tokens: int


def encode_example(tokenizer, prompt: str, target: str, max_len: int) -> Example:
    """Tokenize prompt + target + EOS; a long prompt loses its oldest tokens, never the target."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = [*tokenizer(target, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    target_ids = target_ids[: max_len - 1]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_len - len(target_ids))) :]
    return Example(tuple(prompt_ids + target_ids), len(prompt_ids))


def bucketed_batches(lengths: Sequence[int], batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """`steps` batches of indices over shuffled epochs; within windows of 8 batches of one epoch,
    examples of similar length are batched together."""
    rng = random.Random(seed)
    produced = 0
    window = batch_size * 8
    while True:
        epoch = list(range(len(lengths)))
        rng.shuffle(epoch)
        for start in range(0, len(epoch), window):
            chunk = sorted(epoch[start : start + window], key=lambda i: lengths[i])
            batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(batches)
            for batch in batches:
                if produced == steps:
                    return
                produced += 1
                yield batch


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of the positions whose next token is a target."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    predicts_target = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        predicts_target[row, example.prompt_len - 1 : n - 1] = True
    return ids, attention, predicts_target


def shared_prefix_len(examples: Sequence[Example]) -> int:
    """How many leading tokens every example of the batch has in common, ending before the first
    position that predicts a target; 0 when that is too short to be worth a pass of its own."""
    if len(examples) < 2:
        return 0
    limit = min(e.prompt_len for e in examples) - 1
    length = 0
    for column in zip(*(e.input_ids for e in examples), strict=False):
        if length == limit or any(token != column[0] for token in column):
            break
        length += 1
    return length if length >= MIN_SHARED_PREFIX else 0


def target_loss(
    resident: ResidentModel,
    ids: torch.Tensor,
    attention: torch.Tensor,
    mask: torch.Tensor,
    prefix_len: int = 0,
    inputs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy over the target tokens. With `prefix_len`, the first `prefix_len` tokens
    (the same in every row) are run once and their keys and values repeated for every row. With
    `inputs`, the hidden states entering the first adapted layer, only the adapted layers run."""
    causal_lm = resident.peft.base_model.model
    backbone = backbone_of(resident)
    if inputs is not None:
        top = adapted_layers_forward(resident, inputs, attention, prefix_len)
        hidden = backbone.norm(top[mask[:, prefix_len:]])
    else:
        cache = None
        if prefix_len:
            cache = backbone(input_ids=ids[:1, :prefix_len], use_cache=True).cache
            cache.batch_repeat_interleave(ids.shape[0])
        hidden = backbone(
            input_ids=ids[:, prefix_len:], attention_mask=attention, cache=cache, use_cache=cache is not None
        ).last_hidden_state[mask[:, prefix_len:]]
    logits = causal_lm.get_output_embeddings()(hidden)
    targets = ids[:, 1:][mask[:, :-1]]
    return F.cross_entropy(logits.float(), targets)


def _prefix_and_inputs(
    resident: ResidentModel,
    batch: Sequence[Example],
    ids: torch.Tensor,
    attention: torch.Tensor,
    bf16: bool,
    hidden: HiddenStates | None,
) -> tuple[int, torch.Tensor | None]:
    """The batch's shared prefix length and, with adapters on the top layers, the states entering them."""
    prefix_len = shared_prefix_len(batch)
    if hidden is None:
        return prefix_len, None
    return prefix_len, hidden.inputs(resident, batch, ids, attention, bf16, prefix_len)


@contextlib.contextmanager
def training_attention(model, rows: int, width: int, layers: int, bf16: bool) -> Iterator[None]:
    """Under bf16 autocast on a CPU, switch an SDPA model to eager attention for one step when the
    attention weights of the `layers` it runs fit the budget (a GPU keeps SDPA's fused kernels)."""
    config = model.config
    weights = rows * config.num_attention_heads * width**2 * layers * 8  # fp32 + copies
    on_cpu = model.device.type == "cpu"
    if not (bf16 and on_cpu) or config._attn_implementation != "sdpa" or weights > EAGER_ATTENTION_BYTES:
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def _accumulate(
    resident: ResidentModel,
    batch: Sequence[Example],
    micro_batch_size: int,
    autocast_bf16: bool,
    hidden: HiddenStates | None,
) -> tuple[float, int]:
    """Backward over micro-batches; each one's loss is weighted by its share of the batch's target
    tokens, so the gradient equals that of the whole batch. Returns (mean loss, tokens)."""
    size = micro_batch_size or len(batch)
    micro = [batch[i : i + size] for i in range(0, len(batch), size)]
    targets = [sum(len(e.input_ids) - e.prompt_len for e in m) for m in micro]
    model = resident.peft.base_model.model
    layers = model.config.num_hidden_layers - resident.specs.first_layer
    total_loss, tokens = 0.0, 0
    for part, weight in zip(micro, targets, strict=True):
        ids, attention, mask = (t.to(resident.device) for t in collate(part, resident.tokenizer.pad_token_id))
        prefix_len, inputs = _prefix_and_inputs(resident, part, ids, attention, autocast_bf16, hidden)
        with resident.autocast(autocast_bf16), training_attention(model, *ids.shape, layers, autocast_bf16):
            loss = target_loss(resident, ids, attention, mask, prefix_len, inputs)
            loss = loss * (weight / sum(targets))
        loss.backward()
        total_loss += loss.item()
        tokens += int(attention.sum())
    return total_loss, tokens


def train_slot(
    resident: ResidentModel,
    slot: str,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    micro_batch_size: int = 0,
    autocast_bf16: bool = False,
    proximal_mu: float = 0.0,
    hidden: HiddenStates | None = None,
    on_step: Callable[[int, float], bool | None] | None = None,
    frozen: tuple[str, ...] = (),
    optimizer: str = "adamw",
) -> TrainResult:
    """Train one slot with AdamW (or plain SGD: `optimizer = "sgd"`) for `steps` batches; FedProx adds
    mu/2 * ||w - w_start||^2. Parameters whose names contain one of `frozen` keep their values
    (FFA-LoRA's "lora_A").
    `on_step(step, loss)` runs after each step; when it returns True, training stops there.

    With adapters on the top layers only, `hidden` keeps the states below them across calls (a
    node's cache); without it they are kept for this call's steps alone."""
    if not examples or steps < 1:
        return TrainResult(math.nan, 0, 0, 0)
    if hidden is None and resident.specs.first_layer:
        hidden = HiddenStates(resident, limit_bytes=2**62)
    params = resident.trainable(slot, frozen)
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    step_rule = (
        torch.optim.SGD(params, lr=learning_rate)
        if optimizer == "sgd"
        else torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    )
    resident.peft.train()
    losses, seen, tokens = [], 0, 0
    try:
        for step, batch in enumerate(
            bucketed_batches([len(e.input_ids) for e in examples], batch_size, steps, seed)
        ):
            step_rule.zero_grad(set_to_none=True)
            loss, batch_tokens = _accumulate(
                resident, [examples[i] for i in batch], micro_batch_size, autocast_bf16, hidden
            )
            if anchor:
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                (proximal_mu / 2 * proximal).backward()
            step_rule.step()
            losses.append(loss)
            seen += len(batch)
            tokens += batch_tokens
            if on_step is not None and on_step(step + 1, losses[-1]):
                break
    finally:
        resident.peft.eval()
        resident.peft.requires_grad_(False)
    return TrainResult(sum(losses) / len(losses), len(losses), seen, tokens)


@torch.no_grad()
def evaluation_loss(
    resident: ResidentModel,
    examples: Sequence[Example],
    *,
    batch_size: int,
    autocast_bf16: bool = False,
    hidden: HiddenStates | None = None,
) -> float:
    """Mean cross-entropy over the target tokens of `examples` with the adapters as they are active,
    no gradient; batches of similar length, and the states below the adapters from `hidden`."""
    if not examples:
        return math.nan
    was_training = resident.peft.training
    resident.peft.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, targets = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            ids, attention, mask = collate(batch, resident.tokenizer.pad_token_id)
            prefix_len, inputs = _prefix_and_inputs(resident, batch, ids, attention, autocast_bf16, hidden)
            with resident.autocast(autocast_bf16):
                loss = target_loss(resident, ids, attention, mask, prefix_len, inputs)
            count = int(mask.sum())
            total += loss.item() * count
            targets += count
    finally:
        resident.peft.train(was_training)
    return total / targets
