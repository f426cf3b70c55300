"""The hidden states below the adapters: computed once per example, reused by every later step.

With both adapters on the top K decoder layers (`adapter-layers`), the layers below them are the frozen
base model, so the hidden state entering the first adapted layer depends on the example's tokens
alone. It is computed once (no gradient, in the compute precision) and reused by every local step,
epoch and round, and by the personal training on the same prompts; a training step then runs only the
top K layers, the final norm and the lm_head at target positions (client/training.py).

A deployed node starts a new ClientApp process for every message, so the states also go to the node's
disk, one file per user next to the personal adapters (`fedoppu adapter delete` removes them with the
rest of the user). Memory and disk are each bounded by `hidden-cache-mb`: least recently used first out.
On a GPU the states are computed there and kept in host memory: a batch's (rows x width x hidden, a
few MB) crosses to the GPU in well under a millisecond, and the GPU's memory stays for the model and
the clients packed beside it (simulations/placement.py).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from client.resident import ResidentModel
from common.io import atomic_write_bytes

HIDDEN_DIR = "hidden-states"  # in the node's state directory
_CHECKSUM = "sha256"  # of the tensors, in each file's metadata
_BACKBONE_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")


def backbone_of(resident: ResidentModel) -> torch.nn.Module:
    causal_lm = resident.peft.base_model.model
    return getattr(causal_lm, causal_lm.base_model_prefix)


def check_layered(resident: ResidentModel) -> None:
    """Adapters on the top layers run the decoder layer by layer: the model must be a Llama-style
    decoder (embed_tokens, layers, norm, rotary_emb), as SmolLM2, Llama, Mistral and Qwen2 are."""
    backbone = backbone_of(resident)
    missing = [part for part in _BACKBONE_PARTS if not hasattr(backbone, part)]
    if missing:
        raise ValueError(
            f"adapter-layers: {type(backbone).__name__} has no {', '.join(missing)}; adapters on the top "
            'layers need a Llama-style decoder. Use adapter-layers = "all" for this model.'
        )


def positions(start: int, stop: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, stop, device=device).unsqueeze(0)


def run_layers(
    backbone: torch.nn.Module,
    layers: slice,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Decoder layers `layers` of a Llama-style backbone, as its own forward runs them (no final norm)."""
    mask = create_causal_mask(
        config=backbone.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layers.start or 0,
    )
    position_embeddings = backbone.rotary_emb(hidden, position_ids=position_ids)
    for layer in backbone.layers[layers]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
    return hidden


def run_layers_once_for_the_prefix(
    backbone: torch.nn.Module, layers: slice, inputs: torch.Tensor, attention: torch.Tensor, prefix_len: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`run_layers` over right-padded rows whose first `prefix_len` inputs are the same in every row:
    the prefix runs once (one row) and its keys and values serve every row. Returns the prefix's
    output (None without a prefix) and the other positions' output."""
    width = inputs.shape[1]
    if not prefix_len:
        return None, run_layers(backbone, layers, inputs, attention, positions(0, width, inputs.device))
    cache = DynamicCache(config=backbone.config)
    head = run_layers(
        backbone,
        layers,
        inputs[:1, :prefix_len],
        attention[:1, :prefix_len],
        positions(0, prefix_len, inputs.device),
        cache,
    )
    cache.batch_repeat_interleave(inputs.shape[0])
    tail = run_layers(
        backbone,
        layers,
        inputs[:, prefix_len:],
        attention,
        positions(prefix_len, width, inputs.device),
        cache,
    )
    return head, tail


def adapted_layers_forward(
    resident: ResidentModel, inputs: torch.Tensor, attention: torch.Tensor, prefix_len: int = 0
) -> torch.Tensor:
    """The adapted top layers on the states entering them (rows x width x hidden, right-padded); with
    `prefix_len`, the prefix every row shares runs once. Returns the states after the last layer for
    the positions after the prefix (before the norm)."""
    top = slice(resident.specs.first_layer, None)
    return run_layers_once_for_the_prefix(backbone_of(resident), top, inputs, attention, prefix_len)[1]


def example_key(input_ids: Sequence[int]) -> str:
    return hashlib.sha256(torch.tensor(input_ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]


def _checksum(states: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(states):
        digest.update(key.encode())
        digest.update(states[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_fingerprint(model: torch.nn.Module, adapter_prefix: str) -> str:
    """A digest of the base weights (not the adapters', whose parameter names hold the PEFT type's
    `adapter_prefix`: "lora_", "ia3_") from a strided sample of every tensor: cheap, and a different
    model (or a changed one under the same name) gets different files."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if adapter_prefix in name:
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class HiddenStore:
    """One safetensors file per user and variant on the node's disk, bounded in total size."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def user_dir(self, user_id: str) -> Path:
        return self.root / hashlib.sha256(user_id.encode()).hexdigest()[:24]

    def read(self, user_id: str, variant: str) -> dict[str, torch.Tensor]:
        """The user's stored states; a file that cannot be read or fails its checksum is removed (the
        states are computed again)."""
        path = self.user_dir(user_id) / f"{variant}.safetensors"
        if not path.is_file():
            return {}
        try:
            with safe_open(str(path), framework="pt") as handle:
                recorded = (handle.metadata() or {}).get(_CHECKSUM)
                states = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, SafetensorError, ValueError):
            states, recorded = {}, None
        if recorded is None or recorded != _checksum(states):
            path.unlink(missing_ok=True)
            return {}
        path.touch()  # recently used: evicted last
        return states

    def write(self, user_id: str, variant: str, states: dict[str, torch.Tensor], limit_bytes: int) -> None:
        """Store the user's states, then remove the least recently used files beyond `limit_bytes`."""
        path = self.user_dir(user_id) / f"{variant}.safetensors"
        tensors = {key: tensor.contiguous() for key, tensor in states.items()}
        atomic_write_bytes(path, save(tensors, metadata={_CHECKSUM: _checksum(tensors)}))
        self._evict(limit_bytes, keep=path)

    def delete(self, user_id: str) -> int:
        """Remove every stored state of the user; returns how many files went."""
        directory = self.user_dir(user_id)
        files = list(directory.glob("*.safetensors")) if directory.is_dir() else []
        for path in files:
            path.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()
        return len(files)

    def _evict(self, limit_bytes: int, keep: Path) -> None:
        files = sorted(self.root.glob("*/*.safetensors"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= limit_bytes:
                break
            if path != keep:
                total -= path.stat().st_size
                path.unlink(missing_ok=True)


class HiddenStates:
    """The states entering the first adapted layer, per example: in memory (bounded, least recently
    used out), backed by a node's `HiddenStore` for the users it is told about (`users`)."""

    def __init__(self, resident: ResidentModel, limit_bytes: int) -> None:
        check_layered(resident)
        self.first = resident.specs.first_layer
        self.limit_bytes = limit_bytes
        tuner = resident.peft.base_model
        self.fingerprint = weights_fingerprint(tuner.model, tuner.prefix)
        # A GPU's kernels round differently: its states do not stand in for a CPU's, nor the reverse.
        self.device_tag = "" if resident.device.type == "cpu" else f"-{resident.device.type}"
        self._memory: OrderedDict[tuple[bool, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        # (store, user, variant) -> keys in its file: one process may serve several nodes' stores (a
        # simulation worker across runs), each with files of its own.
        self._on_disk: dict[tuple[Path, str, str], set[str]] = {}

    def variant(self, bf16: bool) -> str:
        """What the states depend on besides the tokens: the weights, the split and the precision."""
        return f"{self.fingerprint}-layer{self.first}-{'bf16' if bf16 else 'fp32'}{self.device_tag}"

    def __len__(self) -> int:
        return len(self._memory)

    def _put(self, key: tuple[bool, str], state: torch.Tensor) -> None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = state
        self._bytes += state.numel() * state.element_size()
        while self._bytes > self.limit_bytes and len(self._memory) > 1:
            _, dropped = self._memory.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()

    def _get(self, key: tuple[bool, str]) -> torch.Tensor | None:
        state = self._memory.get(key)
        if state is not None:
            self._memory.move_to_end(key)
        return state

    @torch.no_grad()
    def _compute(
        self, resident: ResidentModel, ids: torch.Tensor, attention: torch.Tensor, bf16: bool, prefix_len: int
    ) -> torch.Tensor:
        """The frozen layers below the adapters over a right-padded batch, in the compute precision,
        the prefix all rows share run once: under bf16 autocast the matmuls run in bf16 and the
        residual stream stays in the model's dtype, and so do the states kept. (Rounded to bf16 they
        would change the loss by about as much as autocast itself does: SmolLM2's residual stream
        reaches ~2e4, where bf16 steps by 128.)"""
        backbone = backbone_of(resident)
        with resident.autocast(bf16):
            head, tail = run_layers_once_for_the_prefix(
                backbone, slice(0, self.first), backbone.embed_tokens(ids), attention, prefix_len
            )
        return tail if head is None else torch.cat([head.expand(ids.shape[0], -1, -1), tail], dim=1)

    def inputs(
        self,
        resident: ResidentModel,
        examples: Sequence,
        ids: torch.Tensor,
        attention: torch.Tensor,
        bf16: bool,
        prefix_len: int = 0,
    ) -> torch.Tensor:
        """The batch's states entering the first adapted layer (rows x width x hidden, zero where
        `attention` is, in the model's dtype, on its device): from memory, or computed for the whole
        batch when any row's are not known yet (then kept on the CPU, one tensor per example), with
        the first `prefix_len` tokens, the same in every row, run once."""
        keys = [(bf16, example_key(e.input_ids)) for e in examples]
        states = [self._get(key) for key in keys]
        if any(state is None for state in states):
            computed = self._compute(resident, ids, attention, bf16, prefix_len)
            states = [
                computed[row, : len(e.input_ids)].to("cpu", copy=True) for row, e in enumerate(examples)
            ]
            for key, state in zip(keys, states, strict=True):
                self._put(key, state)
        batch = torch.zeros(*ids.shape, states[0].shape[-1], dtype=resident.peft.base_model.model.dtype)
        for row, state in enumerate(states):
            batch[row, : state.shape[0]] = state
        return batch.to(resident.device)

    def recall(self, store: HiddenStore, user_id: str, bf16: bool) -> None:
        """Bring a user's stored states into memory the first time this process serves the user (a
        deployed node's ClientApp process starts from the node's disk on every message)."""
        file = (store.root, user_id, self.variant(bf16))
        if file in self._on_disk:
            return
        stored = store.read(user_id, file[2])
        for key, state in stored.items():
            self._put((bf16, key), state)
        self._on_disk[file] = set(stored)

    def keep(self, store: HiddenStore, user_id: str, examples: Sequence, bf16: bool) -> None:
        """Write the user's states to the node's disk when memory holds some that its file lacks."""
        variant = self.variant(bf16)
        on_disk = self._on_disk.get((store.root, user_id, variant), set())
        fresh = {
            key: state
            for key in {example_key(e.input_ids) for e in examples} - on_disk
            if (state := self._get((bf16, key))) is not None
        }
        if not fresh:
            return
        states = {**store.read(user_id, variant), **fresh}
        store.write(user_id, variant, states, self.limit_bytes)
        self._on_disk[(store.root, user_id, variant)] = set(states)


@contextlib.contextmanager
def persisted(
    hidden: HiddenStates | None, store: HiddenStore, examples: dict[str, Sequence], bf16: bool
) -> Iterator[None]:
    """Training on these users' examples ({user id: examples}): their stored states are recalled
    first, and what was computed is kept on the node's disk afterwards."""
    if hidden is None:
        yield
        return
    for user_id in examples:
        hidden.recall(store, user_id, bf16)
    yield
    for user_id, user_examples in examples.items():
        hidden.keep(store, user_id, user_examples, bf16)
