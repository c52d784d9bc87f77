"""The lab engine, driven by the real SDK and the real imageio client.

Every backup here really goes through ovirtsdk4 -> lab engine -> imageio daemon -> qemu-nbd
-> qcow2 with persistent dirty bitmaps, and every comparison is a sha256 of real bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
import pytest
import requests
from ovirt_imageio import client

from helpers import file_sha256
from ovirt_borg.lab import qemu
from ovirt_borg.lab.control import Lab, LabRequestError
from ovirt_borg.lab.model import BLOCK
from ovirt_borg.lab.sample import HELLO_TEXT

MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Helpers: what a backup tool does with the SDK


def poll(fetch, done, *, timeout=20.0, what="state"):
    """Call ``fetch()`` until ``done(result)``; return the result."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not settle: {result}")
        time.sleep(0.02)


def vm_service(conn, name):
    vms = conn.system_service().vms_service()
    found = vms.list(search=f"name={name}")
    assert len(found) == 1, f"no single VM named {name}"
    return found[0], vms.vm_service(found[0].id)


def vm_disks(conn, service):
    return [conn.follow_link(a.disk) for a in service.disk_attachments_service().list()]


def start_backup(service, disks, from_checkpoint=None):
    backups = service.backups_service()
    backup = backups.add(types.Backup(disks=[types.Disk(id=d.id) for d in disks],
                                      from_checkpoint_id=from_checkpoint))
    assert backup.phase == types.BackupPhase.INITIALIZING
    assert backup.vm.id
    backup_service = backups.backup_service(backup.id)
    phases = []

    def fetch():
        b = backup_service.get()
        phases.append(b.phase)
        return b

    backup = poll(fetch, lambda b: b.phase == types.BackupPhase.READY, what="backup")
    assert phases[0] == types.BackupPhase.STARTING  # one step per poll
    return backup, backup_service


def finalize_backup(backup_service):
    backup_service.finalize()
    return finalize_backup_polled(backup_service)


def finalize_backup_polled(backup_service):
    """Poll a finalized backup until it succeeded."""
    return poll(backup_service.get, lambda b: b.phase == types.BackupPhase.SUCCEEDED,
                what="backup finalize")


def open_transfer(conn, disk_id, *, backup_id=None, direction="download"):
    transfers = conn.system_service().image_transfers_service()
    transfer = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk_id),
        backup=types.Backup(id=backup_id) if backup_id else None,
        direction=types.ImageTransferDirection(direction),
        format=types.DiskFormat.RAW, inactivity_timeout=120))
    service = transfers.image_transfer_service(transfer.id)
    transfer = poll(service.get, lambda t: t.phase != types.ImageTransferPhase.INITIALIZING,
                    what="transfer")
    return transfer, service


def finish_transfer(service):
    service.finalize()
    return poll(service.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_SUCCESS,
                what="transfer finalize")


def download_disk(conn, lab, backup_id, disk_id, out, *, incremental=False, backing=None,
                  via_proxy=False):
    transfer, service = open_transfer(conn, disk_id, backup_id=backup_id)
    assert transfer.phase == types.ImageTransferPhase.TRANSFERRING
    url = transfer.proxy_url if via_proxy else transfer.transfer_url
    client.download(url, os.fspath(out), os.fspath(lab.ca_file), incremental=incremental,
                    backing_file=os.fspath(backing) if backing else None,
                    backing_format="qcow2" if backing else None)
    finish_transfer(service)
    return transfer


def image_sha256(path: Path, tmp_path: Path) -> str:
    """sha256 of the guest-visible content of an image (through its backing chain)."""
    raw = tmp_path / f"{path.name}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", os.fspath(path), os.fspath(raw)],
                   check=True)
    try:
        return file_sha256(raw)
    finally:
        raw.unlink()


def top_layer_ranges(path: Path) -> list[tuple[int, int]]:
    """Ranges a qcow2 overlay holds itself (depth 0), merged."""
    out = subprocess.run(["qemu-img", "map", "--output=json", os.fspath(path)],
                         check=True, capture_output=True, text=True).stdout
    ranges = [(e["start"], e["length"]) for e in json.loads(out) if e["depth"] == 0
              and (e["data"] or e["zero"]) and e.get("present", True)]
    return merge(ranges)


def merge(ranges):
    merged: list[tuple[int, int]] = []
    for start, length in sorted(ranges):
        if merged and merged[-1][0] + merged[-1][1] >= start:
            last_start, last_length = merged[-1]
            merged[-1] = (last_start, max(last_start + last_length, start + length) - last_start)
        else:
            merged.append((start, length))
    return merged


def checkpoints(service):
    return service.checkpoints_service().list()


def fault_detail(error: sdk.Error) -> str:
    return error.fault.detail if error.fault else str(error)


@pytest.fixture(scope="module")
def conn(module_lab):
    connection = module_lab.connection()
    yield connection
    connection.close()


@pytest.fixture
def mlab(module_lab):
    """The module's lab with every fault off before and after the test."""
    module_lab.clear_faults()
    yield module_lab
    module_lab.clear_faults()


# ---------------------------------------------------------------------------------------------
# Pure parts


# ---------------------------------------------------------------------------------------------
# Inventory


def test_inventory_search_and_ovf_through_the_sdk(mlab, conn):
    assert conn.test(raise_exception=True)
    system = conn.system_service()
    api = system.get()
    assert api.product_info.name == "oVirt Engine"
    vms = system.vms_service()

    def names(search):
        return sorted(v.name for v in vms.list(search=search))

    assert {"vm1", "vm2", "vm3"} <= set(names("name=vm*"))
    assert names("tag=prod") == ["vm1"]
    assert names("name=vm* and status=down") == ["vm2"]
    assert names("cluster=Default and tag=prod") == ["vm1"]
    assert names("name=vm1 or name=vm2") == ["vm1", "vm2"]
    assert names("name=nothing*") == []
    with pytest.raises(sdk.Error) as error:
        vms.list(search="colour=blue")
    assert error.value.code == 400

    vm1 = vms.list(search="name=vm1", all_content=True)[0]
    assert vm1.status == types.VmStatus.UP
    assert vm1.cluster.id and vm1.host.id
    assert vm1.initialization.configuration.type == types.ConfigurationType.OVF
    ovf = vm1.initialization.configuration.data
    assert "ovf:Envelope" in ovf and "<Name>vm1</Name>" in ovf
    attachments = vms.vm_service(vm1.id).disk_attachments_service().list()
    assert len(attachments) == 2
    for attachment in attachments:
        assert attachment.disk.id in ovf  # References/DiskSection name the disk ids
        disk = conn.follow_link(attachment.disk)
        assert disk.format == types.DiskFormat.COW
        assert disk.backup == types.DiskBackup.INCREMENTAL
        assert disk.status == types.DiskStatus.OK
        assert disk.provisioned_size == 32 * MiB
    assert vms.list(search="name=vm2")[0].status == types.VmStatus.DOWN

    sds = system.storage_domains_service().list()
    assert [(sd.name, sd.storage.type) for sd in sds] == [("data1", types.StorageType.LOCALFS),
                                                          ("block1", types.StorageType.ISCSI)]
    cluster = system.clusters_service().list()[0]
    assert cluster.name == "Default"
    host = system.hosts_service().host_service(vm1.host.id).get()
    assert host.name == "host1"
    with pytest.raises(sdk.NotFoundError):
        vms.vm_service("no-such-vm").get()


# ---------------------------------------------------------------------------------------------
# Backups


def test_full_then_incremental_backup_equal_the_disks(mlab, conn, tmp_path):
    vm, service = vm_service(conn, "vm1")
    disks = vm_disks(conn, service)
    sample = mlab.sample["vms"]["vm1"]["disks"]
    before = mlab.stats()

    backup, backup_service = start_backup(service, disks)
    assert backup.to_checkpoint_id
    modes = {d.id: d.backup_mode for d in backup_service.disks_service().list()}
    assert set(modes.values()) == {types.DiskBackupMode.FULL}
    full = {}
    for index, disk in enumerate(disks, start=1):
        full[disk.id] = tmp_path / f"full-{index}.qcow2"
        download_disk(conn, mlab, backup.id, disk.id, full[disk.id])
    finalize_backup(backup_service)

    for index, disk in enumerate(disks, start=1):
        expected = sample[str(index)]["initial_sha256"]
        assert mlab.disk_sha256("vm1", index) == expected
        assert image_sha256(full[disk.id], tmp_path) == expected
    # The backed-up file system holds the sample files.
    raw = tmp_path / "fs.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", full[disks[0].id], raw], check=True)
    hello = subprocess.run(["debugfs", "-R", "cat /hello.txt", raw], capture_output=True,
                           check=True).stdout
    assert hello == HELLO_TEXT
    random_bin = subprocess.run(["debugfs", "-R", "cat /data/random.bin", raw],
                                capture_output=True, check=True).stdout
    assert hashlib.sha256(random_bin).hexdigest() == sample["1"]["files"]["/data/random.bin"]["sha256"]
    full_bytes = mlab.stats()["imageio.host.bytes"] - before["imageio.host.bytes"]
    assert full_bytes > 0

    # The guest changes disk 2: scattered data, a zeroed range, a discarded range.
    written = mlab.write("vm1", 2, percent=10, seed=7)
    written += mlab.write("vm1", 2, offset=4 * MiB, length=BLOCK, zero=True)
    written += mlab.write("vm1", 2, offset=20 * MiB, length=2 * BLOCK, discard=True)
    changed = merge([(r["offset"], r["length"]) for r in written])

    before = mlab.stats()
    backup2, backup_service2 = start_backup(service, disks, from_checkpoint=backup.to_checkpoint_id)
    assert backup2.from_checkpoint_id == backup.to_checkpoint_id
    assert backup2.to_checkpoint_id not in (None, backup.to_checkpoint_id)
    modes = {d.id: d.backup_mode for d in backup_service2.disks_service().list()}
    assert set(modes.values()) == {types.DiskBackupMode.INCREMENTAL}
    for index, disk in enumerate(disks, start=1):
        overlay = tmp_path / f"inc-{index}.qcow2"
        download_disk(conn, mlab, backup2.id, disk.id, overlay, incremental=True,
                      backing=full[disk.id])
        assert image_sha256(overlay, tmp_path) == mlab.disk_sha256("vm1", index)
        # The dirty extents were exactly the guest's writes: nothing else was copied.
        assert top_layer_ranges(overlay) == (changed if index == 2 else [])
    finalize_backup(backup_service2)
    incremental_bytes = mlab.stats()["imageio.host.bytes"] - before["imageio.host.bytes"]
    assert incremental_bytes <= sum(n for _, n in changed)

    chain = checkpoints(service)
    assert [c.id for c in chain][-2:] == [backup.to_checkpoint_id, backup2.to_checkpoint_id]
    assert chain[-1].parent_id == backup.to_checkpoint_id
    assert all(c.state == types.CheckpointState.CREATED for c in chain)
    bitmaps = {b.name for b in qemu.list_bitmaps(Path(mlab.vm_info("vm1")["disks"][1]["path"]))}
    assert {backup.to_checkpoint_id, backup2.to_checkpoint_id} <= bitmaps
    assert mlab.stats()["open_backups"] == []


def test_cold_backup_old_engine_and_engine_routed_download(mlab, conn, tmp_path):
    vm, service = vm_service(conn, "vm2")
    assert vm.status == types.VmStatus.DOWN
    disks = vm_disks(conn, service)
    backup, backup_service = start_backup(service, disks)
    out = tmp_path / "cold.qcow2"
    download_disk(conn, mlab, backup.id, disks[0].id, out)
    finalize_backup(backup_service)
    assert image_sha256(out, tmp_path) == mlab.disk_sha256("vm2")

    mlab.fault("old_engine")
    with pytest.raises(sdk.Error) as error:
        service.backups_service().add(types.Backup(disks=[types.Disk(id=disks[0].id)]))
    assert error.value.code == 409
    assert "should be in Up or Down status" in fault_detail(error.value)
    assert "Backup is not supported by the host" in fault_detail(error.value)
    assert conn.system_service().get().product_info.version.minor == 4  # reports 4.4.x

    # The engine-routed path: a plain download of the down VM's disk through the proxy.
    transfer, transfer_service = open_transfer(conn, disks[0].id)
    assert transfer.proxy_url != transfer.transfer_url
    proxy_out = tmp_path / "proxy.qcow2"
    before = mlab.stats()["imageio.proxy.bytes"]
    client.download(transfer.proxy_url, os.fspath(proxy_out), os.fspath(mlab.ca_file))
    finish_transfer(transfer_service)
    assert image_sha256(proxy_out, tmp_path) == mlab.disk_sha256("vm2")
    assert mlab.stats()["imageio.proxy.bytes"] > before

    # A running VM's disk cannot be downloaded without a backup.
    _, service1 = vm_service(conn, "vm1")
    with pytest.raises(sdk.Error) as error:
        open_transfer(conn, vm_disks(conn, service1)[0].id)
    assert error.value.code == 409


def test_disk_added_after_checkpoint_is_full_and_raw_disks_have_no_checkpoint(mlab, conn, tmp_path):
    mlab.add_vm("grow", disks=1, size="8M")
    vm, service = vm_service(conn, "grow")
    backup, backup_service = start_backup(service, vm_disks(conn, service))
    finalize_backup(backup_service)
    mlab.add_disk("grow", size="8M")
    mlab.write("grow", 2, offset=0, length=MiB)
    disks = vm_disks(conn, service)
    assert len(disks) == 2
    backup2, backup_service2 = start_backup(service, disks, from_checkpoint=backup.to_checkpoint_id)
    modes = {d.id: d.backup_mode for d in backup_service2.disks_service().list()}
    assert modes == {disks[0].id: types.DiskBackupMode.INCREMENTAL,
                     disks[1].id: types.DiskBackupMode.FULL}
    out = tmp_path / "new-disk.qcow2"
    download_disk(conn, mlab, backup2.id, disks[1].id, out)
    finalize_backup(backup_service2)
    assert image_sha256(out, tmp_path) == mlab.disk_sha256("grow", 2)

    mlab.add_vm("rawvm", disks=1, size="8M", format="raw")
    _, raw_service = vm_service(conn, "rawvm")
    raw_disk = vm_disks(conn, raw_service)[0]
    assert raw_disk.format == types.DiskFormat.RAW
    assert raw_disk.backup == types.DiskBackup.NONE
    raw_backup, raw_backup_service = start_backup(raw_service, [raw_disk])
    assert raw_backup.to_checkpoint_id is None
    assert [d.backup_mode for d in raw_backup_service.disks_service().list()] == [
        types.DiskBackupMode.FULL]
    out = tmp_path / "raw.qcow2"
    download_disk(conn, mlab, raw_backup.id, raw_disk.id, out)
    finalize_backup(raw_backup_service)
    assert image_sha256(out, tmp_path) == mlab.disk_sha256("rawvm")
    disks_service = conn.system_service().disks_service()
    with pytest.raises(sdk.Error) as error:
        disks_service.disk_service(raw_disk.id).update(types.Disk(backup=types.DiskBackup.INCREMENTAL))
    assert error.value.code == 409
    updated = disks_service.disk_service(disks[1].id).update(types.Disk(backup=types.DiskBackup.NONE))
    assert updated.backup == types.DiskBackup.NONE


def test_open_backup_blocks_writes_second_backup_and_early_finalize(mlab, conn):
    mlab.add_vm("busy", disks=1, size="8M")
    _, service = vm_service(conn, "busy")
    disks = vm_disks(conn, service)
    backup, backup_service = start_backup(service, disks)
    with pytest.raises(sdk.Error) as error:
        service.backups_service().add(types.Backup(disks=[types.Disk(id=disks[0].id)]))
    assert error.value.code == 409 and "VM is during a backup operation" in fault_detail(error.value)
    with pytest.raises(LabRequestError) as refused:
        mlab.write("busy", 1, offset=0, length=BLOCK)
    assert refused.value.status == 409

    transfer, transfer_service = open_transfer(conn, disks[0].id, backup_id=backup.id)
    # StopVmBackupCommand.validate: any transfer not finished_* (a cancel's steps included)
    # refuses the finalize with 409 (ACTION_TYPE_FAILED_ACTIVE_IMAGE_TRANSFER_FOR_VM_BACKUP: CONFLICT).
    transfer_service.cancel()
    phases = []
    while not phases or phases[-1] != types.ImageTransferPhase.FINISHED_FAILURE:
        assert len(phases) < 3, phases
        with pytest.raises(sdk.Error) as error:
            backup_service.finalize()
        assert error.value.code == 409
        assert "There is an active image transfer for VM backup" in fault_detail(error.value)
        assert mlab.stats()["open_transfers"][0]["id"] == transfer.id
        phases.append(transfer_service.get().phase)
    assert phases == [types.ImageTransferPhase.FINALIZING_CLEANUP, types.ImageTransferPhase.FINISHED_CLEANUP,
                      types.ImageTransferPhase.FINISHED_FAILURE]  # one step per poll
    backup_service.finalize()
    # A second finalize: StopVmBackupCommand.executeCommand fails it with the phase (400).
    with pytest.raises(sdk.Error) as error:
        backup_service.finalize()
    assert error.value.code == 400
    assert re.search(r"backup '.*' is already (stopped|in '.*' phase), no need to stop the backup again",
                     fault_detail(error.value)), fault_detail(error.value)
    finalize_backup_polled(backup_service)
    assert mlab.write("busy", 1, offset=0, length=BLOCK) == [{"offset": 0, "length": BLOCK}]
    assert mlab.stats()["exports"] == 0


def test_checkpoint_faults_and_removal(mlab, conn, tmp_path):
    mlab.add_vm("cps", disks=1, size="8M")
    _, service = vm_service(conn, "cps")
    disks = vm_disks(conn, service)
    disk_path = Path(mlab.vm_info("cps")["disks"][0]["path"])

    def full_backup():
        backup, backup_service = start_backup(service, disks)
        finalize_backup(backup_service)
        return backup.to_checkpoint_id

    def incremental_refused(checkpoint_id):
        with pytest.raises(sdk.Error) as error:
            service.backups_service().add(types.Backup(
                disks=[types.Disk(id=disks[0].id)], from_checkpoint_id=checkpoint_id))
        assert error.value.code == 400
        return fault_detail(error.value)

    first = full_backup()
    mlab.fault("invalid_checkpoint", vm="cps")
    assert [c.state for c in checkpoints(service)] == [types.CheckpointState.INVALID]
    assert f"Checkpoint ID {first} is invalid and should be removed" in incremental_refused(first)
    service.checkpoints_service().checkpoint_service(first).remove()
    with pytest.raises(sdk.NotFoundError):
        service.checkpoints_service().checkpoint_service(first).get()
    assert first not in {b.name for b in qemu.list_bitmaps(disk_path)}

    second = full_backup()
    mlab.fault("missing_checkpoint", vm="cps")
    assert checkpoints(service) == []
    assert f"Checkpoint ID {second} doesn't exist" in incremental_refused(second)
    assert qemu.list_bitmaps(disk_path) == []

    third = full_backup()
    mlab.fault("broken_bitmap", vm="cps")
    assert qemu.bitmap_is_broken(disk_path, third)
    # Hybrid (cluster level 4.7, the default): the backup becomes ready and the checkpoint stays
    # created; the transfer's NBD server cannot start (vdsm nbd._find_bitmap), so the engine
    # stops it (cancelled_system) and it ends finished_failure.
    backup, backup_service = start_backup(service, disks, from_checkpoint=third)
    assert backup.snapshot is not None and backup.snapshot.id
    transfer, transfer_service = open_transfer(conn, disks[0].id, backup_id=backup.id)
    assert transfer.phase == types.ImageTransferPhase.CANCELLED_SYSTEM
    poll(transfer_service.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_FAILURE, what="failure")
    finalize_backup(backup_service)
    assert [c.state for c in checkpoints(service)] == [types.CheckpointState.CREATED] * 2
    # Live (?legacy=true): redefining the checkpoint fails; the engine removes every checkpoint
    # of the VM and answers 400 "Operation Failed" with detail "[]".
    with pytest.raises(sdk.Error) as error:
        service.backups_service().add(types.Backup(disks=[types.Disk(id=disks[0].id)], from_checkpoint_id=third),
                                      query={"legacy": "true"})
    assert error.value.code == 400 and fault_detail(error.value) == "[]"
    assert error.value.fault.reason == "Operation Failed"
    assert checkpoints(service) == []

    # A full backup still works next to the broken bitmap, and its data is right.
    backup, backup_service = start_backup(service, disks)
    out = tmp_path / "after-broken.qcow2"
    download_disk(conn, mlab, backup.id, disks[0].id, out)
    finalize_backup(backup_service)
    assert image_sha256(out, tmp_path) == mlab.disk_sha256("cps")
    for checkpoint in checkpoints(service):
        service.checkpoints_service().checkpoint_service(checkpoint.id).remove()
    assert qemu.list_bitmaps(disk_path) == []


def test_transfer_and_finalize_faults(mlab, conn):
    mlab.add_vm("flaky", disks=1, size="8M")
    _, service = vm_service(conn, "flaky")
    disks = vm_disks(conn, service)
    backup, backup_service = start_backup(service, disks)

    mlab.fault("transfer_fail")
    transfer, failed_service = open_transfer(conn, disks[0].id, backup_id=backup.id)
    assert transfer.phase == types.ImageTransferPhase.CANCELLED_SYSTEM
    assert [failed_service.get().phase for _ in range(3)] == [
        types.ImageTransferPhase.FINALIZING_FAILURE, types.ImageTransferPhase.FINISHED_FAILURE,
        types.ImageTransferPhase.FINISHED_FAILURE]

    mlab.fault("transfer_stuck")
    transfers = conn.system_service().image_transfers_service()
    stuck = transfers.add(types.ImageTransfer(disk=types.Disk(id=disks[0].id),
                                              backup=types.Backup(id=backup.id),
                                              format=types.DiskFormat.RAW))
    stuck_service = transfers.image_transfer_service(stuck.id)
    for _ in range(5):
        assert stuck_service.get().phase == types.ImageTransferPhase.INITIALIZING
    stuck_service.cancel()
    poll(stuck_service.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_FAILURE, what="cancel")
    assert mlab.faults()["active"] == {}  # both were one-shot

    transfer, transfer_service = open_transfer(conn, disks[0].id, backup_id=backup.id)
    assert transfer.phase == types.ImageTransferPhase.TRANSFERRING
    finish_transfer(transfer_service)

    mlab.fault("finalize_stuck")
    backup_service.finalize()
    # hybrid: still ready (stopped) at the first poll, then removing its snapshot
    phases = [backup_service.get().phase for _ in range(5)]
    assert phases == [types.BackupPhase.READY] + [types.BackupPhase.FINALIZING] * 4
    finalize_backup_polled(backup_service)


def test_cluster_level_and_engine_config_choose_the_backup(mlab, conn, tmp_path):
    """BackendVmBackupsResource.add: hybrid from cluster level 4.7 (UseHybridBackup) unless
    ?legacy=true; StartVmBackupCommand below: live for a running VM, cold for a powered-off one;
    below 4.5 no cold and no incremental backup, and no checkpoint (0000_config.sql)."""
    def backup_of(name, legacy=False, from_checkpoint=None):
        _, service = vm_service(conn, name)
        disks = vm_disks(conn, service)
        backups = service.backups_service()
        backup = backups.add(types.Backup(disks=[types.Disk(id=d.id) for d in disks],
                                          from_checkpoint_id=from_checkpoint),
                             query={"legacy": "true"} if legacy else None)
        backup_service = backups.backup_service(backup.id)
        backup = poll(backup_service.get, lambda b: b.phase == types.BackupPhase.READY, what="backup")
        types_now = {b["id"]: b["type"] for b in mlab.stats()["open_backups"]}
        return backup, backup_service, types_now[backup.id], service

    mlab.cluster("lab-4.6", "4.6")
    mlab.cluster("lab-4.4", "4.4")
    mlab.add_vm("lvl47", disks=1, size="8M")
    mlab.add_vm("lvl46", disks=1, size="8M", cluster="lab-4.6")
    mlab.add_vm("lvl46down", disks=1, size="8M", cluster="lab-4.6", status="down")
    mlab.add_vm("lvl44", disks=1, size="8M", cluster="lab-4.4")
    mlab.add_vm("lvl44down", disks=1, size="8M", cluster="lab-4.4", status="down")

    # 4.7: hybrid, with a snapshot named on the backup and listed on the VM while it is open
    backup, backup_service, kind, service = backup_of("lvl47")
    assert kind == "hybrid" and backup.snapshot.id
    snapshots = {s.id: s.description for s in service.snapshots_service().list()}
    assert snapshots[backup.snapshot.id] == "Auto-generated for Backup VM"
    finalize_backup(backup_service)
    assert backup.snapshot.id not in {s.id for s in service.snapshots_service().list()}
    with pytest.raises(sdk.NotFoundError):
        service.snapshots_service().snapshot_service(backup.snapshot.id).get()
    # ?legacy=true: a live backup, no snapshot
    backup, backup_service, kind, _ = backup_of("lvl47", legacy=True)
    assert kind == "live" and backup.snapshot is None
    finalize_backup(backup_service)
    # UseHybridBackup off for 4.7 (engine-config): live again
    mlab.engine_config("UseHybridBackup", "4.7", False)
    try:
        backup, backup_service, kind, _ = backup_of("lvl47")
        assert kind == "live"
        finalize_backup(backup_service)
    finally:
        mlab.engine_config("UseHybridBackup", "4.7", True)
    # 4.6: live when up, cold when down; both make checkpoints
    for name, expected in (("lvl46", "live"), ("lvl46down", "cold")):
        backup, backup_service, kind, _ = backup_of(name)
        assert kind == expected and backup.to_checkpoint_id
        finalize_backup(backup_service)
    # 4.4: a running VM's full backup works without a checkpoint; cold or incremental: 400
    backup, backup_service, kind, service = backup_of("lvl44")
    assert kind == "live" and backup.to_checkpoint_id is None
    out = tmp_path / "lvl44.qcow2"
    download_disk(conn, mlab, backup.id, vm_disks(conn, service)[0].id, out)
    finalize_backup(backup_service)
    assert image_sha256(out, tmp_path) == mlab.disk_sha256("lvl44")
    assert checkpoints(service) == []
    _, down_service = vm_service(conn, "lvl44down")
    with pytest.raises(sdk.Error) as error:
        down_service.backups_service().add(types.Backup(disks=[types.Disk(id=vm_disks(conn, down_service)[0].id)]))
    assert error.value.code == 400
    assert fault_detail(error.value) == "[Cannot backup VM. Incremental backup is not supported.]"
    assert mlab.stats()["open_backups"] == []


@pytest.mark.parametrize("damage", ["--disable", "--remove"])
def test_hybrid_transfer_is_stopped_by_a_disabled_or_missing_bitmap(mlab, conn, damage):
    """vdsm nbd._find_bitmap refuses a bitmap that is in use, disabled or missing: the backup
    starts, the incremental disk's transfer is stopped (cancelled_system), the checkpoint stays."""
    name = f"bm{damage.strip('-')}"
    mlab.add_vm(name, disks=1, size="8M")
    _, service = vm_service(conn, name)
    disks = vm_disks(conn, service)
    first, first_service = start_backup(service, disks)
    finalize_backup(first_service)
    path = mlab.vm_info(name)["disks"][0]["path"]
    subprocess.run(["qemu-img", "bitmap", damage, path, first.to_checkpoint_id], check=True)
    backup, backup_service = start_backup(service, disks, from_checkpoint=first.to_checkpoint_id)
    transfer, transfer_service = open_transfer(conn, disks[0].id, backup_id=backup.id)
    assert transfer.phase == types.ImageTransferPhase.CANCELLED_SYSTEM
    poll(transfer_service.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_FAILURE, what="failure")
    finalize_backup(backup_service)
    assert checkpoints(service)[0].id == first.to_checkpoint_id
    assert checkpoints(service)[0].state == types.CheckpointState.CREATED


def test_hybrid_finalize_snapshot_and_checkpoint_removal_during_a_backup(mlab, conn):
    """HybridBackupCommand: finalize removes the snapshot (ready, then finalizing); a failed
    removal still ends succeeded with the snapshot left. DeleteVmCheckpointCommand: 409 while a
    backup of the VM is unfinished. A finalize whose reply was lost: the retry answers 400."""
    mlab.add_vm("snap", disks=1, size="8M")
    _, service = vm_service(conn, "snap")
    disks = vm_disks(conn, service)
    first, first_service = start_backup(service, disks)
    finalize_backup(first_service)
    backup, backup_service = start_backup(service, disks, from_checkpoint=first.to_checkpoint_id)
    checkpoint_service = service.checkpoints_service().checkpoint_service(first.to_checkpoint_id)
    with pytest.raises(sdk.Error) as error:
        checkpoint_service.remove()
    assert error.value.code == 409 and "The VM is during a backup operation" in fault_detail(error.value)

    mlab.fault("snapshot_left")
    mlab.fault("reply_lost:backup.finalize")
    with pytest.raises(sdk.Error) as lost:
        backup_service.finalize()
    assert lost.value.code is None  # no HTTP answer at all
    with pytest.raises(sdk.Error) as error:
        backup_service.finalize()
    assert error.value.code == 400 and "is already stopped, no need to stop the backup again" in fault_detail(error.value)
    phases = []
    while not phases or phases[-1] != types.BackupPhase.SUCCEEDED:
        assert len(phases) < 10, phases
        phases.append(backup_service.get().phase)
        if phases[-1] == types.BackupPhase.FINALIZING:
            with pytest.raises(sdk.Error) as error:
                checkpoint_service.remove()  # the snapshot's removal still counts as a backup
            assert error.value.code == 409
            with pytest.raises(sdk.Error) as error:
                backup_service.finalize()
            assert "is already in 'REMOVING_SNAPSHOT' phase" in fault_detail(error.value)
    assert phases[0] == types.BackupPhase.READY and types.BackupPhase.FINALIZING in phases
    # the merge failed: succeeded, yet the snapshot is still on the VM
    assert backup_service.get().snapshot.id == backup.snapshot.id
    left = service.snapshots_service().snapshot_service(backup.snapshot.id).get()
    assert left.description == "Auto-generated for Backup VM"
    checkpoint_service.remove()
    poll(lambda: [c.id for c in checkpoints(service)], lambda ids: first.to_checkpoint_id not in ids,
         what="checkpoint removal")


def test_engine_cancels_a_transfer_whose_ticket_idles(mlab, conn, tmp_path):
    """TransferDiskImageCommand.stopTransferIfNecessary: a ticket idle (imageio: no read or write
    running or completed; an extents query does not count) longer than inactivity_timeout
    makes the engine cancel a download."""
    mlab.add_vm("idle", disks=1, size="8M")
    _, service = vm_service(conn, "idle")
    disks = vm_disks(conn, service)
    backup, backup_service = start_backup(service, disks)
    transfers = conn.system_service().image_transfers_service()
    transfer = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disks[0].id), backup=types.Backup(id=backup.id),
        direction=types.ImageTransferDirection.DOWNLOAD, format=types.DiskFormat.RAW, inactivity_timeout=2))
    transfer_service = transfers.image_transfer_service(transfer.id)
    transfer = poll(transfer_service.get, lambda t: t.phase == types.ImageTransferPhase.TRANSFERRING)
    session = requests.Session()
    session.trust_env = False
    session.verify = os.fspath(mlab.ca_file)

    def read(url):
        response = session.get(url, headers={"Range": "bytes=0-65535"})
        assert response.status_code == 206

    # Reads keep it alive, for longer than the timeout in all (reads close together: a machine
    # under load must not leave the ticket idle for the timeout between two of them).
    keep_reading_until = time.monotonic() + 5  # two and a half times the inactivity timeout
    while time.monotonic() < keep_reading_until:
        read(transfer.transfer_url)
        assert transfer_service.get().phase == types.ImageTransferPhase.TRANSFERRING
        time.sleep(0.1)
    # Extents queries alone do not: the engine stops it and ends it.
    def extents_then_phase():
        assert session.get(transfer.transfer_url + "/extents").status_code in (200, 403)
        time.sleep(0.2)
        return transfer_service.get().phase

    phase = poll(extents_then_phase, lambda p: p != types.ImageTransferPhase.TRANSFERRING, what="idle transfer")
    assert phase == types.ImageTransferPhase.CANCELLED_SYSTEM
    poll(transfer_service.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_FAILURE, what="failure")
    assert session.get(transfer.transfer_url + "/extents").status_code == 403  # the ticket is gone
    finalize_backup(backup_service)


def test_format_cow_is_refused_for_backups(mlab, conn):
    mlab.add_vm("fmt", disks=1, size="8M")
    _, service = vm_service(conn, "fmt")
    disks = vm_disks(conn, service)
    backup, backup_service = start_backup(service, disks)
    with pytest.raises(sdk.Error) as error:
        conn.system_service().image_transfers_service().add(types.ImageTransfer(
            disk=types.Disk(id=disks[0].id), backup=types.Backup(id=backup.id),
            format=types.DiskFormat.COW))
    assert error.value.code == 400
    finalize_backup(backup_service)


def test_stale_backup_fault(mlab, conn):
    mlab.add_vm("stale", disks=1, size="8M")
    _, service = vm_service(conn, "stale")
    done = mlab.fault("stale_backup", vm="stale")
    stale = service.backups_service().list()
    assert [b.id for b in stale] == [done["backup"]]
    assert stale[0].phase == types.BackupPhase.READY
    with pytest.raises(sdk.Error) as error:
        start_backup(service, vm_disks(conn, service))
    assert error.value.code == 409
    finalize_backup(service.backups_service().backup_service(stale[0].id))
    backup, backup_service = start_backup(service, vm_disks(conn, service))
    finalize_backup(backup_service)


def test_engine_errors_and_authentication(mlab, conn):
    vms = conn.system_service().vms_service()
    mlab.fault("engine_500:vms.list", times=1)
    with pytest.raises(sdk.Error) as error:
        vms.list()
    assert error.value.code == 500 and error.value.fault is not None
    assert vms.list()  # one time only

    mlab.fault("engine_500:backups.add")
    _, service = vm_service(conn, "vm3")
    for _ in range(2):
        with pytest.raises(sdk.Error) as error:
            service.backups_service().add(types.Backup())
        assert error.value.code == 500
    mlab.fault("engine_500:backups.add", on=False)
    assert mlab.stats()["open_backups"] == []

    mlab.fault("wrong_password")
    with pytest.raises(sdk.AuthError):
        mlab.connection().test(raise_exception=True)
    mlab.fault("wrong_password", on=False)
    assert mlab.connection().test(raise_exception=True)
    with pytest.raises(sdk.AuthError):
        mlab.connection(password="wrong").test(raise_exception=True)

    with pytest.raises(LabRequestError):
        mlab.fault("no_such_fault")

    # Neither the API nor the control API answers without credentials.
    session = requests.Session()
    session.trust_env = False
    session.verify = os.fspath(mlab.ca_file)
    base = mlab.url.split("/ovirt-engine/")[0]
    assert session.get(mlab.url + "/vms").status_code == 401
    assert session.post(f"{base}/ovirt-engine/lab/stats", json={}).status_code == 403
    assert session.post(f"{base}/ovirt-engine/lab/stats", json={},
                        headers={"X-Lab-Token": "guess"}).status_code == 403


def test_imageio_restart_fault(mlab, conn, tmp_path):
    mlab.add_vm("restart", disks=1, size="32M")
    mlab.write("restart", 1, percent=50, seed=3)
    _, service = vm_service(conn, "restart")
    disks = vm_disks(conn, service)
    backup, backup_service = start_backup(service, disks)
    pid_before = mlab.stats()["imageio.host.pid"]

    mlab.fault("imageio_restart")
    transfer, transfer_service = open_transfer(conn, disks[0].id, backup_id=backup.id)
    out = tmp_path / "restart.qcow2"
    try:
        client.download(transfer.transfer_url, os.fspath(out), os.fspath(mlab.ca_file))
    except Exception:
        pass  # the restart may cut this first download: the point of the fault
    stats = poll(mlab.stats, lambda s: s["imageio.host.restarts"] == 1, what="imageio restart")
    assert stats["imageio.host.pid"] not in (None, pid_before)
    # The ticket was re-added: the same transfer URL serves the whole disk again.
    client.download(transfer.transfer_url, os.fspath(out), os.fspath(mlab.ca_file))
    finish_transfer(transfer_service)
    finalize_backup(backup_service)
    assert image_sha256(out, tmp_path) == mlab.disk_sha256("restart")


# ---------------------------------------------------------------------------------------------
# Restore


def test_upload_restore_and_vm_from_ovf(mlab, conn, tmp_path):
    system = conn.system_service()
    source = mlab.image("vm1", 1, out=tmp_path / "source.raw")
    size = source.stat().st_size
    disks = system.disks_service()

    def new_disk(name, domain="data1"):
        return disks.add(types.Disk(
            name=name, format=types.DiskFormat.COW, sparse=True, provisioned_size=size,
            backup=types.DiskBackup.INCREMENTAL, content_type=types.DiskContentType.DATA,
            storage_domains=[types.StorageDomain(name=domain)]))

    with pytest.raises(sdk.NotFoundError):
        new_disk("lost", domain="no-such-domain")
    disk = new_disk("restored-disk")
    assert disk.status == types.DiskStatus.LOCKED
    disk_service = disks.disk_service(disk.id)
    assert poll(disk_service.get, lambda d: d.status == types.DiskStatus.OK).provisioned_size == size

    transfer, transfer_service = open_transfer(conn, disk.id, direction="upload")
    assert transfer.phase == types.ImageTransferPhase.TRANSFERRING
    client.upload(os.fspath(source), transfer.transfer_url, os.fspath(mlab.ca_file))
    finish_transfer(transfer_service)
    assert disk_service.get().status == types.DiskStatus.OK
    assert mlab.stats()["imageio.host.bytes_written"] > 0

    # A cancelled upload removes its disk.
    doomed = new_disk("doomed")
    poll(disks.disk_service(doomed.id).get, lambda d: d.status == types.DiskStatus.OK)
    _, doomed_transfer = open_transfer(conn, doomed.id, direction="upload")
    doomed_transfer.cancel()
    poll(doomed_transfer.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_FAILURE, what="cancel")
    with pytest.raises(sdk.NotFoundError):
        disks.disk_service(doomed.id).get()

    # The VM comes back from its OVF with new ids and its settings.
    vms = system.vms_service()
    original = vms.list(search="name=vm1", all_content=True)[0]
    restored = vms.add(types.Vm(
        name="vm1-restored", cluster=types.Cluster(name="Default"),
        initialization=types.Initialization(configuration=types.Configuration(
            type=types.ConfigurationType.OVF, data=original.initialization.configuration.data),
            regenerate_ids=True)))
    assert restored.id != original.id
    assert restored.memory == original.memory
    assert restored.cpu.topology.sockets == original.cpu.topology.sockets
    assert restored.status == types.VmStatus.DOWN
    restored_service = vms.vm_service(restored.id)
    restored_service.disk_attachments_service().add(types.DiskAttachment(
        disk=types.Disk(id=disk.id), active=True, bootable=True,
        interface=types.DiskInterface.VIRTIO_SCSI))
    assert mlab.disk_sha256("vm1-restored", 1) == file_sha256(source)
    with pytest.raises(sdk.Error) as error:
        vms.add(types.Vm(name="vm1-restored", cluster=types.Cluster(name="Default")))
    assert error.value.code == 409

    restored_service.remove()
    with pytest.raises(sdk.NotFoundError):
        restored_service.get()
    with pytest.raises(sdk.NotFoundError):
        disk_service.get()


def test_deleted_vm_answers_not_found(mlab, conn):
    mlab.add_vm("gone", disks=1, size="8M")
    vm, service = vm_service(conn, "gone")
    backup, _ = start_backup(service, vm_disks(conn, service))
    mlab.delete_vm("gone")  # between selection and backup: even with a backup open
    with pytest.raises(sdk.NotFoundError):
        service.get()
    with pytest.raises(sdk.NotFoundError):
        service.backups_service().add(types.Backup())
    assert conn.system_service().vms_service().list(search="name=gone") == []
    assert mlab.stats()["exports"] == 0


# ---------------------------------------------------------------------------------------------
# Shared fixtures and the command line


def test_session_fixtures_give_an_isolated_vm(lab_vm, engine, lab):
    found = engine.system_service().vms_service().list(search=f"name={lab_vm['name']}")
    assert [v.id for v in found] == [lab_vm["id"]]
    assert found[0].status == types.VmStatus.UP
    assert len(lab_vm["disks"]) == 1 and lab_vm["disks"][0]["size"] == 16 * MiB
    assert lab.faults()["active"] == {}


def _cli(*args, check=True):
    command = [os.fspath(Path(sys.executable).parent / "ovirt-borg-lab"), *map(os.fspath, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_cli_up_drive_down_leaves_no_process(tmp_path):
    directory = tmp_path / "cli-lab"
    info = json.loads(_cli("up", "--dir", directory, "--vms", "1", "--disk-size", "16M",
                           "--plain-http").stdout)
    try:
        assert info["url"].startswith("http://127.0.0.1:")
        assert stat.S_IMODE(os.stat(info["password_file"]).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(directory / "passphrase").st_mode) == 0o600
        config = tomllib.loads((directory / "config.toml").read_text())
        assert config["engine"]["url"] == info["url"]
        assert config["engine"]["user"] == "admin@internal"
        assert config["repository"] == {"location": os.fspath(directory / "repo"),
                                        "passcommand": f"cat {directory / 'passphrase'}"}
        assert config["state"] == {"directory": os.fspath(directory / "state")}
        borg = subprocess.run([sys.executable, "-m", "borg", "info", "--json"],
                              env={**os.environ, **info["borg_env"]}, capture_output=True,
                              text=True, timeout=60)
        assert borg.returncode == 0, borg.stderr
        assert json.loads(borg.stdout)["encryption"]["mode"] == "repokey-blake2"

        lab = Lab.open(directory)
        with lab.connection() as connection:
            assert [v.name for v in connection.system_service().vms_service().list()] == ["vm1"]
            _, service = vm_service(connection, "vm1")
            backup, backup_service = start_backup(service, vm_disks(connection, service))
            finalize_backup(backup_service)
        # A second up reuses the running engine.
        assert json.loads(_cli("up", "--dir", directory, "--plain-http").stdout)["pids"] == info["pids"]

        written = json.loads(_cli("write", "--dir", directory, "vm1", "--disk", "2",
                                  "--percent", "5").stdout)
        assert written["bytes"] == round(16 * MiB // BLOCK * 0.05) * BLOCK
        out = tmp_path / "disk2.raw"
        _cli("image", "--dir", directory, "vm1", "--disk", "2", "--out", out)
        assert out.stat().st_size == 16 * MiB
        _cli("fault", "--dir", directory, "transfer_fail")
        assert "transfer_fail" in json.loads(_cli("fault", "--dir", directory, "--list").stdout)["active"]
        stats = json.loads(_cli("stats", "--dir", directory).stdout)
        assert stats["faults"] == {"transfer_fail": 1} and "imageio.host.bytes" in stats
        failed = _cli("write", "--dir", directory, "nosuchvm", "--percent", "1", check=False)
        assert failed.returncode == 2 and "nosuchvm" in failed.stderr
    finally:
        _cli("down", "--dir", directory)
    pids = [pid for pid in info["pids"].values() if pid]
    assert len(pids) == 3
    assert not [pid for pid in pids if _running(pid)]
    assert not (directory / "run" / "engine.json").exists()

    # Up again: a new engine over the same VMs, disks and checkpoints.
    again = json.loads(_cli("up", "--dir", directory, "--plain-http").stdout)
    try:
        assert again["pids"]["engine"] != info["pids"]["engine"]
        with Lab.open(directory).connection() as connection:
            vm, service = vm_service(connection, "vm1")
            assert vm.id == lab.sample["vms"]["vm1"]["id"]
            assert [c.id for c in checkpoints(service)] == [backup.to_checkpoint_id]
    finally:
        _cli("down", "--dir", directory)
    assert not [pid for pid in again["pids"].values() if pid and _running(pid)]
