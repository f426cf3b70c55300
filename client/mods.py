"""What may leave the node: the mods around every reply, and the node's half of each privacy setting.

Around the whole ClientApp (`GuardedClientApp`, routing included), `error_code_mod` turns every
exception and every error reply into a generic code (common/protocol.py: NodeError): an exception's
text can quote a user's data or the node's paths, so the node logs it and the server never sees it.
Inside it, outermost first:
- `audit_mod` appends what each reply carries to $FEDOPPU_AUDIT_LOG/<pid>.jsonl when that is set, so
  people (and the tests) can check what a node actually sent;
- `privacy_layer_mod` checks the run's privacy setting against the node's own policy
  (client/policy.py) and applies the node's half of it, to the `train` action only (never to personal
  adapters or evaluation): clipping to the checked norm, local DP noise, or SecAgg+ masking (whose
  replies carry Flower's protocol records: public keys, encrypted key shares, the masked adapter);
- `PrivacyGuard` checks every reply a handler produces against the allowlist: a train reply carries
  exactly the shared adapter's keys and shapes, no tensor equal to one of any personal adapter the
  node holds, and scalar metrics of the allowed names; every other reply carries scalar metrics of
  the allowed names under the allowed record names only. No text (no ConfigRecord) ever leaves.
`UpdateCheckMod` (SecAgg+ only, where the server never sees one update) checks this node's own update
before it is masked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.utils import make_ffn
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import compute_clip_model_update

from client.policy import BadRequest, PolicyRefusal, node_policy
from common import protocol
from common.accounting import noise_multiplier
from common.config import RunConfig
from common.updates import update_problem

log = logging.getLogger("fedoppu.node")


class PrivacyViolation(RuntimeError):
    """A reply would carry something other than the shared adapter and allowed metrics."""


# -- generic errors ------------------------------------------------------------------------------------
def _error_code(err: BaseException) -> protocol.NodeError:
    if isinstance(err, PolicyRefusal):
        return protocol.NodeError.REFUSED_BY_POLICY
    if isinstance(err, PrivacyViolation):
        return protocol.NodeError.REPLY_REFUSED
    if isinstance(err, BadRequest):
        return protocol.NodeError.BAD_REQUEST
    return protocol.NodeError.FAILED


def error_reply(msg: Message, code: protocol.NodeError) -> Message:
    return Message(Error(code=int(code), reason=code.text), reply_to=msg)


def error_code_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost: no exception's text and no inner error's reason reaches the server, only a code."""
    kind = msg.metadata.message_type
    try:
        reply = call_next(msg, context)
    except Exception as err:  # every exception: this is the boundary of what leaves the node
        code = _error_code(err)
        log.error("%s message of run %s: %s", kind, msg.metadata.run_id, code.name, exc_info=err)
        return error_reply(msg, code)
    if reply.has_error():
        log.error("%s message of run %s: error reply %s", kind, msg.metadata.run_id, reply.error)
        return error_reply(msg, protocol.NodeError.FAILED)
    return reply


class GuardedClientApp(ClientApp):
    """A ClientApp whose every reply passes `error_code_mod`, also when routing fails (an unknown
    message type raises before any of a ClientApp's own mods run)."""

    def __call__(self, message: Message, context: Context) -> Message:
        return error_code_mod(message, context, self._route)

    def _route(self, message: Message, context: Context) -> Message:
        if message.metadata.message_type not in protocol.MESSAGE_TYPES:
            raise BadRequest(f"message type {message.metadata.message_type!r} is not answered by this node")
        return super().__call__(message, context)


# -- the allowlist ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplyRules:
    """What this node's replies may carry in this run; the ClientApp builds it from its setup."""

    privacy: str
    node_metrics: frozenset[str]  # evaluate: the node's own record (`metrics`)
    user_metrics: frozenset[str]  # evaluate: one user's record
    user_records: frozenset[str]  # evaluate: the record names the node's users appear under
    personal_tensors: Callable[[], Iterable[torch.Tensor]]  # every personal adapter tensor on the node


def _shapes(record) -> dict[str, tuple[int, ...]]:
    return {key: tuple(array.shape) for key, array in record.items()}


def _check_metrics(kind: str, name: str, record, allowed: frozenset[str]) -> None:
    extra = sorted(set(record) - allowed)
    if extra:
        raise PrivacyViolation(
            f"{kind} reply's record {name!r} carries metrics outside the allowlist: {extra}"
        )
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in record.values()):
        raise PrivacyViolation(f"{kind} reply's record {name!r}: metrics must be scalars")


def _digest(array: np.ndarray) -> bytes:
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).digest()


def _check_not_personal(arrays: ArrayRecord, sent: ArrayRecord, personal: Iterable[torch.Tensor]) -> None:
    """No tensor of the reply may equal a personal tensor (compared in the reply's own dtype); a
    tensor returned exactly as the server sent it carries nothing of the node and is skipped."""
    replied = {}
    for key, array in arrays.items():
        value = array.numpy()
        if not np.array_equal(value, sent[key].numpy().astype(value.dtype)):
            replied[_digest(value)] = key
    dtypes = {array.numpy().dtype for array in arrays.values()}
    for tensor in personal:
        values = tensor.detach().float().cpu().numpy()
        for dtype in dtypes:
            if (key := replied.get(_digest(values.astype(dtype)))) is not None:
                raise PrivacyViolation(f"train reply's tensor {key!r} equals a personal adapter's tensor")


def check_reply(msg: Message, reply: Message, rules: ReplyRules) -> None:
    """Raise PrivacyViolation unless the reply carries only what the allowlist allows."""
    kind, content = msg.metadata.message_type, reply.content
    if content.config_records:
        raise PrivacyViolation(f"reply to {kind} carries config records {list(content.config_records)}")
    metrics = content.metric_records
    if kind == protocol.EVALUATE:
        for name, record in metrics.items():
            if name == protocol.METRICS:
                _check_metrics(kind, name, record, rules.node_metrics)
            elif name in rules.user_records:
                _check_metrics(kind, name, record, rules.user_metrics)
            else:
                raise PrivacyViolation(
                    f"evaluate reply carries record {name!r}, not one of this node's users"
                )
    elif kind in (protocol.TRAIN, protocol.PERSONALIZE):
        if list(metrics) != [protocol.METRICS]:
            raise PrivacyViolation(
                f"{kind} reply must carry one '{protocol.METRICS}' record, got {list(metrics)}"
            )
        _check_metrics(
            kind,
            protocol.METRICS,
            metrics[protocol.METRICS],
            protocol.reply_metric_names(kind, rules.privacy),
        )
    else:
        raise PrivacyViolation(f"no reply to message type {kind!r} may leave the node")
    arrays = content.array_records
    if kind != protocol.TRAIN:
        if arrays:
            raise PrivacyViolation(f"reply to {kind} carries arrays {list(arrays)}")
        return
    sent = msg.content.array_records
    if list(arrays) != [protocol.ARRAYS] or protocol.ARRAYS not in sent:
        raise PrivacyViolation(
            f"train reply must carry exactly the '{protocol.ARRAYS}' record it received, got {list(arrays)}"
        )
    if _shapes(arrays[protocol.ARRAYS]) != _shapes(sent[protocol.ARRAYS]):
        raise PrivacyViolation(
            "train reply's tensors differ in keys or shapes from the shared adapter that was sent"
        )
    _check_not_personal(arrays[protocol.ARRAYS], sent[protocol.ARRAYS], rules.personal_tensors())


class PrivacyGuard:
    """The mod that checks every reply a handler produces (errors are `error_code_mod`'s)."""

    def __init__(self, rules: Callable[[Message, Context], ReplyRules]) -> None:
        self.rules = rules

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if not reply.has_error():
            check_reply(msg, reply, self.rules(msg, context))
        return reply


# -- the audit log ------------------------------------------------------------------------------------
def describe(msg: Message, reply: Message) -> dict:
    if reply.has_error():
        return {"message_type": msg.metadata.message_type, "error": reply.error.code}
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
        "error": None,
    }


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(msg, context)
    log_dir = os.environ.get("FEDOPPU_AUDIT_LOG")
    if log_dir:
        path = Path(log_dir) / f"{os.getpid()}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(describe(msg, reply)) + "\n")
    return reply


# -- the node's half of the privacy settings -----------------------------------------------------------
class NodeClippingMod:
    """Clip this client's update to the node's checked norm C and, for local DP, add N(0, (zC)^2).

    The norm is the one the node's policy admitted, never one a message carries (Flower's
    `fixedclipping_mod` clips to whatever norm the server sends). Local DP's noise is given as a
    multiplier so that epsilon composes over rounds, and comes from a generator seeded by the OS:
    training seeds are public, so noise drawn from them could be removed.
    """

    def __init__(self, clipping_norm: float, noise_multiplier: float = 0.0) -> None:
        if clipping_norm <= 0 or noise_multiplier < 0:
            raise ValueError("NodeClippingMod needs a clipping norm > 0 and a noise multiplier >= 0")
        self.clipping_norm = clipping_norm
        self.noise_multiplier = noise_multiplier

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        received = msg.content[protocol.ARRAYS].to_numpy_ndarrays()
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        record = reply.content[protocol.ARRAYS]
        arrays = [a.astype(np.float32) for a in record.to_numpy_ndarrays()]
        compute_clip_model_update(arrays, received, self.clipping_norm)
        if self.noise_multiplier > 0:
            rng = np.random.default_rng()
            std = self.noise_multiplier * self.clipping_norm
            arrays = [a + rng.normal(0.0, std, a.shape) for a in arrays]
        reply.content[protocol.ARRAYS] = ArrayRecord(
            {k: Array(a.astype(np.float32)) for k, a in zip(record.keys(), arrays, strict=True)}
        )
        return reply


def legacy_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Serve a legacy fit message (what SecAgg+ sends) with the ordinary train handler.

    The handler's training code stays the only one: this mod renames the legacy records to the
    Message-API ones (`arrays`, `config`) on the way in and back to a FitRes on the way out.
    """
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config.pop(protocol.LEGACY_KEYS)).split(",")
    received = parameters_to_ndarrays(fitins.parameters)
    inner = copy.copy(msg)
    inner.content = RecordDict(
        {
            protocol.ARRAYS: ArrayRecord({k: Array(a) for k, a in zip(keys, received, strict=True)}),
            protocol.CONFIG: ConfigRecord(config),
        }
    )
    reply = call_next(inner, context)
    if reply.has_error():
        return reply
    record, metrics = reply.content[protocol.ARRAYS], dict(reply.content[protocol.METRICS])
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters([record[k].numpy() for k in keys]),
        num_examples=int(metrics[protocol.NUM_EXAMPLES]),
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


class InvalidUpdate(RuntimeError):
    """This node's own update failed its check; it is not sent."""


class UpdateCheckMod:
    """Under SecAgg+ the server sees only the masked sum, so no server can check one update: each client
    checks its own before masking it (the keys and shapes that arrived, finite values, an L2 norm within
    `max-update-norm`). A bad update is never sent: the node drops out of the round and SecAgg+ sums the
    others. This guards the sum against the node's own faults (a diverged training, a corrupted
    tensor), not against a hostile node, which runs code of its own choosing (docs/privacy.md).
    """

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm or None

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        sent = {k: a.numpy() for k, a in msg.content[protocol.ARRAYS].items()}
        update = {k: a.numpy() for k, a in reply.content[protocol.ARRAYS].items()}
        if (problem := update_problem(sent, update, dtype=None, max_norm=self.max_norm)) is not None:
            raise InvalidUpdate(f"this node's update is not sent: {problem}")
        return reply


def train_privacy_mods(
    setting: str, noise_multiplier: float, clipping_norm: float, max_update_norm: float = 0.0
) -> list[Mod]:
    """The node's half of each privacy setting (the server's half is server/privacy.py)."""
    if setting in ("client-dp", "local-dp"):
        noise = noise_multiplier if setting == "local-dp" else 0.0
        return [NodeClippingMod(clipping_norm, noise)]
    check = UpdateCheckMod(max_update_norm)
    if setting == "secagg":
        return [secaggplus_mod, legacy_train_mod, check]
    if setting == "secagg+dp":
        return [secaggplus_mod, legacy_train_mod, check, NodeClippingMod(clipping_norm)]
    return []  # none, central-dp and adaptive-dp act on the server only


def privacy_layer_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Admit the run's privacy setting under the node's policy, then apply it to `train` only."""
    if msg.metadata.message_type != protocol.TRAIN:
        return call_next(msg, context)
    config = RunConfig.from_mapping(context.run_config)
    z = noise_multiplier(config)  # target-epsilon's derived z, as the server's
    node_policy(context.node_config).admit(config.privacy, z, config.clipping_norm)
    mods = train_privacy_mods(config.privacy, z, config.clipping_norm, config.max_update_norm)
    return make_ffn(call_next, mods)(msg, context)
