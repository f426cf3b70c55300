"""Personal adapters on the client's own disk: one directory per (variant, user), peft's format.

Each adapter is recorded in a manifest with its checksum, the version and digest of the shared adapter
it was trained on and a fingerprint of the user's history, so a later run can reuse it, continue from
it, or detect that it is corrupt and retrain it. A new adapter never overwrites the one it replaces: it
is written to a new version directory, then the manifest (renamed into place) switches to it, then the
old version is removed. A crash at any point leaves the manifest naming a complete adapter, the old
one or the new one. The adapters belong to their users: they can be exported as a portable archive,
imported on another node (for the user it was exported for, within size limits), and deleted without
a trace. A user's directory is named by a hash of the id alone, so no user id can name another user's
directory; a store written with the older names (the id itself when it was a safe file name) is
migrated the first time it is changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import re
import shutil
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from peft import PeftConfig

from common.io import (
    DataError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    file_sha256,
    read_json,
)
from common.peft_io import WEIGHTS, read_adapter, write_adapter

MANIFEST = "manifest.json"
MANIFEST_VERSION = 2  # 2: user directories named by hash only (1: the id itself when it was safe)
PROFILES = "profiles"  # the node's profile cache, next to its adapters
STATE_DIR = ".fedoppu"  # a deployed node's state inside its data directory, unless `state-dir` is set
_VARIANT = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a method name: one path component
# An imported archive holds a few peft adapters of one user (a few MB each): far below these.
MAX_ARCHIVE_BYTES = 256 * 2**20
MAX_UNPACKED_BYTES = 1024 * 2**20
MAX_ARCHIVE_MEMBERS = 4096


@dataclass(frozen=True)
class GateDecision:
    """How a user is answered with the stored adapter (client/gate.py), decided on held-out history;
    kept in the manifest and in the user's export, never sent. The defaults are OPPU's original:
    the shared adapter at weight 1 plus the personal adapter, trained on the whole history."""

    setting: str = "none"  # the run config's gate setting (RunConfig.gate_setting) it was decided under
    shared_weight: float = 1.0  # the weight on the shared adapter's delta
    uses_personal: bool = True  # False: shared adapter alone (the stored adapter is then the identity)
    epochs: float | None = None  # personal training kept, in epochs of the training part
    holdout_loss: float | None = None  # the chosen alternative's loss on the held-out items
    holdout_items: int = 0
    reason: str = ""  # e.g. "short-history": too few items to hold any out


@dataclass(frozen=True)
class AdapterRecord:
    user_id: str
    variant: str
    path: str
    sha256: str
    shared_digest: str
    data_fingerprint: str
    created: float
    shared_version: int | None = None  # the server round the shared adapter came from, when known
    gate: GateDecision = GateDecision()


def node_state_dir(data_path: str | Path, state_dir: str | Path | None = None) -> Path:
    """Where a deployed node keeps its users' adapters, profiles and manifest."""
    return Path(state_dir) if state_dir else Path(data_path) / STATE_DIR


def user_dir_name(user_id: str) -> str:
    """A user's directory name: a hash of the id and nothing else, so no id can name another's."""
    return "u-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]


def _leftover(name: str) -> re.Pattern:
    """Temporary and replaced directories that atomic writes of `name` can leave after a crash."""
    return re.compile(rf"\.{re.escape(name)}\.([a-z0-9_]{{8}}\.tmp|old-\d+)")


def _record(entry: dict, where: Path) -> AdapterRecord:
    known = {f.name for f in fields(AdapterRecord)}
    try:
        values = {k: v for k, v in entry.items() if k in known}
        if "gate" in values:
            values["gate"] = GateDecision(**values["gate"])
        return AdapterRecord(**values)
    except TypeError as err:
        raise DataError(f"{where}: bad adapter entry {entry!r} ({err})") from err


class PersonalAdapterStore:
    """The node's personal adapters; nothing here is ever sent to the server."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize manifest updates between the ClientApp and `fedoppu adapter` on the same node."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._migrate()
            yield

    def _migrate(self) -> None:
        """Move a version-1 store's adapters (one directory per user, named by the id) into versions
        under hash-only user directories (through unique staging names, since an old name can be a new
        one) and drop its crash leftovers."""
        if not self.manifest_path.exists():
            return
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict) or manifest.get("version") == MANIFEST_VERSION:
            return  # current, or malformed: _manifest() names the problem
        adapters = self._manifest()
        staged = {}
        for key, entry in adapters.items():
            old = self.root / entry["path"]
            for leftover in old.parent.glob(".*"):
                if _leftover(old.name).fullmatch(leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)
            if old.is_dir():
                staged[key] = old.rename(old.with_name(f".migrating-{len(staged)}"))
        for key, entry in adapters.items():
            target = self._user_dir(entry["variant"], entry["user_id"]) / "version-migrated"
            if key in staged:
                target.parent.mkdir(parents=True, exist_ok=True)
                staged[key].rename(target)
            entry["path"] = str(target.relative_to(self.root))
        self._write_manifest(adapters)

    def _manifest(self) -> dict[str, dict]:
        if not self.manifest_path.exists():
            return {}
        manifest = read_json(self.manifest_path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("adapters"), dict):
            raise DataError(f"{self.manifest_path}: expected an object with an 'adapters' object")
        return manifest["adapters"]

    def _write_manifest(self, adapters: dict[str, dict]) -> None:
        atomic_write_json(self.manifest_path, {"version": MANIFEST_VERSION, "adapters": adapters})

    @staticmethod
    def _key(variant: str, user_id: str) -> str:
        return f"{variant}/{user_id}"

    def records(self) -> list[AdapterRecord]:
        return [_record(entry, self.manifest_path) for entry in self._manifest().values()]

    def record(self, variant: str, user_id: str) -> AdapterRecord | None:
        entry = self._manifest().get(self._key(variant, user_id))
        return _record(entry, self.manifest_path) if entry else None

    def intact(self, record: AdapterRecord) -> bool:
        """Whether the adapter's weights are on disk and match the checksum in the manifest."""
        weights = self.root / record.path / WEIGHTS
        return weights.is_file() and file_sha256(weights) == record.sha256

    def save(
        self,
        variant: str,
        user_id: str,
        state: dict[str, torch.Tensor],
        peft_config: PeftConfig,
        *,
        shared_digest: str,
        data_fingerprint: str,
        shared_version: int | None = None,
        gate: GateDecision | None = None,
    ) -> AdapterRecord:
        """Write the adapter so that `PeftModel.from_pretrained(model, path)` loads it as is."""
        with self._locked():
            target = self._new_version(variant, user_id)
            digest = write_adapter(target, state, peft_config)
            record = AdapterRecord(
                user_id,
                variant,
                str(target.relative_to(self.root)),
                digest,
                shared_digest,
                data_fingerprint,
                time.time(),
                shared_version,
                gate or GateDecision(),
            )
            adapters = self._manifest()
            adapters[self._key(variant, user_id)] = asdict(record)
            self._write_manifest(adapters)
            self._prune(variant, user_id, keep=target)
        return record

    def _user_dir(self, variant: str, user_id: str) -> Path:
        return self.root / "adapters" / variant / user_dir_name(user_id)

    def _new_version(self, variant: str, user_id: str) -> Path:
        return self._user_dir(variant, user_id) / f"version-{uuid.uuid4().hex[:12]}"

    def _prune(self, variant: str, user_id: str, keep: Path) -> None:
        """Remove every version but the recorded one: the one it replaced and any a crash left. What
        cannot be removed now (the adapter is saved either way) goes in a later save or delete."""
        for path in self._user_dir(variant, user_id).iterdir():
            if path == keep:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()

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
        """Remove a user's adapters (all variants by default), their manifest entries and any adapter
        directory a crash left behind; returns how many manifest entries were removed."""
        with self._locked():
            adapters = self._manifest()
            doomed = [
                key
                for key, entry in adapters.items()
                if entry["user_id"] == user_id and (variants is None or entry["variant"] in variants)
            ]
            paths = {self.root / adapters.pop(key)["path"] for key in doomed}
            if doomed:
                self._write_manifest(adapters)
            for path in paths | set(self._user_dirs(user_id, variants)):
                shutil.rmtree(path, ignore_errors=True)
        return len(doomed)

    def _user_dirs(self, user_id: str, variants: list[str] | None) -> Iterator[Path]:
        """The user's adapter directories (every version inside), and the temporary or replaced ones that
        interrupted writes of the earlier one-directory layout left beside them."""
        name = user_dir_name(user_id)
        leftover = _leftover(name)
        base = self.root / "adapters"
        if variants is not None:
            variant_dirs = [base / v for v in variants]
        else:
            variant_dirs = list(base.iterdir()) if base.is_dir() else []
        for variant_dir in variant_dirs:
            if variant_dir.is_dir():
                yield from (p for p in variant_dir.iterdir() if p.name == name or leftover.fullmatch(p.name))

    # -- the user's own copy ---------------------------------------------------------------------
    def export_user(
        self, user_id: str, out: str | Path, variants: list[str] | None = None
    ) -> list[AdapterRecord]:
        """Write the user's adapters and their manifest entries to a .tar.gz archive.

        The archive holds `<user>/manifest.json` and one peft adapter directory per variant
        (`<user>/<variant>/`), so `PeftModel.from_pretrained` loads it without fedoppu.
        """
        records = [
            r for r in self.records() if r.user_id == user_id and (variants is None or r.variant in variants)
        ]
        if not records:
            wanted = f" (variants {variants})" if variants else ""
            raise DataError(f"{self.manifest_path}: no adapters for user {user_id!r}{wanted}")
        for record in records:
            if not self.intact(record):
                raise DataError(
                    f"{self.root / record.path}: adapter '{record.variant}' of user {user_id!r} fails its "
                    "checksum; the node retrains it in the next run, export it after that"
                )
        top = user_dir_name(user_id)
        manifest = {
            "version": 1,
            "user_id": user_id,
            "adapters": {r.variant: asdict(replace(r, path=r.variant)) for r in records},
        }
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            _add_bytes(tar, f"{top}/{MANIFEST}", json.dumps(manifest, indent=2).encode() + b"\n")
            for record in records:
                tar.add(self.root / record.path, arcname=f"{top}/{record.variant}", filter=_portable)
        atomic_write_bytes(out, buffer.getvalue())
        return records

    def import_archive(
        self, archive: str | Path, *, user_id: str, overwrite: bool = False
    ) -> list[AdapterRecord]:
        """Add the adapters of an archive exported for `user_id` to this node, after checking its size
        and every checksum; an archive of another user, or with entries of another, is refused."""
        archive = Path(archive)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                if archive.stat().st_size > MAX_ARCHIVE_BYTES:
                    raise DataError(
                        f"{archive}: larger than {MAX_ARCHIVE_BYTES} bytes; not an adapter archive"
                    )
                with tarfile.open(archive, "r:*") as tar:
                    _check_members(tar.getmembers(), archive)
                    tar.extractall(tmp, filter="data")
            except (OSError, tarfile.TarError) as err:
                raise DataError(f"{archive}: not a readable adapter archive ({err})") from err
            tops = [p for p in Path(tmp).iterdir() if (p / MANIFEST).is_file()]
            if len(tops) != 1:
                raise DataError(f"{archive}: expected one '<user>/{MANIFEST}' in the archive")
            owner, entries = _archive_manifest(tops[0] / MANIFEST, archive)
            if owner != user_id:
                raise DataError(f"{archive}: holds the adapters of user {owner!r}, not {user_id!r}")
            records = [_record(entry, archive) for entry in entries.values()]
            if any(record.user_id != owner for record in records):
                raise DataError(f"{archive}: has adapter entries of a user other than {owner!r}")
            for record in records:
                weights = tops[0] / record.path / WEIGHTS
                if not weights.is_file() or file_sha256(weights) != record.sha256:
                    raise DataError(f"{archive}: adapter '{record.variant}' fails its checksum")
            with self._locked():
                adapters = self._manifest()
                clashes = [r.variant for r in records if self._key(r.variant, owner) in adapters]
                if clashes and not overwrite:
                    raise DataError(
                        f"{self.manifest_path}: user {owner!r} already has adapters {clashes} on this node; "
                        "pass --overwrite to replace them"
                    )
                imported = []
                for record in records:
                    target = self._new_version(record.variant, owner)
                    with atomic_directory(target) as staging:
                        shutil.copytree(tops[0] / record.path, staging, dirs_exist_ok=True)
                    imported.append(replace(record, user_id=owner, path=str(target.relative_to(self.root))))
                    adapters[self._key(record.variant, owner)] = asdict(imported[-1])
                self._write_manifest(adapters)
                for record in imported:
                    self._prune(record.variant, owner, keep=self.root / record.path)
        return imported


def _portable(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner names or ids of the node in the user's archive; readable wherever it is unpacked."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o755 if info.isdir() else 0o644
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), int(time.time())
    tar.addfile(_portable(info), io.BytesIO(data))


def _check_members(members: list[tarfile.TarInfo], archive: Path) -> None:
    """Only plain files and directories, within the size limits, before anything is unpacked."""
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise DataError(
            f"{archive}: {len(members)} entries; an adapter archive has at most {MAX_ARCHIVE_MEMBERS}"
        )
    if any(not (m.isfile() or m.isdir()) for m in members):
        raise DataError(f"{archive}: holds links or special files; an adapter archive holds files only")
    if sum(m.size for m in members) > MAX_UNPACKED_BYTES:
        raise DataError(f"{archive}: unpacks to more than {MAX_UNPACKED_BYTES} bytes; not an adapter archive")


def _archive_manifest(path: Path, archive: Path) -> tuple[str, dict[str, dict]]:
    manifest = read_json(path)
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("user_id"), str)
        or not isinstance(manifest.get("adapters"), dict)
        or not manifest["adapters"]
    ):
        raise DataError(
            f"{archive}: {path.name} must hold a 'user_id' string and a non-empty 'adapters' object"
        )
    for variant, entry in manifest["adapters"].items():
        if not _VARIANT.fullmatch(variant) or not isinstance(entry, dict):
            raise DataError(f"{archive}: adapter {variant!r}: expected a method name and an object")
        if entry.get("variant") != variant or entry.get("path") != variant:
            raise DataError(f"{archive}: adapter entry {variant!r} must name its own variant and directory")
    return manifest["user_id"], manifest["adapters"]
