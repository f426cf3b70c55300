"""A Flower simulation backend that runs the ClientApp in the federation's own process.

When simulated clients take turns one at a time on the CPU (a client given every core), Ray's actor
pool holds a single actor: a second process that imports torch, transformers and peft again and loads
its own copy of the model (about 4 GB resident and 10 s of start per federation, with Ray's own
processes) only to run messages one after another. This backend runs them one after another here.

Messages and contexts cross the same boundary as with Ray: both are pickled on the way in and the
reply on the way out, so a ClientApp can neither alter the message the server keeps in its store
nor hand the server tensors it goes on using. A ClientApp's exception becomes Flower's
`ClientAppException`, as Ray's actor raises it, and Flower's worker turns it into an error reply.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException, LoadClientAppError
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.server.superlink.fleet.vce.backend.backend import Backend, BackendConfig

from simulations.engine_options import EngineOptions


def runs_in_process(engine: EngineOptions, total_cpus: int) -> bool:
    """One client at a time on the CPU: Ray would add a process and nothing else."""
    return not engine.gpus_per_client and engine.cpus_per_client >= total_cpus


class InProcessBackend(Backend):
    """Flower's Ray backend with one actor, without Ray: one message at a time, in this process."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], ClientApp] | None = None
        self._busy = threading.Lock()

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return not self._busy.locked()

    def terminate(self) -> None:
        """Nothing to stop: no process was started."""

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self._app_fn is None:
            raise ValueError("build() the backend before it processes messages")
        message, context = _copied((message, context))
        with self._busy:
            try:
                reply = self._app_fn()(message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as error:
                raise ClientAppException(str(error)) from error
        return _copied((reply, context))


def _copied(objects: tuple[Message, Context]) -> tuple[Message, Context]:
    return pickle.loads(pickle.dumps(objects, protocol=pickle.HIGHEST_PROTOCOL))


def use_in_process_backend() -> None:
    """Flower 1.42's simulation engine builds `raybackend.RayBackend` by name (vce_api.start_vce):
    in a federation's own process, that name is made to build this backend instead."""
    raybackend.RayBackend = InProcessBackend
