"""`autocast-bf16 = "auto"`: bf16 only where this machine measured it faster, measured once per machine."""

import json

import pytest
import torch

from common import precision
from common.precision import MIN_SPEEDUP, ProbeShapes, choose, measure_speedup

SHAPES = ProbeShapes(hidden=64, kv=32, intermediate=128)


def test_true_and_false_force_the_precision_without_measuring(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "measure_speedup", lambda shapes: pytest.fail("measured"))
    assert choose(True, SHAPES, tmp_path).bf16 and not choose(False, SHAPES, tmp_path).bf16
    assert "set in the run config" in choose(False, SHAPES, tmp_path).reason


@pytest.mark.parametrize(
    ("speedup", "bf16"), [(0.05, False), (1.0, False), (MIN_SPEEDUP - 0.01, False), (2.2, True)]
)
def test_auto_takes_bf16_only_where_it_measured_faster(monkeypatch, tmp_path, speedup, bf16):
    monkeypatch.setattr(precision, "measure_speedup", lambda shapes: speedup)
    chosen = choose("auto", SHAPES, tmp_path)
    assert chosen.bf16 is bf16 and chosen.speedup == speedup
    assert ("so bf16" if bf16 else "so fp32") in chosen.reason
    assert chosen.record()["autocast_bf16"] is bf16


def test_the_measurement_is_kept_per_machine_and_redone_when_the_key_changes(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(precision, "measure_speedup", lambda shapes: calls.append(shapes) or 2.0)
    assert choose("auto", SHAPES, tmp_path).bf16 and choose("auto", SHAPES, tmp_path).bf16
    assert len(calls) == 1
    (cached,) = (tmp_path / "precision").glob("*.json")
    assert json.loads(cached.read_text())["key"]["torch"]  # keyed by the torch version, CPU and flags
    this_cpu = precision.cpu_name
    monkeypatch.setattr(precision, "cpu_name", lambda: "another CPU")
    choose("auto", SHAPES, tmp_path)
    assert len(calls) == 2
    monkeypatch.setattr(precision, "cpu_name", this_cpu)
    cached.write_text("{broken")  # an unreadable record is measured again
    choose("auto", SHAPES, tmp_path)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="expected true, false or 'auto'"):
        choose("fast", SHAPES, tmp_path)


def test_the_probe_measures_both_precisions():
    assert measure_speedup(SHAPES, rows=8) > 0


@pytest.mark.parametrize("supported", [True, False])
def test_auto_on_a_gpu_takes_bf16_where_torch_says_the_gpu_supports_it(monkeypatch, supported):
    monkeypatch.setattr(precision, "measure_speedup", lambda shapes: pytest.fail("probed a GPU's precision"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "A Test GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: supported)
    chosen = precision.cuda_choice(torch.device("cuda", 0))
    assert chosen.bf16 is supported and chosen.speedup is None
    assert f"on cuda:0 (A Test GPU): torch.cuda.is_bf16_supported() is {supported}" in chosen.reason
