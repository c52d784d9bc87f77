"""A lab engine with latency: its slow phases are seen by polling through the real SDK, and an
ovirt-borg backup under it still gives images identical to the disks."""

from __future__ import annotations

import os
import time

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
import pytest
from ovirt_imageio import client

from conftest import make_job
from helpers import file_sha256
from ovirt_borg.lab.control import Lab

# The documented figures with the slow phases a client must see made long enough to be seen
# between two polls, all scaled down; checkpoint_delete keeps a tenth of its figure.
LATENCY = "real,ready=30,transfer=20,transfer_finalize=20,backup_finalize=30,checkpoint_delete=20"
SCALE = 0.1
SETTLE = 120.0  # only a bound for a phase that never comes; nothing here measures time


@pytest.fixture(scope="module")
def slow_lab(tmp_path_factory):
    lab = Lab.up(tmp_path_factory.mktemp("latency-lab"), vms=1, disk_size="16M",
                 latency=LATENCY, latency_scale=SCALE)
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def conn(slow_lab):
    connection = slow_lab.connection()
    try:
        yield connection
    finally:
        connection.close()


def phases_until(fetch, done, what):
    """Poll ``fetch()`` until ``done(result)``; return every result seen, in order."""
    seen = []
    deadline = time.monotonic() + SETTLE
    while True:
        seen.append(fetch())
        if done(seen[-1]):
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never settled: {[getattr(s, 'phase', s) for s in seen]}")
        time.sleep(0.05)


def test_lab_json_records_the_latency(slow_lab):
    latency = slow_lab.info["latency"]
    assert latency["ready"] == pytest.approx(3.0)
    assert latency["checkpoint_delete"] == pytest.approx(2.0)


def test_slow_phases_are_seen_by_polling(slow_lab, conn, tmp_path):
    slow_lab.add_vm("lat1", disks=1, size="8M")
    vms = conn.system_service().vms_service()
    vm = vms.list(search="name=lat1")[0]
    service = vms.vm_service(vm.id)
    disk = conn.follow_link(service.disk_attachments_service().list()[0].disk)

    # The backup: starting for a while (no checkpoint yet), then ready with its checkpoint.
    backups = service.backups_service()
    backup = backups.add(types.Backup(disks=[types.Disk(id=disk.id)]))
    assert backup.phase == types.BackupPhase.INITIALIZING
    backup_service = backups.backup_service(backup.id)
    seen = phases_until(backup_service.get, lambda b: b.phase == types.BackupPhase.READY, "backup")
    assert [b.phase for b in seen[:2]] == [types.BackupPhase.STARTING] * 2
    assert all(b.to_checkpoint_id is None for b in seen[:-1])
    backup = seen[-1]
    assert backup.to_checkpoint_id

    # A transfer: initializing (no URL yet), then transferring.
    transfers = conn.system_service().image_transfers_service()
    transfer = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id), backup=types.Backup(id=backup.id),
        direction=types.ImageTransferDirection.DOWNLOAD, format=types.DiskFormat.RAW,
        inactivity_timeout=120))
    assert transfer.phase == types.ImageTransferPhase.INITIALIZING
    transfer_service = transfers.image_transfer_service(transfer.id)
    seen = phases_until(transfer_service.get,
                        lambda t: t.phase != types.ImageTransferPhase.INITIALIZING, "transfer")
    assert len(seen) >= 2 and seen[0].phase == types.ImageTransferPhase.INITIALIZING
    assert seen[0].transfer_url is None
    transfer = seen[-1]
    assert transfer.phase == types.ImageTransferPhase.TRANSFERRING
    out = tmp_path / "lat1.raw"
    client.download(transfer.transfer_url, os.fspath(out), os.fspath(slow_lab.ca_file), fmt="raw")

    # Its finalize: finalizing_success for a while, then finished_success.
    transfer_service.finalize()
    seen = phases_until(transfer_service.get,
                        lambda t: t.phase == types.ImageTransferPhase.FINISHED_SUCCESS, "transfer finalize")
    assert seen[0].phase == types.ImageTransferPhase.FINALIZING_SUCCESS
    assert file_sha256(out) == slow_lab.disk_sha256("lat1", 1)

    # The backup's finalize: finalizing (a hybrid backup first stays ready, stopped), then succeeded.
    backup_service.finalize()
    seen = phases_until(backup_service.get, lambda b: b.phase == types.BackupPhase.SUCCEEDED, "backup finalize")
    assert types.BackupPhase.FINALIZING in [b.phase for b in seen]
    assert seen[0].phase in (types.BackupPhase.READY, types.BackupPhase.FINALIZING)

    # Deleting the checkpoint: still there for a while, then gone.
    checkpoint_service = service.checkpoints_service().checkpoint_service(backup.to_checkpoint_id)
    checkpoint_service.remove()
    assert checkpoint_service.get().id == backup.to_checkpoint_id

    def gone():
        try:
            return checkpoint_service.get()
        except sdk.NotFoundError:
            return None

    phases_until(gone, lambda found: found is None, "checkpoint deletion")
    assert backup.to_checkpoint_id not in [c.id for c in service.checkpoints_service().list()]


def test_ovirt_borg_backup_under_latency_equals_the_disk(slow_lab, tmp_path):
    slow_lab.add_vm("lat2", disks=1, size="8M")
    job = make_job(slow_lab, tmp_path / "job")
    result = job.backup("lat2")["lat2"]
    job.assert_identical(result)
    assert [b for b in slow_lab.stats()["open_backups"] if b["vm"] == "lat2"] == []
