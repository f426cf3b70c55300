"""A curious, malicious server for tests/test_malicious_server.py (test-only; never deployed).

Its ServerApp sends the real ClientApp one attack after another, each a batch of messages to every
node, and writes down everything that reached it in <run-dir>/attacks.json: per reply its error code
and text, every record and metric name and value, and the sha256 of every tensor, so the test can
look there for personal text, personal tensors and raw user ids. The attacks:
- unknown message types and method names (a handler's error text used to reach the server);
- a train round, the same round again (averaging local noise away), and a round past the budget;
- a train message whose adapter has keys of its own;
- personalization, then evaluation with a chosen shared adapter (max-queries-per-user = 1 in the run
  config makes each per-user record a single answer: an oracle on the user's gold output);
- and, in a second run whose run config asks for privacy "none" and a task the data is not, all of
  them again: the node's policy and its data, not the run config, decide.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import protocol
from common.adapters import AdapterSpecs, initial_adapter
from common.config import RunConfig
from common.io import atomic_write_json

app = ServerApp()
SCOPE = "the-same-scope-in-every-run"  # a scope a server reuses links pseudonyms across its runs


def tensor_digest(array: np.ndarray) -> str:
    """The digest the test compares with every personal adapter's tensors (as float32)."""
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _seen(attack: str, reply: Message) -> dict:
    entry: dict = {"attack": attack, "node": reply.metadata.src_node_id}
    if reply.has_error():
        entry["error"] = {"code": reply.error.code, "reason": reply.error.reason}
        return entry
    content = reply.content
    entry["metrics"] = {name: dict(record) for name, record in content.metric_records.items()}
    entry["configs"] = {name: dict(record) for name, record in content.config_records.items()}
    entry["arrays"] = {
        name: {key: tensor_digest(array.numpy()) for key, array in record.items()}
        for name, record in content.array_records.items()
    }
    return entry


def _messages(grid: Grid, message_type: str, config: dict, shared=None) -> list[Message]:
    content = RecordDict({protocol.CONFIG: ConfigRecord(config)})
    if shared is not None:
        content[protocol.ARRAYS] = ArrayRecord({k: v.float() for k, v in shared.items()})
    return [Message(content, dst_node_id=node, message_type=message_type) for node in grid.get_node_ids()]


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    shared = initial_adapter(config.model, config.dtype, AdapterSpecs.from_config(config).shared, config.seed)
    generator = torch.Generator().manual_seed(1)
    chosen = {k: torch.randn(v.shape, generator=generator) for k, v in shared.items()}  # the server's pick
    evaluate = {protocol.USER_SCOPE: SCOPE}
    attacks = [
        ("message type query", "query", {"method": "oppu"}, None),
        ("message type train.exfiltrate", "train.exfiltrate", {"method": "oppu"}, shared),
        ("message type evaluate.dump", "evaluate.dump", {"method": "oppu"}, None),
        ("method ../../etc/passwd", protocol.EVALUATE, {"method": "../../etc/passwd", **evaluate}, None),
        ("method personal-dump", protocol.EVALUATE, {"method": "personal-dump", **evaluate}, None),
        ("train round 1", protocol.TRAIN, {protocol.SERVER_ROUND: 1}, shared),
        ("train round 1 again", protocol.TRAIN, {protocol.SERVER_ROUND: 1}, shared),
        ("train round 2, past the node's budget", protocol.TRAIN, {protocol.SERVER_ROUND: 2}, shared),
        (
            "train with keys of its own",
            protocol.TRAIN,
            {protocol.SERVER_ROUND: 3},
            {"x.lora_A.weight": torch.ones(2, 2)},
        ),
        ("personalize oppu", protocol.PERSONALIZE, {"method": "oppu", protocol.SHARED_ROUND: 1}, shared),
        ("evaluate oppu, chosen adapter", protocol.EVALUATE, {"method": "oppu", **evaluate}, chosen),
        ("evaluate shared, chosen adapter", protocol.EVALUATE, {"method": "shared", **evaluate}, chosen),
        ("evaluate zero-shot", protocol.EVALUATE, {"method": "zero-shot", **evaluate}, None),
    ]
    seen = []
    for attack, message_type, message_config, arrays in attacks:
        replies = grid.send_and_receive(_messages(grid, message_type, message_config, arrays), timeout=600)
        seen += [_seen(attack, reply) for reply in replies]
    atomic_write_json(Path(config.run_dir) / "attacks.json", seen)
