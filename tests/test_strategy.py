import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg

from common.config import STRATEGIES, load_run_config
from server.strategy import build_strategy

pytestmark = pytest.mark.usefixtures("flower_identity")


def _replies(values, weights):
    replies = []
    for value, weight in zip(values, weights, strict=True):
        content = RecordDict(
            {
                "arrays": ArrayRecord(
                    {"lora_A": torch.full((2, 3), value), "lora_B": torch.full((3,), -value)}
                ),
                "metrics": MetricRecord({"num-examples": weight, "train-loss": value}),
            }
        )
        request = Message(RecordDict(), dst_node_id=1, message_type="train")
        replies.append(Message(content, reply_to=request))
    return replies


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_builds_from_the_run_config(name):
    strategy = build_strategy(load_run_config(overrides=[f"strategy={name}"]), min_nodes=3)
    assert strategy.fraction_evaluate == 0.0
    # A round samples the connected nodes once its quorum is connected (the grid bounds that wait).
    assert strategy.min_train_nodes == strategy.min_available_nodes == 3
    if name == "fedprox":
        assert isinstance(strategy, FedProx) and strategy.proximal_mu == 0.01


def test_fedavg_weights_adapters_by_examples():
    strategy = build_strategy(load_run_config(), min_nodes=2)
    assert type(strategy) is FedAvg
    arrays, metrics = strategy.aggregate_train(1, _replies([1.0, 2.0, 4.0], [1, 1, 2]))
    state = arrays.to_numpy_ndarrays()
    assert np.allclose(state[0], 2.75) and np.allclose(state[1], -2.75)
    assert metrics["train-loss"] == pytest.approx(2.75)


def test_robust_strategies_resist_an_outlier():
    median = build_strategy(load_run_config(overrides=["strategy=fedmedian"]), min_nodes=2)
    assert isinstance(median, FedMedian)
    arrays, _ = median.aggregate_train(1, _replies([1.0, 1.2, 1000.0], [1, 1, 1]))
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.2)
    trimmed = build_strategy(
        load_run_config(overrides=["strategy=fedtrimmedavg", "trim-beta=0.2"]), min_nodes=3
    )
    assert isinstance(trimmed, FedTrimmedAvg)
    arrays, _ = trimmed.aggregate_train(1, _replies([1.0, 1.0, 1.0, 1.0, 1000.0], [1] * 5))
    assert np.allclose(arrays.to_numpy_ndarrays()[0], 1.0)
