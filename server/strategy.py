"""The aggregation strategy for the shared adapter, chosen by name in the run config."""

from __future__ import annotations

import math

from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi

from common.config import RunConfig


def build_strategy(config: RunConfig, num_nodes: int) -> FedAvg:
    """Federated evaluation is driven by the ServerApp itself (per user, per method), so it is off here."""
    sampled = max(1, math.ceil(num_nodes * config.fraction_train))
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": sampled,
        "min_evaluate_nodes": 0,
        "min_available_nodes": num_nodes,
    }
    name = config.strategy
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    if name == "fedadam":
        return FedAdam(**common, eta=config.server_learning_rate)
    if name == "fedyogi":
        return FedYogi(**common, eta=config.server_learning_rate)
    if name == "fedavgm":
        return FedAvgM(
            **common, server_learning_rate=config.server_learning_rate, server_momentum=config.server_momentum
        )
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=config.trim_beta)
    raise ValueError(
        f"strategy {name!r} is not one of fedavg, fedprox, fedadam, fedyogi, fedavgm, fedmedian, fedtrimmedavg"
    )
