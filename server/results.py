"""The run's results file, rewritten atomically after every phase so a crash loses nothing.

Users appear in it under the names their nodes reported them by: pseudonyms by default, one scope per
results file (`user_scope`, kept when a run resumes, so one user has one name across every method).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import protocol
from common.data import QUERY_GROUPS
from common.io import atomic_write_json, read_json
from common.metrics import merge_counts, metrics_from_counts, split_groups
from common.tasks import Task


@dataclass
class Missing:
    """What a phase could not reach: its users by name, and the dropped nodes with their reasons."""

    users: list[str] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)  # {"node", "users", "reason"}

    def to_json(self) -> dict[str, list]:
        return asdict(self)


@dataclass
class Evaluation:
    """One method's answers scored: exact metrics over all answers (from the nodes' own counts) and per
    user (from the users' counts, as far as the nodes' policies report them). The per-user counts are
    kept too: the report's intervals resample users and recompute the pooled metrics from them
    (macro-F1 cannot be recomputed from per-user F1). `withheld` answers were scored by their nodes
    but reported in no record (their group was below the node's minimum group size); the users it
    could not reach are in `missing`, not in the metrics. Where the data marks its queries with groups
    (common.data.QUERY_GROUPS), `groups` scores each group the same way, from the records' own counts
    for it: {group: {"overall", "users", "counts"}}."""

    overall: dict[str, float]
    users: dict[str, dict[str, float]]
    history: dict[str, int]
    counts: dict[str, dict[str, float]]
    withheld: int = 0
    missing: Missing = field(default_factory=Missing)
    groups: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_counts(
        cls,
        task: Task,
        nodes: list[dict[str, float]],
        users: dict[str, dict[str, float]],
        missing: Missing | None = None,
    ) -> Evaluation:
        history = {
            uid: int(c.pop(protocol.HISTORY_SIZE)) for uid, c in users.items() if protocol.HISTORY_SIZE in c
        }
        # sums in user order, not reply arrival order: reproducible
        user_parts = {uid: split_groups(c) for uid, c in sorted(users.items())}
        node_parts = [
            split_groups({k: v for k, v in node.items() if k != protocol.NUM_EXAMPLES}) for node in nodes
        ]
        ordered = {uid: plain for uid, (plain, _) in user_parts.items()}
        overall = _pooled(task, [plain for plain, _ in node_parts])
        answered = sum(int(node.get(protocol.NUM_EXAMPLES, 0)) for node in nodes)
        withheld = answered - int(overall["n"])
        groups = {}
        for group in QUERY_GROUPS:
            counts = {uid: parts[group] for uid, (_, parts) in user_parts.items() if group in parts}
            reported = [parts[group] for _, parts in node_parts if group in parts]
            if counts or reported:
                groups[group] = {
                    "overall": _pooled(task, reported),
                    "users": {uid: metrics_from_counts(task, c) for uid, c in counts.items()},
                    "counts": counts,
                }
        per_user = {uid: metrics_from_counts(task, c) for uid, c in ordered.items()}
        return cls(overall, per_user, history, ordered, withheld, missing or Missing(), groups)


def _pooled(task: Task, records: list[dict[str, float]]) -> dict[str, float]:
    """Exact metrics over the nodes' summed counts, summed in an order free of the replies' arrival."""
    reported = sorted((r for r in records if "n" in r), key=lambda counts: json.dumps(counts, sort_keys=True))
    return metrics_from_counts(task, merge_counts(*reported)) if reported else {"n": 0}


class RunRecorder:
    """metrics.json: per method (overall, per user, the users missed), per round (with the nodes
    dropped), per personalization phase, and every stop of training with its reason."""

    def __init__(self, run_dir: str | Path, task: Task, resume: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.json"
        if resume and self.path.exists():
            self.data: dict[str, Any] = read_json(self.path)
            self.data["status"] = "running"
            self.data.pop("stop_reason", None)  # the stop it resumes from stays in "stops"
        else:
            self.data = {
                "task": task.name,
                "primary_metric": task.primary_metric,
                "higher_is_better": task.higher_is_better,
                "status": "running",
                "started": time.time(),
                "methods": {},
                "rounds": [],
                "personalize": {},
                "history": {},
                "stops": [],
            }
        self.data.setdefault("user_scope", secrets.token_hex(16))
        self._node_users = {int(node): users for node, users in self.data.get("node_users", {}).items()}
        self.save()

    @property
    def user_scope(self) -> str:
        """The scope the nodes' user pseudonyms are drawn in for this results file."""
        return self.data["user_scope"]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    @property
    def node_users(self) -> dict[int, list[str]]:
        """The users each node's replies named (a live view: learn_node_users adds to it)."""
        return self._node_users

    def learn_node_users(self, node: int, users: list[str]) -> None:
        """Saved with the next record; node ids persist across a node's restarts (its registered key)."""
        self._node_users[node] = users
        self.data["node_users"] = {str(n): u for n, u in sorted(self._node_users.items())}

    @property
    def known_users(self) -> set[str]:
        """Every user this results file has scored or sized, also in the runs it resumes: a resumed run
        can name the users of a node that dies before it answers again."""
        scored = [entry.get("users", []) for entry in [*self.data["methods"].values(), *self.data["rounds"]]]
        return set(self.data["history"]).union(*scored)

    def record_method(self, name: str, evaluation: Evaluation, seconds: float) -> None:
        self.data["methods"][name] = {
            "overall": evaluation.overall,
            "users": evaluation.users,
            "counts": evaluation.counts,
            "missing": evaluation.missing.to_json(),
            "seconds": seconds,
        }
        if evaluation.withheld:
            self.data["methods"][name]["withheld"] = evaluation.withheld
        if evaluation.groups:
            self.data["methods"][name]["groups"] = evaluation.groups
        self.data["history"].update(evaluation.history)
        self.save()

    def record_round(
        self,
        server_round: int,
        train: dict[str, float] | None,
        evaluation: Evaluation | None,
        privacy: dict[str, Any] | None = None,
        dropped: list[dict] | None = None,
        seconds: dict[str, float] | None = None,
    ) -> None:
        """`train` holds the round's training time (`seconds`: sending it to its aggregate); `seconds`
        the time of what the server did after it, e.g. {"evaluate": ...}."""
        rounds = [r for r in self.data["rounds"] if r["round"] != server_round]
        entry: dict[str, Any] = {"round": server_round}
        if seconds:
            entry["seconds"] = seconds
        if privacy:
            entry["privacy"] = privacy
        if train is not None:
            entry["train"] = train
        if dropped:
            entry["dropped"] = dropped
        if evaluation is not None:
            entry["eval"] = evaluation.overall
            entry["users"] = evaluation.users
            if evaluation.missing.users or evaluation.missing.nodes:
                entry["missing"] = evaluation.missing.to_json()
            self.data["history"].update(evaluation.history)
        self.data["rounds"] = sorted([*rounds, entry], key=lambda r: r["round"])
        self.save()

    def record_privacy(self, info: dict[str, Any], stopped_early: bool) -> None:
        """The privacy setting, and whether its budget stopped the shared adapter's training early."""
        self.data["privacy"] = info
        self.data["stopped_early"] = stopped_early
        self.save()

    def record_personalization(self, name: str, summary: dict[str, Any]) -> None:
        self.data["personalize"][name] = summary
        self.save()

    def record_stop(self, server_round: int, reason: str, dropped: list[dict]) -> None:
        """Training stopped because `server_round` could not be aggregated."""
        entry = {"round": server_round, "reason": reason, "dropped": dropped, "time": time.time()}
        self.data.setdefault("stops", []).append(entry)
        self.save()

    def name_nodes(self, node_users: dict[int, list[str]]) -> None:
        """Name the users of dropped nodes that a later reply of the run named."""
        entries = [d for r in self.data["rounds"] for d in r.get("dropped", [])]
        entries += [d for stop in self.data.get("stops", []) for d in stop["dropped"]]
        for section in (self.data["methods"], self.data["personalize"]):
            entries += [d for entry in section.values() for d in entry.get("missing", {}).get("nodes", [])]
        for entry in entries:
            if entry["users"] is None and entry["node"] in node_users:
                entry["users"] = node_users[entry["node"]]
        self.save()

    def finish(self, status: str = "complete", **extra: Any) -> None:
        self.data.update(status=status, finished=time.time(), **extra)
        self.save()
