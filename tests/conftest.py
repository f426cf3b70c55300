"""Shared fixtures: a tiny random llama with the real SmolLM2 tokenizer, so unit tests take seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.model import load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


def tiny_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture()
def tiny_model(tokenizer):
    return tiny_llama(tokenizer), tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """The tiny model saved as an ordinary checkpoint, so code paths that load by name use it."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def flower_identity():
    """Messages built outside a running federation need a task identity, as the simulation engine sets."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir) -> dict:
    """Run-config overrides for a whole federation in seconds: the tiny model, 2 users, 2 short rounds."""
    return {
        "model": f'"{tiny_model_dir}"',
        "benchmark-users": 2,
        "benchmark-min-history": 8,
        "benchmark-max-history": 12,
        "benchmark-queries": 2,
        "num-rounds": 2,
        "local-steps": 2,
        "batch-size": 4,
        "personal-epochs": 0.5,
    }
