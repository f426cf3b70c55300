"""One resident base model with two adapter slots: the shared base adapter and a personal one.

PEFT slows down as adapters accumulate (add_adapter/load_adapter grow from ~60 ms to ~700 ms after
90 adapters), so users are swapped by copying weights into the same two slots instead of loading
one adapter per user. Both slots are active together: output = base + shared delta + personal delta.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from common.config import RunConfig
from common.model import model_config

SHARED = "shared"
PERSONAL = "personal"
ANSWER = "answer-{}"
StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterSpec:
    """The PEFT settings both adapters use (OPPU: LoRA r=8, alpha=8 on q_proj and v_proj)."""

    peft_type: str = "lora"
    r: int = 8
    alpha: int = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    @classmethod
    def from_config(cls, config: RunConfig) -> AdapterSpec:
        return cls(
            config.peft_type,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            tuple(config.target_module_list),
        )

    def peft_config(self) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            use_dora=self.peft_type == "dora",
            task_type="CAUSAL_LM",
        )

    def answer_config(self) -> LoraConfig:
        """Shared and personal concatenated: rank 2r with alpha 2*alpha keeps the same alpha/r scale."""
        return dataclasses.replace(self, r=2 * self.r, alpha=2 * self.alpha).peft_config()


class ResidentModel:
    """Base model + `shared` and `personal` adapter slots, created once per process."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: AdapterSpec) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        with warnings.catch_warnings():  # peft calls a transformers API that is deprecated in v5
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.peft: PeftModel = get_peft_model(model, spec.peft_config(), adapter_name=SHARED)
        self.peft.add_adapter(PERSONAL, spec.peft_config())
        self._identity = {slot: _clone(self.state(slot)) for slot in (SHARED, PERSONAL)}
        self.peft.eval()  # training switches to train mode only for its own steps
        self.use(personal=False)

    def state(self, slot: str) -> StateDict:
        """The slot's tensors under PEFT's adapter-name-free keys (the keys a saved adapter has)."""
        return get_peft_model_state_dict(self.peft, adapter_name=slot)

    def load(self, slot: str, state: Mapping[str, torch.Tensor] | None) -> None:
        """Copy weights into a slot; None restores the identity adapter (zero delta)."""
        source = self._identity[slot] if state is None else state
        expected = self.state(slot)
        if set(source) != set(expected):
            missing, extra = sorted(set(expected) - set(source)), sorted(set(source) - set(expected))
            raise ValueError(
                f"adapter for slot '{slot}' does not match: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for key, tensor in source.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"adapter tensor {key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise ValueError(f"adapter tensor {key} holds NaN or infinite values")
        set_peft_model_state_dict(self.peft, {k: v.float() for k, v in source.items()}, adapter_name=slot)

    def fresh(self, slot: str, seed: int) -> StateDict:
        """A new adapter as PEFT initializes one (A Kaiming-uniform, B zero), from a seed."""
        return fresh_adapter(self._identity[slot], seed)

    def answer_slots(self, personal_states: Sequence[Mapping[str, torch.Tensor] | None]) -> list[str]:
        """Load shared + each user's personal adapter into rank-2r answer slots, one per user.

        A LoRA sum B_s A_s + B_p A_p equals one LoRA with A = [A_s; A_p] and B = [B_s, B_p], so each
        row of a mixed batch (`generate(adapter_names=...)`) can use its own user's pair at once.
        The slots are created once and then refilled by weight copy, like the training slots.
        """
        if self.spec.peft_type != "lora":
            raise ValueError("mixed-adapter answering needs plain LoRA (DoRA adapters do not concatenate)")
        shared = self.state(SHARED)
        names = []
        for index, personal in enumerate(personal_states):
            name = ANSWER.format(index)
            if name not in self.peft.peft_config:
                self.peft.add_adapter(name, self.spec.answer_config())
            personal = self._identity[PERSONAL] if personal is None else personal
            combined = {
                key: torch.cat([tensor, personal[key].to(tensor.dtype)], dim=0 if "lora_A" in key else 1)
                for key, tensor in shared.items()
            }
            set_peft_model_state_dict(self.peft, combined, adapter_name=name)
            names.append(name)
        self.peft.requires_grad_(False)
        return names

    def use(self, personal: bool) -> None:
        """Activate the shared slot alone or shared + personal; nothing is trainable until train()."""
        self.peft.base_model.set_adapter([SHARED, PERSONAL] if personal else [SHARED])
        self.peft.requires_grad_(False)

    def trainable(self, slot: str) -> list[torch.nn.Parameter]:
        """Make exactly one slot trainable and return its parameters."""
        self.peft.requires_grad_(False)
        params = [
            p for name, p in self.peft.named_parameters() if f".{slot}." in name or name.endswith(f".{slot}")
        ]
        for param in params:
            param.requires_grad_(True)
        return params


def fresh_adapter(identity: Mapping[str, torch.Tensor], seed: int) -> StateDict:
    """`identity` (a zero-delta adapter) with its A matrices drawn as PEFT draws them, from a seed."""
    generator = torch.Generator().manual_seed(seed)
    state = _clone(identity)
    for key, tensor in state.items():
        if "lora_A" in key:
            bound = 1.0 / math.sqrt(tensor.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
            tensor.uniform_(-bound, bound, generator=generator)
    return state


def fresh_lora_from_config(model: str, spec: AdapterSpec, seed: int) -> StateDict:
    """The same adapter as `ResidentModel.fresh`, with shapes taken from a weightless (meta-device)
    copy of the model: the server creates the first shared adapter without loading base weights.
    LoRA only: a DoRA adapter's magnitudes are computed from the weights."""
    if spec.peft_type != "lora":
        raise ValueError(f"a {spec.peft_type} adapter needs the base weights to initialize")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config(model))
    with warnings.catch_warnings():  # as in ResidentModel
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        shapes = get_peft_model_state_dict(get_peft_model(skeleton, spec.peft_config()))
    return fresh_adapter({key: torch.zeros(tensor.shape) for key, tensor in shapes.items()}, seed)


def _clone(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {key: tensor.detach().clone().float() for key, tensor in state.items()}


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A content hash of an adapter, recorded with personal adapters to know what they were trained on."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
