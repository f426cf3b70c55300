"""Client mods that watch what leaves the node.

`privacy_guard_mod` enforces OPPU's promise on every reply: a train reply carries only the shared
adapter's tensors (the keys and shapes that arrived) and scalar metrics; every other reply carries
metrics only. No personal adapter tensor, no text (no ConfigRecord) ever leaves.
`audit_mod` appends a description of each reply to $FEDOPPU_AUDIT_LOG/<pid>.jsonl when that variable
is set, so people (and the tests) can check what a node actually sent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable


class PrivacyViolation(RuntimeError):
    """A reply would carry something other than the shared adapter and metrics."""


def _shapes(record) -> dict[str, tuple[int, ...]]:
    return {key: tuple(array.shape) for key, array in record.items()}


def check_reply(msg: Message, reply: Message) -> None:
    content = reply.content
    if content.config_records:
        raise PrivacyViolation(
            f"reply to {msg.metadata.message_type} carries config records {list(content.config_records)}"
        )
    arrays = content.array_records
    if msg.metadata.message_type != "train":
        if arrays:
            raise PrivacyViolation(f"reply to {msg.metadata.message_type} carries arrays {list(arrays)}")
        return
    sent = msg.content.array_records
    if list(arrays) != ["arrays"] or "arrays" not in sent:
        raise PrivacyViolation(
            f"train reply must carry exactly the 'arrays' record it received, got {list(arrays)}"
        )
    if _shapes(arrays["arrays"]) != _shapes(sent["arrays"]):
        raise PrivacyViolation(
            "train reply's tensors differ in keys or shapes from the shared adapter that was sent"
        )
    if any(not isinstance(v, (int, float)) for r in content.metric_records.values() for v in r.values()):
        raise PrivacyViolation("train reply's metrics must be scalars")


def privacy_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    if not reply.has_error():
        check_reply(msg, reply)
    return reply


def describe(msg: Message, reply: Message) -> dict:
    content = reply.content
    return {
        "message_type": msg.metadata.message_type,
        "sent_arrays": {name: _shapes(r) for name, r in msg.content.array_records.items()},
        "arrays": {
            name: {k: [list(a.shape), a.dtype] for k, a in r.items()}
            for name, r in content.array_records.items()
        },
        "metrics": {
            name: {k: type(v).__name__ for k, v in r.items()} for name, r in content.metric_records.items()
        },
        "configs": list(content.config_records),
        "error": reply.has_error(),
    }


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    log_dir = os.environ.get("FEDOPPU_AUDIT_LOG")
    if log_dir and not reply.has_error():
        path = Path(log_dir) / f"{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(describe(msg, reply)) + "\n")
    return reply
