"""Test-only apps that inject faults into a simulated federation (the engine's server_app/client_app).

`app` is the production ClientApp behind one more mod, outermost, so a corrupted update reaches the
server as a hostile or broken node would send it, past the node's own guard. What it injects comes
from $FEDOPPU_FAULTS, a JSON list of faults; each names the phase, the partition, the train round or
the method, and what happens:
- train updates: `nan`, `inf` (one value), `wrong-shape`, `missing-key` (one tensor), `scaled` (the
  update times 1000);
- any phase: `raise` (the ClientApp raises), `kill` (its process dies), `sleep` (it answers after
  `seconds`), `kill-while-saving` (personalize: the process dies half-way through writing its second
  user's adapter).
A fault with `"once": true` fires on its first message only (a marker in $FEDOPPU_FAULTS_DIR), so a
retried round meets a recovered node.

`killed_server` is the production ServerApp whose process kills itself (SIGKILL) when the train
replies of round $FEDOPPU_KILL_AT_ROUND arrive: a server that dies mid-round.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save

import client.client_app as production
import common.peft_io
from common import protocol
from common.config import RunConfig
from server.federation import Federation

FAULTS = "FEDOPPU_FAULTS"
FAULTS_DIR = "FEDOPPU_FAULTS_DIR"
KILL_AT_ROUND = "FEDOPPU_KILL_AT_ROUND"
PHASES = {protocol.TRAIN: "train", protocol.PERSONALIZE: "personalize", protocol.EVALUATE: "evaluate"}


def _train_round(msg: Message) -> int:
    return int(protocol.config_value(msg, protocol.SERVER_ROUND, 0)) + int(
        protocol.config_value(msg, protocol.ROUND_OFFSET, 0)
    )


def _matches(fault: dict, msg: Message, partition: int) -> bool:
    if fault["phase"] != PHASES.get(msg.metadata.message_type) or fault["partition"] != partition:
        return False
    if "round" in fault and fault["round"] != _train_round(msg):
        return False
    return "method" not in fault or fault["method"] == protocol.config_value(msg, protocol.METHOD)


def _fires(fault: dict) -> bool:
    if not fault.get("once"):
        return True
    marker = Path(os.environ[FAULTS_DIR]) / f"{json.dumps(fault, sort_keys=True).encode().hex()}.fired"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def corrupt(kind: str, sent: ArrayRecord, reply: ArrayRecord) -> ArrayRecord:
    """The reply's arrays with one fault of the given kind."""
    arrays = {key: array.numpy().copy() for key, array in reply.items()}
    first = next(iter(arrays))
    if kind in ("nan", "inf"):
        arrays[first].flat[0] = np.nan if kind == "nan" else np.inf
    elif kind == "wrong-shape":
        arrays[first] = np.concatenate([arrays[first], arrays[first][:1]])
    elif kind == "missing-key":
        del arrays[first]
    elif kind == "scaled":
        arrays = {
            key: sent[key].numpy() + 1000 * (value - sent[key].numpy()) for key, value in arrays.items()
        }
    else:
        raise ValueError(f"unknown update fault {kind!r}")
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in arrays.items()})


def _dying_save_file(real):
    """save_file that writes its second adapter half-way and then kills the process."""
    calls = []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) < 2:
            return real(tensors, filename, *args, **kwargs)
        data = save(tensors)
        Path(filename).write_bytes(data[: len(data) // 2])
        os._exit(1)

    return save_file


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    partition = int(context.node_config["partition-id"])
    faults = [f for f in json.loads(os.environ.get(FAULTS, "[]")) if _matches(f, msg, partition)]
    fault = next((f for f in faults if _fires(f)), None)
    kind = fault["fault"] if fault else None
    if kind == "raise":
        raise RuntimeError(f"injected fault: partition {partition} raises")
    if kind == "kill":
        os._exit(1)
    if kind == "sleep":
        time.sleep(fault["seconds"])
    saving = (
        mock.patch.object(common.peft_io, "save_file", _dying_save_file(common.peft_io.save_file))
        if kind == "kill-while-saving"
        else nullcontext()
    )
    with saving:
        reply = call_next(msg, context)
    if kind in ("nan", "inf", "wrong-shape", "missing-key", "scaled"):
        reply.content[protocol.ARRAYS] = corrupt(
            kind, msg.content[protocol.ARRAYS], reply.content[protocol.ARRAYS]
        )
    return reply


app = ClientApp(mods=[fault_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return production.app(msg, context)


@app.train(protocol.PERSONALIZE_ACTION)
def personalize(msg: Message, context: Context) -> Message:
    return production.app(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return production.app(msg, context)


class KillingGrid:
    """Kills this process when the train replies of round `at_round` arrive, before aggregation."""

    def __init__(self, grid: Grid, at_round: int) -> None:
        self._grid, self.at_round = grid, at_round

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = self._grid.send_and_receive(messages, timeout=timeout)
        train = messages and messages[0].metadata.message_type == protocol.TRAIN
        if train and _train_round(messages[0]) == self.at_round:
            os.kill(os.getpid(), signal.SIGKILL)
        return replies


killed_server = ServerApp()


@killed_server.main()
def main(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    Federation(KillingGrid(grid, int(os.environ[KILL_AT_ROUND])), config).run(config.method_list)
