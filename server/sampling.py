"""Which clients train in a round: Flower's fraction, a fixed number, or Poisson sampling.

`fraction-train` alone leaves sampling to Flower's strategy (`max(int(connected * fraction), min)` of the
connected nodes, drawn with the global `random` the run seeds). `clients-per-round` and `sample-rate`
sample here instead, from the connected nodes in node-id order with a generator seeded by the run's
seed and the round, so a resumed run samples the same positions in each round it redoes. The strategy
then sees only the sampled nodes (`SampledNodes`, a view of the grid), and the round's quorum
(server/grid.py) applies to them. Evaluation and personalization do not go through it: they reach every
node. Poisson sampling is what the accountant credits under central-dp (common/accounting.py); a
Poisson round may sample no client (server/dpfedavg.py releases noise alone then, as the analysis
assumes; without DP the round is skipped and recorded).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from flwr.serverapp import Grid

from common.config import ConfigError, RunConfig

FRACTION, FIXED, POISSON = "fraction", "fixed-size", "poisson"


@dataclass(frozen=True)
class ClientSampling:
    """How a round picks its clients from a population of `population` nodes."""

    mode: str
    population: int
    fraction: float
    size: int
    rate: float
    seed: int

    @classmethod
    def from_config(cls, config: RunConfig, population: int) -> ClientSampling:
        if config.sample_rate > 0:
            mode = POISSON
        elif config.clients_per_round > 0:
            mode = FIXED
            if config.clients_per_round > population:
                raise ConfigError(
                    f"clients-per-round = {config.clients_per_round} is more than the {population} clients"
                )
        else:
            mode = FRACTION
        return cls(
            mode, population, config.fraction_train, config.clients_per_round, config.sample_rate, config.seed
        )

    @property
    def expected(self) -> float:
        """Clients per round on average: DP-FedAvg's fixed denominator, and the accountant's sample size."""
        if self.mode == POISSON:
            return self.rate * self.population
        if self.mode == FIXED:
            return float(self.size)
        return float(max(1, math.ceil(self.population * self.fraction)))

    def sample(self, nodes: list[int], server_round: int) -> list[int]:
        """The round's clients among the connected `nodes` (a fraction: all of them, Flower samples)."""
        nodes = sorted(nodes)
        rng = np.random.default_rng([self.seed, server_round])
        if self.mode == POISSON:
            return [
                node for node, draw in zip(nodes, rng.random(len(nodes)), strict=True) if draw < self.rate
            ]
        if self.mode == FIXED:
            return sorted(nodes[i] for i in rng.choice(len(nodes), size=self.size, replace=False))
        return nodes

    def view(self, grid: Grid, server_round: int, wait_for: int) -> Grid:
        """The grid as the strategy sees it in this round: only the sampled nodes, once `wait_for` nodes
        are connected (the round's grid ends that wait after min-nodes-timeout)."""
        if self.mode == FRACTION:
            return grid
        while len(nodes := list(grid.get_node_ids())) < wait_for:
            time.sleep(1)
        return SampledNodes(grid, self.sample(nodes, server_round))

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "population": self.population,
            "expected_per_round": self.expected,
            **({"rate": self.rate} if self.mode == POISSON else {}),
            **({"clients_per_round": self.size} if self.mode == FIXED else {}),
        }


class SampledNodes:
    """A grid that shows the strategy only the round's sampled nodes."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self.nodes = grid, nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
