"""The ServerApp's work: federated rounds for the shared adapter, then personalization and evaluation.

Evaluation is driven here rather than by the strategy so each method is scored per user from exact
metric counts; per-round evaluation of the shared adapter runs inside the strategy's evaluate_fn,
which is also where every round's checkpoint is written.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common import protocol
from common.adapters import AdapterSpec, StateDict, initial_adapter
from common.config import RunConfig
from common.methods import METHODS
from common.tasks import get_task
from server.checkpoints import CheckpointStore
from server.grid import MeteredSortedGrid
from server.privacy import PrivacyLayer
from server.results import Evaluation, RunRecorder
from server.secagg import run_secagg
from server.strategy import build_strategy


class ClientFailure(RuntimeError):
    """A node replied with an error instead of a result."""


def node_counts(replies: Iterable[Message]) -> list[dict[str, float]]:
    """Each node's own record: its answer count and, where its policy allows, its summed counts."""
    return [dict(reply.content[protocol.METRICS]) for reply in replies]


def user_counts(replies: Iterable[Message], label: str) -> dict[str, dict[str, float]]:
    """Per-user metric counts from every node's reply; a user reported by two nodes is an error,
    since summing them would silently score that user twice."""
    counts: dict[str, dict[str, float]] = {}
    owners: dict[str, int] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        for name, record in reply.content.metric_records.items():
            user = protocol.record_user(name)
            if user is None:
                continue
            if user in owners:
                raise ClientFailure(
                    f"{label}: user {user!r} is reported by node {owners[user]} and node {node}; "
                    "each user's data must live on exactly one node"
                )
            owners[user] = node
            counts[user] = dict(record)
    return counts


@dataclass
class SharedTraining:
    """Stage 1 in progress: its rounds, privacy layer, grid, train metrics and latest shared adapter."""

    start_round: int
    last_round: int
    privacy: PrivacyLayer
    grid: MeteredSortedGrid
    latest: StateDict
    train_metrics: list[dict[str, float]] = field(default_factory=list)

    def aggregate_train(self, records: list[RecordDict], weighting: str) -> MetricRecord:
        aggregated = aggregate_metricrecords(records, weighting)
        self.train_metrics.append({**dict(aggregated), "clients": len(records)})
        return aggregated


class Federation:
    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid = grid
        self.config = config
        self.task = get_task(config.task)
        self.spec = AdapterSpec.from_config(config)
        self.checkpoints = CheckpointStore(config.run_dir)
        self.recorder = RunRecorder(config.run_dir, self.task, resume=config.resume)
        self.node_ids = sorted(grid.get_node_ids())
        self.stopped_early = False  # set by federate() when the privacy budget ends training early
        self.shared_round = 0  # the round the latest shared adapter comes from

    # -- messaging ---------------------------------------------------------------------------------
    def broadcast(
        self,
        message_type: str,
        method: str | None,
        shared: StateDict | None,
        label: str,
        extra: dict[str, int | str] | None = None,
    ) -> list[Message]:
        """Send one message per node and collect every reply, showing progress as nodes finish."""
        messages = protocol.requests(
            message_type, self.node_ids, method=method or "", shared=shared, config=extra
        )
        pending = set(self.grid.push_messages(messages))
        replies: list[Message] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True) as progress:
            bar = progress.add_task(f"{label} ({len(messages)} clients)", total=len(messages))
            while pending:
                for reply in self.grid.pull_messages(list(pending)):
                    pending.discard(reply.metadata.reply_to_message_id)
                    replies.append(reply)
                    progress.advance(bar)
                if pending:
                    time.sleep(0.2)
        errors = [
            f"node {r.metadata.src_node_id}: {protocol.node_error(r.error.code)}"
            for r in replies
            if r.has_error()
        ]
        if errors:
            raise ClientFailure(f"{label}: {len(errors)} client(s) failed; first error: {errors[0]}")
        return replies

    def evaluate(self, method: str, shared: StateDict | None, label: str | None = None) -> Evaluation:
        label = label or f"evaluating {method}"
        scope = {protocol.USER_SCOPE: self.recorder.user_scope}
        replies = self.broadcast(protocol.EVALUATE, method, shared, label, scope)
        return Evaluation.from_counts(self.task, node_counts(replies), user_counts(replies, label))

    def evaluate_method(self, method: str, shared: StateDict | None) -> None:
        started = time.perf_counter()
        evaluation = self.evaluate(method, shared)
        self.recorder.record_method(method, evaluation, time.perf_counter() - started)

    def personalize(self, method: str, shared: StateDict | None) -> None:
        started = time.perf_counter()
        # The shared adapter's round goes into each stored adapter's manifest entry.
        extra = {protocol.SHARED_ROUND: self.shared_round} if shared is not None else None
        replies = self.broadcast(
            protocol.PERSONALIZE, method, shared, f"personalizing users for {method}", extra
        )
        records = [dict(r.content[protocol.METRICS]) for r in replies]
        summary = {
            key: sum(r.get(key, 0) for r in records) for key in ("num-users", "users-trained", "users-reused")
        }
        losses = sorted(r["personal-loss"] for r in records if "personal-loss" in r)  # arrival-order free
        if losses:
            summary["personal-loss"] = sum(losses) / len(losses)
        summary["seconds"] = time.perf_counter() - started
        self.recorder.record_personalization(method, summary)

    # -- stage 1 -----------------------------------------------------------------------------------
    def initial_shared(self) -> tuple[int, StateDict]:
        if self.config.resume and (latest := self.checkpoints.latest()) is not None:
            return latest
        return 0, initial_adapter(self.config.model, self.config.dtype, self.spec, self.config.seed)

    def federate(self) -> StateDict:
        """Run the remaining rounds the privacy budget allows; every round is checkpointed and evaluated.

        The privacy layer wraps the strategy (or, for SecAgg+, runs Flower's legacy workflow). A budget
        that would be exceeded stops training before that round: what was trained is kept, and the
        last shared adapter goes on to personalization.
        """
        config = self.config
        start_round, state = self.initial_shared()
        self.shared_round = start_round
        if start_round >= config.num_rounds:
            return state
        num_weights = sum(tensor.numel() for tensor in state.values())
        privacy = PrivacyLayer(
            config, len(self.node_ids), completed_rounds=start_round, num_weights=num_weights
        )
        last_round = start_round + privacy.affordable_rounds(start_round, config.num_rounds - start_round)
        self.stopped_early = last_round < config.num_rounds
        self.recorder.record_privacy(
            {**privacy.describe(), "rounds_planned": config.num_rounds, "rounds_run": last_round},
            stopped_early=self.stopped_early,
        )
        stage = SharedTraining(start_round, last_round, privacy, MeteredSortedGrid(self.grid), state)
        rounds = last_round - start_round
        if rounds == 0:  # the budget affords no release: the initial adapter is the shared one
            self.close_round(stage, 0, state)
        elif privacy.legacy:
            run_secagg(
                stage.grid,
                privacy,
                state,
                rounds,
                start_round,
                lambda server_round, weights: self.close_round(stage, server_round, weights),
                stage.aggregate_train,
            )
        else:
            base = build_strategy(config, len(self.node_ids))
            base.train_metrics_aggr_fn = stage.aggregate_train
            privacy.wrap(base).start(
                stage.grid,
                ArrayRecord({k: v.float() for k, v in state.items()}),
                num_rounds=rounds,
                train_config=ConfigRecord({protocol.ROUND_OFFSET: start_round}),
                evaluate_fn=lambda r, arrays: self.close_round(stage, r, arrays.to_torch_state_dict()),
            )
        return {k: v.float() for k, v in stage.latest.items()}

    def close_round(self, stage: SharedTraining, server_round: int, weights: StateDict) -> None:
        """After each round (and at round 0): account, checkpoint, evaluate and record it."""
        stage.latest = weights
        current = stage.start_round + server_round
        self.shared_round = current
        if server_round == 0 and stage.start_round > 0:
            return  # that round was evaluated before the run was interrupted
        round_privacy = self.release(stage, current, weights) if server_round > 0 else None
        evaluation = self.evaluate_round(current, stage.last_round, weights)
        train = stage.train_metrics[-1] if server_round > 0 else None
        self.recorder.record_round(current, train, evaluation, round_privacy)

    def release(self, stage: SharedTraining, current: int, weights: StateDict) -> dict[str, float | None]:
        """A trained round's aggregate went out: compose its privacy cost and checkpoint it."""
        privacy = stage.privacy
        privacy.released()
        self.checkpoints.save(current, weights, self.spec.peft_config())
        released = {"epsilon": privacy.spent(), "bytes-per-client": stage.grid.take_per_client()}
        if privacy.adaptive is not None:
            released["clipping-norm"] = privacy.strategy.round_clipping_norm  # this round's
        return released

    def evaluate_round(self, current: int, last_round: int, weights: StateDict) -> Evaluation | None:
        """The shared adapter's score after this round, when asked for; round 0 is the zero-shot score
        (the initial adapter is the identity) and the last round is the `shared` method's."""
        final = current == last_round
        zero_shot_here = current == 0 and "zero-shot" in self.config.method_list
        if not (self.config.eval_every_round or final or zero_shot_here):
            return None
        started = time.perf_counter()
        evaluation = self.evaluate("shared", weights, f"round {current}/{last_round}: evaluating")
        if zero_shot_here:
            self.recorder.record_method("zero-shot", evaluation, time.perf_counter() - started)
        if final:
            self.recorder.record_method("shared", evaluation, time.perf_counter() - started)
        return evaluation

    # -- the whole run -----------------------------------------------------------------------------
    def run(self, methods: Iterable[str]) -> None:
        methods = list(methods)
        random.seed(self.config.seed)  # Flower samples clients with the global `random`
        needs_shared = any(METHODS[m].shared for m in methods)
        done = set(self.recorder.data["methods"]) if self.config.resume else set()
        for name in ("zero-shot", "rag"):
            if name in methods and name not in done and not (name == "zero-shot" and needs_shared):
                self.evaluate_method(name, None)
        shared = self.federate() if needs_shared else None
        for name in methods:
            method = METHODS[name]
            if method.personal:
                base = shared if method.shared else None
                self.personalize(name, base)
                self.evaluate_method(name, base)
        self.recorder.finish("stopped-early" if self.stopped_early else "complete")
