"""The adapters' spec and how a new one is drawn: what the server and every client must agree on.

The server creates the first shared adapter and every client creates its personal ones with the same
spec and the same draw (PEFT's LoRA init from a seed; IA3's is all ones), so both sides import this
module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
from transformers import AutoModelForCausalLM, PreTrainedModel

from common.config import ALL_LAYERS, RunConfig
from common.model import load_base_model, model_config

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AdapterSpec:
    """The PEFT settings of one adapter and the decoder layers it sits on (empty: every layer). The
    defaults here are OPPU's paper (LoRA r=8, alpha=8 on q_proj and v_proj of every layer); a run's
    come from its config (`AdapterSpecs.from_config`). `feedforward_modules` are IA3's targets whose
    input is scaled rather than their output."""

    peft_type: str = "lora"
    r: int = 8
    alpha: float = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] = ()
    feedforward_modules: tuple[str, ...] = ()

    @classmethod
    def from_layout(
        cls, config: RunConfig, r: int, alpha: float, targets: list[str], layers: int | str
    ) -> AdapterSpec:
        """The run's peft-type and dropout with one adapter's layout (its rank, alpha, targets and
        `adapter-layers` setting)."""
        return cls(
            config.peft_type,
            r,
            alpha,
            config.lora_dropout,
            tuple(targets),
            adapted_layers(config.model, layers),
            ia3_feedforward(config.model, tuple(targets)) if config.peft_type == "ia3" else (),
        )

    @property
    def first_layer(self) -> int:
        """The lowest adapted decoder layer: everything below it is the frozen base model."""
        return min(self.layers, default=0)

    def peft_config(self) -> PeftConfig:
        if self.peft_type == "ia3":
            return IA3Config(
                target_modules=self._ia3_targets(),
                feedforward_modules=list(self.feedforward_modules),
                task_type="CAUSAL_LM",
            )
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            layers_to_transform=list(self.layers) or None,
            use_dora=self.peft_type == "dora",
            task_type="CAUSAL_LM",
        )

    def _ia3_targets(self) -> list[str] | str:
        """IA3Config has no layers_to_transform: adapters on some layers are a pattern peft matches
        against each module's full name (Llama-style `layers.N.`, as `adapter-layers` K requires)."""
        if not self.layers:
            return list(self.target_modules)
        layers = "|".join(str(layer) for layer in self.layers)
        names = "|".join(re.escape(name) for name in self.target_modules)
        return rf"(.*\.)?layers\.({layers})\.(.*\.)?({names})"

    @property
    def layout(self) -> str:
        """The adapter's layout in words, as reports name it (e.g. "lora r 2 alpha 4 on q_proj,v_proj of
        layers 28-29")."""
        first, last = (self.layers[0], self.layers[-1]) if self.layers else (None, None)
        layers = (
            "every layer"
            if first is None
            else f"layer {first}"
            if first == last
            else f"layers {first}-{last}"
        )
        rank = "" if self.peft_type == "ia3" else f" r {self.r} alpha {self.alpha:g}"
        return f"{self.peft_type}{rank} on {','.join(self.target_modules)} of {layers}"

    @property
    def scale(self) -> float:
        """LoRA's factor on B A."""
        return self.alpha / self.r


@dataclass(frozen=True)
class AdapterSpecs:
    """The shared adapter's spec and the personal adapters'. They are the same unless the run config's
    `shared-*` keys give the shared adapter its own (smaller) layout: under DP its noise grows with the
    weights sent, while the personal adapters never leave the node. peft-type and dropout are one for
    both."""

    shared: AdapterSpec
    personal: AdapterSpec

    @classmethod
    def both(cls, spec: AdapterSpec) -> AdapterSpecs:
        return cls(spec, spec)

    @classmethod
    def from_config(cls, config: RunConfig) -> AdapterSpecs:
        personal = AdapterSpec.from_layout(
            config, config.lora_r, config.lora_alpha, config.target_module_list, config.adapter_layers
        )
        return cls(AdapterSpec.from_layout(config, *config.shared_layout), personal)

    @property
    def peft_type(self) -> str:
        return self.personal.peft_type

    @property
    def first_layer(self) -> int:
        """The lowest decoder layer either adapter touches: everything below it is the frozen base model."""
        return min(self.shared.first_layer, self.personal.first_layer)

    def answer_config(self) -> LoraConfig:
        """Shared and personal concatenated into one LoRA (client/resident.py: `answer_slots`): rank
        r_shared + r_personal on the union of their target modules and layers, at the personal adapter's
        scale (the shared part's own scale is folded into its B, `answer_shared_factor`)."""
        shared, personal = self.shared, self.personal
        layers = (
            ()
            if not shared.layers or not personal.layers
            else tuple(sorted({*shared.layers, *personal.layers}))
        )
        r = shared.r + personal.r
        return dataclasses.replace(
            personal,
            r=r,
            alpha=personal.alpha * r / personal.r,  # 2 alpha when the ranks are equal, as before
            target_modules=tuple(dict.fromkeys((*personal.target_modules, *shared.target_modules))),
            layers=layers,
        ).peft_config()

    @property
    def answer_shared_factor(self) -> float:
        """What the shared part's B is multiplied by in the answer adapter: its scale over the answer's
        (1 when both adapters share alpha / r, as they do by default)."""
        return self.shared.scale / self.personal.scale


def ia3_feedforward(model: str, target_modules: tuple[str, ...]) -> tuple[str, ...]:
    """The targets whose input IA3 scales: those peft's IA3 lists as feedforward for the model's type
    (the MLP's down projection, whose input is its inner activation, as in the IA3 paper); every other
    target has its output scaled."""
    listed = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_config(model).model_type, [])
    return tuple(name for name in target_modules if name in listed)


@functools.cache
def adapted_layers(model: str, setting: int | str) -> tuple[int, ...]:
    """`adapter-layers` as layer indices: the top K, or () (every layer) for "all" and for a model
    with K decoder layers or fewer."""
    if setting == ALL_LAYERS:
        return ()
    total = model_config(model).num_hidden_layers
    return () if setting >= total else tuple(range(total - setting, total))


def with_adapter(model: PreTrainedModel, spec: AdapterSpec, adapter_name: str = "default") -> PeftModel:
    """`get_peft_model`, without the FutureWarning peft raises by calling a transformers v5-deprecated API."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, spec.peft_config(), adapter_name=adapter_name)


def clone_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {key: tensor.detach().clone().float() for key, tensor in state.items()}


def fresh_adapter(identity: Mapping[str, torch.Tensor], seed: int) -> StateDict:
    """`identity` (an adapter that leaves the model unchanged) with its LoRA A matrices drawn as PEFT's
    LoRA layer draws them (Kaiming-uniform, a = sqrt(5)), from a seed. An IA3 adapter has none: a new
    one is the identity, all ones, as PEFT initializes it."""
    generator = torch.Generator().manual_seed(seed)
    state = clone_state(identity)
    for key, tensor in state.items():
        if "lora_A" in key:
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    return state


def fresh_adapter_from_config(model: str, spec: AdapterSpec, seed: int) -> StateDict:
    """The same adapter as a client's resident model draws, with shapes taken from a weightless
    (meta-device) copy of the model: the server creates the first shared adapter without loading base
    weights. LoRA and IA3 only: a DoRA adapter's magnitudes are computed from the weights."""
    if spec.peft_type == "dora":
        raise ValueError(f"a {spec.peft_type} adapter needs the base weights to initialize")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config(model))
    shapes = get_peft_model_state_dict(with_adapter(skeleton, spec))
    blank = torch.ones if spec.peft_type == "ia3" else torch.zeros  # IA3 scales by its vectors
    return fresh_adapter({key: blank(tensor.shape) for key, tensor in shapes.items()}, seed)


FFA_FROZEN = "lora_A"  # FFA-LoRA (Sun et al., ICLR 2024): A stays at its seeded draw, only B trains


def on_the_wire(state: Mapping[str, torch.Tensor], ffa_lora: bool) -> StateDict:
    """The shared adapter's tensors a train round sends, trains, clips and noises: B only under FFA-LoRA."""
    return {key: tensor for key, tensor in state.items() if not (ffa_lora and FFA_FROZEN in key)}


@functools.lru_cache(maxsize=4)
def frozen_lora_a(model: str, spec: AdapterSpec, seed: int) -> StateDict:
    """FFA-LoRA's frozen A of the shared adapter: the run's initial draw, which the server and every client
    derive from the run's seed (`initial_adapter` draws the same tensors bit for bit)."""
    state = fresh_adapter_from_config(model, spec, seed)
    return {key: tensor for key, tensor in state.items() if FFA_FROZEN in key}


def initial_adapter(model: str, dtype: str, spec: AdapterSpec, seed: int) -> StateDict:
    """The first shared adapter: from the config alone for LoRA and IA3, from the base weights for DoRA."""
    if spec.peft_type != "dora":
        return fresh_adapter_from_config(model, spec, seed)
    base, _ = load_base_model(model, dtype)
    return fresh_adapter(get_peft_model_state_dict(with_adapter(base, spec)), seed)


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """A content hash of an adapter, recorded with personal adapters to know what they were trained on."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
