"""The message protocol between the ServerApp and the ClientApp, spelled once for both sides.

| message | server -> client | client -> server |
|---|---|---|
| `train` (one round of the shared adapter; Flower's strategies send it) | `arrays`: the shared adapter; `config`: `server-round`, `round-offset`, FedProx's `proximal-mu` | `arrays`: the trained shared adapter, same keys and shapes; `metrics`: `TRAIN_METRICS` |
| `train.personalize` (train each user's personal adapter for one method) | `config`: `method`, `shared-round`; `arrays` when the method builds on the shared adapter | `metrics`: `PERSONALIZE_METRICS` |
| `evaluate` (answer every user's queries with one method) | `config`: `method`, `user-scope`; `arrays` when the method uses the shared adapter | `metrics`: the node's metric counts; `user:<pseudonym>`: one user's counts (and history size, where the node's policy allows); both also per query group (`<group>:<count>`) where the node's data marks its queries with groups |

SecAgg+ runs `train` through Flower's legacy fit messages instead; their config carries the shared
adapter's key order (`arrays-keys`), since legacy parameters have no names.

What a reply may carry is spelled here too, so the node's guard (client/mods.py) and the server read
one allowlist: the metric names of each message type, which of them depend on the users' data, and
the error codes a node answers with instead of an exception's text. A train reply's tensors come back
in the run's `wire-dtype`, except under client-dp and local-dp, whose client mods re-emit them in
float32 (`train_reply_dtype`); the server refuses any other dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode

from common.metrics import count_names, group_count_names, label_count_names
from common.tasks import Task

if TYPE_CHECKING:  # a node's CLI (client/policy.py) imports this module: no torch for annotations
    import torch

    from common.adapters import StateDict

# Message types. `train` and `evaluate` are Flower's; personalization is a `train` sub-action.
TRAIN = MessageType.TRAIN
PERSONALIZE_ACTION = "personalize"
PERSONALIZE = f"{MessageType.TRAIN}.{PERSONALIZE_ACTION}"
EVALUATE = MessageType.EVALUATE
MESSAGE_TYPES = (TRAIN, PERSONALIZE, EVALUATE)  # a node answers these and refuses every other

# Record names.
ARRAYS = "arrays"  # the shared adapter, both ways
CONFIG = "config"
METRICS = "metrics"
USER_RECORD_PREFIX = "user:"  # evaluate replies: one MetricRecord per user
PSEUDONYM_PREFIX = "p-"  # a user record's name under a pseudonym: user:p-<32 hex digits>

# Config keys.
SERVER_ROUND = "server-round"  # set by Flower's strategies in every train config
ROUND_OFFSET = "round-offset"  # rounds finished before this run resumed
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx
METHOD = "method"
SHARED_ROUND = "shared-round"  # the round the shared adapter of a personalize message comes from
LEGACY_KEYS = "arrays-keys"  # SecAgg+'s legacy fit config: the shared adapter's key order
USER_SCOPE = "user-scope"  # evaluate config: the run's scope for user pseudonyms (same scope, same pseudonym)

# Metric names, per reply.
NUM_EXAMPLES = "num-examples"
TRAIN_METRICS = ("num-examples", "train-loss", "train-steps", "train-tokens", "train-seconds", "bytes-sent")
PERSONALIZE_METRICS = ("num-users", "users-trained", "users-reused", "personal-seconds", "personal-loss")
HISTORY_SIZE = "history"  # in a user record: the user's number of history items
# Metrics computed from the users' data (a loss, token and step counts, the time they took): a node
# sends them only under privacy = "none", since no privacy setting covers them.
DATA_DEPENDENT_METRICS = frozenset(
    {"train-loss", "train-steps", "train-tokens", "train-seconds", "personal-loss", "personal-seconds"}
)

# SecAgg+ quantization (server/secagg.py sets it, the nodes' secaggplus_mod applies it). Every client
# weighs 1 under any privacy setting, so max_weight = 1 keeps the full 2^22 levels for the update.
SECAGG_MAX_WEIGHT = 1.0
SECAGG_CLIPPING_RANGE = 8.0
SECAGG_QUANTIZATION_RANGE = 2**22


def secagg_quantization_bound(num_weights: int) -> float:
    """The L2 bound of SecAgg+'s stochastic rounding error on one client's update: under one
    quantization step per weight. It widens the sensitivity the DP accounting of secagg+dp uses."""
    return math.sqrt(num_weights) * 2 * SECAGG_CLIPPING_RANGE / SECAGG_QUANTIZATION_RANGE


class NodeError(IntEnum):
    """What a node answers instead of an exception: a code and its fixed text, never the exception's
    own text (which can quote a user's data or the node's paths); the node logs the details."""

    FAILED = 3100  # anything else that went wrong on the node
    REFUSED_BY_POLICY = 3101  # the request asks for less than the node's privacy policy allows
    REPLY_REFUSED = 3102  # the reply would have carried more than the allowlist
    BAD_REQUEST = 3103  # an unknown message type or method, or a malformed message

    @property
    def text(self) -> str:
        return _NODE_ERROR_TEXT[self]


_NODE_ERROR_TEXT = {
    NodeError.FAILED: "the node failed; its own log has the details",
    NodeError.REFUSED_BY_POLICY: "refused by the node's privacy policy; its own log names the policy key",
    NodeError.REPLY_REFUSED: "the node's guard refused its reply; its own log says why",
    NodeError.BAD_REQUEST: "the node does not answer this request; its own log says why",
}


# Errors the SuperLink itself writes for a message it could not deliver: their texts are Flower's own.
_SUPERLINK_ERRORS = (
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.NODE_UNAVAILABLE,
)


def node_error(code: int, reason: str = "") -> str:
    """An error reply as the server reports it: a node's code with its fixed text, the SuperLink's own
    text for a message it could not deliver, and for anything else only the code (its text came from
    the node's side and is not shown)."""
    if code in NodeError._value2member_map_:
        return f"{NodeError(code).name.lower().replace('_', ' ')}: {NodeError(code).text}"
    if code in _SUPERLINK_ERRORS:
        return reason
    return f"Flower error code {code}"


def reply_metric_names(message_type: str, privacy: str) -> frozenset[str]:
    """The metric names a train or personalize reply may carry under this privacy setting."""
    names = frozenset(TRAIN_METRICS if message_type == TRAIN else PERSONALIZE_METRICS)
    return names if privacy == "none" else names - DATA_DEPENDENT_METRICS


def evaluate_metric_names(task: Task, *, labels: bool, history: bool) -> frozenset[str]:
    """The metric names of one evaluate record: the task's counts, also per query group (where the data
    marks its queries with groups), without the per-label breakdown unless `labels`, with the history
    size only if `history`."""
    names = set(count_names(task)) - (set() if labels else set(label_count_names(task)))
    return frozenset(names | group_count_names(names) | ({HISTORY_SIZE} if history else set()))


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
