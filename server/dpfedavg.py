"""central-dp: DP-FedAvg with adaptive clipping and server momentum, the recipe under which user-level DP
trains (McMahan et al. 2018; Andrew et al. 2021; TensorFlow Federated's DP tutorial).

Each round, on the server:
1. each sampled client's update (reply minus the adapter sent) is clipped to the round's norm C_t;
2. the clipped updates are summed and N(0, (z_u C_t)^2) is added to the sum: the only release;
3. the noised sum is divided by the *expected* number of clients per round (q * N under Poisson
   sampling, the fixed count otherwise), not by the number that replied. With that fixed denominator
   the sensitivity of the mean to one user is C_t / m whatever the round's count, so the
   Poisson-subsampled Gaussian analysis holds, a round that sampled nobody releases noise alone (as
   that analysis assumes: skipping it would reveal that nobody was sampled), and a client that
   drops out does not lower anyone's noise;
4. adaptive clipping (`dp-clipping = adaptive`): the count of updates within C_t, centred (b - 1/2, so
   its sensitivity is 1/2) and noised with N(0, sigma_b^2), moves C towards the median update norm:
   C_{t+1} = C_t exp(-0.2 (b~ - 0.5)). With z_u = (z^-2 - (2 sigma_b)^-2)^-1/2 the two releases
   together are exactly one Gaussian mechanism of multiplier z (Andrew et al., Thm. 1), which is what
   the accountant composes;
5. server momentum (`dp-server-momentum`, beta): v <- beta v + noised mean, adapter <- adapter + v.
   It is post-processing of the released means, so it costs no privacy; it averages the noise of
   consecutive rounds while the signal adds up.
The noise comes from a generator the operating system seeds: the training seeds are public.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from common import protocol
from server.strategy import Delegating

TARGET_QUANTILE = 0.5  # Andrew et al.: clip at the median update norm
CLIP_LEARNING_RATE = 0.2  # Andrew et al.'s geometric update rate


class DPFedAvg(Delegating):
    """Clip, sum, noise and divide by the expected count; adapt the clip norm; apply server momentum."""

    def __init__(
        self,
        strategy: FedAvg,
        noise_multiplier: float,
        clipping_norm: float,
        expected_clients: float,
        *,
        count_stddev: float | None = None,
        momentum: float = 0.0,
    ) -> None:
        """`count_stddev` None: fixed clipping at `clipping_norm`, the update sum noised with z. Otherwise
        adaptive clipping from `clipping_norm`; `noise_multiplier` is then the update sum's share z_u."""
        super().__init__(strategy)
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.round_clipping_norm = clipping_norm  # the norm the last aggregated round clipped to
        self.expected_clients = expected_clients
        self.count_stddev = count_stddev
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] | None = None
        self.current: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng()

    def configure_train(self, server_round, arrays, config, grid):
        self.current = {key: array.numpy().astype(np.float64) for key, array in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = [reply for reply in replies if not reply.has_error()]
        clip = self.clipping_norm
        total = {key: np.zeros_like(value) for key, value in self.current.items()}
        within = 0
        for reply in replies:
            update = _update(reply, self.current)
            norm = math.sqrt(sum(float(np.sum(u * u)) for u in update.values()))
            within += norm <= clip
            scale = min(1.0, clip / norm) if norm > 0 else 1.0
            for key, value in update.items():
                total[key] += value * scale
        std = self.noise_multiplier * clip
        mean = {
            key: (value + self.rng.normal(0.0, std, value.shape)) / self.expected_clients
            for key, value in total.items()
        }
        self.round_clipping_norm = clip
        if self.count_stddev is not None:
            centred = within - len(replies) / 2 + self.rng.normal(0.0, self.count_stddev)
            within_fraction = centred / self.expected_clients + 0.5
            self.clipping_norm = clip * math.exp(-CLIP_LEARNING_RATE * (within_fraction - TARGET_QUANTILE))
        step = mean
        if self.momentum > 0:
            previous = self.velocity or {key: np.zeros_like(value) for key, value in mean.items()}
            step = {key: self.momentum * previous[key] + value for key, value in mean.items()}
            self.velocity = step
        arrays = ArrayRecord(
            {key: Array((self.current[key] + step[key]).astype(np.float32)) for key in self.current}
        )
        metrics = None
        if replies and self.strategy.train_metrics_aggr_fn is not None:
            metrics = self.strategy.train_metrics_aggr_fn(
                [reply.content for reply in replies], self.strategy.weighted_by_key
            )
        return arrays, metrics


def _update(reply: Message, current: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = reply.content[protocol.ARRAYS]
    return {key: arrays[key].numpy().astype(np.float64) - value for key, value in current.items()}
