"""The run's results file, rewritten atomically after every phase so a crash loses nothing.

Users appear in it under the names their nodes reported them by: pseudonyms by default, one scope per
results file (`user_scope`, kept when a run resumes, so one user has one name across every method).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import protocol
from common.io import atomic_write_json, read_json
from common.metrics import merge_counts, metrics_from_counts
from common.tasks import Task


@dataclass
class Evaluation:
    """One method's answers scored: exact metrics over all answers (from the nodes' own counts) and per
    user (from the users' counts, as far as the nodes' policies report them). The per-user counts are
    kept too: the report's intervals resample users and recompute the pooled metrics from them
    (macro-F1 cannot be recomputed from per-user F1). `withheld` answers were scored by their nodes
    but reported in no record (their group was below the node's minimum group size)."""

    overall: dict[str, float]
    users: dict[str, dict[str, float]]
    history: dict[str, int]
    counts: dict[str, dict[str, float]]
    withheld: int = 0

    @classmethod
    def from_counts(
        cls, task: Task, nodes: list[dict[str, float]], users: dict[str, dict[str, float]]
    ) -> Evaluation:
        history = {
            uid: int(c.pop(protocol.HISTORY_SIZE)) for uid, c in users.items() if protocol.HISTORY_SIZE in c
        }
        ordered = dict(sorted(users.items()))  # sums in user order, not reply arrival order: reproducible
        per_user = {uid: metrics_from_counts(task, c) for uid, c in ordered.items()}
        reported = sorted(
            ({k: v for k, v in node.items() if k != protocol.NUM_EXAMPLES} for node in nodes if "n" in node),
            key=lambda counts: json.dumps(counts, sort_keys=True),  # arrival-order free, as above
        )
        overall = metrics_from_counts(task, merge_counts(*reported)) if reported else {"n": 0}
        answered = sum(int(node.get(protocol.NUM_EXAMPLES, 0)) for node in nodes)
        return cls(overall, per_user, history, ordered, answered - int(overall["n"]))


class RunRecorder:
    """metrics.json: per method (overall and per user), per round, and per personalization phase."""

    def __init__(self, run_dir: str | Path, task: Task, resume: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.json"
        if resume and self.path.exists():
            self.data: dict[str, Any] = read_json(self.path)
            self.data["status"] = "running"
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
            }
        self.data.setdefault("user_scope", secrets.token_hex(16))
        self.save()

    @property
    def user_scope(self) -> str:
        """The scope the nodes' user pseudonyms are drawn in for this results file."""
        return self.data["user_scope"]

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def record_method(self, name: str, evaluation: Evaluation, seconds: float) -> None:
        self.data["methods"][name] = {
            "overall": evaluation.overall,
            "users": evaluation.users,
            "counts": evaluation.counts,
            "seconds": seconds,
        }
        if evaluation.withheld:
            self.data["methods"][name]["withheld"] = evaluation.withheld
        self.data["history"].update(evaluation.history)
        self.save()

    def record_round(
        self,
        server_round: int,
        train: dict[str, float] | None,
        evaluation: Evaluation | None,
        privacy: dict[str, Any] | None = None,
    ) -> None:
        rounds = [r for r in self.data["rounds"] if r["round"] != server_round]
        entry: dict[str, Any] = {"round": server_round}
        if privacy:
            entry["privacy"] = privacy
        if train is not None:
            entry["train"] = train
        if evaluation is not None:
            entry["eval"] = evaluation.overall
            entry["users"] = evaluation.users
            self.data["history"].update(evaluation.history)
        self.data["rounds"] = sorted([*rounds, entry], key=lambda r: r["round"])
        self.save()

    def record_privacy(self, info: dict[str, Any], stopped_early: bool) -> None:
        """The privacy setting, and whether its budget stopped the shared adapter's training early."""
        self.data["privacy"] = info
        self.data["stopped_early"] = stopped_early
        self.save()

    def record_personalization(self, name: str, metrics: dict[str, float]) -> None:
        self.data["personalize"][name] = metrics
        self.save()

    def finish(self, status: str = "complete", **extra: Any) -> None:
        self.data.update(status=status, finished=time.time(), **extra)
        self.save()
