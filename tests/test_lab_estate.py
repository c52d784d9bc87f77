"""The lab as strict as a real oVirt 4.5 estate, driven by the real SDK.

Each test holds the lab to one engine rule read in the engine's sources (named in the lab's
code): image transfers as the REST mapper writes them, the disks a backup leaves out and the
VMs it refuses, backup descriptions, the two certificate authorities; and the sample disks of
any size starting in seconds.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import ssl
import subprocess
import time
import urllib.parse

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
import pytest

from helpers import file_sha256
from ovirt_borg.imageio import ImageioClient, TransferSettings
from ovirt_borg.lab.control import Lab
from ovirt_borg.lab.model import LabLayout
from ovirt_borg.lab.sample import FULL_SHA256_LIMIT, create_sample, data_sha256, parse_size

MiB = 1 << 20
_numbers = itertools.count(1)


def _seek_data_extents(path) -> list[tuple[int, int]]:
    """The data ranges of a sparse file, from the kernel (SEEK_DATA/SEEK_HOLE), not qemu-img."""
    extents = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            extents.append((start, end - start))
            offset = end
    return extents


# ---------------------------------------------------------------------------------------------
# Sample disks of any size


@pytest.mark.parametrize("size", ["64M", "2G", "2T"])
def test_sample_disks_of_any_size_start_with_true_digests(tmp_path, size):
    """A 2G sample used to crash (random.randbytes of a 256 MiB region) and a 2T one hashed
    2 TiB of zeros; the digests come from the data extents and match the images."""
    layout = LabLayout(tmp_path / "lab")
    disk_size = parse_size(size)
    inventory = create_sample(layout, vms=2, disk_size=disk_size)
    sample = json.loads(layout.sample.read_text())
    disks = {d.id: d for d in inventory.disks}
    assert {d.provisioned_size for d in disks.values()} == {disk_size}
    for vm_name, disk_key in (("vm1", "1"), ("vm2", "1")):  # vm1's ext4 disk, vm2's data disk
        entry = sample["vms"][vm_name]["disks"][disk_key]
        raw = tmp_path / f"{vm_name}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", disks[entry["id"]].path, raw],
                       check=True)
        assert os.path.getsize(raw) == disk_size
        assert entry["initial_data_sha256"] == data_sha256(raw, _seek_data_extents(raw), disk_size)
        if disk_size <= FULL_SHA256_LIMIT:
            assert entry["initial_sha256"] == file_sha256(raw)
        else:
            assert "initial_sha256" not in entry
        raw.unlink()
    assert sample["vms"]["vm2"]["disks"]["1"]["regions"][0]["length"] == min(disk_size // 8, 64 * MiB)


# ---------------------------------------------------------------------------------------------
# What the SDK sees


def _poll(fetch, done, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"did not settle: {value}"
        time.sleep(0.02)


def _ready_backup(engine, vm_id, disk_ids, **options):
    backups = engine.system_service().vms_service().vm_service(vm_id).backups_service()
    backup = backups.add(types.Backup(disks=[types.Disk(id=d) for d in disk_ids], **options))
    service = backups.backup_service(backup.id)
    return _poll(service.get, lambda b: b.phase == types.BackupPhase.READY), service


def _finalize(service):
    service.finalize()
    _poll(service.get, lambda b: b.phase in (types.BackupPhase.SUCCEEDED, types.BackupPhase.FAILED))


@contextlib.contextmanager
def _backup_transfer(engine, vm_id, disk_id):
    """A ready backup of the VM's disk and a download transfer of it as the POST answered it,
    with the transfer's service; both are finalized afterwards."""
    backup, backup_service = _ready_backup(engine, vm_id, [disk_id])
    try:
        transfers = engine.system_service().image_transfers_service()
        created = transfers.add(types.ImageTransfer(
            disk=types.Disk(id=disk_id), backup=types.Backup(id=backup.id),
            direction=types.ImageTransferDirection.DOWNLOAD, format=types.DiskFormat.RAW))
        service = transfers.image_transfer_service(created.id)
        try:
            yield created, service
        finally:
            service.finalize()
            _poll(service.get, lambda t: t.phase.value.startswith("finished"))
    finally:
        _finalize(backup_service)


def test_image_transfers_carry_no_backup_and_no_disk(lab_vm, engine):
    """ImageTransferMapper: a transfer shows its host and <image id> = the disk id, never the
    <backup> or <disk> it was created with (POST reply, GET and list alike)."""
    disk_id = lab_vm["disks"][0]["id"]
    with _backup_transfer(engine, lab_vm["id"], disk_id) as (created, service):
        got = _poll(service.get, lambda t: t.phase != types.ImageTransferPhase.INITIALIZING)
        listed = [t for t in engine.system_service().image_transfers_service().list() if t.id == created.id]
        assert len(listed) == 1
        for seen in (created, got, listed[0]):
            assert seen.backup is None and seen.disk is None, seen.id
            assert seen.image is not None and seen.image.id == disk_id
            assert seen.host is not None and seen.host.id


# ---------------------------------------------------------------------------------------------
# Disks a backup leaves out, VMs it refuses


@pytest.fixture
def estate_vm(lab_clean):
    """A running VM with an image disk, then a LUN, a managed-block, a shareable and an
    unplugged image disk (as the engine shows them); deleted afterwards."""
    name = f"estate{next(_numbers)}-{os.getpid()}"
    lab_clean.add_vm(name, disks=1, size="16M")
    try:
        extra = {
            "lun": lab_clean.add_disk(name, size="8M", storage_type="lun")["id"],
            "managed_block_storage": lab_clean.add_disk(name, size="8M", storage_type="managed_block_storage")["id"],
            "shareable": lab_clean.add_disk(name, size="8M", shareable=True)["id"],
            "unplugged": lab_clean.add_disk(name, size="8M", active=False)["id"],
        }
        info = lab_clean.vm_info(name)
        yield {"name": name, "id": info["id"], "image": info["disks"][0]["id"], **extra}
    finally:
        lab_clean.delete_vm(name)


def test_backup_leaves_out_lun_managed_block_and_shareable_disks(estate_vm, engine):
    """StartVmBackupCommand.getDisks keeps plugged image disks that are not shareable; the
    others are dropped from the backup without a word, and their transfer then fails."""
    vm_service = engine.system_service().vms_service().vm_service(estate_vm["id"])
    attachments = {a.disk.id: a for a in vm_service.disk_attachments_service().list()}
    assert attachments[estate_vm["unplugged"]].active is False
    assert all(a.active for d, a in attachments.items() if d != estate_vm["unplugged"])
    disks = {d: engine.follow_link(a.disk) for d, a in attachments.items()}
    assert disks[estate_vm["lun"]].storage_type == types.DiskStorageType.LUN
    assert disks[estate_vm["lun"]].lun_storage is not None and disks[estate_vm["lun"]].provisioned_size is None
    assert disks[estate_vm["managed_block_storage"]].storage_type == types.DiskStorageType.MANAGED_BLOCK_STORAGE
    assert disks[estate_vm["shareable"]].shareable is True
    assert disks[estate_vm["image"]].storage_type == types.DiskStorageType.IMAGE
    assert disks[estate_vm["image"]].shareable is False

    asked = [estate_vm[k] for k in ("image", "lun", "managed_block_storage", "shareable")]
    backup, service = _ready_backup(engine, estate_vm["id"], asked)
    try:
        assert [d.id for d in service.disks_service().list()] == [estate_vm["image"]]
        transfers = engine.system_service().image_transfers_service()
        left_out = transfers.add(types.ImageTransfer(
            disk=types.Disk(id=estate_vm["lun"]), backup=types.Backup(id=backup.id),
            direction=types.ImageTransferDirection.DOWNLOAD, format=types.DiskFormat.RAW))
        # It fails to start and ends in steps (TransferDiskImageCommand's callback); the backup
        # can be finalized only once it has finished.
        ended = _poll(transfers.image_transfer_service(left_out.id).get,
                      lambda t: t.phase in (types.ImageTransferPhase.FINISHED_FAILURE,
                                            types.ImageTransferPhase.FINISHED_SUCCESS))
        assert ended.phase == types.ImageTransferPhase.FINISHED_FAILURE and ended.transfer_url is None
    finally:
        _finalize(service)


def test_backup_with_an_unplugged_disk_is_refused(estate_vm, engine):
    """StartVmBackupCommand.allDisksPlugged: 409 'The following disks are not active'."""
    backups = engine.system_service().vms_service().vm_service(estate_vm["id"]).backups_service()
    with pytest.raises(sdk.Error) as refused:
        backups.add(types.Backup(disks=[types.Disk(id=estate_vm["image"]), types.Disk(id=estate_vm["unplugged"])]))
    assert refused.value.code == 409
    assert f"The following disks are not active on VM {estate_vm['name']}: {estate_vm['unplugged']}" \
        in str(refused.value)
    assert backups.list() == []


def test_hosted_engine_vm_cannot_be_backed_up(lab_clean, engine):
    """StartVmBackupCommand.validate: the hosted engine's VM (origin managed_hosted_engine) is
    refused first, 409, whatever its disks."""
    name = f"HostedEngine{next(_numbers)}-{os.getpid()}"
    lab_clean.add_vm(name, disks=1, size="8M", origin="managed_hosted_engine")
    try:
        vm = engine.system_service().vms_service().list(search=f"name={name}")[0]
        assert vm.origin == "managed_hosted_engine"
        disk_id = lab_clean.vm_info(name)["disks"][0]["id"]
        backups = engine.system_service().vms_service().vm_service(vm.id).backups_service()
        with pytest.raises(sdk.Error) as refused:
            backups.add(types.Backup(disks=[types.Disk(id=disk_id)]))
        assert refused.value.code == 409
        assert "Backup of Hosted Engine VM is not supported" in str(refused.value)
        assert backups.list() == []
    finally:
        lab_clean.delete_vm(name)


# ---------------------------------------------------------------------------------------------
# Backups of other tools


def test_backup_description_is_kept_and_listed(lab_vm, engine):
    """VmBackupMapper maps a backup's description both ways (engines from 4.4.8); more than
    1024 characters are refused with 400 (StartVmBackupCommand.validate)."""
    disk_id = lab_vm["disks"][0]["id"]
    backups = engine.system_service().vms_service().vm_service(lab_vm["id"]).backups_service()
    with pytest.raises(sdk.Error) as refused:
        backups.add(types.Backup(disks=[types.Disk(id=disk_id)], description="x" * 1025))
    assert refused.value.code == 400 and "more than 1024 characters" in str(refused.value)
    backup, service = _ready_backup(engine, lab_vm["id"], [disk_id], description="Veeam Backup & Replication")
    assert backup.description == "Veeam Backup & Replication"
    _finalize(service)
    listed = [b for b in backups.list() if b.id == backup.id]
    assert [b.description for b in listed] == ["Veeam Backup & Replication"]


# ---------------------------------------------------------------------------------------------
# Two certificate authorities


@pytest.fixture(scope="module")
def two_ca_lab(tmp_path_factory):
    """A lab whose engine web certificate (HTTPS, imageio proxy) has a CA of its own."""
    instance = Lab.up(tmp_path_factory.mktemp("two-ca-lab"), vms=1, disk_size="16M", separate_web_ca=True)
    try:
        yield instance
    finally:
        instance.down()


def _options(url: str, ca_file) -> int:
    parts = urllib.parse.urlsplit(url)
    con = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10,
                                      context=ssl.create_default_context(cafile=os.fspath(ca_file)))
    try:
        con.request("OPTIONS", parts.path)
        return con.getresponse().status
    finally:
        con.close()


def test_engine_and_proxy_use_the_web_ca_hosts_the_internal_ca(two_ca_lab):
    """ovirt-engine-setup's 50-engine.conf gives the proxy the Apache certificate and trusts the
    hosts with the internal CA; vdsm's 50-vdsm.conf gives the host daemon the internal CA's."""
    lab = two_ca_lab
    assert lab.ca_file != lab.host_ca_file
    wrong = lab.connection(ca_file=os.fspath(lab.host_ca_file))
    with pytest.raises(sdk.Error, match="SSL|certificate"):
        wrong.test(raise_exception=True)
    with contextlib.suppress(sdk.Error):
        wrong.close()
    engine = lab.connection()
    try:
        vm = engine.system_service().vms_service().list(search="name=vm1")[0]
        with _backup_transfer(engine, vm.id, lab.vm_info("vm1")["disks"][0]["id"]) as (_, service):
            transfer = _poll(service.get, lambda t: t.phase == types.ImageTransferPhase.TRANSFERRING)
            with pytest.raises(ssl.SSLCertVerificationError):
                _options(transfer.transfer_url, lab.ca_file)
            assert _options(transfer.transfer_url, lab.host_ca_file) == 200
            with pytest.raises(ssl.SSLCertVerificationError):
                _options(transfer.proxy_url, lab.host_ca_file)
            # the proxy verifies the host with the internal CA and passes requests on
            before = lab.stats()["imageio.host.bytes"]
            assert _options(transfer.proxy_url, lab.ca_file) == 200
            with ImageioClient(transfer.proxy_url, None, TransferSettings(ca_file=os.fspath(lab.ca_file))) as client:
                assert [len(piece) for _, piece in client.read_ranges([(0, MiB)])] == [MiB]
            assert lab.stats()["imageio.host.bytes"] > before
    finally:
        engine.close()


def test_default_lab_signs_both_with_the_internal_ca(lab):
    """As engine-setup leaves it: apache.cer signed by the engine CA, so one CA file does."""
    assert lab.ca_file == lab.host_ca_file
    pki = lab.ca_file.parent
    for cert in ("server.pem", "host.pem"):
        subprocess.run(["openssl", "verify", "-CAfile", lab.ca_file, pki / cert], check=True,
                       capture_output=True)
