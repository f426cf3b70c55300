"""How the users' gates chose (client/gate.py), read from the simulated nodes' own disks.

A deployed server never learns these choices: each is made from one user's held-out history and stays
in that node's manifest. A simulation holds every node's disk, so its report can say how many users
kept the shared adapter, at which weight, and with a personal adapter or not: under DP, this is what
explains OPPU's score (a user whose gate drops a noised shared adapter is answered as `local` is).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from client.store import PersonalAdapterStore
from client.users import PARTITION_DIR

UNGATED = "none"  # GateDecision's setting of OPPU's original: every user takes shared + personal


def gate_decisions(state_root: Path, methods: Iterable[str]) -> dict[str, dict]:
    """Per gated method: users counted by the shared adapter's weight they kept, by whether they kept
    a personal adapter, and those whose history was too short to hold any of it out."""
    wanted = set(methods)
    weights: dict[str, Counter] = {}
    summary: dict[str, dict] = {}
    for node_dir in sorted(state_root.glob(f"{PARTITION_DIR}*")):
        for record in PersonalAdapterStore(node_dir).records():
            gate = record.gate
            if record.variant not in wanted or gate.setting == UNGATED:
                continue
            entry = summary.setdefault(
                record.variant, {"setting": gate.setting, "users": 0, "personal": 0, "short_history": 0}
            )
            entry["users"] += 1
            entry["personal"] += gate.uses_personal
            entry["short_history"] += gate.reason == "short-history"
            weights.setdefault(record.variant, Counter())[f"{gate.shared_weight:g}"] += 1
    for method, entry in summary.items():
        entry["shared_weight"] = dict(sorted(weights[method].items(), key=lambda kv: float(kv[0])))
    return summary


def users_keeping_shared(entry: dict) -> int:
    """Of the users a gate decided for, those who kept the shared adapter at some weight."""
    return entry["users"] - entry["shared_weight"].get("0", 0)


def gate_line(method: str, entry: dict) -> str:
    """One line of the report: e.g. `oppu's gate (mix): of 200 users, 200 kept the shared adapter
    (weight 1: 30, weight 0.5: 170), 0 dropped it; 158 kept a personal adapter` (epsilon 8)."""
    users, kept = entry["users"], users_keeping_shared(entry)
    weights = ", ".join(f"weight {w}: {n}" for w, n in reversed(entry["shared_weight"].items()) if w != "0")
    short = f"; {entry['short_history']} too short to hold any out" if entry["short_history"] else ""
    return (
        f"{method}'s gate ({entry['setting'].split(':')[0]}): of {users} users, {kept} kept the shared "
        f"adapter ({weights or 'none'}), {users - kept} dropped it; {entry['personal']} kept a personal "
        f"adapter{short}"
    )
