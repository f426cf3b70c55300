"""Personal adapters on the client's own disk: one directory per (variant, user), peft's format.

Each adapter is written atomically (temporary directory + rename) and recorded in a manifest with its
checksum, the digest of the shared adapter it was trained on and a fingerprint of the user's history,
so a later run can reuse it, continue from it, or detect that it is corrupt and retrain it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig

from common.io import DataError, atomic_write_json, read_json
from common.peft_io import read_adapter, write_adapter

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class AdapterRecord:
    user_id: str
    variant: str
    path: str
    sha256: str
    shared_digest: str
    data_fingerprint: str
    created: float


def _safe_name(user_id: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", user_id) and user_id not in {".", ".."}:
        return user_id
    return "user-" + hashlib.sha256(user_id.encode()).hexdigest()[:16]


class PersonalAdapterStore:
    """The node's personal adapters; nothing here is ever sent to the server."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def _manifest(self) -> dict[str, dict]:
        if not self.manifest_path.exists():
            return {}
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("adapters"), dict):
            raise DataError(f"{self.manifest_path}: expected an object with an 'adapters' object")
        return manifest["adapters"]

    def _write_manifest(self, adapters: dict[str, dict]) -> None:
        atomic_write_json(self.manifest_path, {"version": 1, "adapters": adapters})

    @staticmethod
    def _key(variant: str, user_id: str) -> str:
        return f"{variant}/{user_id}"

    def records(self) -> list[AdapterRecord]:
        return [AdapterRecord(**entry) for entry in self._manifest().values()]

    def record(self, variant: str, user_id: str) -> AdapterRecord | None:
        entry = self._manifest().get(self._key(variant, user_id))
        return AdapterRecord(**entry) if entry else None

    def save(
        self,
        variant: str,
        user_id: str,
        state: dict[str, torch.Tensor],
        peft_config: LoraConfig,
        *,
        shared_digest: str,
        data_fingerprint: str,
    ) -> AdapterRecord:
        """Write the adapter so that `PeftModel.from_pretrained(model, path)` loads it as is."""
        target = self.root / "adapters" / variant / _safe_name(user_id)
        digest = write_adapter(target, state, peft_config)
        record = AdapterRecord(
            user_id,
            variant,
            str(target.relative_to(self.root)),
            digest,
            shared_digest,
            data_fingerprint,
            time.time(),
        )
        adapters = self._manifest()
        adapters[self._key(variant, user_id)] = asdict(record)
        self._write_manifest(adapters)
        return record

    def load(self, variant: str, user_id: str) -> tuple[AdapterRecord, dict[str, torch.Tensor]] | None:
        """The stored adapter, or None when there is none or it fails its checksum (then it is dropped)."""
        record = self.record(variant, user_id)
        if record is None:
            return None
        state = read_adapter(self.root / record.path, record.sha256)
        if state is None:
            self.delete(user_id, variants=[variant])
            return None
        return record, state

    def delete(self, user_id: str, variants: list[str] | None = None) -> int:
        """Remove a user's adapters (all variants by default) and their manifest entries."""
        adapters = self._manifest()
        doomed = [
            key
            for key, entry in adapters.items()
            if entry["user_id"] == user_id and (variants is None or entry["variant"] in variants)
        ]
        for key in doomed:
            shutil.rmtree(self.root / adapters.pop(key)["path"], ignore_errors=True)
        if doomed:
            self._write_manifest(adapters)
        return len(doomed)
