"""The global shared adapter after every round, in peft's format, so a run can resume from it."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig

from common.io import DataError, atomic_write_json, read_json
from common.peft_io import read_adapter, write_adapter


class CheckpointStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir) / "checkpoints"

    def save(self, server_round: int, state: dict[str, torch.Tensor], peft_config: LoraConfig) -> Path:
        target = self.root / f"round-{server_round:04d}"
        sha256 = write_adapter(target, state, peft_config)
        # The pointer is written last: a crash before it leaves the previous checkpoint as latest.
        atomic_write_json(
            self.root / "latest.json", {"round": server_round, "path": target.name, "sha256": sha256}
        )
        return target

    def latest(self) -> tuple[int, dict[str, torch.Tensor]] | None:
        pointer = self.root / "latest.json"
        if not pointer.exists():
            return None
        latest = read_json(pointer)
        state = read_adapter(self.root / latest["path"], latest["sha256"])
        if state is None:
            raise DataError(f"{pointer}: checkpoint {latest['path']} is missing or fails its sha256 check")
        return int(latest["round"]), state
