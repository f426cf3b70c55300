"""The in-process simulation backend (simulations/in_process.py): when it is used, and that a message
crosses it as it crosses into a Ray actor (copied both ways, exceptions as Flower's)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException
from flwr.server.superlink.fleet.vce.backend import raybackend

from simulations.engine_options import EngineOptions
from simulations.in_process import InProcessBackend, runs_in_process, use_in_process_backend


def test_clients_run_in_process_only_when_they_take_turns_on_the_cpu():
    assert runs_in_process(EngineOptions(cpus_per_client=2), total_cpus=2)
    assert runs_in_process(EngineOptions(cpus_per_client=4), total_cpus=2)
    assert not runs_in_process(EngineOptions(cpus_per_client=1), total_cpus=2)
    assert not runs_in_process(EngineOptions(cpus_per_client=2, gpus_per_client=0.5), total_cpus=2)


def _message() -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))}), "config": ConfigRecord({})}
    )
    return Message(content, dst_node_id=7, message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_a_message_and_its_reply_are_copies_and_the_context_comes_back(flower_identity):
    kept = {}
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        message.content["config"]["seen"] = True  # a client that alters what it received
        context.state["calls"] = ConfigRecord({"n": 1})
        reply = Message(
            RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(3, np.float32))})}), reply_to=message
        )
        kept["reply"] = reply
        return reply

    backend = InProcessBackend({})
    backend.build(lambda: app)
    message, context = _message(), _context()
    assert backend.num_workers == 1 and backend.is_worker_idle()

    reply, updated = backend.process_message(message, context)

    assert "seen" not in message.content["config"]  # the server's stored message is untouched
    assert reply is not kept["reply"]
    np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), np.ones(3))
    assert updated.state["calls"]["n"] == 1
    assert backend.is_worker_idle()


def test_a_clientapp_error_is_raised_as_flowers_clientapp_exception(flower_identity):
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        raise ValueError("user u3: no history")

    backend = InProcessBackend({})
    backend.build(lambda: app)
    with pytest.raises(ClientAppException, match="user u3: no history"):
        backend.process_message(_message(), _context())
    assert backend.is_worker_idle()


def test_the_engine_builds_this_backend_where_it_would_build_rays(monkeypatch):
    monkeypatch.setattr(raybackend, "RayBackend", raybackend.RayBackend)  # restored after the test
    use_in_process_backend()
    # What flwr's vce_api.start_vce imports when it builds the backend:
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    assert RayBackend is InProcessBackend
