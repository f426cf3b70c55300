"""SecAgg+ for the shared adapter, on Flower's legacy workflow: the only place Flower 1.42 offers it.

The server never sees one client's update, only the sum of all of them (docs/privacy.md). Clients
answer with the same train handler as every other setting; the ClientApp's `legacy_train_mod` translates
the legacy fit records. Per-round evaluation, checkpoints and accounting run in the same `after_round`
hook the Message-API strategies call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Context, MetricRecord, RecordDict
from flwr.common import Metrics, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from common import protocol
from common.adapters import StateDict
from server.privacy import PrivacyLayer, RoundRefused

# Every sampled client shares its masking secrets with all others (num_shares = 1.0 of them); masks
# are recovered from any half of them, so the server colluding with fewer than half the clients
# learns nothing about one update beyond the sum. Every client weighs 1 (num-examples under any
# privacy setting), so max_weight = 1 leaves the quantization all 2^22 levels for the update itself;
# Flower's default of 1000 scales each update by 1/1000 first, a thousand times the rounding error.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 0.5


def run_secagg(
    grid: Grid,
    privacy: PrivacyLayer,
    initial: StateDict,
    num_rounds: int,
    round_offset: int,
    after_round: Callable[[int, StateDict], None],
    aggregate_train: Callable[[list[RecordDict], str], MetricRecord],
    timeout: float | None = None,
) -> None:
    """Run `num_rounds` SecAgg+ rounds from `initial`, calling `after_round` at round 0 and after each.

    `timeout` bounds each of SecAgg+'s four stages; a node that misses one drops out of the round, and
    SecAgg+ recovers the sum of the others while enough of the masking secrets' shares arrive."""
    keys = list(initial)

    def evaluate_fn(server_round: int, arrays: NDArrays, _: dict[str, Scalar]) -> None:
        after_round(
            server_round, {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
        )

    def fit_config(server_round: int) -> dict[str, Scalar]:
        return {
            protocol.SERVER_ROUND: server_round,
            protocol.ROUND_OFFSET: round_offset,
            protocol.LEGACY_KEYS: ",".join(keys),
        }

    def fit_metrics(results: list[tuple[int, Metrics]]) -> Metrics:
        records = [RecordDict({protocol.METRICS: MetricRecord(dict(metrics))}) for _, metrics in results]
        return dict(aggregate_train(records, protocol.NUM_EXAMPLES))

    strategy = LegacyFedAvg(
        fraction_fit=privacy.config.fraction_train,
        fraction_evaluate=0.0,  # evaluation is driven by the ServerApp, per user and method
        min_fit_clients=privacy.sampled,
        min_available_clients=privacy.population,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=fit_config,
        initial_parameters=ndarrays_to_parameters([v.float().numpy() for v in initial.values()]),
        fit_metrics_aggregation_fn=fit_metrics,
    )
    exact = privacy.wrap_legacy(strategy)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=num_rounds),
        strategy=exact,
    )
    secagg = SecAggPlusWorkflow(
        num_shares=NUM_SHARES,
        reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
        max_weight=protocol.SECAGG_MAX_WEIGHT,
        clipping_range=protocol.SECAGG_CLIPPING_RANGE,
        quantization_range=protocol.SECAGG_QUANTIZATION_RANGE,
        timeout=timeout,
    )

    def fit_round(grid: Grid, context: LegacyContext) -> None:
        """SecAgg+ halts a round quietly (too few shares, nodes refusing); refuse it instead, before
        the round is evaluated and accounted as if it had been released."""
        aggregated = exact.aggregated
        secagg(grid, context)
        if exact.aggregated == aggregated:
            raise RoundRefused("SecAgg+ halted before aggregating this round (see the log above)")

    DefaultWorkflow(fit_workflow=fit_round)(grid, context)
