"""`device`: where clients compute, validated as a run-config key, resolved on the machine that computes,
and how many simulated clients share a GPU (Ray's client resources), with the GPU's memory mocked."""

import math

import pytest
import torch

from client.hidden import HiddenStates
from client.inference import answer_users
from client.resident import PERSONAL, SHARED, ResidentModel
from client.training import encode_example, train_slot
from common import device as device_module
from common.adapters import AdapterSpec
from common.config import ConfigError, load_run_config
from common.device import GPU_MEMORY_FRACTION_ENV, bound_gpu_memory, resolve_device
from common.precision import Precision
from simulations import placement
from simulations.engine_options import EngineOptions
from simulations.placement import client_gpu_bytes, place_clients, ray_backend_config
from tests.conftest import tiny_llama

# The same tests run on the GPU where torch sees one.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("setting", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_the_device_key_takes_auto_cpu_cuda_and_cuda_n(setting):
    assert load_run_config(overrides=[f'device="{setting}"']).device == setting


@pytest.mark.parametrize("setting", ["gpu", "CUDA", "cuda:", "cuda:x", "cuda:-1", "mps", ""])
def test_any_other_device_is_an_error_naming_the_key(setting):
    with pytest.raises(ConfigError, match=r"device = .*expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        load_run_config(overrides=[f'device="{setting}"'])


def test_auto_is_the_gpu_where_torch_sees_one_and_the_cpu_elsewhere():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_on_a_machine_without_cuda_is_an_error_that_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"device = '{setting}', but this machine has no CUDA device"):
            resolve_device(setting)


def test_a_cuda_index_beyond_the_machines_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda") == torch.device("cuda", 0) == resolve_device("auto")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"torch sees 2 CUDA device\(s\) here"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("setting", DEVICES)
def test_every_tensor_of_the_resident_model_and_its_slots_sits_on_the_device(tokenizer, setting):
    where = resolve_device(setting)
    resident = ResidentModel(tiny_llama(tokenizer), tokenizer, AdapterSpec(layers=(1,)), where)
    resident.answer_slots([resident.fresh(PERSONAL, 1), None])
    tensors = dict(resident.peft.named_parameters()) | dict(resident.peft.named_buffers())
    assert [name for name, tensor in tensors.items() if tensor.device != where] == []
    for slot in (SHARED, PERSONAL, "answer-1"):
        assert any(f".{slot}." in name for name in tensors)
    # What leaves the slots (to the wire, the store, the seeded initialization) is on the CPU.
    assert {t.device.type for slot in (SHARED, PERSONAL) for t in resident.state(slot).values()} == {"cpu"}


@pytest.mark.parametrize("setting", DEVICES)
def test_training_and_answering_run_on_the_device_with_the_states_below_kept_in_host_memory(
    tokenizer, setting
):
    resident = ResidentModel(
        tiny_llama(tokenizer), tokenizer, AdapterSpec(layers=(1,)), resolve_device(setting)
    )
    examples = [encode_example(tokenizer, f"item {i} tag:", " comedy", 32) for i in range(8)]
    hidden = HiddenStates(resident, 2**20)
    resident.load(SHARED, resident.fresh(SHARED, 0))
    result = train_slot(
        resident, SHARED, examples, steps=3, batch_size=4, learning_rate=0.05, seed=0, hidden=hidden
    )
    assert result.steps == 3 and math.isfinite(result.loss)
    assert len(hidden) == 8 and {s.device.type for s in hidden._memory.values()} == {"cpu"}
    assert any(t.abs().sum() > 0 for k, t in resident.state(SHARED).items() if "lora_B" in k)  # trained
    prompts = [["item 1 tag:", "item 2 tag:"], ["item 3 tag:"]]
    answers = answer_users(
        resident, prompts, [resident.fresh(PERSONAL, 1), None], max_new_tokens=3, max_prompt_tokens=32
    )
    assert [len(a) for a in answers] == [2, 1] and all(isinstance(a, str) for u in answers for a in u)


def test_a_client_process_holds_itself_to_its_share_of_the_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(
        device_module.torch.cuda, "set_per_process_memory_fraction", lambda *a: calls.append(a)
    )
    bound_gpu_memory(torch.device("cuda", 0))  # outside a simulation: no bound
    monkeypatch.setenv(GPU_MEMORY_FRACTION_ENV, "0.25")
    bound_gpu_memory(torch.device("cpu"))
    bound_gpu_memory(torch.device("cuda", 0))
    assert calls == [(0.25, torch.device("cuda", 0))]


@pytest.fixture()
def on_a_gpu(monkeypatch):
    """The machine has a bf16-capable GPU, as far as placement can tell."""
    monkeypatch.setattr(
        placement, "resolve_device", lambda setting: torch.device(setting if ":" in setting else "cuda:0")
    )
    monkeypatch.setattr(placement, "compute_precision", lambda config: Precision(True, "a GPU with bf16"))


def test_the_footprint_of_a_client_on_a_gpu_is_the_documented_formula(tokenizer, tiny_model_dir):
    config = load_run_config(overrides=[f'model="{tiny_model_dir}"', "adapter-layers=1"])
    params = sum(p.numel() for p in tiny_llama(tokenizer).parameters())
    tokens = config.batch_size * config.max_seq_len
    activations = tokens * 1 * 64 * 34  # one trained layer of hidden size 64, 16-bit under bf16 autocast
    logits = tokens * len(tokenizer) * 4 * 2
    expected = 600 * 2**20 + params * 4 + params * 2 + activations + logits
    assert client_gpu_bytes(config, bf16=True) == expected
    fp32 = expected - params * 2 + activations  # no bf16 weight copies; activations in 32 bit
    assert client_gpu_bytes(config, bf16=False) == fp32


def test_the_default_packs_as_many_clients_per_gpu_as_the_free_memory_fits(on_a_gpu, tiny_model_dir):
    config = load_run_config(overrides=[f'model="{tiny_model_dir}"', "adapter-layers=1"])
    footprint = client_gpu_bytes(config, bf16=True)
    placed, engine = place_clients(config, EngineOptions(), free_memory=lambda index: 10 * footprint)
    assert engine.gpus_per_client == 0.1111  # floor(0.9 * 10) = 9 clients, to Ray's 4 decimals
    assert engine.client_device == "cuda" and placed.device == "auto" and engine.gpu is None
    resources = ray_backend_config(engine, total_cpus=16)
    assert (
        resources["client_resources"]["num_gpus"] == 0.1111 and resources["client_resources"]["num_cpus"] == 1
    )
    assert "num_gpus" not in resources["init_args"]  # Ray finds the GPUs itself
    _, engine = place_clients(config, EngineOptions(), free_memory=lambda index: footprint // 2)
    assert engine.gpus_per_client == 1.0  # a client that barely fits gets a GPU of its own


def test_a_requested_gpu_share_is_taken_as_given(on_a_gpu, tiny_model_dir):
    config = load_run_config(overrides=[f'model="{tiny_model_dir}"'])

    def unmeasured(index):
        pytest.fail("measured the free memory although a share was given")

    _, engine = place_clients(config, EngineOptions(gpus_per_client=0.25), free_memory=unmeasured)
    assert ray_backend_config(engine, 16)["client_resources"]["num_gpus"] == 0.25
    _, engine = place_clients(config.replace(device="cuda:1"), EngineOptions(gpus_per_client=0.5))
    assert engine.gpu == 1 and engine.client_device == "cuda"  # Ray sees GPU 1 alone, as the clients' cuda:0
    placed, engine = place_clients(config, EngineOptions(gpus_per_client=0.0), free_memory=unmeasured)
    assert placed.device == "cpu" and engine.client_device == "cpu"  # auto with no GPU share: the CPU
    assert ray_backend_config(engine, 16)["init_args"]["num_gpus"] == 0
    with pytest.raises(ConfigError, match="gives the simulated clients no GPU"):
        place_clients(config.replace(device="cuda"), EngineOptions(gpus_per_client=0.0))
    with pytest.raises(ConfigError, match=r"--gpus-per-client 1\.5: expected a share of one GPU"):
        place_clients(config, EngineOptions(gpus_per_client=1.5))


def test_on_a_cpu_machine_simulated_clients_ask_ray_for_no_gpu(monkeypatch):
    monkeypatch.setattr(placement, "resolve_device", lambda setting: torch.device("cpu"))
    config = load_run_config()
    placed, engine = place_clients(config, EngineOptions(), free_memory=lambda index: pytest.fail("measured"))
    assert placed == config and engine.gpus_per_client == 0.0 and engine.client_device == "cpu"
    resources = ray_backend_config(engine, total_cpus=2)
    assert resources["client_resources"]["num_gpus"] == 0.0 and resources["init_args"]["num_gpus"] == 0
    with pytest.raises(ConfigError, match="a share of a GPU needs a CUDA device"):
        place_clients(config, EngineOptions(gpus_per_client=0.5))
