"""The aggregation strategy for the shared adapter, chosen by name in the run config."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from common.config import RunConfig


def build_strategy(config: RunConfig, min_nodes: int) -> FedAvg:
    """Each round samples max(int(connected nodes * fraction-train), min_nodes) of the connected nodes,
    once min_nodes are connected (the round's grid bounds that wait): a round goes on with the nodes
    that are online. `min_nodes` is what a round needs to be aggregated (server/grid.py's RoundPolicy).
    Federated evaluation is driven by the ServerApp itself (per user, per method), so it is off here.

    The robust strategies answer updates that pass validation but are hostile (a bounded but
    poisoned update): fedmedian takes the coordinate-wise median, fedtrimmedavg drops the `trim-beta`
    fraction of largest and smallest values per coordinate before averaging.
    """
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": 0,
        "min_available_nodes": min_nodes,
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


class Delegating(Strategy):
    """A strategy that hands every step to the one it wraps; the wrappers override what they change."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def configure_train(self, server_round, arrays, config, grid):
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
