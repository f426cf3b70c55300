"""On a CUDA device: training, answering, precision and the simulation's GPU share. Skipped without one
(tests/test_device.py runs its device tests on the CPU, and on the GPU too where there is one)."""

import pytest
import torch

from client.resident import SHARED, ResidentModel
from client.training import encode_example, train_slot
from common.adapters import AdapterSpec
from common.config import load_run_config
from common.device import GPU_MEMORY_FRACTION_ENV, bound_gpu_memory, resolve_device
from common.precision import compute_precision
from simulations.engine_options import EngineOptions
from simulations.placement import client_gpu_bytes, place_clients, ray_backend_config
from tests.conftest import tiny_llama
from tests.test_training import mixed_and_per_user_answers

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here (torch.cuda.is_available() is False)"
)


def _trained(tokenizer, device: str, bf16: bool) -> tuple[float, dict]:
    resident = ResidentModel(tiny_llama(tokenizer), tokenizer, AdapterSpec(layers=(1,)), device)
    examples = [encode_example(tokenizer, f"question {i} about films:", " an answer", 32) for i in range(8)]
    resident.load(SHARED, resident.fresh(SHARED, 0))
    result = train_slot(
        resident, SHARED, examples, steps=4, batch_size=4, learning_rate=0.01, seed=0, autocast_bf16=bf16
    )
    return result.loss, resident.state(SHARED)


def test_a_training_step_on_the_gpu_matches_the_cpu(tokenizer):
    cpu_loss, cpu_state = _trained(tokenizer, "cpu", bf16=False)
    gpu_loss, gpu_state = _trained(tokenizer, "cuda", bf16=False)
    assert abs(gpu_loss - cpu_loss) < 1e-3
    assert all(torch.allclose(gpu_state[k], cpu_state[k], atol=1e-4) for k in cpu_state)
    if torch.cuda.is_bf16_supported(including_emulation=False):  # the precision `auto` picks there
        bf16_loss, _ = _trained(tokenizer, "cuda", bf16=True)
        assert abs(bf16_loss - cpu_loss) < 0.05 * cpu_loss


def test_mixed_adapter_answering_equals_per_user_answering_on_the_gpu(tokenizer):
    resident = ResidentModel(tiny_llama(tokenizer), tokenizer, AdapterSpec(layers=(1,)), "cuda")
    mixed, one_by_one = mixed_and_per_user_answers(resident)
    assert mixed == one_by_one
    assert len({tuple(a) for a in mixed}) > 1


def test_auto_precision_on_the_gpu_is_bf16_where_torch_says_it_is_supported(tiny_model_dir):
    config = load_run_config(overrides=[f'model="{tiny_model_dir}"', 'device="cuda"'])
    precision = compute_precision(config)
    assert precision.bf16 is torch.cuda.is_bf16_supported(including_emulation=False)
    assert torch.cuda.get_device_name(0) in precision.reason and precision.speedup is None


def test_the_default_gpu_share_packs_clients_by_the_measured_free_memory(tiny_model_dir, monkeypatch):
    config = load_run_config(overrides=[f'model="{tiny_model_dir}"'])
    placed, engine = place_clients(config, EngineOptions())
    free = torch.cuda.mem_get_info(0)[0]
    clients = int(0.9 * free // client_gpu_bytes(config, compute_precision(config).bf16))
    assert placed.device == "auto" and engine.client_device == "cuda"
    assert abs(engine.gpus_per_client - 1 / max(1, clients)) < 0.01
    assert ray_backend_config(engine, 16)["client_resources"]["num_gpus"] == engine.gpus_per_client
    # Each client's process is held to its share: more than that fails at once in that process alone.
    monkeypatch.setenv(GPU_MEMORY_FRACTION_ENV, "0.25")
    device = resolve_device("cuda")
    bound_gpu_memory(device)
    try:
        total = torch.cuda.get_device_properties(device).total_memory
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(0.3 * total), dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
