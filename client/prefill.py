"""The query prompts' prefill below the adapters: computed by the first evaluation, replayed by the rest.

With both adapters on the top K layers (`adapter-layers`), the frozen layers below them turn a prompt
into the same keys, values and hidden states whatever adapters answer it. A run answers the same
queries again and again (zero-shot, the shared adapter after every round, each personalized method),
and prefilling its prompts is most of answering's time: on SmolLM2-135M, 32 tagging prompts took
7.0 s of one core to prefill and 2.9 s more to generate their 8 tokens (fp32, AVX2 kernels). So the first `generate` over a
batch records, per prompt, the bottom layers' keys and values and the states entering the first
adapted layer; a later one over prompts all recorded replays them into its cache in place of running
those layers, and runs only the adapted layers over the prompt. Decoding then runs every layer as
before. Generation's positions count from each prompt's first real token (left padding), so what is
recorded does not depend on the batch it came from.

Only in memory (a prompt's keys and values take ~2.5 MB in fp32 for SmolLM2-135M: not worth a node's
disk): a deployed node answers each evaluation in a new process, which records and gains nothing.
Bounded by `hidden-cache-mb`: once full, further prompts are not recorded. An evaluation visits the
prompts in the same order every time, so keeping the first ones serves that many every time, where
least-recently-used eviction would serve none once the prompts outnumber the room.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from client.hidden import backbone_of, check_layered, example_key
from client.resident import ResidentModel


@dataclass(frozen=True)
class PromptPrefill:
    """One prompt's prefill below the adapters, for its real tokens only."""

    keys: tuple[torch.Tensor, ...]  # per frozen layer: kv heads x tokens x head dim
    values: tuple[torch.Tensor, ...]
    hidden: torch.Tensor  # tokens x hidden size: entering the first adapted layer

    @property
    def nbytes(self) -> int:
        tensors = (*self.keys, *self.values, self.hidden)
        return sum(t.numel() * t.element_size() for t in tensors)


def left_padded(
    rows: Sequence[torch.Tensor], width: int, token_dim: int, device: torch.device
) -> torch.Tensor:
    """Rows of different lengths along `token_dim`, stacked and right-aligned to `width` (zeros before)."""
    first = rows[0]
    shape = list(first.shape)
    shape[token_dim] = width
    batch = torch.zeros(len(rows), *shape, dtype=first.dtype)
    for row, tensor in enumerate(rows):
        n = tensor.shape[token_dim]
        batch[row].narrow(token_dim, width - n, n).copy_(tensor)
    return batch.to(device)


class PromptPrefills:
    """Recorded prefills of a resident model's query prompts, keyed by their tokens and precision."""

    def __init__(self, resident: ResidentModel, limit_bytes: int) -> None:
        check_layered(resident)
        self.first = resident.specs.first_layer
        self.limit_bytes = limit_bytes
        self._prefills: dict[tuple[bool, str], PromptPrefill] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._prefills)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @contextlib.contextmanager
    def around_generate(
        self, resident: ResidentModel, ids: torch.Tensor, attention: torch.Tensor, bf16: bool
    ) -> Iterator[None]:
        """Around one `generate` over this left-padded batch: the frozen layers' prefill is replayed
        when every prompt's was recorded, and recorded otherwise."""
        lengths = [int(n) for n in attention.sum(dim=1)]
        keys = [
            (bf16, example_key(row[len(row) - n :].tolist())) for row, n in zip(ids, lengths, strict=True)
        ]
        known = [self._prefills.get(key) for key in keys]
        layers = backbone_of(resident).layers
        if all(prefill is not None for prefill in known):
            replaced = self._replay(layers, known, ids.shape[1], resident.device)
            try:
                yield
            finally:
                for layer in replaced:
                    layer.__dict__.pop("forward", None)
        else:
            handle = layers[self.first - 1].register_forward_hook(
                self._recorder(keys, lengths, lambda: handle.remove()), with_kwargs=True
            )
            try:
                yield
            finally:
                handle.remove()

    def _replay(
        self,
        layers: torch.nn.ModuleList,
        prefills: Sequence[PromptPrefill],
        width: int,
        device: torch.device,
    ) -> list[torch.nn.Module]:
        """Make each frozen layer's next call (the prefill) put its recorded keys and values in the
        cache instead of computing them; the last one also returns the recorded states. Their calls
        after that (decoding) run the layers."""
        hidden = left_padded([p.hidden for p in prefills], width, 0, device)
        replaced = []
        for index in range(self.first):
            layer = layers[index]
            keys = left_padded([p.keys[index] for p in prefills], width, 1, device)
            values = left_padded([p.values[index] for p in prefills], width, 1, device)

            def replay(
                states, *args, _layer=layer, _index=index, _keys=keys, _values=values, cache, **kwargs
            ):
                del _layer.forward  # decoding runs the layer itself
                cache.update(_keys, _values, _index)
                return hidden if _index == self.first - 1 else states

            layer.forward = replay
            replaced.append(layer)
        return replaced

    def _recorder(self, keys: Sequence[tuple[bool, str]], lengths: Sequence[int], done):
        """A forward hook for the last frozen layer: at the prefill, each new prompt's real tokens'
        keys and values (all frozen layers have filled the cache by then) and the layer's output."""

        def record(_module, _args, kwargs, output: torch.Tensor) -> None:
            done()  # the prefill only: decoding's calls are one token each
            layers = kwargs["cache"].layers[: self.first]
            for row, (key, n) in enumerate(zip(keys, lengths, strict=True)):
                if key in self._prefills:
                    continue
                prefill = PromptPrefill(
                    tuple(layer.keys[row, :, -n:].to("cpu", copy=True) for layer in layers),
                    tuple(layer.values[row, :, -n:].to("cpu", copy=True) for layer in layers),
                    output[row, -n:].to("cpu", copy=True),
                )
                if self._bytes + prefill.nbytes > self.limit_bytes:
                    return  # full: the prompts recorded so far stay
                self._prefills[key] = prefill
                self._bytes += prefill.nbytes

        return record
