"""The privacy layer without a federation: noise, clipping, epsilon, budget, and where the mods act."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.common import Code, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server.strategy import FedAvg as LegacyFedAvg

from client.mods import NodeClippingMod, legacy_train_mod, privacy_layer_mod, train_privacy_mods
from common import protocol
from common.config import ConfigError, load_run_config
from common.protocol import LEGACY_KEYS
from server.privacy import PrivacyLayer, RoundRefused
from server.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("flower_identity")

CLIENTS = 4
SHAPES = {"a.lora_A.weight": (8, 64), "a.lora_B.weight": (2048, 8)}


def _config(setting: str, z: float = 1.0, clip: float = 0.5, **extra):
    overrides = {"privacy": f'"{setting}"', "noise-multiplier": z, "clipping-norm": clip, **extra}
    return load_run_config(overrides=[f"{k}={v}" for k, v in overrides.items()])


class _Grid:
    def get_node_ids(self):
        return list(range(1, CLIENTS + 1))


def _norm(arrays) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


def _clip(update, clip):
    scale = min(1.0, clip / _norm(update))
    return [u * scale for u in update]


def _updates(seed: int = 0):
    """Fixed client updates, all above the clip norm (so adaptive clipping must shrink its norm)."""
    rng = np.random.default_rng(seed)
    updates = []
    for client in range(CLIENTS):
        update = [rng.normal(size=shape).astype(np.float32) for shape in SHAPES.values()]
        target = 2.0 + client
        updates.append([u * (target / _norm(update)) for u in update])
    return updates


def _aggregate(layer: PrivacyLayer, updates, clip_on_client: bool):
    """One round of the wrapped strategy on fixed updates; returns global, aggregate and sent replies."""
    strategy = layer.wrap(build_strategy(layer.config, CLIENTS))
    rng = np.random.default_rng(1)
    current = {k: rng.normal(size=s).astype(np.float32) * 0.01 for k, s in SHAPES.items()}
    messages = list(
        strategy.configure_train(
            1, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord(), _Grid()
        )
    )
    replies = []
    for msg, update in zip(messages, updates, strict=True):
        if clip_on_client:  # what fixedclipping_mod does with the norm the wrapper sent
            assert msg.content["config"]["clipping_norm"] == layer.config.clipping_norm
            update = _clip(update, layer.config.clipping_norm)
        arrays = ArrayRecord({k: Array(current[k] + u) for k, u in zip(SHAPES, update, strict=True)})
        replies.append(
            Message(
                RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg
            )
        )
    aggregated, _ = strategy.aggregate_train(1, replies)
    return current, aggregated, replies


@pytest.mark.parametrize("setting", ["central-dp", "client-dp", "adaptive-dp"])
def test_aggregate_noise_has_the_configured_std_and_updates_are_clipped(setting):
    layer = PrivacyLayer(_config(setting), CLIENTS)
    clip = layer.config.clipping_norm
    updates = _updates()
    current, aggregated, replies = _aggregate(layer, updates, clip_on_client=setting == "client-dp")
    for reply in replies if setting != "central-dp" else []:  # Flower's wrappers clip the replies in place
        sent = reply.content["arrays"].to_numpy_ndarrays()
        assert _norm([s - current[k] for s, k in zip(sent, SHAPES, strict=True)]) <= clip * (1 + 1e-5)
    expected_mean = [
        current[k] + sum(_clip(u, clip)[i] for u in updates) / CLIENTS for i, k in enumerate(SHAPES)
    ]
    deviation = np.concatenate(
        [(a - e).ravel() for a, e in zip(aggregated.to_numpy_ndarrays(), expected_mean, strict=True)]
    )
    # adaptive (adaptive-dp, central-dp's default): the update sum's share of z, this round's clip norm
    z = layer.adaptive.update_multiplier if layer.adaptive is not None else layer.config.noise_multiplier
    expected_std = z * clip / CLIENTS
    assert abs(deviation.mean()) < 0.05 * expected_std
    assert deviation.std() == pytest.approx(expected_std, rel=0.03)
    layer.released()
    assert layer.spent() == pytest.approx(layer.epsilon_after(1))


def test_local_dp_clips_then_adds_noise_of_z_times_c_on_the_client():
    (mod,) = train_privacy_mods("local-dp", 0.5, 0.3)
    received = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    update = _updates()[0]  # norm 2.0, clipped to 0.3
    msg = Message(
        RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in received.items()}), "config": ConfigRecord()}
        ),
        dst_node_id=1,
        message_type="train",
    )

    def handler(message, _context):
        arrays = ArrayRecord({k: Array(u) for k, u in zip(SHAPES, update, strict=True)})
        return Message(
            RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=message
        )

    reply = mod(msg, None, handler)
    noise = np.concatenate(
        [
            (a - c).ravel()
            for a, c in zip(reply.content["arrays"].to_numpy_ndarrays(), _clip(update, 0.3), strict=True)
        ]
    )
    assert list(reply.content["arrays"]) == list(SHAPES)
    assert noise.std() == pytest.approx(0.5 * 0.3, rel=0.03)


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("setting", ["central-dp", "client-dp", "local-dp", "adaptive-dp", "secagg+dp"])
def test_epsilon_matches_an_independent_rdp_computation(setting, z):
    layer = PrivacyLayer(_config(setting, z=z), num_clients=8)
    if setting == "local-dp":
        events = [dp_event.GaussianDpEvent(z / 2)]  # sensitivity 2C against the server
    elif setting == "adaptive-dp":
        count_std = max(8 / 20, z)
        update_z = (z**-2 - (2 * count_std) ** -2) ** -0.5  # Andrew et al.'s split of the noise
        events = [dp_event.GaussianDpEvent(update_z), dp_event.GaussianDpEvent(count_std)]
    else:
        events = [dp_event.GaussianDpEvent(z)]
    for rounds in (1, 3, 10):
        reference = RdpAccountant()
        for event in events:
            reference.compose(event, rounds)
        assert layer.epsilon_after(rounds) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def _closed_form_epsilon(z: float, rounds: int, delta: float) -> float:
    """The Gaussian mechanism's RDP in closed form, rounds * a / (2 z^2), converted to (epsilon, delta)
    with the bound of Canonne, Kamath and Steinke (2020, Prop. 12) at the orders dp-accounting tries."""
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    return min(
        rounds * a / (2 * z**2) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        for a in orders
        if a > 1.01
    )


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0])
def test_epsilon_is_the_closed_form_gaussian_rdp_bound(z):
    layer = PrivacyLayer(_config("central-dp", z=z), num_clients=8)
    for rounds in (1, 4, 20):
        closed = _closed_form_epsilon(z, rounds, 1e-5)
        assert layer.epsilon_after(rounds) == pytest.approx(closed, rel=1e-9)
        # and below Mironov's classic conversion at its best order
        assert closed <= rounds / (2 * z**2) + math.sqrt(2 * rounds * math.log(1e5)) / z


def test_epsilon_agrees_with_the_figures_measured_in_the_notes():
    layer = PrivacyLayer(_config("central-dp", z=1.0), num_clients=4)
    assert [round(layer.epsilon_after(r), 2) for r in (1, 2, 3)] == [4.73, 7.08, 9.01]


def test_secagg_rounding_is_within_its_bound_and_accounted():
    """With every client at weight 1 (max_weight = 1) SecAgg+ rounds each weight by under one step of
    2 * 8 / 2^22; secagg+dp's epsilon treats that bound as part of the sensitivity."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    rng = np.random.default_rng(0)
    params = [rng.normal(0, 0.05, size=s).astype(np.float32) for s in SHAPES.values()]
    rounded = dequantize(
        quantize(params, protocol.SECAGG_CLIPPING_RANGE, protocol.SECAGG_QUANTIZATION_RANGE),
        protocol.SECAGG_CLIPPING_RANGE,
        protocol.SECAGG_QUANTIZATION_RANGE,
    )
    error = _norm([r - p for r, p in zip(rounded, params, strict=True)])
    weights = sum(p.size for p in params)
    assert 0 < error <= protocol.secagg_quantization_bound(weights)
    layer = PrivacyLayer(_config("secagg+dp", z=1.0, clip=0.01), num_clients=4, num_weights=weights)
    z_accounted = 1.0 * 0.01 / (0.01 + protocol.secagg_quantization_bound(weights))
    assert layer.describe()["accounted_noise_multiplier"] == pytest.approx(z_accounted)
    reference = RdpAccountant()
    reference.compose(dp_event.GaussianDpEvent(z_accounted), 2)
    assert layer.epsilon_after(2) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert layer.epsilon_after(2) > PrivacyLayer(_config("client-dp", z=1.0, clip=0.01), 4).epsilon_after(2)


def _direction(seed: int = 3):
    rng = np.random.default_rng(seed)
    direction = [rng.normal(size=s) for s in SHAPES.values()]
    return [d / _norm(direction) for d in direction]


def _private_round(setting: str, updates, z: float = 1.0, clip: float = 0.5, lost: int = 0):
    """One round through both halves of a setting: the node's own privacy mods (SecAgg+'s masking
    aside: its sum is exact up to rounding) around each client's update, then the server's wrapper."""
    layer = PrivacyLayer(_config(setting, z=z, clip=clip), CLIENTS)
    strategy = layer.wrap(build_strategy(layer.config, CLIENTS))
    current = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    messages = strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in current.items()}), ConfigRecord(), _Grid()
    )
    mods = [m for m in train_privacy_mods(setting, z, clip) if isinstance(m, NodeClippingMod)]
    replies = []
    for msg, update in zip(messages, updates, strict=True):

        def handler(message, _context, update=update):
            arrays = ArrayRecord(
                {k: Array((current[k] + u).astype(np.float32)) for k, u in zip(SHAPES, update, strict=True)}
            )
            return Message(
                RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=message
            )

        replies.append(make_ffn(handler, mods)(msg, None))
    aggregated, _ = strategy.aggregate_train(1, replies[lost:])
    return layer, aggregated.to_numpy_ndarrays()


@pytest.mark.parametrize("setting", ["central-dp", "client-dp", "adaptive-dp", "local-dp", "secagg+dp"])
def test_one_huge_update_moves_the_release_by_at_most_c_over_n(setting):
    """Project the released aggregate on the direction of one client's update 2000 C long: clipped, it
    moves the mean by C/n plus the noise; without clipping (anywhere on its path) by 500 C."""
    direction, clip = _direction(), 0.5
    small = [[1e-3 * d for d in _direction(seed)] for seed in range(CLIENTS - 1)]  # the others barely move
    layer, released = _private_round(setting, [[2000 * clip * d for d in direction], *small], clip=clip)
    moved = sum(float(np.sum(r * d)) for r, d in zip(released, direction, strict=True))
    z = layer.adaptive.update_multiplier if layer.adaptive is not None else 1.0
    noise = z * clip / math.sqrt(CLIENTS) if setting == "local-dp" else z * clip / CLIENTS
    if setting == "secagg+dp":
        noise = 0.0  # the server's noise is the legacy wrapper's (a simulated run checks it)
    assert abs(moved - clip / CLIENTS) <= 6 * noise + 1e-3


def test_a_private_round_needs_every_sampled_reply_with_weight_one():
    direction = _direction()
    for setting in ("adaptive-dp", "local-dp"):  # one node's reply lost: fewer, weaker noise
        with pytest.raises(RoundRefused, match="exactly 4 replies of weight 1; got 3 replies"):
            _private_round(setting, [[1e-3 * d for d in direction]] * CLIENTS, lost=1)
    strategy = PrivacyLayer(_config("local-dp"), CLIENTS).wrap(build_strategy(_config("local-dp"), CLIENTS))
    heavy = [
        Message(
            RecordDict({"metrics": MetricRecord({"num-examples": w})}), dst_node_id=1, message_type="train"
        )
        for w in (1, 1, 1, 9)
    ]
    with pytest.raises(RoundRefused, match=r"weights \[1, 9\]"):
        strategy.aggregate_train(1, heavy)
    legacy = PrivacyLayer(_config("secagg"), CLIENTS).wrap_legacy(LegacyFedAvg())
    with pytest.raises(RoundRefused, match="1 error"):
        legacy.aggregate_fit(1, [], [RuntimeError("node 5 dropped")])
    # Without a privacy setting a round may lose nodes, but a round no node trained in is refused,
    # naming the nodes' codes (here: what a node's policy answers a run it does not accept).
    plain = PrivacyLayer(_config("none"), CLIENTS).wrap(build_strategy(_config("none"), CLIENTS))
    refused = Message(Error(3101, protocol.NodeError.REFUSED_BY_POLICY.text), reply_to=heavy[0])
    with pytest.raises(RoundRefused, match=r"needs a reply; got 0 replies .* refused by policy"):
        plain.aggregate_train(1, [refused])


def test_the_budget_stops_before_the_round_that_would_exceed_it():
    layer = PrivacyLayer(_config("central-dp", z=1.0, **{"max-epsilon": 8.0}), num_clients=4)
    assert layer.affordable_rounds(0, 5) == 2  # 4.73, 7.08, then 9.01 > 8
    assert layer.affordable_rounds(2, 3) == 0
    resumed = PrivacyLayer(layer.config, num_clients=4, completed_rounds=2)
    assert resumed.spent() == pytest.approx(layer.epsilon_after(2))
    assert PrivacyLayer(_config("secagg"), 4).affordable_rounds(0, 5) == 5  # no DP, no budget to spend
    assert PrivacyLayer(_config("none"), 4).spent() is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy": '"secagg"', "strategy": '"fedprox"'}, "works with strategy fedavg"),
        ({"privacy": '"central-dp"', "strategy": '"fedadam"'}, "fedavg or fedprox"),
        ({"privacy": '"central-dp"', "noise-multiplier": 0}, "needs noise-multiplier > 0"),
        ({"privacy": '"dp"'}, "expected one of"),
        ({"dp-delta": 1.5}, "dp-delta"),
    ],
)
def test_bad_privacy_configs_fail_with_the_key_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(overrides=[f"{k}={v}" for k, v in overrides.items()])


def test_the_population_must_fit_delta_and_secagg():
    with pytest.raises(ConfigError, match="not below 1/8"):
        PrivacyLayer(_config("central-dp", **{"dp-delta": 0.2}), num_clients=8)
    with pytest.raises(ConfigError, match="at least 2 clients"):
        PrivacyLayer(_config("secagg"), num_clients=1)


@pytest.mark.parametrize("message_type", ["train.personalize", "evaluate"])
@pytest.mark.parametrize("setting", ["client-dp", "local-dp", "secagg+dp"])
def test_privacy_mods_leave_personal_adapters_and_evaluation_alone(message_type, setting):
    msg = Message(
        RecordDict({"config": ConfigRecord({"method": "oppu"})}), dst_node_id=1, message_type=message_type
    )
    reply = Message(RecordDict({"metrics": MetricRecord({"n": 1})}), reply_to=msg)

    class _Context:
        run_config = _config(setting).to_flower()

    assert privacy_layer_mod(msg, _Context(), lambda m, c: reply) is reply


def test_legacy_fit_messages_reach_the_train_handler_as_named_arrays():
    keys = list(SHAPES)
    received = [np.full(s, i, np.float32) for i, s in enumerate(SHAPES.values())]
    fitins = FitIns(ndarrays_to_parameters(received), {"server-round": 1, LEGACY_KEYS: ",".join(keys)})
    msg = Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=1, message_type="train")
    seen = {}

    def handler(inner, _context):
        seen["arrays"] = {k: a.numpy() for k, a in inner.content["arrays"].items()}
        seen["config"] = dict(inner.content["config"])
        reordered = ArrayRecord({k: Array(seen["arrays"][k] + 1) for k in reversed(keys)})
        metrics = MetricRecord({"num-examples": 1, "train-loss": 0.5})
        return Message(RecordDict({"arrays": reordered, "metrics": metrics}), reply_to=inner)

    reply = legacy_train_mod(msg, None, handler)
    assert list(seen["arrays"]) == keys and seen["config"] == {"server-round": 1}
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.status.code == Code.OK and fitres.num_examples == 1
    assert fitres.metrics == {"num-examples": 1, "train-loss": 0.5}
    for got, sent in zip(parameters_to_ndarrays(fitres.parameters), received, strict=True):
        np.testing.assert_array_equal(got, sent + 1)  # back in the order the server sent
