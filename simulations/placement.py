"""Where simulated clients compute: each one's CPUs and share of a GPU (Ray's client resources).

`--gpus-per-client` sets a client's share of a GPU (0.25: four clients on each GPU). Left out on a
machine with a GPU, it packs as many clients onto a GPU as fit, from the GPU's free memory (measured)
and a client's footprint (from the model's config and the run's settings), in bytes:

    footprint = CUDA context (600 MiB: the driver's context and cuBLAS workspaces, outside torch's allocator)
              + weights (parameters x 4 for dtype fp32, x 2 for bf16)
              + their bf16 copies under bf16 autocast of fp32 weights (parameters x 2)
              + activations of one training micro-batch: rows x max-seq-len x trained layers x hidden
                x 34 x (element bytes / 2)   (34 bytes per hidden unit, token and layer in 16 bit:
                Korthikanti et al. 2022, with fused attention, as SDPA runs on a GPU)
              + logits and their gradient at every position: rows x max-seq-len x vocabulary x 4 x 2
    clients per GPU = max(1, floor(0.9 x free bytes / footprint))
    gpus-per-client = 1 / clients per GPU, rounded down to Ray's 4 decimals

Every term is an upper bound (logits exist at target positions only; answering holds less than
training), so packed clients fit. Each client's process is also held to its share of the GPU's memory
(common/device.py), so one that needs more fails alone instead of starving the others. Ray starts no
more clients than CPU cores allow (`--cpus-per-client`), whatever the GPU would fit.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import multiprocessing
from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM

from common.adapters import AdapterSpecs
from common.config import AUTO, ConfigError, RunConfig
from common.device import resolve_device
from common.model import model_config
from common.precision import compute_precision
from simulations.engine_options import EngineOptions


def ray_backend_config(engine: EngineOptions, total_cpus: int) -> dict:
    """Flower's Ray backend settings: each simulated client's CPUs and share of a GPU."""
    gpus = engine.gpus_per_client or 0.0
    return {
        # Simulated nodes share a few Ray actors. One that dies (killed, out of memory) is restarted,
        # and a message it was running or was handed while restarting is retried once: without that,
        # Flower keeps handing every node's messages to the dead actor and the run hangs or fails.
        "client_resources": {
            "num_cpus": min(engine.cpus_per_client, total_cpus),
            "num_gpus": gpus,
            "max_restarts": -1,
            "max_task_retries": 1,
        },
        # With GPUs Ray finds them itself (CUDA_VISIBLE_DEVICES); without, it is told there are none.
        "init_args": {"num_cpus": total_cpus, "logging_level": logging.ERROR, "log_to_driver": True}
        | ({} if gpus else {"num_gpus": 0}),
    }


CUDA_CONTEXT_BYTES = 600 * 2**20
ACTIVATION_BYTES = 34  # per hidden unit, token and trained layer, in 16 bit
GPU_HEADROOM = 0.9  # of the free memory: the allocator's fragmentation and what the formula leaves out
RAY_RESOLUTION = 10_000  # Ray keeps fractional resources to 4 decimals


def client_gpu_bytes(config: RunConfig, bf16: bool) -> int:
    """One simulated client's GPU memory, by the formula in the module docstring."""
    model = model_config(config.model)
    with torch.device("meta"):  # shapes only: nothing is allocated
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(model).parameters())
    weight_bytes = 4 if config.dtype == "fp32" else 2
    autocast_copies = params * 2 if bf16 and config.dtype == "fp32" else 0
    tokens = (config.micro_batch_size or config.batch_size) * config.max_seq_len
    layers = model.num_hidden_layers - AdapterSpecs.from_config(config).first_layer
    element = 2 if bf16 or config.dtype == "bf16" else 4
    activations = tokens * layers * model.hidden_size * ACTIVATION_BYTES * element // 2
    logits = tokens * model.vocab_size * 4 * 2
    return CUDA_CONTEXT_BYTES + params * weight_bytes + autocast_copies + activations + logits


def _free_bytes(index: int) -> int:
    return torch.cuda.mem_get_info(index)[0]


def free_gpu_memory(index: int) -> int:
    """Free bytes on GPU `index`, measured in a short child process: a CUDA context in this one would
    hold GPU memory for the whole simulation."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_free_bytes, index).result()


def packed_share(config: RunConfig, free_bytes: int, bf16: bool) -> float:
    """`gpus-per-client` that packs as many clients as fit into `free_bytes` of one GPU."""
    clients = max(1, math.floor(GPU_HEADROOM * free_bytes / client_gpu_bytes(config, bf16)))
    return math.floor(RAY_RESOLUTION / clients) / RAY_RESOLUTION


def _check_share(share: float) -> None:
    if share < 0 or (share > 1 and not float(share).is_integer()):
        raise ConfigError(
            f"--gpus-per-client {share}: expected a share of one GPU (0 < share <= 1, e.g. 0.25 for four "
            "clients per GPU), a whole number of GPUs, or 0 for none"
        )


def place_clients(
    config: RunConfig, engine: EngineOptions, free_memory: Callable[[int], int] = free_gpu_memory
) -> tuple[RunConfig, EngineOptions]:
    """Resolve the run's `device` here and each client's GPU share. Returns the config the run records
    (device = cpu where `auto` meets --gpus-per-client 0 on a GPU machine) and the engine options with
    the share set (0 on a CPU) and, for `cuda:N`, the one GPU Ray may hand out."""
    requested = engine.gpus_per_client
    if requested is not None:
        _check_share(requested)
    device = resolve_device(config.device)  # a CUDA device this machine lacks fails here, before Ray starts
    if device.type != "cuda":
        if requested:
            raise ConfigError(
                f"--gpus-per-client {requested}: the clients compute on the CPU here (device = {config.device!r}); "
                "a share of a GPU needs a CUDA device"
            )
        return config, replace(engine, gpus_per_client=0.0)
    if requested == 0:
        if config.device != AUTO:
            raise ConfigError(
                f"device = {config.device!r}, but --gpus-per-client 0 gives the simulated clients no GPU; "
                'use device = "auto" or "cpu" to simulate on the CPU'
            )
        return config.replace(device="cpu"), engine
    share = requested or packed_share(config, free_memory(device.index), compute_precision(config).bf16)
    only = device.index if config.device.startswith("cuda:") else None
    return config, replace(engine, gpus_per_client=share, gpu=only)
