"""What a strategy carries from one round to the next besides the shared adapter, so a resumed run
goes on where it stopped: DP-FedAvg's adapted clip norm and server momentum, the adaptive clip norm
of Flower's DP wrapper, FedAdam's and FedYogi's moments, FedAvgM's momentum. A run resumed without
them would restart the clip norm at `clipping-norm` (under DP, the noise scales with it) and the
momentum at zero: a different run from the one checkpointed.

The state is read from every strategy of the wrapper chain (ExactRounds -> DP wrapper -> base) and
written beside each round's checkpoint (server/checkpoints.py).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp.strategy import FedAvgM
from flwr.serverapp.strategy.fedopt import FedOpt

from common.io import DataError
from server.dpfedavg import DPFedAvg
from server.privacy import RoundClipAdaptiveClipping

# The attributes each strategy updates in aggregate_train and reads in the next round.
CARRIED: tuple[tuple[type, tuple[str, ...]], ...] = (
    (DPFedAvg, ("clipping_norm", "velocity")),
    (RoundClipAdaptiveClipping, ("clipping_norm",)),
    (FedOpt, ("m_t", "v_t")),  # FedAdam, FedYogi, FedAdagrad
    (FedAvgM, ("momentum_vector",)),
)
_LIST = "#"  # FedAvgM keeps its momentum as a list of arrays: `<attr>/#<index>`


def _chain(strategy) -> list:
    chain = [strategy]
    while (inner := getattr(chain[-1], "strategy", None)) is not None:
        chain.append(inner)
    return chain


def _attributes(strategy) -> tuple[str, ...]:
    return next((names for kind, names in CARRIED if isinstance(strategy, kind)), ())


def carried_state(strategy) -> dict[str, torch.Tensor]:
    """Every carried attribute of the chain that has a value, as tensors under `<depth>/<attribute>`
    (`/<key>` for a dict of arrays, `/#<index>` for a list)."""
    state: dict[str, torch.Tensor] = {}
    for depth, level in enumerate(_chain(strategy)):
        for name in _attributes(level):
            value, prefix = getattr(level, name), f"{depth}/{name}"
            if value is None:
                continue
            if isinstance(value, dict):
                state |= {
                    f"{prefix}/{key}": torch.from_numpy(np.asarray(a).copy()) for key, a in value.items()
                }
            elif isinstance(value, list):
                state |= {
                    f"{prefix}/{_LIST}{i}": torch.from_numpy(np.asarray(a).copy())
                    for i, a in enumerate(value)
                }
            else:
                state[prefix] = torch.tensor(float(value), dtype=torch.float64)
    return state


def restore_carried(strategy, state: dict[str, torch.Tensor], where: str) -> None:
    """Put `state` (from carried_state of the same chain) back; `where` names its file in errors."""
    chain = _chain(strategy)
    expected = {f"{depth}/{name}" for depth, level in enumerate(chain) for name in _attributes(level)}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        depth_name_item = key.split("/", 2)
        attribute, item = "/".join(depth_name_item[:2]), "/".join(depth_name_item[2:])
        if attribute not in expected:
            raise DataError(
                f"{where}: {key!r} is not state of this run's strategy ({type(chain[-1]).__name__} "
                f"wrapped in {', '.join(type(s).__name__ for s in chain[:-1])}); expected keys under "
                f"{sorted(expected)}"
            )
        grouped.setdefault(attribute, {})[item] = tensor
    for attribute, items in grouped.items():
        depth, name = attribute.split("/")
        level = chain[int(depth)]
        if list(items) == [""]:
            setattr(level, name, float(items[""]))
        elif all(item.startswith(_LIST) for item in items):
            ordered = sorted(items, key=lambda item: int(item[len(_LIST) :]))
            setattr(level, name, [items[item].numpy() for item in ordered])
        else:
            setattr(level, name, {item: tensor.numpy() for item, tensor in items.items()})
