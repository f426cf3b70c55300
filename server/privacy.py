"""The server side of the privacy settings: which strategy guards the shared adapter, and epsilon.

Every setting trains with the same client code; only this layer differs (docs/privacy.md). Epsilon is
user-level (add or remove one client, i.e. one user's whole history when a client hosts one user),
accounted with dp-accounting's RDP accountant (common/accounting.py): Poisson sampling (`sample-rate`)
is credited under central-dp, any other sampling is not. Each round releases the same events, so the
budget check is exact: `affordable_rounds` says, before training, after how many rounds the next
release would exceed `max-epsilon`, and the federation stops there.

central-dp is DP-FedAvg (server/dpfedavg.py): its mean has a fixed denominator, so a round may
aggregate fewer replies than it sampled (down to the quorum of server/grid.py) without lowering the
noise per user. The other settings divide by the number of replies (Flower's wrappers, SecAgg+): a
round aggregates exactly the sampled clients' replies, each of weight 1, or it is refused
(`RoundRefused`). SecAgg+ rounds its sum to 2^22 levels per weight; secagg+dp accounts that error as
part of the sensitivity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ArrayRecord
from flwr.server.strategy import DifferentialPrivacyClientSideFixedClipping as LegacyClientSideClipping
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from common import accounting, protocol
from common.config import ConfigError, RunConfig
from server.dpfedavg import DPFedAvg
from server.grid import RoundFailed
from server.sampling import ClientSampling
from server.strategy import Delegating

ACCOUNTING = {
    "none": "no DP: no epsilon can be claimed",
    "central-dp": "RDP, Gaussian noise z per round on the sum of updates clipped to C (sensitivity C) over a "
    "fixed denominator; adaptive clipping's centred count and the sum together are one Gaussian of multiplier z",
    "client-dp": "RDP, Gaussian noise z per round on the sum of updates clipped to C by the clients",
    "adaptive-dp": "RDP, per round two Gaussian releases: the update sum (z_updates) and the clipped count "
    "(noise std sigma_count, sensitivity 1: Flower's bits are not centred)",
    "local-dp": "RDP, per client per round a Gaussian release with sensitivity 2C (any two histories of the "
    "user): noise multiplier z/2; protects each update from the server itself",
    "secagg": "no DP: SecAgg+ hides individual updates, not the aggregate; no epsilon can be claimed",
    "secagg+dp": "RDP (standalone accountant), Gaussian noise z per round on the SecAgg+ sum of client-clipped "
    "updates; sensitivity C plus SecAgg+'s rounding bound",
}


NEIGHBOURING = {
    name: "add or remove one client (one user's whole history)"
    for name in ("central-dp", "client-dp", "adaptive-dp", "secagg+dp")
} | {"local-dp": "replace one client's data (any two histories of the user), seen by the server"}


@dataclass(frozen=True)
class AdaptiveNoise:
    """Flower's adaptive clipping splits the noise between the update sum and the clipped count."""

    update_multiplier: float
    count_stddev: float

    @classmethod
    def for_config(cls, noise_multiplier: float, sampled: float) -> AdaptiveNoise:
        # Flower's default count noise (sampled/20) refuses z >= sampled/10, which small federations hit;
        # at least z keeps the split valid (z < 2 * sigma_count) at any size.
        count_stddev, update_multiplier = compute_adaptive_noise_params(
            noise_multiplier, sampled, max(sampled / 20, noise_multiplier)
        )
        return cls(update_multiplier, count_stddev)


class RoundClipAdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower 1.42's adaptive wrapper, noising each round's sum with the clip norm that round used.

    Flower updates the clip norm from the noisy clipped count *before* it adds noise to the sum, so the
    noise is scaled by the next round's norm: whenever the norm shrinks, the sum of updates clipped to
    C_t gets noise for C_{t+1} < C_t and the noise multiplier falls below the configured one by a
    data-dependent factor no accountant can bound. Restoring C_t for the noise makes every round the
    fixed pair of Gaussian releases that `round_events` accounts for.
    """

    def configure_train(self, server_round, arrays, config, grid):
        self.round_clipping_norm = self.clipping_norm
        return super().configure_train(server_round, arrays, config, grid)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        next_norm, self.clipping_norm = self.clipping_norm, self.round_clipping_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = next_norm


class RoundRefused(RoundFailed):
    """A round under a privacy setting did not get exactly the sampled replies, each of weight 1; like
    any round that cannot be aggregated, it ends training early with every checkpoint kept."""


def check_round(server_round: int, expected: int | None, weights: list[float], errors: list[str]) -> None:
    """Refuse a private round's aggregation unless every one of the `expected` sampled clients
    replied with weight 1; with `expected` None (no privacy setting), unless any client replied."""
    exact = expected is None or (not errors and len(weights) == expected and all(w == 1 for w in weights))
    if exact and weights:
        return
    wanted = "a reply" if expected is None else f"exactly {expected} replies of weight 1"
    first = f": {errors[0]}" if errors else ""
    raise RoundRefused(
        f"round {server_round} needs {wanted}; got {len(weights)} replies (weights {sorted(set(weights))}) "
        f"and {len(errors)} error(s){first}. Checkpoints of earlier rounds are kept: resume when every "
        "node is back"
    )


class ExactRounds(Delegating):
    """A Message-API strategy whose rounds aggregate exactly the sampled replies of weight 1 (`exact`),
    or any reply at all (not `exact`), or raise RoundRefused. Its `sampling` picks each round's
    clients (server/sampling.py); a round that sampled nobody goes to the strategy with no replies."""

    def __init__(
        self,
        strategy: Strategy,
        exact: bool,
        sampling: ClientSampling,
        round_offset: int = 0,
        wait_for: int = 1,
    ) -> None:
        super().__init__(strategy)
        self.exact, self.sampling = exact, sampling
        self.round_offset, self.wait_for = round_offset, wait_for
        self.sent = max(1, round(sampling.expected))  # the clients the round in progress was sent to

    def configure_train(self, server_round, arrays, config, grid):
        grid = self.sampling.view(grid, self.round_offset + server_round, self.wait_for)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sent = len(messages)
        return messages

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        if self.sent == 0:  # nobody sampled: central-dp releases noise alone, the others skip the round
            return self.strategy.aggregate_train(server_round, replies)
        good = [r for r in replies if not r.has_error()]
        weights = [r.content[protocol.METRICS].get(protocol.NUM_EXAMPLES, 0) for r in good]
        errors = [
            f"node {r.metadata.src_node_id}: {protocol.node_error(r.error.code, r.error.reason)}"
            for r in replies
            if r.has_error()
        ]
        check_round(server_round, self.sent if self.exact else None, weights, errors)
        return self.strategy.aggregate_train(server_round, replies)


class ExactLegacyRounds(LegacyStrategy):
    """The legacy (SecAgg+) strategy's counterpart of ExactRounds; `aggregated` counts its rounds."""

    def __init__(self, strategy: LegacyStrategy, expected: int) -> None:
        self.strategy, self.expected, self.aggregated = strategy, expected, 0

    def initialize_parameters(self, client_manager):
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round, parameters, client_manager):
        return self.strategy.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        errors = [f"a client failed: {type(failure).__name__}" for failure in failures]
        check_round(server_round, self.expected, [fit.num_examples for _, fit in results], errors)
        self.aggregated += 1
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round, parameters, client_manager):
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round, results, failures):
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round, parameters):
        return self.strategy.evaluate(server_round, parameters)


class PrivacyLayer:
    """One run's privacy setting: its sampling, the wrapped strategy, its accounting and its budget."""

    def __init__(
        self, config: RunConfig, num_clients: int, completed_rounds: int = 0, num_weights: int = 0
    ) -> None:
        self.config = config
        self.setting = config.privacy
        self.num_weights = num_weights  # the shared adapter's size on the wire (d, per client)
        self.population = num_clients
        self.sampling = ClientSampling.from_config(config, num_clients)
        self.expected = self.sampling.expected  # clients per round on average (DP-FedAvg's denominator)
        self.sampled = max(1, round(self.expected))  # the fixed count Flower's wrappers and SecAgg+ expect
        self.noise_multiplier = accounting.noise_multiplier(config) if self.accounted else 0.0
        if self.accounted and config.dp_delta >= 1 / num_clients:
            raise ConfigError(
                f"dp-delta = {config.dp_delta} is not below 1/{num_clients} (one over the number of clients): "
                "a mechanism that publishes one user's history outright would satisfy it"
            )
        if self.legacy and self.sampled < 2:
            raise ConfigError(f"privacy = {self.setting!r}: SecAgg+ needs at least 2 clients per round")
        self.releases = completed_rounds if self.accounted else 0
        self.strategy: Strategy | None = None  # the wrapped Message-API strategy, once built

    # -- what the setting is -----------------------------------------------------------------------
    @property
    def accounted(self) -> bool:
        return self.setting not in ("none", "secagg")

    @property
    def legacy(self) -> bool:
        """SecAgg+ exists only on Flower's legacy workflow (LegacyContext + DefaultWorkflow)."""
        return self.setting in ("secagg", "secagg+dp")

    @property
    def adaptive(self) -> AdaptiveNoise | None:
        """The noise split of adaptive clipping: adaptive-dp (Flower's), or central-dp's default."""
        if self.setting == "adaptive-dp" or (
            self.setting == "central-dp" and self.config.dp_clipping == "adaptive"
        ):
            return AdaptiveNoise.for_config(self.noise_multiplier, self.expected)
        return None

    @property
    def quantization_bound(self) -> float:
        """secagg+dp: the L2 bound of SecAgg+'s rounding error on one client's update."""
        return protocol.secagg_quantization_bound(self.num_weights) if self.setting == "secagg+dp" else 0.0

    def round_multipliers(self) -> tuple[float, ...]:
        """The private releases of one round, as noise multipliers relative to their sensitivity."""
        z = self.noise_multiplier
        if self.setting in ("central-dp", "client-dp"):  # central-dp's adaptive pair is one Gaussian of z
            return (z,)
        if self.setting == "secagg+dp":  # noise z*C on a sum whose sensitivity is C + rounding
            clip = self.config.clipping_norm
            return (z * clip / (clip + self.quantization_bound),)
        if self.setting == "local-dp":
            return (z / 2,)
        if (adaptive := self.adaptive) is not None:
            return (adaptive.update_multiplier, adaptive.count_stddev)
        return ()

    @property
    def sample_rate(self) -> float:
        """The sampling rate the accountant credits (0: none)."""
        return self.config.sample_rate if accounting.credits_sampling(self.config) else 0.0

    @property
    def needs_every_sampled_client(self) -> bool:
        """Whether the aggregate's noise is calibrated to the sampled count (Flower's DP wrappers and the
        SecAgg+ DP sum): a round aggregated from fewer replies would carry less noise per user than
        accounted, so such a round is refused (retried, then training stops) instead. central-dp's
        fixed denominator makes the noise per user independent of the count."""
        return self.setting in ("client-dp", "adaptive-dp", "secagg+dp")

    def update_norm_bound(self, max_update_norm: float, num_params: int) -> float | None:
        """The L2 bound the server checks each update against (None: no bound).

        client-dp: the clients must have clipped to C, so C itself (plus float rounding). local-dp: the
        clipped update plus the client's Gaussian noise, whose norm exceeds z*C*(sqrt(d) + 8) with
        probability below 1e-13 (`max-update-norm` would refuse every honest update). Otherwise
        `max-update-norm` (0: none); central-dp and adaptive-dp clip on the server after the check.
        """
        clip, z = self.config.clipping_norm, self.noise_multiplier
        if self.setting == "client-dp":
            return min(clip * (1 + 1e-3), max_update_norm or math.inf)
        if self.setting == "local-dp":
            return clip + z * clip * (math.sqrt(num_params) + 8)
        return max_update_norm or None

    # -- accounting --------------------------------------------------------------------------------
    def epsilon_after(self, rounds: int) -> float | None:
        """Epsilon at dp-delta after `rounds` releases; None where no DP guarantee exists."""
        if not self.accounted:
            return None
        return accounting.epsilon(self.round_multipliers(), rounds, self.config.dp_delta, self.sample_rate)

    def spent(self) -> float | None:
        """Epsilon released so far; None where no DP guarantee exists."""
        return self.epsilon_after(self.releases)

    def affordable_rounds(self, done: int, remaining: int) -> int:
        """How many of the remaining rounds fit in max-epsilon, given `done` rounds already released."""
        if self.config.max_epsilon <= 0 or not self.accounted:
            return remaining
        affordable = 0
        while affordable < remaining and (self.epsilon_after(done + affordable + 1) or 0.0) <= (
            self.config.max_epsilon
        ):
            affordable += 1
        return affordable

    def released(self) -> None:
        """One round's aggregate went out: compose its cost (a Poisson round that sampled nobody
        released noise and counts too: the accountant's analysis includes it)."""
        if self.accounted:
            self.releases += 1

    def round_clipping_norm(self) -> float | None:
        """The clip norm of the round just aggregated, where it adapts (None: fixed)."""
        return getattr(self.strategy, "round_clipping_norm", None) if self.adaptive is not None else None

    # -- the strategy ------------------------------------------------------------------------------
    def wrap(self, strategy: FedAvg, round_offset: int = 0, wait_for: int = 1) -> Strategy:
        """The Message-API strategy for this setting (local-dp adds no noise on the server), sampling
        each round's clients: exact rounds under the settings whose noise assumes the sampled count,
        otherwise any reply (a round that sampled nobody excepted)."""
        self.strategy = self._wrapped(strategy)
        exact = self.setting not in ("none", "central-dp")  # central-dp's denominator is fixed
        return ExactRounds(self.strategy, exact, self.sampling, round_offset, wait_for)

    def _wrapped(self, strategy: FedAvg) -> Strategy:
        z, clip = self.noise_multiplier, self.config.clipping_norm
        adaptive = self.adaptive
        if self.setting == "central-dp":
            return DPFedAvg(
                strategy,
                adaptive.update_multiplier if adaptive is not None else z,
                clip,
                self.expected,
                count_stddev=adaptive.count_stddev if adaptive is not None else None,
                momentum=self.config.dp_server_momentum,
            )
        if self.setting == "client-dp":
            return DifferentialPrivacyClientSideFixedClipping(strategy, z, clip, self.sampled)
        if adaptive is not None:
            return RoundClipAdaptiveClipping(
                strategy,
                z,
                self.sampled,
                initial_clipping_norm=clip,
                clipped_count_stddev=adaptive.count_stddev,
            )
        return strategy

    def wrap_legacy(self, strategy: LegacyFedAvg) -> ExactLegacyRounds:
        """secagg+dp: clients clip (client/mods.py: NodeClippingMod), the server noises the SecAgg+ sum."""
        if self.setting == "secagg+dp":
            strategy = LegacyClientSideClipping(
                strategy, self.noise_multiplier, self.config.clipping_norm, self.sampled
            )
        return ExactLegacyRounds(strategy, self.sampled)

    def describe(self) -> dict:
        """What metrics.json records about the setting (epsilon per round is added by the rounds)."""
        accounted = self.accounted
        info = {
            "setting": self.setting,
            "noise_multiplier": self.noise_multiplier,
            "noise_multiplier_from": "target-epsilon"
            if accounted and self.config.target_epsilon
            else "noise-multiplier",
            "target_epsilon": self.config.target_epsilon or None,
            "clipping_norm": self.config.clipping_norm if accounted else None,
            "clipping": (self.config.dp_clipping if self.setting == "central-dp" else "fixed")
            if accounted
            else None,
            "server_momentum": self.config.dp_server_momentum if self.setting == "central-dp" else None,
            "delta": self.config.dp_delta if accounted else None,
            "max_epsilon": self.config.max_epsilon or None,
            "population": self.population,
            "sampling": self.sampling.describe(),
            "sampling_assumption": accounting.sampling_assumption(self.config) if accounted else None,
            "sampling_assumption_text": accounting.SAMPLING_ASSUMPTIONS[
                accounting.sampling_assumption(self.config)
            ]
            if accounted
            else None,
            "sampled_per_round": self.expected,
            "params_per_client": self.num_weights,
            "neighbouring": NEIGHBOURING.get(self.setting),
            "accounting": ACCOUNTING[self.setting],
        }
        if accounted:
            info["epsilon_planned"] = self.epsilon_after(self.config.num_rounds)
        if (adaptive := self.adaptive) is not None:
            info["update_noise_multiplier"] = adaptive.update_multiplier
            info["count_noise_stddev"] = adaptive.count_stddev
        if self.setting == "secagg+dp":
            info["quantization_l2_bound"] = self.quantization_bound
            info["accounted_noise_multiplier"] = self.round_multipliers()[0]
        return info
