"""`fedoppu adapter`: the user's adapters can be listed, exported, loaded without fedoppu, imported
on another node and deleted without a trace."""

import io
import json
import tarfile

import pytest
import torch
from conftest import tiny_llama
from peft import PeftModel

from client import store as store_module
from client.hidden import HIDDEN_DIR, HiddenStore
from client.resident import PERSONAL, SHARED, ResidentModel
from client.store import PROFILES, STATE_DIR, GateDecision, PersonalAdapterStore, user_dir_name
from common.adapters import AdapterSpec
from common.io import DataError, atomic_write_json
from common.peft_io import write_adapter
from common.profiles import ProfileCache
from simulations.cli import main

USER = "alice@example.org"  # not a safe file name: stored under a hashed directory name


def _said(text, capsys) -> bool:
    """Whether the command printed `text` to stderr, wherever the console wrapped its lines."""
    return "".join(text.split()) in "".join(capsys.readouterr().err.split())


def _random(resident, slot, seed):
    state = resident.fresh(slot, seed)
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) * 0.3 if "lora_B" in k else v for k, v in state.items()
    }


@pytest.fixture()
def node(tiny_model, tmp_path):
    """A node's data directory whose state holds two adapters and a cached profile for USER."""
    model, tokenizer = tiny_model
    resident = ResidentModel(model, tokenizer, AdapterSpec())
    data = tmp_path / "node"
    store = PersonalAdapterStore(data / STATE_DIR)
    states = {}
    for seed, variant in enumerate(("oppu", "local")):
        states[variant] = _random(resident, PERSONAL, seed + 1)
        store.save(
            variant,
            USER,
            states[variant],
            resident.specs.personal.peft_config(),
            shared_digest="abc123" if variant == "oppu" else "none",
            data_fingerprint="f" * 64,
            shared_version=3 if variant == "oppu" else None,
        )
    store.save(
        "oppu",
        "bob",
        states["oppu"],
        resident.specs.personal.peft_config(),
        shared_digest="abc123",
        data_fingerprint="e",
        gate=GateDecision("mix:x", shared_weight=0.5, epochs=2.0, holdout_loss=1.25, holdout_items=4),
    )
    ProfileCache(store.root / PROFILES).get_or_build(USER, "summary", [], lambda: "likes drama")
    return data, store, resident, states


def test_list_shows_every_adapter_and_flags_a_corrupt_one(node, capsys):
    data, store, _, _ = node
    weights = store.root / store.record("local", USER).path / "adapter_model.safetensors"
    weights.write_bytes(b"garbage")
    assert main(["adapter", "list", "--data", str(data), "--user", USER]) == 0
    out = capsys.readouterr().out
    assert out.count(USER) == 2 and "bob" not in out
    assert f"{USER}  oppu  base round 3  base abc123" in out and "CORRUPT" in out
    assert main(["adapter", "list", "--data", str(data), "--user", "bob"]) == 0
    out = capsys.readouterr().out
    assert "gate shared x0.5, personal 2 epochs, held-out loss 1.250 on 4" in out
    assert main(["adapter", "list", "--data", str(data / "missing")]) == 2
    assert _said("no node state here", capsys)


def test_export_loads_with_plain_peft_onto_base_and_shared_adapter(node, tokenizer, tmp_path):
    data, _, resident, states = node
    archive = tmp_path / "alice.tar.gz"
    assert main(["adapter", "export", "--data", str(data), "--user", USER, "--out", str(archive)]) == 0
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert {m.uname for m in tar.getmembers()} == {""}
        tar.extractall(tmp_path / "unpacked", filter="data")
    top = next((tmp_path / "unpacked").iterdir())
    assert {f"{top.name}/manifest.json", f"{top.name}/oppu/adapter_model.safetensors"} <= set(names)
    manifest = json.loads((top / "manifest.json").read_text())
    assert manifest["user_id"] == USER and set(manifest["adapters"]) == {"oppu", "local"}
    assert manifest["adapters"]["oppu"]["shared_version"] == 3
    assert manifest["adapters"]["oppu"]["shared_digest"] == "abc123"

    # The user's own setup: base model + shared adapter (from the server's checkpoint) merged, then
    # the exported personal adapter with nothing but peft. Same logits as fedoppu's two-slot model.
    shared = _random(resident, SHARED, 7)
    resident.load(SHARED, shared)
    resident.load(PERSONAL, states["oppu"])
    resident.use(personal=True)
    shared_dir = tmp_path / "shared"
    resident.peft.save_pretrained(shared_dir, selected_adapters=[SHARED])
    base = PeftModel.from_pretrained(tiny_llama(tokenizer), shared_dir / SHARED).merge_and_unload()
    user_model = PeftModel.from_pretrained(base, top / "oppu")
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        assert torch.allclose(user_model(ids).logits, resident.peft(ids).logits, atol=1e-4)


def test_import_verifies_the_archive_and_refuses_to_overwrite(node, tmp_path, capsys):
    _, store, _, _ = node
    archive = tmp_path / "alice.tar.gz"
    store.export_user(USER, archive, variants=["oppu"])
    other = tmp_path / "other-node"
    assert main(["adapter", "import", "--data", str(other), str(archive), "--user", USER]) == 0
    moved = PersonalAdapterStore(other / STATE_DIR)
    record, _ = moved.load("oppu", USER)
    original = store.record("oppu", USER)
    assert (record.sha256, record.shared_version, record.created) == (
        original.sha256,
        original.shared_version,
        original.created,
    )
    assert main(["adapter", "import", "--data", str(other), str(archive), "--user", USER]) == 2
    assert _said("pass --overwrite to replace them", capsys)
    assert main(["adapter", "import", "--data", str(other), str(archive), "--user", USER, "--overwrite"]) == 0
    assert main(["adapter", "import", "--data", str(other), str(archive), "--user", "bob"]) == 2
    assert _said("not 'bob'", capsys)

    tampered = tmp_path / "tampered.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(tampered, "w:gz") as target:
        for member in source.getmembers():
            content = source.extractfile(member).read() if member.isfile() else None
            if member.name.endswith(".safetensors"):
                content = content[:-4] + b"\0\0\0\0"
            target.addfile(member, io.BytesIO(content) if content is not None else None)
    assert (
        main(["adapter", "import", "--state-dir", str(tmp_path / "third"), str(tampered), "--user", USER])
        == 2
    )
    assert _said("fails its checksum", capsys)
    assert not (tmp_path / "third" / "manifest.json").exists()


def test_delete_removes_every_trace_of_the_user(node, capsys):
    data, store, _, _ = node
    user_dir = store.root / store.record("oppu", USER).path
    crashed = user_dir.with_name(f".{user_dir.name}.abcd_123.tmp")  # an interrupted atomic write
    crashed.mkdir()
    hidden = HiddenStore(store.root / HIDDEN_DIR)
    for user in (USER, "bob"):
        hidden.write(user, "model-layer1-fp32", {"k": torch.ones(3, 4)}, limit_bytes=2**20)
    assert main(["adapter", "delete", "--data", str(data), "--user", USER]) == 0
    assert _said("2 adapter(s)", capsys)
    assert not hidden.user_dir(USER).exists() and hidden.read("bob", "model-layer1-fp32")
    assert [(r.user_id, r.variant) for r in store.records()] == [("bob", "oppu")]
    for path in store.root.rglob("*"):
        assert user_dir.name not in path.name
        assert not path.is_file() or USER.encode() not in path.read_bytes(), path
    assert list((store.root / PROFILES).iterdir()) == []
    assert main(["adapter", "delete", "--data", str(data), "--user", USER]) == 0
    assert _said("nothing of user", capsys)


def test_no_user_id_can_name_another_users_directory(node):
    _, store, resident, states = node
    impostor = user_dir_name("bob")  # a user whose id is bob's directory name
    store.save(
        "oppu",
        impostor,
        states["local"],
        resident.specs.personal.peft_config(),
        shared_digest="x",
        data_fingerprint="y",
    )
    assert store.record("oppu", impostor).path != store.record("oppu", "bob").path
    store.delete(impostor)
    _, bob = store.load("oppu", "bob")
    assert all(torch.equal(bob[k], states["oppu"][k]) for k in bob)


def test_a_store_with_the_old_names_is_migrated_when_first_changed(node, tmp_path):
    _, _, resident, states = node
    root = tmp_path / "old-node"
    old = PersonalAdapterStore(root)
    adapters = {}
    # Version 1 named a directory after a safe id itself, e.g. a user called like another's new name.
    for user, state in (
        ("carol", states["oppu"]),
        (user_dir_name("dave"), states["local"]),
        ("dave", states["oppu"]),
    ):
        path = root / "adapters" / "oppu" / (user if user != "dave" else "user-0123456789abcdef")
        digest = write_adapter(path, state, resident.specs.personal.peft_config())
        adapters[f"oppu/{user}"] = {
            "user_id": user,
            "variant": "oppu",
            "path": str(path.relative_to(root)),
            "sha256": digest,
            "shared_digest": "s",
            "data_fingerprint": "d",
            "created": 1.0,
        }
    (root / "adapters" / "oppu" / ".carol.abcd_123.tmp").mkdir()  # a crash leftover of the old name
    atomic_write_json(root / "manifest.json", {"version": 1, "adapters": adapters})
    assert old.load("oppu", "carol") is not None  # still readable as it is
    old.delete("nobody")  # the first change migrates
    names = sorted(p.name for p in (root / "adapters" / "oppu").iterdir())
    assert names == sorted(user_dir_name(u) for u in ("carol", "dave", user_dir_name("dave")))
    for user, state in (
        ("carol", states["oppu"]),
        (user_dir_name("dave"), states["local"]),
        ("dave", states["oppu"]),
    ):
        _, loaded = old.load("oppu", user)
        assert all(torch.equal(loaded[k], state[k]) for k in state), user
    assert json.loads((root / "manifest.json").read_text())["version"] == store_module.MANIFEST_VERSION


def _archive_with(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for info, content in members:
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def test_import_checks_size_members_and_the_user_of_every_entry(node, tmp_path, monkeypatch):
    _, store, _, _ = node
    archive = tmp_path / "alice.tar.gz"
    store.export_user(USER, archive)
    target = PersonalAdapterStore(tmp_path / "target")
    link = tarfile.TarInfo(f"{user_dir_name(USER)}/oppu/adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(DataError, match="links or special files"):
        target.import_archive(_archive_with(tmp_path / "link.tar.gz", [(link, None)]), user_id=USER)
    monkeypatch.setattr(store_module, "MAX_UNPACKED_BYTES", 1000)
    with pytest.raises(DataError, match="unpacks to more than 1000 bytes"):
        target.import_archive(archive, user_id=USER)
    monkeypatch.setattr(store_module, "MAX_ARCHIVE_BYTES", 100)
    with pytest.raises(DataError, match="larger than 100 bytes"):
        target.import_archive(archive, user_id=USER)
    monkeypatch.undo()
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    forged = []
    for info, content in members:
        if info.name.endswith("manifest.json"):
            manifest = json.loads(content)
            manifest["adapters"]["oppu"]["user_id"] = "bob"  # an entry of another user under alice's name
            content = json.dumps(manifest).encode()
            info.size = len(content)
        forged.append((info, content))
    with pytest.raises(DataError, match="entries of a user other than"):
        target.import_archive(_archive_with(tmp_path / "forged.tar.gz", forged), user_id=USER)
    assert not target.manifest_path.exists()
