"""The sidecar schema and the state directory (real files, permissions, atomic writes)."""

import json
import stat

import pytest

from ovirt_borg import sidecar as sc


def make(**kw):
    disk = sc.DiskRecord(id="d1", alias="disk1", format="cow", provisioned_size=8 << 20,
                         backup_mode="full", image="vm1/disks/disk1-d1.raw", blocks_file="vm1/disks/disk1-d1.blocks",
                         blocks_sha256=sc.digests_sha256(b"x" * 64), blocks=2)
    base = dict(vm_id="v1", vm_name="vm1", archive="a1", mode="full", reason="r", path="backup",
                block_size=4 << 20, started="s", finished="f", last_full="2026-11-25T03:00:00Z",
                disks=(disk,), checkpoint_id="c1")
    base.update(kw)
    return sc.Sidecar(**base)


def test_round_trip():
    s = make()
    assert sc.parse(s.to_json()) == s
    chunk_ids = make(disks=(sc.DiskRecord(**{**make().disks[0].__dict__, "blocks_kind": sc.BLOCKS_BORG_ID}),))
    assert sc.parse(chunk_ids.to_json()) == chunk_ids


def test_version_1_documents_read_as_sha256_digests():
    doc = json.loads(make().to_json())
    doc["version"] = 1
    del doc["disks"][0]["blocks_kind"]
    parsed = sc.parse(json.dumps(doc).encode())
    assert parsed == make() and parsed.disks[0].blocks_kind == sc.BLOCKS_SHA256


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("checkpoint_id"),
    lambda d: d.update(version=99),
    lambda d: d.update(format="other"),
    lambda d: d.update(block_size="4M"),
    lambda d: d.update(mode="sometimes"),
    lambda d: d["disks"][0].pop("blocks_sha256"),
    lambda d: d["disks"][0].pop("blocks_kind"),
    lambda d: d["disks"][0].update(blocks_kind="md5"),
    lambda d: d["disks"][0].update(provisioned_size=True),
    lambda d: d.update(vm="v1"),
])
def test_tampered_sidecar_is_rejected(mutate):
    doc = json.loads(make().to_json())
    mutate(doc)
    with pytest.raises(sc.SidecarInvalid):
        sc.parse(json.dumps(doc).encode())


def test_state_dir_store_and_load(tmp_path):
    state = sc.StateDir(tmp_path / "state", "repo1")
    s = make()
    state.store(s, {"d1": b"x" * 64})
    assert state.load("v1") == s
    assert state.load_digests("v1", s.disks[0]) == b"x" * 64
    assert stat.S_IMODE(state.sidecar_path("v1").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "state" / "repo1").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_state_dir_treats_garbage_as_absent(tmp_path, caplog):
    state = sc.StateDir(tmp_path, "repo1")
    state.store(make(), {"d1": b"x" * 64})
    state.sidecar_path("v1").write_text('{"format": "ovirt-borg-sidecar", "version": 1}')
    assert state.load("v1") is None
    assert "full" in caplog.text
    state.digests_path("v1", "d1").write_bytes(b"y" * 64)
    assert state.load_digests("v1", make().disks[0]) is None


def test_removed_disk_digests_are_dropped(tmp_path):
    state = sc.StateDir(tmp_path, "repo1")
    state.store(make(), {"d1": b"x" * 64})
    state.digests_path("v1", "old").write_bytes(b"z")
    state.store(make(), {"d1": b"x" * 64})
    assert not state.digests_path("v1", "old").exists()
