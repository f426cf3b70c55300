"""The ServerApp's work: federated rounds for the shared adapter, then personalization and evaluation.

Evaluation is driven here rather than by the strategy so each method is scored per user from exact
metric counts; per-round evaluation of the shared adapter runs inside the strategy's evaluate_fn,
which is also where every round's checkpoint is written.

Nodes fail independently (docs/deploy.md, "When nodes fail"): the run waits for `min-nodes` before
round 1; every phase has a timeout; a train round is aggregated from the clients that delivered a
valid update when they are enough (server/grid.py), otherwise training stops early with every
checkpoint kept; personalization and evaluation go on without the nodes that fail and report their
users as missing, by name. A resumed run redoes what missed users.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common import protocol
from common.adapters import AdapterSpecs, StateDict, initial_adapter, on_the_wire
from common.cli import console
from common.config import RunConfig
from common.methods import METHODS
from common.tasks import get_task
from server.carried import carried_state, restore_carried
from server.checkpoints import CheckpointStore
from server.grid import RoundFailed, RoundGrid, RoundPolicy, RoundTraffic, UpdateRules, no_reply
from server.privacy import PrivacyLayer
from server.results import Evaluation, Missing, RunRecorder
from server.sampling import FRACTION
from server.secagg import run_secagg
from server.strategy import build_strategy


class ClientFailure(RuntimeError):
    """The nodes' replies contradict each other (a user on two nodes)."""


class NodesUnavailable(RuntimeError):
    """Fewer than `min-nodes` nodes connected within `min-nodes-timeout`."""


def wait_for_nodes(grid: Grid, minimum: int, timeout: float | None) -> list[int]:
    """The connected nodes once there are `minimum` of them, saying how many there are while waiting."""
    started = time.monotonic()
    shown = None
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        waited = time.monotonic() - started
        if timeout is not None and waited > timeout:
            raise NodesUnavailable(
                f"min-nodes = {minimum}: only {len(nodes)} node(s) connected after {timeout:g} s "
                "(min-nodes-timeout); start the missing nodes (`flwr supernode list` shows which are "
                "online) and submit the run again"
            )
        if shown != (len(nodes), int(waited) // 30):  # on every change, and every 30 s
            shown = (len(nodes), int(waited) // 30)
            console.print(f"waiting for nodes: {len(nodes)} of {minimum} connected ({waited:.0f} s)")
        time.sleep(1)
    if shown is not None:
        console.print(f"{len(nodes)} nodes connected after {time.monotonic() - started:.0f} s")
    return nodes


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
    grid: RoundGrid
    latest: StateDict
    train_metrics: list[dict[str, float]] = field(default_factory=list)
    aggregated: int | None = None  # clients in the round's aggregate; None until the strategy made one
    round_started: float = field(default_factory=time.monotonic)
    strategy: Strategy | None = None  # the wrapped strategy, whose carried state each checkpoint keeps

    def aggregate_train(self, records: list[RecordDict], weighting: str) -> MetricRecord:
        aggregated = aggregate_metricrecords(records, weighting)
        self.aggregated = len(records)
        self.train_metrics.append({**dict(aggregated), "clients": len(records)})
        return aggregated


class Federation:
    def __init__(self, grid: Grid, config: RunConfig) -> None:
        self.grid = grid
        self.config = config
        self.task = get_task(config.task)
        self.spec = AdapterSpecs.from_config(config).shared  # the personal adapters are the clients' own
        self.node_ids = wait_for_nodes(grid, config.min_nodes, config.timeout("min-nodes"))
        self.checkpoints = CheckpointStore(config.run_dir)
        self.recorder = RunRecorder(config.run_dir, self.task, resume=config.resume)
        # Learned from the replies that name users, kept in the results file: a node keeps its id across
        # restarts, so a resumed run can name the users of a node that dies before it answers again.
        self.node_users: dict[int, list[str]] = self.recorder.node_users
        self.stopped_early = False  # set by federate() when the privacy budget ends training early
        self.failure: str | None = None  # set by federate() when a round could not be aggregated
        self.shared_round = 0  # the round the latest shared adapter comes from

    # -- messaging ---------------------------------------------------------------------------------
    def broadcast(
        self,
        message_type: str,
        method: str | None,
        shared: StateDict | None,
        label: str,
        phase: str,
        extra: dict[str, int | str] | None = None,
    ) -> tuple[list[Message], dict[int, str]]:
        """Send one message per connected node and collect the replies until `<phase>-timeout`,
        showing progress as nodes finish; returns the good replies and the dropped nodes' reasons
        (an error, no reply in time, or a node of the run no longer connected)."""
        connected = sorted(self.grid.get_node_ids())
        online = set(connected)
        dropped = {node: "not connected" for node in self.node_ids if node not in online}
        messages = protocol.requests(
            message_type, connected, method=method or "", shared=shared, config=extra
        )
        pushed = set(self.grid.push_messages(messages))
        # A reply names the node that was asked through the request it answers: the SuperLink itself
        # answers for a node it has found offline.
        asked = {
            m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in pushed
        }
        pending, waiting = set(asked), set(asked.values())
        dropped |= {node: "could not be sent" for node in online - waiting}
        timeout = self.config.timeout(phase)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        started = time.monotonic()
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, transient=True) as progress:
            bar = progress.add_task(f"{label} ({len(messages)} clients)", total=len(messages))
            while pending and (deadline is None or time.monotonic() < deadline):
                for reply in self.grid.pull_messages(list(pending)):
                    pending.discard(reply.metadata.reply_to_message_id)
                    node = asked[reply.metadata.reply_to_message_id]
                    waiting.discard(node)
                    if reply.has_error():
                        dropped[node] = f"error: {protocol.node_error(reply.error.code, reply.error.reason)}"
                    else:
                        replies.append(reply)
                        if named := _named_users(reply):
                            self.recorder.learn_node_users(node, named)
                    progress.advance(bar)
                if pending:
                    time.sleep(0.2)
        dropped |= {node: no_reply(timeout, phase) for node in waiting}
        if not console.is_terminal:  # a log file, where the bar draws nothing: a line per phase instead
            seconds = time.monotonic() - started
            console.print(f"{label}: {len(replies)} of {len(messages)} clients replied ({seconds:.0f} s)")
        for node, reason in sorted(dropped.items()):
            console.print(f"[yellow]{label}: node {node} dropped[/]: {reason}")
        return replies, dropped

    def missing(self, dropped: dict[int, str], scored: set[str] | None = None) -> Missing:
        """The users a phase could not reach, by name, and the dropped nodes with their reasons and
        users (None while no reply of the run has named them). For an evaluation (`scored`: the users
        it scored) every user the run knows and did not score; for personalization, whose replies name
        no users, the users of the dropped nodes."""
        if scored is None:
            users = {user for node in dropped for user in self.node_users.get(node, [])}
        else:
            users = self.recorder.known_users.union(*self.node_users.values()) - scored
        nodes = [{"node": node, "reason": reason} for node, reason in sorted(dropped.items())]
        return Missing(sorted(users), self.named(nodes))

    def named(self, dropped: list[dict]) -> list[dict]:
        """Drop records with the node's users (None until a reply of the run names them)."""
        return [{"node": d["node"], "users": self.node_users.get(d["node"]), **d} for d in dropped]

    def evaluate(self, method: str, shared: StateDict | None, label: str | None = None) -> Evaluation:
        label = label or f"evaluating {method}"
        scope = {protocol.USER_SCOPE: self.recorder.user_scope}
        replies, dropped = self.broadcast(protocol.EVALUATE, method, shared, label, "evaluate", scope)
        users = user_counts(replies, label)
        missing = self.missing(dropped, set(users))
        return Evaluation.from_counts(self.task, node_counts(replies), users, missing)

    def evaluate_method(self, method: str, shared: StateDict | None) -> None:
        started = time.perf_counter()
        evaluation = self.evaluate(method, shared)
        self.recorder.record_method(method, evaluation, time.perf_counter() - started)

    def personalize(self, method: str, shared: StateDict | None) -> None:
        started = time.perf_counter()
        # The shared adapter's round goes into each stored adapter's manifest entry.
        extra = {protocol.SHARED_ROUND: self.shared_round} if shared is not None else None
        replies, dropped = self.broadcast(
            protocol.PERSONALIZE, method, shared, f"personalizing users for {method}", "personalize", extra
        )
        records = [dict(r.content[protocol.METRICS]) for r in replies]
        summary: dict = {
            key: sum(r.get(key, 0) for r in records) for key in ("num-users", "users-trained", "users-reused")
        }
        losses = sorted(r["personal-loss"] for r in records if "personal-loss" in r)  # arrival-order free
        if losses:
            summary["personal-loss"] = sum(losses) / len(losses)
        summary["seconds"] = time.perf_counter() - started
        summary["missing"] = self.missing(dropped).to_json()
        self.recorder.record_personalization(method, summary)

    # -- stage 1 -----------------------------------------------------------------------------------
    def initial_shared(self) -> tuple[int, StateDict, StateDict]:
        """(round, shared adapter, the strategy's carried state) to start from."""
        if self.config.resume and (latest := self.checkpoints.latest()) is not None:
            return latest
        return 0, initial_adapter(self.config.model, self.config.dtype, self.spec, self.config.seed), {}

    def round_grid(self, privacy: PrivacyLayer) -> RoundGrid:
        """The grid the rounds go through, with this run's round policy and update rules."""
        config = self.config
        rules = UpdateRules(
            protocol.train_reply_dtype(config.wire_dtype, config.privacy),
            privacy.update_norm_bound(config.max_update_norm, privacy.num_weights),
            config.uniform_client_weights,
            protocol.reply_metric_names(protocol.TRAIN, config.privacy),
        )
        return RoundGrid(
            self.grid, RoundPolicy.from_config(config, privacy.needs_every_sampled_client), rules
        )

    def federate(self) -> StateDict:
        """Run the remaining rounds the privacy budget allows; every round is checkpointed and evaluated.

        The privacy layer wraps the strategy (or, for SecAgg+, runs Flower's legacy workflow). A budget
        that would be exceeded stops training before that round: what was trained is kept, and the
        last shared adapter goes on to personalization. A round that cannot be aggregated (RoundFailed)
        also stops training, and the run: every checkpoint is kept, and `resume` continues from it.
        """
        config = self.config
        start_round, state, carried = self.initial_shared()
        self.shared_round = start_round
        if start_round >= config.num_rounds:
            if self.redo("shared"):  # interrupted before, or short of users at, its last evaluation
                self.evaluate_method("shared", state)
            return state
        # FFA-LoRA: the rounds train, send, clip and noise B alone; after_round puts A (as drawn) back.
        wire = on_the_wire(state, config.shared_ffa_lora)
        num_weights = sum(tensor.numel() for tensor in wire.values())
        privacy = PrivacyLayer(
            config, len(self.node_ids), completed_rounds=start_round, num_weights=num_weights
        )
        last_round = start_round + privacy.affordable_rounds(start_round, config.num_rounds - start_round)
        self.stopped_early = last_round < config.num_rounds
        self.recorder.record_privacy(
            {
                **privacy.describe(),
                "shared_adapter": self.spec.layout
                + (" (FFA-LoRA: B sent)" if config.shared_ffa_lora else ""),
                "rounds_planned": config.num_rounds,
                "rounds_run": last_round,
            },
            stopped_early=self.stopped_early,
        )
        stage = SharedTraining(start_round, last_round, privacy, self.round_grid(privacy), state)
        rounds = last_round - start_round

        def after_round(server_round: int, trained: StateDict) -> None:
            self.close_round(stage, server_round, {**state, **trained})

        try:
            if rounds == 0:  # the budget affords no release: the initial adapter is the shared one
                self.close_round(stage, 0, state)
            elif privacy.legacy:
                run_secagg(
                    stage.grid,
                    privacy,
                    wire,
                    rounds,
                    start_round,
                    after_round,
                    stage.aggregate_train,
                    timeout=config.timeout("train"),
                )
            else:
                sampling = privacy.sampling
                if sampling.mode == FRACTION:  # Flower's strategy samples
                    base = build_strategy(config, stage.grid.policy.needed(privacy.sampled))
                    stage.grid.min_nodes = base.min_train_nodes
                else:  # the sampling view shows the strategy exactly the round's clients
                    base = build_strategy(config.replace(fraction_train=1.0), 0)
                    stage.grid.min_nodes = sampling.size or 1
                base.train_metrics_aggr_fn = stage.aggregate_train
                stage.strategy = privacy.wrap(base, start_round, stage.grid.min_nodes)
                restore_carried(stage.strategy, carried, str(self.checkpoints.root / "latest.json"))
                stage.strategy.start(
                    stage.grid,
                    ArrayRecord({k: v.float() for k, v in wire.items()}),
                    num_rounds=rounds,
                    timeout=config.timeout("train"),
                    train_config=ConfigRecord({protocol.ROUND_OFFSET: start_round}),
                    evaluate_fn=lambda r, arrays: after_round(r, arrays.to_torch_state_dict()),
                )
        except RoundFailed as failure:
            self.stop(stage, str(failure))
        return {k: v.float() for k, v in stage.latest.items()}

    def stop(self, stage: SharedTraining, reason: str) -> None:
        """The round in progress cannot be aggregated: record why and who was dropped; the run ends."""
        failed = self.shared_round + 1
        dropped = stage.grid.take_round().dropped
        self.failure = f"round {failed}: {reason}"
        self.recorder.record_stop(failed, reason, self.named(dropped))
        console.print(
            f"[yellow]training stopped early at round {failed}[/]: {reason}. Every checkpoint up to round "
            f"{self.shared_round} is kept; resume the run (--resume, or resume = true) to continue."
        )

    def close_round(self, stage: SharedTraining, server_round: int, weights: StateDict) -> None:
        """After each round (and at round 0): check it was aggregated from enough clients, then
        account, checkpoint, evaluate and record it."""
        current = stage.start_round + server_round
        traffic, train = None, None
        if server_round > 0:
            aggregated, stage.aggregated = stage.aggregated, None
            needed = stage.grid.policy.needed(stage.grid.sampled)
            if (
                stage.grid.sampled == 0
            ):  # Poisson sampled nobody: central-dp released noise alone, else skipped
                aggregated, needed = 0, 0
                stage.train_metrics.append({"clients": 0})
            if aggregated is None or aggregated < needed:  # SecAgg+ drops, or a DP wrapper's refusal
                raise RoundFailed(
                    f"{aggregated or 0} of {stage.grid.sampled} sampled clients were aggregated, {needed} needed"
                )
            traffic = stage.grid.take_round()
            seconds = time.monotonic() - stage.round_started  # sending the round to its aggregate
            train = {**stage.train_metrics[-1], "sampled": traffic.sampled, "seconds": seconds}
            loss = f", train loss {train['train-loss']:.3f}" if "train-loss" in train else ""
            console.print(
                f"round {current}/{stage.last_round}: {train['clients']} of {traffic.sampled} sampled "
                f"clients aggregated{loss} ({seconds:.0f} s)"
            )
        stage.latest = weights
        self.shared_round = current
        if server_round == 0 and stage.start_round > 0:
            return  # that round was evaluated before the run was interrupted
        round_privacy = self.release(stage, current, weights, traffic) if traffic is not None else None
        evaluating = time.monotonic()
        evaluation = self.evaluate_round(current, stage.last_round, weights)
        seconds = {"evaluate": time.monotonic() - evaluating} if evaluation is not None else None
        dropped = self.named(traffic.dropped) if traffic is not None else []
        self.recorder.record_round(current, train, evaluation, round_privacy, dropped, seconds)
        stage.round_started = time.monotonic()

    def release(
        self, stage: SharedTraining, current: int, weights: StateDict, traffic: RoundTraffic
    ) -> dict[str, float | None]:
        """A trained round's aggregate went out: compose its privacy cost and checkpoint it."""
        privacy = stage.privacy
        if traffic.sampled or privacy.setting == "central-dp":  # otherwise an empty round released nothing
            privacy.released()
        carried = carried_state(stage.strategy) if stage.strategy is not None else None
        self.checkpoints.save(current, weights, self.spec.peft_config(), carried)
        released = {"epsilon": privacy.spent(), "bytes-per-client": traffic.bytes_per_client}
        if (clip := privacy.round_clipping_norm()) is not None:
            released["clipping-norm"] = clip  # this round's
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
    def redo(self, method: str) -> bool:
        """Whether a resumed run must score `method` again: not scored yet, or short of users."""
        recorded = self.recorder.data["methods"].get(method)
        return recorded is None or bool(recorded.get("missing", {}).get("users"))

    def run(self, methods: Iterable[str]) -> None:
        methods = list(methods)
        random.seed(self.config.seed)  # Flower samples clients with the global `random`
        needs_shared = any(METHODS[m].shared for m in methods)
        for name in ("zero-shot", "rag"):
            if name in methods and self.redo(name) and not (name == "zero-shot" and needs_shared):
                self.evaluate_method(name, None)
        shared = self.federate() if needs_shared else None
        if self.failure is None:
            for name in methods:
                method = METHODS[name]
                if method.personal and not self.redo(name):
                    console.print(f"{name}: scored for every user before the resume, kept")
                elif method.personal:
                    base = shared if method.shared else None
                    self.personalize(name, base)
                    self.evaluate_method(name, base)
        self.recorder.name_nodes(self.node_users)
        if self.failure is not None:
            self.recorder.finish("stopped-early", stop_reason=self.failure)
        else:
            self.recorder.finish("stopped-early" if self.stopped_early else "complete")


def _named_users(reply: Message) -> list[str]:
    """The users a reply reports on (an evaluate reply's `user:<name>` records)."""
    return sorted(user for name in reply.content.metric_records if (user := protocol.record_user(name)))
