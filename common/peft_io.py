"""Adapters on disk in peft's own format (adapter_config.json + adapter_model.safetensors).

Shared by the server's checkpoints and the clients' personal adapters, so both can be loaded with
plain `PeftModel.from_pretrained` and both are written atomically and verified by checksum.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.io import StorageError, atomic_directory, file_sha256

WEIGHTS = "adapter_model.safetensors"


def write_adapter(target: str | Path, state: Mapping[str, torch.Tensor], peft_config: PeftConfig) -> str:
    """Write an adapter directory atomically; returns the weights' sha256 for the caller's manifest."""
    with atomic_directory(target) as tmp:
        try:  # safetensors reports a full disk as its own error, naming only its temporary file
            save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(tmp / WEIGHTS))
        except SafetensorError as err:
            raise StorageError(f"cannot write {target}: {err}") from err
        peft_config.save_pretrained(str(tmp))
        return file_sha256(tmp / WEIGHTS)


def read_adapter(directory: str | Path, sha256: str) -> dict[str, torch.Tensor] | None:
    """The adapter's tensors, or None if the weights are missing or do not match their checksum."""
    weights = Path(directory) / WEIGHTS
    if not weights.is_file() or file_sha256(weights) != sha256:
        return None
    return load_file(str(weights))
