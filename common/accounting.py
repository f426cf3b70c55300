"""User-level epsilon of the shared adapter's rounds, computed with dp-accounting's RDP accountant.

Both sides need it: the server accounts and budgets the rounds it releases, and a `target-epsilon`
is turned into a noise multiplier from the run config alone, so the nodes check (policy) and ledger
the same z the server noises with. Poisson sampling of clients at rate q is credited (amplification
by subsampling: `PoissonSampledDpEvent` of the round's Gaussian); fixed-size sampling is not, each
round counting as a full Gaussian release (docs/privacy.md, "The sampling assumption").
"""

from __future__ import annotations

import functools
import logging

from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from common.config import ConfigError, RunConfig

POISSON = "poisson"
NO_AMPLIFICATION = "no-amplification"
SAMPLING_ASSUMPTIONS = {
    POISSON: "Poisson sampling: each client independently with probability q per round, amplification "
    "by subsampling credited (PoissonSampledDpEvent of the round's Gaussian)",
    NO_AMPLIFICATION: "no amplification: every round counts as a full Gaussian release, whichever clients "
    "were sampled",
}
# The settings whose per-round cost follows from z alone, so a target epsilon can choose z: the
# releases' noise multipliers relative to their sensitivity, as a factor of z (local-dp: 2C).
TARGETED_SCALE = {"central-dp": 1.0, "client-dp": 1.0, "local-dp": 0.5}
_BISECTION_STEPS = 50


class _QuietAbsl(logging.Filter):
    """dp-accounting warns for every fractional RDP order it cannot evaluate (and then skips it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietAbsl())


def credits_sampling(config: RunConfig) -> bool:
    """Poisson sampling is credited where the released mechanism hides who was sampled: central-dp.
    Under local-dp the server itself samples and sees each release, so no credit is taken."""
    return config.sample_rate > 0 and config.privacy == "central-dp"


def sampling_assumption(config: RunConfig) -> str:
    return POISSON if credits_sampling(config) else NO_AMPLIFICATION


@functools.lru_cache(maxsize=1024)
def epsilon(multipliers: tuple[float, ...], rounds: int, delta: float, sample_rate: float = 0.0) -> float:
    """Epsilon at `delta` after `rounds` identical rounds, each releasing Gaussians of these noise
    multipliers; with `sample_rate` > 0 each round is Poisson-subsampled at that rate."""
    if rounds <= 0 or not multipliers:
        return 0.0
    events = [dp_event.GaussianDpEvent(m) for m in multipliers]
    event = events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)
    if sample_rate > 0:
        event = dp_event.PoissonSampledDpEvent(sample_rate, event)
    accountant = RdpAccountant()
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_for_epsilon(target: float, scale: float, rounds: int, delta: float, sample_rate: float) -> float:
    """The smallest z (to 1e-4 relative) whose epsilon after `rounds` is at most `target`, for rounds that
    release one Gaussian of multiplier scale * z: epsilon falls as z grows, so bisection finds it."""

    def cost(z: float) -> float:
        return epsilon((scale * z,), rounds, delta, sample_rate)

    low, high = 1.0, 1.0
    while cost(high) > target:
        high *= 2
        if high > 1e6:
            raise ConfigError(f"target-epsilon = {target}: not reachable with any noise multiplier")
    while cost(low) <= target and low > 1e-3:
        low /= 2
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        if cost(middle) <= target:
            high = middle
        else:
            low = middle
        if high - low <= 1e-4 * high:
            break
    return high


def noise_multiplier(config: RunConfig) -> float:
    """The z this run noises with: `noise-multiplier`, or, with `target-epsilon` > 0 (which then takes
    precedence), the one the accountant derives for `num-rounds` at `dp-delta` and the sampling."""
    if config.target_epsilon <= 0:
        return config.noise_multiplier
    rate = config.sample_rate if credits_sampling(config) else 0.0
    scale = TARGETED_SCALE[config.privacy]
    return noise_for_epsilon(config.target_epsilon, scale, config.num_rounds, config.dp_delta, rate)
