"""One resident base model with two adapter slots: the shared base adapter and a personal one.

PEFT slows down as adapters accumulate (add_adapter/load_adapter grow from ~60 ms to ~700 ms after
90 adapters), so users are swapped by copying weights into the same two slots instead of loading
one adapter per user. Both slots are active together: output = base + shared delta + personal delta
(LoRA, DoRA); under IA3, whose vectors scale activations, PEFT multiplies the two slots' vectors
(peft/tuners/ia3/layer.py, `Linear.forward`), so the base is scaled by shared times personal.

The model and every slot live on one device (the run's `device`, common/device.py); adapters enter
and leave as CPU tensors (the wire, the store and the seeded initialization are on the CPU), so what
leaves a client is the same whichever device trained it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from common.adapters import AdapterSpec, AdapterSpecs, StateDict, clone_state, fresh_adapter, with_adapter

SHARED = "shared"
PERSONAL = "personal"
ANSWER = "answer-{}"


def weighted(state: Mapping[str, torch.Tensor], weight: float) -> StateDict:
    """A LoRA adapter whose delta B A is scaled by `weight` (its B matrices are)."""
    return {key: tensor * weight if "lora_B" in key else tensor for key, tensor in state.items()}


def concatenated(
    parts: Sequence[tuple[Mapping[str, torch.Tensor], int]], layout: Mapping[str, torch.Tensor]
) -> StateDict:
    """LoRA adapters (each with its rank) stacked along the rank into `layout`'s keys and dtypes: A's
    rows and B's columns in the order of `parts`, zero where a part has no tensor under a key (it does
    not adapt that module)."""
    stacked = {}
    for key, blank in layout.items():
        dim = 0 if "lora_A" in key else 1
        blocks = []
        for state, rank in parts:
            shape = list(blank.shape)
            shape[dim] = rank
            blocks.append(state[key].to(blank.dtype) if key in state else blank.new_zeros(shape))
        stacked[key] = torch.cat(blocks, dim=dim)
    return stacked


class ResidentModel:
    """Base model + `shared` and `personal` adapter slots, created once per process."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        specs: AdapterSpecs | AdapterSpec,
        device: torch.device | str = "cpu",
    ) -> None:
        """`specs`: each slot's layout (peft takes a LoraConfig per adapter name); one spec for both."""
        self.specs = specs if isinstance(specs, AdapterSpecs) else AdapterSpecs.both(specs)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        # On the device before the adapters are added: PEFT puts every adapter beside its base layer.
        self.peft: PeftModel = with_adapter(model.to(self.device), self.specs.shared, adapter_name=SHARED)
        self.peft.add_adapter(PERSONAL, self.specs.personal.peft_config())
        self._identity = {slot: clone_state(self.state(slot)) for slot in (SHARED, PERSONAL)}
        # The frozen base model's linear maps (the adapters' own are excluded: slots change), and
        # their bf16 copies once a bf16 autocast has needed them.
        self._base_linears = [
            module
            for name, module in self.peft.named_modules()
            if isinstance(module, torch.nn.Linear) and "lora_" not in name
        ]
        self._bf16_weights: list[torch.nn.Parameter] = []
        self._autocast_depth = 0
        self.peft.eval()  # training switches to train mode only for its own steps
        self.use(personal=False)

    def state(self, slot: str) -> StateDict:
        """The slot's tensors under PEFT's adapter-name-free keys (the keys a saved adapter has), on
        the CPU (a copy from a GPU; the slot's own tensors on the CPU)."""
        return {k: v.cpu() for k, v in get_peft_model_state_dict(self.peft, adapter_name=slot).items()}

    @contextlib.contextmanager
    def autocast(self, bf16: bool) -> Iterator[None]:
        """bf16 autocast on the model's device, with the frozen base weights already in bf16; nothing
        when `bf16` is off. Autocast keeps its casts only of weights that need a gradient, so it cast
        every frozen weight again on every call: half of answering's CPU time (every generated token
        cast the whole model) and a sixth of training's. The results are the same bits: the copies are
        what autocast would have cast. They cost 2 bytes per base weight, kept from the first use."""
        if not bf16:
            yield
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            outermost = self._autocast_depth == 0
            self._autocast_depth += 1
            originals = [module.weight for module in self._base_linears] if outermost else []
            if outermost:
                for module, weight in zip(self._base_linears, self.bf16_weights(), strict=True):
                    module.weight = weight
            try:
                yield
            finally:
                self._autocast_depth -= 1
                if outermost:
                    for module, weight in zip(self._base_linears, originals, strict=True):
                        module.weight = weight

    def bf16_weights(self) -> list[torch.nn.Parameter]:
        """bf16 copies of the base model's linear weights (a tied lm_head gets its own: the embedding
        keeps its fp32 table), made outside any inference mode so that training can use them too."""
        if not self._bf16_weights:
            with torch.inference_mode(False), torch.no_grad():
                self._bf16_weights = [
                    torch.nn.Parameter(module.weight.to(torch.bfloat16), requires_grad=False)
                    for module in self._base_linears
                ]
        return self._bf16_weights

    def mismatch(self, slot: str, state: Mapping[str, torch.Tensor]) -> str | None:
        """Why `state` cannot go into the slot (other keys or shapes, e.g. adapters on other layers, or
        non-finite values), or None when it can."""
        expected = self.state(slot)
        if set(state) != set(expected):
            missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            return f"adapter for slot '{slot}' does not match: missing {missing[:3]}, unexpected {extra[:3]}"
        for key, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                return f"adapter tensor {key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
            if not torch.isfinite(tensor).all():
                return f"adapter tensor {key} holds NaN or infinite values"
        return None

    def load(self, slot: str, state: Mapping[str, torch.Tensor] | None) -> None:
        """Copy weights into a slot; None restores the identity adapter (zero delta; IA3: all ones)."""
        source = self._identity[slot] if state is None else state
        problem = self.mismatch(slot, source)
        if problem is not None:
            raise ValueError(problem)
        set_peft_model_state_dict(self.peft, {k: v.float() for k, v in source.items()}, adapter_name=slot)

    def fresh(self, slot: str, seed: int) -> StateDict:
        """A new adapter as PEFT initializes one (A Kaiming-uniform, B zero; IA3 all ones), from a seed."""
        return fresh_adapter(self._identity[slot], seed)

    def answer_slots(
        self,
        personal_states: Sequence[Mapping[str, torch.Tensor] | None],
        shared_weights: Sequence[float] | None = None,
    ) -> list[str]:
        """Load shared + each user's personal adapter into answer slots of rank r_shared + r_personal,
        one per user.

        A LoRA sum w s_s B_s A_s + s_p B_p A_p equals one LoRA at scale s_p with A = [A_s; A_p] and
        B = [w (s_s / s_p) B_s, B_p], so each row of a mixed batch (`generate(adapter_names=...)`) can
        use its own user's pair at once, with its own weight w on the shared adapter (the per-user
        gate, client/gate.py) and None for a user answered without a personal adapter. The answer
        adapter covers the union of both adapters' modules and layers; where a module has only one of
        them, the other's block is zero. The slots are created once and then refilled by weight copy,
        like the training slots.
        """
        if self.specs.peft_type != "lora":
            raise ValueError(
                f"mixed-adapter answering needs plain LoRA ({self.specs.peft_type} adapters do not concatenate)"
            )
        shared = self.state(SHARED)
        weights = [1.0] * len(personal_states) if shared_weights is None else shared_weights
        names = []
        for index, (personal, weight) in enumerate(zip(personal_states, weights, strict=True)):
            name = ANSWER.format(index)
            if name not in self.peft.peft_config:
                self.peft.add_adapter(name, self.specs.answer_config())
                self._identity[name] = clone_state(self.state(name))
            personal = self._identity[PERSONAL] if personal is None else personal
            parts = (
                (weighted(shared, weight * self.specs.answer_shared_factor), self.specs.shared.r),
                (personal, self.specs.personal.r),
            )
            set_peft_model_state_dict(self.peft, concatenated(parts, self._identity[name]), adapter_name=name)
            names.append(name)
        self.peft.requires_grad_(False)
        return names

    def use(self, personal: bool) -> None:
        """Activate the shared slot alone or shared + personal; nothing is trainable until train()."""
        self.peft.base_model.set_adapter([SHARED, PERSONAL] if personal else [SHARED])
        self.peft.requires_grad_(False)

    def trainable(self, slot: str, frozen: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
        """Make exactly one slot trainable, but for the parameters whose names contain one of `frozen`
        (FFA-LoRA freezes "lora_A"), and return its trainable parameters."""
        self.peft.requires_grad_(False)
        params = [
            p
            for name, p in self.peft.named_parameters()
            if (f".{slot}." in name or name.endswith(f".{slot}")) and not any(part in name for part in frozen)
        ]
        for param in params:
            param.requires_grad_(True)
        return params
