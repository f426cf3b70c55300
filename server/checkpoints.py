"""The global shared adapter after every round, in peft's format, so a run can resume from it, and
beside it what the strategy carries to the next round (server/carried.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from peft import PeftConfig
from safetensors import SafetensorError
from safetensors.torch import load, save

from common.io import DataError, atomic_write_bytes, atomic_write_json, read_json
from common.peft_io import read_adapter, write_adapter

SERVER_STATE = "server-state.safetensors"


class CheckpointStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / "checkpoints"

    def save(
        self,
        server_round: int,
        state: dict[str, torch.Tensor],
        peft_config: PeftConfig,
        carried: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        target = self.root / f"round-{server_round:04d}"
        pointer = {
            "round": server_round,
            "path": target.name,
            "sha256": write_adapter(target, state, peft_config),
        }
        if carried:
            data = save(carried)
            atomic_write_bytes(target / SERVER_STATE, data)
            pointer["server_state_sha256"] = hashlib.sha256(data).hexdigest()
        # The pointer is written last: a crash before it leaves the previous checkpoint as latest.
        atomic_write_json(self.root / "latest.json", pointer)
        return target

    def latest(self) -> tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """(round, shared adapter, carried strategy state: empty where the strategy carries none)."""
        pointer = self.root / "latest.json"
        if not pointer.exists():
            return None
        latest = read_json(pointer)
        state = read_adapter(self.root / latest["path"], latest["sha256"])
        if state is None:
            raise DataError(f"{pointer}: checkpoint {latest['path']} is missing or fails its sha256 check")
        carried: dict[str, torch.Tensor] = {}
        if digest := latest.get("server_state_sha256"):
            path = self.root / latest["path"] / SERVER_STATE
            data = path.read_bytes() if path.exists() else b""
            if hashlib.sha256(data).hexdigest() != digest:
                raise DataError(
                    f"{path}: the strategy's state is missing or fails its sha256 check ({pointer})"
                )
            try:
                carried = load(data)
            except SafetensorError as err:
                raise DataError(f"{path}: not a safetensors file ({err})") from err
        return int(latest["round"]), state, carried
