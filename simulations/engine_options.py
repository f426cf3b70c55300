"""How a simulated federation uses this machine: each client's CPUs and GPU share, Flower's log, and
the apps it runs. Not part of the run config (results do not depend on it), and light to import:
the command line's parser needs it before any command runs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineOptions:
    """The engine's settings for one simulated federation."""

    cpus_per_client: int = 1
    # A client's share of a GPU (Ray's num_gpus); None: as many per GPU as fit (simulations/placement.py)
    gpus_per_client: float | None = None
    gpu: int | None = None  # device = "cuda:N": Ray hands out that GPU alone (set by placement)
    flower_log: bool = False  # Flower's own INFO log (rounds, sampling) besides fedoppu's progress
    # Other apps than pyproject's components, as "module:attribute" (the tests' faulty and malicious apps).
    server_app: str | None = None
    client_app: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineOptions:
        return cls(
            cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client,
            flower_log=args.flower_log,
        )

    @property
    def client_device(self) -> str:
        """The `device` simulated clients resolve: the GPU Ray assigned to their worker, if any."""
        return "cuda" if self.gpus_per_client else "cpu"


DEFAULT_ENGINE = EngineOptions()


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpus-per-client",
        type=int,
        default=1,
        help="CPU cores per simulated client (default: 1); a client given every core runs in the "
        "federation's own process, not in a Ray worker",
    )
    parser.add_argument(
        "--gpus-per-client",
        type=float,
        metavar="SHARE",
        help="share of a GPU per simulated client, e.g. 0.25 for four clients per GPU; 0: clients on the CPU "
        "(default: as many per GPU as fit the model, measured; 0 without a GPU)",
    )
    parser.add_argument(
        "--flower-log", action="store_true", help="also show Flower's own log (rounds, sampling, Ray)"
    )
