"""Sampling per round, the epsilon it earns, target-epsilon, and central-dp's DP-FedAvg (fixed
denominator, adaptive clipping, server momentum), without a federation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from peft import LoraConfig

from common.accounting import noise_multiplier
from common.config import ConfigError, load_run_config
from common.io import DataError
from server.carried import carried_state, restore_carried
from server.checkpoints import SERVER_STATE, CheckpointStore
from server.dpfedavg import CLIP_LEARNING_RATE
from server.privacy import PrivacyLayer
from server.sampling import ClientSampling, SampledNodes
from server.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("flower_identity")

SHAPES = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (32, 4)}


def _config(**overrides):
    return load_run_config(overrides=[f"{k}={v}" for k, v in overrides.items()])


def _central(**overrides):
    return _config(**{"privacy": '"central-dp"', **overrides})


# -- sampling ------------------------------------------------------------------------------------------
def test_poisson_sampling_includes_each_client_independently_at_its_rate():
    """2000 rounds of 50 clients at q = 0.1, seed fixed (so the test cannot flake): every client's count
    is within 5 binomial standard deviations of 200, and empty rounds of a 5-client population occur at
    (1 - q)^5 within 5 standard deviations."""
    sampling = ClientSampling.from_config(_config(**{"sample-rate": 0.1}), 50)
    nodes = list(range(100, 150))
    rounds = 2000
    counts = dict.fromkeys(nodes, 0)
    sizes = []
    for server_round in range(1, rounds + 1):
        chosen = sampling.sample(nodes, server_round)
        sizes.append(len(chosen))
        for node in chosen:
            counts[node] += 1
    sd = math.sqrt(rounds * 0.1 * 0.9)
    assert all(abs(count - 200) < 5 * sd for count in counts.values())
    assert np.mean(sizes) == pytest.approx(5.0, abs=5 * math.sqrt(50 * 0.09 / rounds))
    assert len(set(sizes)) > 5  # the cohort size varies: independent inclusion, not a fixed count
    small = ClientSampling.from_config(_config(**{"sample-rate": 0.1}), 5)
    empty = sum(not small.sample([1, 2, 3, 4, 5], r) for r in range(1, rounds + 1)) / rounds
    p = 0.9**5
    assert abs(empty - p) < 5 * math.sqrt(p * (1 - p) / rounds)


def test_sampling_is_seeded_by_the_run_and_the_round():
    config = _config(**{"sample-rate": 0.3})
    sampling = ClientSampling.from_config(config, 20)
    nodes = list(range(20))
    assert sampling.sample(nodes, 4) == ClientSampling.from_config(config, 20).sample(
        list(reversed(nodes)), 4
    )
    assert sampling.sample(nodes, 4) != sampling.sample(nodes, 5)
    other_seed = ClientSampling.from_config(config.replace(seed=1), 20)
    assert [sampling.sample(nodes, r) for r in range(1, 6)] != [
        other_seed.sample(nodes, r) for r in range(1, 6)
    ]


def test_fixed_size_sampling_takes_exactly_that_many_distinct_clients():
    sampling = ClientSampling.from_config(_config(**{"clients-per-round": 3}), 10)
    nodes = list(range(10, 20))
    seen = dict.fromkeys(nodes, 0)
    for server_round in range(1, 1001):
        chosen = sampling.sample(nodes, server_round)
        assert len(chosen) == len(set(chosen)) == 3 and set(chosen) <= set(nodes)
        for node in chosen:
            seen[node] += 1
    sd = math.sqrt(1000 * 0.3 * 0.7)
    assert all(abs(count - 300) < 5 * sd for count in seen.values())
    assert sampling.expected == 3.0


def test_the_strategy_sees_only_the_sampled_nodes():
    class Grid:
        def get_node_ids(self):
            return [7, 3, 5, 9]

    config = _config(**{"clients-per-round": 2})
    layer = PrivacyLayer(config, 4)
    strategy = layer.wrap(build_strategy(config.replace(fraction_train=1.0), 0))
    arrays = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), Grid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == layer.sampling.sample([3, 5, 7, 9], 1)
    assert isinstance(layer.sampling.view(Grid(), 1, 1), SampledNodes)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"clients-per-round": 2, "sample-rate": 0.1}, "set one of them"),
        ({"sample-rate": 1.0}, "sample-rate = 1.0"),
        ({"sample-rate": 0.1, "privacy": '"client-dp"'}, "needs the same number of clients"),
        ({"clients-per-round": 2, "privacy": '"secagg"'}, r"SecAgg\+ samples by fraction-train"),
        ({"target-epsilon": 4.0, "privacy": '"adaptive-dp"'}, "target-epsilon works with privacy"),
        ({"dp-server-momentum": 1.0}, "dp-server-momentum"),
        ({"shared-ffa-lora": "true", "peft-type": '"dora"'}, "needs peft-type"),
    ],
)
def test_bad_sampling_and_dp_keys_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(**overrides)


# -- accounting ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("z", "published"), [(0.5, 21.05), (0.7, 10.14), (1.0, 4.85), (1.5, 2.30)])
def test_poisson_epsilon_is_dp_accounting_called_directly(z, published):
    """The issue's figures: 200 users, q = 0.1, 30 rounds, delta 1e-5."""
    config = _central(
        **{"sample-rate": 0.1, "noise-multiplier": z, "num-rounds": 30, "dp-clipping": '"fixed"'}
    )
    layer = PrivacyLayer(config, 200)
    reference = RdpAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(z)), 30)
    assert layer.epsilon_after(30) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert round(layer.epsilon_after(30), 2) == published
    described = layer.describe()
    assert described["sampling_assumption"] == "poisson" and described["sampling"]["rate"] == 0.1
    # adaptive clipping's centred count makes the pair one Gaussian of z: the same epsilon
    assert PrivacyLayer(config.replace(dp_clipping="adaptive"), 200).epsilon_after(30) == layer.epsilon_after(
        30
    )


def test_fixed_size_sampling_and_local_dp_take_no_amplification():
    reference = RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(1.0), 5)
    fixed = PrivacyLayer(_central(**{"clients-per-round": 20}), 200)
    assert fixed.epsilon_after(5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert fixed.describe()["sampling_assumption"] == "no-amplification"
    local = PrivacyLayer(_config(privacy='"local-dp"', **{"sample-rate": 0.1}), 200)
    assert local.describe()["sampling_assumption"] == "no-amplification"  # the server sees who it sampled


@pytest.mark.parametrize(
    "overrides",
    [
        {"sample-rate": 0.5, "target-epsilon": 8.0},
        {"target-epsilon": 8.0},
        {"sample-rate": 0.1, "target-epsilon": 2.0, "num-rounds": 30},
        {"target-epsilon": 20.0, "privacy": '"local-dp"'},
    ],
)
def test_target_epsilon_inverts_the_accountant(overrides):
    config = _central(**{"noise-multiplier": 99.0, **overrides})  # target-epsilon takes precedence
    layer = PrivacyLayer(config, 200)
    z, target = noise_multiplier(config), config.target_epsilon
    assert layer.noise_multiplier == z != 99.0
    assert layer.epsilon_after(config.num_rounds) <= target
    slightly_less = PrivacyLayer(config.replace(target_epsilon=0.0, noise_multiplier=z * (1 - 1e-3)), 200)
    assert slightly_less.epsilon_after(config.num_rounds) > target
    described = layer.describe()
    assert described["noise_multiplier_from"] == "target-epsilon"
    assert described["epsilon_planned"] == pytest.approx(layer.epsilon_after(config.num_rounds))


# -- DP-FedAvg -----------------------------------------------------------------------------------------
class _ConstantNoise:
    """Noise of a known value, so the arithmetic of a round can be checked exactly."""

    def __init__(self, value: float) -> None:
        self.value = value

    def normal(self, loc, scale, size=None):
        return np.full(size, self.value) if size is not None else self.value


def _round(strategy, current, updates, server_round=1):
    """One round sent to 4 clients (or whom the sampling picks), of which the first len(updates) reply."""
    arrays = ArrayRecord({k: Array(current[k].astype(np.float32)) for k in SHAPES})
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), _Nodes(4)))
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array((current[k] + u[k]).astype(np.float32)) for k in SHAPES}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            ),
            reply_to=message,
        )
        for message, u in zip(messages, updates, strict=False)
    ]
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    return {k: a.numpy().astype(np.float64) for k, a in aggregated.items()}


class _Nodes:
    def __init__(self, count: int) -> None:
        self.count = count

    def get_node_ids(self):
        return list(range(1, self.count + 1))


def _update(scale: float, seed: int):
    rng = np.random.default_rng(seed)
    update = {k: rng.normal(size=s) for k, s in SHAPES.items()}
    norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
    return {k: u * scale / norm for k, u in update.items()}


def _dp_strategy(**overrides):
    config = _central(**{"clipping-norm": 1.0, "dp-delta": 0.01, **overrides})
    layer = PrivacyLayer(config, 4)
    if layer.sampling.mode == "fraction":
        return layer, layer.wrap(build_strategy(config, 1))
    return layer, layer.wrap(build_strategy(config.replace(fraction_train=1.0), 0), 0, wait_for=0)


def test_the_mean_divides_by_the_expected_count_and_momentum_acts_on_the_noised_mean():
    layer, strategy = _dp_strategy(
        **{"dp-clipping": '"fixed"', "dp-server-momentum": 0.9, "noise-multiplier": 0.5}
    )
    layer.strategy.rng = _ConstantNoise(0.25)
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    first = [_update(3.0, 0), _update(0.5, 1)]  # only 2 of 4 replied: still divided by 4; the first clipped
    after_one = _round(strategy, current, first)
    clipped_sum = {k: first[0][k] / 3.0 + first[1][k] for k in SHAPES}
    noised_mean_1 = {k: (clipped_sum[k] + 0.25) / 4 for k in SHAPES}
    for key in SHAPES:
        np.testing.assert_allclose(after_one[key], noised_mean_1[key], atol=1e-6)
    second = [_update(0.2, 2)]
    after_two = _round(strategy, after_one, second, server_round=2)
    for key in SHAPES:  # v2 = 0.9 v1 + noised mean 2; adapter += v2
        noised_mean_2 = (second[0][key] + 0.25) / 4
        np.testing.assert_allclose(
            after_two[key], after_one[key] + 0.9 * noised_mean_1[key] + noised_mean_2, atol=1e-6
        )


def test_a_round_that_sampled_nobody_releases_noise_alone():
    layer, strategy = _dp_strategy(
        **{"dp-clipping": '"fixed"', "dp-server-momentum": 0.0, "sample-rate": 0.5}
    )
    # Seeded: the 192 draws' standard deviation has a standard error of 5%; unseeded, a 10% tolerance
    # failed one run in twenty.
    layer.strategy.rng = np.random.default_rng(0)
    empty = next(r for r in range(1, 100) if not layer.sampling.sample([1, 2, 3, 4], r))
    current = {k: np.ones(s) for k, s in SHAPES.items()}
    released = _round(strategy, current, [], server_round=empty)
    noise = np.concatenate([(released[k] - current[k]).ravel() for k in SHAPES])
    assert noise.std() == pytest.approx(1.0 * 1.0 / 2, rel=0.1)  # z C / expected clients (q N = 2)
    assert abs(noise.mean()) < 0.1


def test_adaptive_clipping_moves_the_norm_towards_the_median_update():
    layer, strategy = _dp_strategy(**{"dp-server-momentum": 0.0})
    layer.strategy.rng = _ConstantNoise(0.0)
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    _round(strategy, current, [_update(5.0, seed) for seed in range(4)])  # all above C = 1: it grows
    assert layer.round_clipping_norm() == 1.0
    assert layer.strategy.clipping_norm == pytest.approx(math.exp(CLIP_LEARNING_RATE * 0.5))
    _round(
        strategy, current, [_update(0.1, seed) for seed in range(4)], server_round=2
    )  # all within: shrinks
    assert layer.strategy.clipping_norm == pytest.approx(1.0)


def _noise(layer, value: float) -> None:
    if hasattr(layer.strategy, "rng"):  # DP-FedAvg: noise of a known value
        layer.strategy.rng = _ConstantNoise(value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dp-server-momentum": 0.9},  # central-dp: adaptive clip norm and server momentum
        {"privacy": '"none"', "strategy": '"fedadam"', "server-learning-rate": 0.5},
        {"privacy": '"none"', "strategy": '"fedavgm"', "server-learning-rate": 0.5},
    ],
)
def test_a_resumed_run_goes_on_with_the_clip_norm_and_momentum_it_checkpointed(tmp_path, overrides):
    """Round 3 after a resume from round 2's checkpoint equals round 3 of the run that never stopped:
    the adapted clip norm and server momentum (or the base strategy's own moments) come back with it,
    where a resume without them would train differently."""
    layer, strategy = _dp_strategy(**overrides)
    _noise(layer, 0.01)
    current = {k: np.zeros(s) for k, s in SHAPES.items()}
    for server_round, scale in ((1, 5.0), (2, 3.0)):
        current = _round(strategy, current, [_update(scale, s) for s in range(4)], server_round)
    store = CheckpointStore(tmp_path)
    adapter = {k: torch.from_numpy(v.astype(np.float32)) for k, v in current.items()}
    carried = carried_state(strategy)
    assert carried and all(torch.isfinite(t).all() for t in carried.values())
    store.save(2, adapter, LoraConfig(r=4, target_modules=["q_proj"]), carried)

    last_round, restored_adapter, restored = store.latest()
    assert last_round == 2 and set(restored) == set(carried)
    resumed_layer, resumed = _dp_strategy(**overrides)
    _noise(resumed_layer, 0.01)
    restore_carried(resumed, restored, "latest.json")
    fresh_layer, fresh = _dp_strategy(**overrides)  # a resume without the carried state
    _noise(fresh_layer, 0.01)
    start = {k: v.double().numpy() for k, v in restored_adapter.items()}
    third = [_update(1.0, s) for s in range(4, 8)]
    expected = _round(strategy, current, third, 3)
    after_resume = _round(resumed, start, third, 3)
    for key in SHAPES:
        np.testing.assert_allclose(after_resume[key], expected[key], atol=1e-5)
    after_fresh = _round(fresh, start, third, 3)
    assert not all(np.allclose(after_fresh[k], expected[k], atol=1e-5) for k in SHAPES)


def test_carried_state_that_is_not_the_runs_strategy_is_named(tmp_path):
    _, strategy = _dp_strategy()
    with pytest.raises(DataError, match=r"'0/m_t/x' is not state of this run's strategy"):
        restore_carried(strategy, {"0/m_t/x": torch.zeros(2)}, "latest.json")
    store = CheckpointStore(tmp_path)
    config = LoraConfig(r=4, target_modules=["q_proj"])
    target = store.save(
        1, {"a.lora_A.weight": torch.zeros(4, 16)}, config, {"1/clipping_norm": torch.tensor(1.0)}
    )
    (target / SERVER_STATE).write_bytes(b"truncated")
    with pytest.raises(DataError, match="strategy's state is missing or fails its sha256 check"):
        store.latest()
