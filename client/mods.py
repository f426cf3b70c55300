"""Client mods that watch what leaves the node.

`privacy_guard_mod` enforces OPPU's promise on every reply: a train reply carries only the shared
adapter's tensors (the keys and shapes that arrived) and scalar metrics; every other reply carries
metrics only. No personal adapter tensor, no text (no ConfigRecord) ever leaves.
`privacy_layer_mod` adds the run's privacy setting to the `train` action only (never to personal
adapters or evaluation): client-side clipping, local DP noise, or SecAgg+ (docs/privacy.md). It sits
outside the guard, which checks what the handler produced; its mods then only clip, noise or mask that
shared adapter (SecAgg+ replies carry Flower's protocol records: public keys, encrypted key shares,
the masked adapter, and the legacy FitRes metrics and status).
`audit_mod` appends a description of each reply to $FEDOPPU_AUDIT_LOG/<pid>.jsonl when that variable
is set, so people (and the tests) can check what a node actually sent.
`UpdateCheckMod` (SecAgg+ only, where the server never sees one update) checks this node's own update
before it is masked.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.utils import make_ffn
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import compute_clip_model_update

from common import protocol
from common.updates import update_problem


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
    if msg.metadata.message_type != protocol.TRAIN:
        if arrays:
            raise PrivacyViolation(f"reply to {msg.metadata.message_type} carries arrays {list(arrays)}")
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


class LocalGaussianMod:
    """Local DP: clip this client's update to C and add N(0, (z*C)^2) noise before the reply leaves.

    Not Flower's `LocalDpMod`, whose noise is calibrated from a one-shot epsilon and never composed:
    here the noise is given as a multiplier so that epsilon composes over rounds in an accountant. The noise comes from
    a generator seeded by the OS: training seeds are public, so noise drawn from them could be removed.
    """

    def __init__(self, clipping_norm: float, noise_multiplier: float) -> None:
        if clipping_norm <= 0 or noise_multiplier <= 0:
            raise ValueError("LocalGaussianMod needs a clipping norm and a noise multiplier > 0")
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
        rng = np.random.default_rng()
        noisy = [a + rng.normal(0.0, self.noise_multiplier * self.clipping_norm, a.shape) for a in arrays]
        reply.content[protocol.ARRAYS] = ArrayRecord(
            {k: Array(a.astype(np.float32)) for k, a in zip(record.keys(), noisy, strict=True)}
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


def train_privacy_mods(run_config: dict) -> list[Mod]:
    """The client half of each privacy setting (the server half is server/privacy.py)."""
    setting = str(run_config.get("privacy", "none"))
    if setting == "client-dp":
        return [fixedclipping_mod]  # the server's wrapper sends the clipping norm
    if setting == "local-dp":
        return [LocalGaussianMod(float(run_config["clipping-norm"]), float(run_config["noise-multiplier"]))]
    check = UpdateCheckMod(float(run_config.get("max-update-norm", 0.0)))
    if setting == "secagg":
        return [secaggplus_mod, legacy_train_mod, check]
    if setting == "secagg+dp":
        return [secaggplus_mod, legacy_train_mod, check, fixedclipping_mod]
    return []  # none, central-dp and adaptive-dp act on the server only


def privacy_layer_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply the privacy setting to the shared adapter's `train` action and to nothing else."""
    if msg.metadata.message_type != protocol.TRAIN:
        return call_next(msg, context)
    return make_ffn(call_next, train_privacy_mods(context.run_config))(msg, context)
