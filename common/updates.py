"""What a valid update of the shared adapter is, checked before it can reach an aggregate.

The server checks every train reply before the strategy aggregates it (server/grid.py); under SecAgg+,
where the server only ever sees the masked sum, each client checks its own update before masking it
(client/mods.py). Both ask the same question: does the reply hold exactly the tensors that were sent
(keys, shapes, the wire dtype), with finite values, and is the update (reply minus what was sent)
within its L2 bound?
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def _listed(keys: list[str]) -> str:
    return f"{keys[:3]}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"


def update_norm(sent: Arrays, reply: Arrays) -> float:
    """The L2 norm of reply minus sent over every tensor, in float64."""
    total = sum(float(np.sum((reply[k].astype(np.float64) - sent[k]) ** 2)) for k in sent)
    return math.sqrt(total)


def update_problem(sent: Arrays, reply: Arrays, *, dtype: str | None, max_norm: float | None) -> str | None:
    """Why `reply` is not a valid update of `sent`, or None when it is."""
    missing = [k for k in sent if k not in reply]
    unexpected = [k for k in reply if k not in sent]
    if missing or unexpected:
        return f"keys differ from the shared adapter's: missing {_listed(missing)}, unexpected {_listed(unexpected)}"
    for key, array in reply.items():
        if array.shape != sent[key].shape:
            return f"{key}: shape {tuple(array.shape)}, expected {tuple(sent[key].shape)}"
        if dtype is not None and str(array.dtype) != dtype:
            return f"{key}: dtype {array.dtype}, expected {dtype}"
        if not np.issubdtype(array.dtype, np.floating):
            return f"{key}: dtype {array.dtype} is not a float type"
        non_finite = int(array.size - np.count_nonzero(np.isfinite(array)))
        if non_finite:
            return f"{key}: {non_finite} non-finite value(s) (NaN or Inf)"
    if max_norm:
        norm = update_norm(sent, reply)
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}"
    return None
