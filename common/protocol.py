"""The message protocol between the ServerApp and the ClientApp, spelled once for both sides.

| message | server -> client | client -> server |
|---|---|---|
| `train` (one round of the shared adapter; Flower's strategies send it) | `arrays`: the shared adapter; `config`: `server-round`, `round-offset`, FedProx's `proximal-mu` | `arrays`: the trained shared adapter, same keys and shapes; `metrics`: `TRAIN_METRICS` |
| `train.personalize` (train each user's personal adapter for one method) | `config`: `method`, `shared-round`; `arrays` when the method builds on the shared adapter | `metrics`: `PERSONALIZE_METRICS`; `user:<id>`: `trained` (1) or reused (0) |
| `evaluate` (answer every user's queries with one method) | `config`: `method`; `arrays` when the method uses the shared adapter | `metrics`: the node's metric counts; `user:<id>`: one user's counts and history size |

SecAgg+ runs `train` through Flower's legacy fit messages instead; their config carries the shared
adapter's key order (`arrays-keys`), since legacy parameters have no names.

A train reply's tensors come back in the run's `wire-dtype`, except under client-dp and local-dp,
whose client mods re-emit them in float32 (`train_reply_dtype`); the server refuses any other dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType

from common.adapters import StateDict

# Message types. `train` and `evaluate` are Flower's; personalization is a `train` sub-action.
TRAIN = MessageType.TRAIN
PERSONALIZE_ACTION = "personalize"
PERSONALIZE = f"{MessageType.TRAIN}.{PERSONALIZE_ACTION}"
EVALUATE = MessageType.EVALUATE

# Record names.
ARRAYS = "arrays"  # the shared adapter, both ways
CONFIG = "config"
METRICS = "metrics"
USER_RECORD_PREFIX = "user:"  # evaluate replies: one MetricRecord per user

# Config keys.
SERVER_ROUND = "server-round"  # set by Flower's strategies in every train config
ROUND_OFFSET = "round-offset"  # rounds finished before this run resumed
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
METHOD = "method"
SHARED_ROUND = "shared-round"  # the round the shared adapter of a personalize message comes from
LEGACY_KEYS = "arrays-keys"  # SecAgg+'s legacy fit config: the shared adapter's key order

# Metric names.
NUM_EXAMPLES = "num-examples"
TRAIN_METRICS = ("num-examples", "train-loss", "train-steps", "train-tokens", "train-seconds", "bytes-sent")
PERSONALIZE_METRICS = ("num-users", "users-trained", "users-reused", "personal-seconds", "personal-loss")
HISTORY_SIZE = "history"  # in a user record: the user's number of history items
USER_TRAINED = "trained"  # in a personalize reply's user record: 1 trained, 0 reused

# numpy dtype of the shared adapter's tensors on the wire, per `wire-dtype`.
WIRE_NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16"}
FLOAT32_REPLY_PRIVACY = ("client-dp", "local-dp")  # their client mods rebuild the arrays in float32


def train_reply_dtype(wire_dtype: str, privacy: str) -> str:
    """The dtype every tensor of a train reply has, under this wire dtype and privacy setting."""
    return "float32" if privacy in FLOAT32_REPLY_PRIVACY else WIRE_NUMPY_DTYPES[wire_dtype]


def user_record(user_id: str) -> str:
    return f"{USER_RECORD_PREFIX}{user_id}"


def record_user(name: str) -> str | None:
    """The user id a record name stands for, or None for a record that is not per user."""
    return name.removeprefix(USER_RECORD_PREFIX) if name.startswith(USER_RECORD_PREFIX) else None


def requests(
    message_type: str,
    node_ids: Sequence[int],
    *,
    method: str = "",
    shared: Mapping[str, torch.Tensor] | None = None,
    config: Mapping[str, int | float | str] | None = None,
) -> list[Message]:
    """A personalize or evaluate message for each node; they share one content (one copy of the adapter)."""
    content = RecordDict({CONFIG: ConfigRecord({METHOD: method, **(config or {})})})
    if shared is not None:
        content[ARRAYS] = ArrayRecord({k: v.float() for k, v in shared.items()})
    return [Message(content, dst_node_id=node, message_type=message_type) for node in node_ids]


def shared_adapter(msg: Message) -> StateDict | None:
    """The shared adapter a message carries, or None."""
    if ARRAYS not in msg.content.array_records:
        return None
    return msg.content.array_records[ARRAYS].to_torch_state_dict()


def config_value(msg: Message, key: str, default: int | float | str | None = None):
    config = msg.content.config_records.get(CONFIG, {})
    return config.get(key, default)
