"""bf16 autocast or fp32: measured on the CPU that runs the model, once per machine.

bf16 autocast trains ~2x faster than fp32 on an AMD EPYC with AVX512_BF16 and ~6x on a Xeon with
AMX, but 8-60x slower on a CPU with AVX2 only (../shared/notes/cpu-measurements.md). No flag list
predicts this reliably (oneDNN's kernels change with torch versions), so `autocast-bf16 = "auto"`
times the model's own matmul shapes in both precisions (a few tens of milliseconds; a precision that
turns out far slower is stopped after one call) and keeps the answer under `$FEDOPPU_CACHE/precision/`,
keyed by the CPU's model and flags, torch's version and kernel level and the shapes. The probe runs
on one thread and counts that thread's CPU time: with 2 threads it scattered from 0.3x to 3.9x while
other processes shared the cores; on one it held within 5% (1.6-1.9x here, 0.22-0.25x with AVX2
kernels), and the ratio is the core's.

On a CUDA device (`device`, common/device.py) nothing is probed: `auto` takes bf16 where
torch.cuda.is_bf16_supported() says the GPU computes it natively (Ampere and later).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from common.config import AUTO, RunConfig
from common.device import resolve_device
from common.io import atomic_write_json, read_json
from common.model import cache_root, model_config

# bf16 must beat fp32 by this factor to be chosen: a probe of a few ms can be off by a few percent.
MIN_SPEEDUP = 1.15
# Rows of the probe's matmuls: a training micro-batch of short prompts, small enough to stay fast.
PROBE_ROWS = 64
PROBE_ROUNDS = 3
# A bf16 call this many times slower than fp32 ends the probe at once: the answer is clear.
CLEARLY_SLOWER = 4.0
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class Precision:
    """The resolved choice: whether to autocast to bf16, why, and the measured bf16/fp32 speed ratio."""

    bf16: bool
    reason: str
    speedup: float | None = None  # bf16 speed / fp32 speed in the probe; None when the setting forced it

    @property
    def name(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    def record(self) -> dict:
        """What a run's config.json records."""
        return {
            "autocast_bf16": self.bf16,
            "compute": self.name,
            "reason": self.reason,
            "speedup": self.speedup,
        }


@dataclass(frozen=True)
class ProbeShapes:
    """The in/out widths of one decoder layer's linear maps (attention q, k, v, o; MLP gate, up, down)."""

    hidden: int
    kv: int
    intermediate: int

    @classmethod
    def of(cls, model_config) -> ProbeShapes:
        heads = model_config.num_attention_heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        return cls(model_config.hidden_size, kv_heads * head_dim, model_config.intermediate_size)

    def linears(self) -> list[tuple[int, int]]:
        h, kv, i = self.hidden, self.kv, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


def cpu_flags() -> list[str]:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor()
    )


def cpu_description() -> str:
    """The CPU and the instruction sets that decide its bf16 speed (AMX: ~6x fp32; AVX512_BF16: ~2x)."""
    isa = [flag for flag in _ISA_FLAGS if flag in cpu_flags()]
    return f"{cpu_name()} ({', '.join(isa) or 'ISA unknown'}; torch kernels {torch.backends.cpu.get_cpu_capability()})"


def probe_key(shapes: ProbeShapes) -> dict:
    """Everything the measured ratio depends on; a change in any of it measures again."""
    return {
        "cpu": cpu_name(),
        "flags_sha256": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16],
        "torch": torch.__version__,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "shapes": asdict(shapes),
    }


def _seconds(fn: Callable[[], None]) -> float:
    """CPU seconds of this thread: time the scheduler gives other processes is not counted (a wall-clock
    probe under a load of 10 on 2 cores measured bf16 at 0.8x here, where it is 1.6-1.9x)."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def measure_speedup(shapes: ProbeShapes, rows: int = PROBE_ROWS) -> float:
    """bf16-autocast speed over fp32 speed for one layer's linear maps on `rows` tokens (frozen fp32
    weights, as the base model's: autocast casts them on every call, and that cost is part of it)."""
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, inp, generator=generator) / inp**0.5 for inp, out in shapes.linears()]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], generator=generator) for w in weights}

    def layer() -> None:
        for weight in weights:
            F.linear(inputs[weight.shape[1]], weight)

    def bf16_layer() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer()

    with torch.inference_mode():
        layer()  # oneDNN builds its kernels on the first call of each precision
        bf16_layer()
        fp32 = _seconds(layer)
        bf16 = _seconds(bf16_layer)
        if bf16 > CLEARLY_SLOWER * fp32:  # e.g. AVX2 only: more calls would only cost time
            return fp32 / bf16
        for _ in range(PROBE_ROUNDS - 1):  # interleaved, so a burst of load elsewhere hits both alike
            fp32 = min(fp32, _seconds(layer))
            bf16 = min(bf16, _seconds(bf16_layer))
    return fp32 / bf16


@contextlib.contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def probed_speedup(shapes: ProbeShapes, cache_dir: Path) -> tuple[float, Path]:
    """The bf16/fp32 speed ratio for this machine, from the cache or measured (then cached)."""
    key = probe_key(shapes)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / "precision" / f"{digest}.json"
    with contextlib.suppress(ValueError, KeyError, TypeError):
        cached = read_json(path)
        if cached["key"] == key:
            return float(cached["speedup"]), path
    with _one_thread():
        speedup = measure_speedup(shapes)
    with contextlib.suppress(OSError):  # a read-only cache measures again next time
        atomic_write_json(path, {"key": key, "speedup": speedup, "measured": time.time()})
    return speedup, path


def choose(setting: bool | str, shapes: ProbeShapes, cache_dir: Path) -> Precision:
    """`true`/`false` force the precision; `auto` takes bf16 only where the probe measured it faster."""
    if isinstance(setting, bool):
        return Precision(setting, f"autocast-bf16 = {str(setting).lower()} (set in the run config)")
    if setting != AUTO:
        raise ValueError(f"autocast-bf16 = {setting!r}; expected true, false or {AUTO!r}")
    speedup, path = probed_speedup(shapes, cache_dir)
    verdict = f"{speedup:.2f}x as fast as fp32" if speedup >= 1 else f"{1 / speedup:.1f}x slower than fp32"
    bf16 = speedup >= MIN_SPEEDUP
    reason = (
        f"autocast-bf16 = auto: bf16 autocast ran this model's matmuls {verdict} on {cpu_description()}, "
        f"so {'bf16' if bf16 else 'fp32'} (bf16 needs >= {MIN_SPEEDUP}x; measured once, kept in {path})"
    )
    return Precision(bf16, reason, speedup)


def cuda_choice(device: torch.device) -> Precision:
    """`auto` on a GPU: bf16 where it has native bf16 matmuls (tensor cores run them several times
    faster than fp32), fp32 on older GPUs, where bf16 would be emulated."""
    # It asks about the current device. Making another one current creates a CUDA context in this
    # process (`fedoppu simulate` would hold GPU memory for the whole run), so only when needed.
    current = device.index in (None, torch.cuda.current_device())
    with contextlib.nullcontext() if current else torch.cuda.device(device):
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    reason = (
        f"autocast-bf16 = auto on {device} ({torch.cuda.get_device_name(device)}): torch.cuda.is_bf16_supported() "
        f"is {bf16}, so {'bf16' if bf16 else 'fp32'}"
    )
    return Precision(bf16, reason)


def compute_precision(config: RunConfig) -> Precision:
    """The precision this run computes in on this machine's `device`: every reader of `autocast-bf16`
    asks here."""
    return resolve_precision(config.autocast_bf16, config.model, str(resolve_device(config.device)))


@functools.cache  # once per process: the probe's file is read, or the probe runs, on first use only
def resolve_precision(setting: bool | str, model: str, device: str = "cpu") -> Precision:
    if isinstance(setting, bool):
        return choose(setting, ProbeShapes(0, 0, 0), Path())
    if device != "cpu":  # the run config's validation admits only true, false and auto
        return cuda_choice(torch.device(device))
    return choose(setting, ProbeShapes.of(model_config(model)), cache_root())
