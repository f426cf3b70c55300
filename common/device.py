"""Where a client computes: the `device` run-config key, resolved on the machine that computes.

`auto` takes the CUDA device torch sees first and the CPU where it sees none, so a deployed node with a
GPU uses it with no flag and a CPU-only machine runs as before. Only clients resolve it: the server
aggregates adapters and never loads base weights for LoRA, so it stays on the CPU.
"""

from __future__ import annotations

import os

import torch

from common.config import AUTO, ConfigError

# A simulation sets this in its Ray workers (simulations/engine.py): the share of a GPU's memory each
# client's process may allocate, its `gpus-per-client`.
GPU_MEMORY_FRACTION_ENV = "FEDOPPU_GPU_MEMORY_FRACTION"


def _no_cuda() -> str:
    build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return f"torch.cuda.is_available() is False (torch {torch.__version__}, {build})"


def resolve_device(setting: str) -> torch.device:
    """The device a `device` setting means on this machine; a CUDA device this machine lacks is an error."""
    if setting == AUTO:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    if setting == "cpu":
        return torch.device("cpu")
    if not setting.startswith("cuda"):
        raise ConfigError(f"device = {setting!r}; expected {AUTO!r}, 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(
            f'device = {setting!r}, but this machine has no CUDA device: {_no_cuda()} here. Use device = "auto" or "cpu"'
        )
    device = torch.device(setting)
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device = {setting!r}, but torch sees {torch.cuda.device_count()} CUDA device(s) here (cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    return torch.device("cuda", index)


def describe_device(device: torch.device) -> str:
    """The device, and for a GPU its name and memory (what `fedoppu info` prints)."""
    if device.type != "cuda":
        return f"{device}: no CUDA device, {_no_cuda()}" if not torch.cuda.is_available() else str(device)
    free, total = torch.cuda.mem_get_info(device)
    return (
        f"{device} ({torch.cuda.get_device_name(device)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free)"
    )


def bound_gpu_memory(device: torch.device) -> None:
    """Hold this process to its share of the GPU (a simulated client's `gpus-per-client`), so clients
    packed onto one GPU fail alone with an out-of-memory error instead of starving each other."""
    share = os.environ.get(GPU_MEMORY_FRACTION_ENV)
    if device.type == "cuda" and share:
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(share)), device)
