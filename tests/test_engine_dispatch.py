"""The simulation's message dispatcher (simulations/engine.py: next_messages) against Flower's own:
the same messages in the same order, at most one per node per tick, each delivered once."""

from __future__ import annotations

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.constant import TASK_ID_NUM_BYTES
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from simulations.engine import next_messages


def _federation(nodes: int, messages_per_node: int):
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    mapping = _register_nodes(nodes, factory)
    state = factory.state()
    run = Run.create_empty(run_id=TaskIdentity.run_id)  # the run the messages are created in
    run.federation_id = NOOP_FEDERATION_ID
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    order = list(mapping)
    for index in range(messages_per_node):  # a broadcast per round, nodes in reverse order
        content = RecordDict({"config": ConfigRecord({"round": index})})
        pushed = [Message(content, dst_node_id=node, message_type="train") for node in reversed(order)]
        assert len(list(grid.push_messages(pushed))) == nodes
    return state, order


def _flowers_tick(state, nodes: list[int]) -> list[Message]:
    """What Flower 1.42's add_messages_to_queue queues in one tick."""
    return [message for node in nodes for message in state.get_message_ins(node_id=node, limit=1)]


def test_each_tick_queues_what_flowers_dispatcher_queues(flower_identity):
    ours, order = _federation(nodes=5, messages_per_node=2)
    theirs, their_order = _federation(nodes=5, messages_per_node=2)
    for _ in range(3):  # two rounds' messages, then nothing is left to deliver
        got, expected = next_messages(ours, order), _flowers_tick(theirs, their_order)
        assert [(order.index(m.metadata.dst_node_id), m.content["config"]["round"]) for m in got] == [
            (their_order.index(m.metadata.dst_node_id), m.content["config"]["round"]) for m in expected
        ]
        assert all(m.metadata.delivered_at for m in got)
    assert got == [] and next_messages(ours, order[:2]) == []
