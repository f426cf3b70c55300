"""Runs the app's ServerApp and ClientApp in Flower's simulation engine, in this process.

This is what `flwr run .` does inside its simulation process (flwr.simulation.app), minus the
SuperLink it would leave running: the components come from pyproject's [tool.flwr.app.components]
and both sides receive the same fused run config. Ray shuts down when the call returns, so no
background process is left behind; clients that take turns one at a time on the CPU run in the
federation's own process instead of Ray's (simulations/in_process.py). Written against flwr 1.42
(the pinned minor version).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
import warnings

from flwr.app import Context, Message, RecordDict
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from common.config import PROJECT_DIR, RunConfig, flower_app_table
from common.device import GPU_MEMORY_FRACTION_ENV
from simulations.engine_options import DEFAULT_ENGINE, EngineOptions
from simulations.in_process import runs_in_process, use_in_process_backend
from simulations.placement import ray_backend_config


def _components() -> tuple[str, str]:
    components = flower_app_table()["components"]
    return components["serverapp"], components["clientapp"]


# How long an interrupted federation's processes may take to disappear after SIGKILL.
STOP_GRACE_SECONDS = 10.0


class FederationFailed(RuntimeError):
    """The federation's process ended with an error (its traceback was printed above)."""


def _federations() -> multiprocessing.context.BaseContext:
    """Fresh processes forked from a server that imported the engine, the ServerApp and the ClientApp
    once (torch, transformers, peft: ~5 s of a core that every spawned federation paid again; a
    comparison or a test session runs many; the ClientApp runs in the federation's process when
    clients take turns on the CPU). The server holds no threads, state or environment a run could
    inherit: each federation gets this process's environment and directory when it starts
    (_run_in_process)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *(component.split(":")[0] for component in _components())])
    return context


def run_federation(config: RunConfig, num_supernodes: int, engine: EngineOptions = DEFAULT_ENGINE) -> None:
    """Run one federation in a fresh process, so no Ray or Flower state leaks between federations.

    The process leads a process group of its own (Ray's processes join it), so a Ctrl-C in the
    terminal reaches this process alone: it stops the whole group and the KeyboardInterrupt goes on."""
    process = _federations().Process(
        target=_run_in_process,
        args=(config, num_supernodes, engine, dict(os.environ), os.getcwd()),
        name="fedoppu-federation",
    )
    process.start()
    try:
        process.join()
    finally:
        if process.is_alive():  # interrupted: take the federation (and its Ray workers) down with us
            _stop_group(process)
    if process.exitcode != 0:
        raise FederationFailed(f"the federation in {config.run_dir} failed (exit code {process.exitcode})")


def _stop_group(process: multiprocessing.process.BaseProcess) -> None:
    """SIGKILL to the federation's process group: the federation and Ray's processes end at once and
    print nothing (with SIGTERM, Ray's own handlers print stack dumps and Flower's threads report the
    actors they lose). Nothing is lost: every result file is written atomically, and a resumed run
    starts from the last checkpointed round."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.kill()  # also when it was stopped before it had a group of its own
    process.join(STOP_GRACE_SECONDS)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group exists, not ours to signal
        return True
    return True


def next_messages(state, nodes: list[int]) -> list[Message]:
    """Each node's oldest undelivered message, marked delivered, in the order of `nodes`: what Flower
    1.42's dispatcher collects per tick with one `get_message_ins(node, limit=1)` per node. Each of
    those calls checks every stored message (expiry, federation), so a tick costs nodes x messages
    checks: at 200 nodes, with a broadcast's 200 messages in the store, that kept a core busy every
    0.1 s. Here every stored message is checked once per tick."""
    wanted = set(nodes)
    with state.lock:
        stored = list(state.message_ins_store)
        state._check_stored_messages(set(stored))  # drops expired messages, as get_message_ins does
        first: dict[int, Message] = {}
        for message_id in stored:
            message = state.message_ins_store.get(message_id)
            if message is None or message.metadata.delivered_at != "":
                continue
            if (node := message.metadata.dst_node_id) in wanted:
                first.setdefault(node, message)
        delivered_at = now().isoformat()
        for message in first.values():
            message.metadata.delivered_at = delivered_at
    return [first[node] for node in nodes if node in first]


def _add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:
    """Flower 1.42's `vce_api.add_messages_to_queue`, one pass over the stored messages per tick."""
    nodes = list(nodes_mapping)
    while not f_stop.is_set():
        for message in next_messages(state, nodes):
            queue.put(message)
        f_stop.wait(0.1)


def _run_in_process(
    config: RunConfig, num_supernodes: int, engine: EngineOptions, environ: dict[str, str], cwd: str
) -> None:
    os.setsid()  # the terminal's Ctrl-C goes to the parent alone; it stops this group (_stop_group)
    os.environ.clear()  # the caller's, as now: the fork server kept the one it started with
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not engine.flower_log:  # fedoppu's progress bars and report are what a user reads
        logging.getLogger("flwr").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
    vce_api.add_messages_to_queue = _add_messages_to_queue  # in this federation's process only
    components = _components()
    server_attr, client_attr = engine.server_app or components[0], engine.client_app or components[1]
    run_config = config.to_flower()
    run_id = generate_rand_int_from_bytes(RUN_ID_NUM_BYTES)
    run = Run.create_empty(run_id=run_id)
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    if engine.gpu is not None:  # Ray's workers see that GPU alone, as their cuda:0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[engine.gpu] if visible else str(engine.gpu)
    if engine.gpus_per_client:  # Ray's workers inherit it: each holds itself to its share of the GPU's memory
        os.environ[GPU_MEMORY_FRACTION_ENV] = str(engine.gpus_per_client)
    total_cpus = os.cpu_count() or 1
    if runs_in_process(engine, total_cpus):
        use_in_process_backend()
    backend_config = ray_backend_config(engine, total_cpus)
    _run_simulation(
        num_supernodes=num_supernodes,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr=server_attr,
        client_app_attr=client_attr,
        backend_config=backend_config,
        app_dir=str(PROJECT_DIR),
        run=run,
        server_app_context=context,
        is_app=True,
    )
