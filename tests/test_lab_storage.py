"""The lab's storage domains: the file domain data1 and block domains, whose thin disks hold
what vdsm allocates for them and no more (real qemu-nbd, real imageio, the real SDK)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time

import ovirtsdk4 as sdk
import ovirtsdk4.types as types
import pytest

from ovirt_borg.errors import TransferError
from ovirt_borg.imageio import ImageioClient, TransferSettings
from ovirt_borg.lab.model import MIB

GiB = 1 << 30
_names = itertools.count(1)


def poll(fetch, done, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not done(value := fetch()):
        assert time.monotonic() < deadline, f"did not settle: {value}"
        time.sleep(0.02)
    return value


@pytest.fixture
def conn(lab_clean):
    connection = lab_clean.connection()
    yield connection
    connection.close()


def add_disk(conn, domain, *, size, initial_size=None, fmt=types.DiskFormat.COW, sparse=True):
    disks = conn.system_service().disks_service()
    disk = disks.add(types.Disk(
        name=f"d{next(_names)}", format=fmt, sparse=sparse, provisioned_size=size,
        initial_size=initial_size, content_type=types.DiskContentType.DATA,
        backup=types.DiskBackup.INCREMENTAL if fmt == types.DiskFormat.COW else None,
        storage_domains=[types.StorageDomain(name=domain)]))
    return poll(disks.disk_service(disk.id).get, lambda d: d.status == types.DiskStatus.OK)


def upload(conn, lab, disk_id, data: bytes) -> None:
    """Write ``data`` at offset 0 of the disk through a real upload transfer; finalize it, or
    cancel it and raise what imageio answered."""
    transfers = conn.system_service().image_transfers_service()
    transfer = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk_id), direction=types.ImageTransferDirection.UPLOAD,
        format=types.DiskFormat.RAW, inactivity_timeout=120))
    service = transfers.image_transfer_service(transfer.id)
    transfer = poll(service.get, lambda t: t.phase != types.ImageTransferPhase.INITIALIZING)
    settings = TransferSettings(retries=0, ca_file=os.fspath(lab.ca_file))
    try:
        with ImageioClient(transfer.transfer_url, transfer.proxy_url, settings) as client:
            client.write_ranges((offset, MIB, data[offset:offset + MIB]) for offset in range(0, len(data), MIB))
    except BaseException:
        service.cancel()
        # A cancel ends in steps (TransferDiskImageCommand's callback): wait for the last one.
        poll(service.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_FAILURE)
        raise
    service.finalize()
    poll(service.get, lambda t: t.phase == types.ImageTransferPhase.FINISHED_SUCCESS)


def measure_required(tmp_path, data: bytes, size: int) -> int:
    """``qemu-img measure -O qcow2``'s ``required`` for a raw image with ``data`` at its start."""
    raw = tmp_path / "measured.raw"
    with open(raw, "wb") as f:
        f.write(data)
        f.truncate(size)
    out = subprocess.run(["qemu-img", "measure", "-f", "raw", "-O", "qcow2", "--output=json", os.fspath(raw)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["required"]


def test_the_lab_has_a_file_and_a_block_domain(conn):
    domains = {sd.name: sd for sd in conn.system_service().storage_domains_service().list()}
    assert domains["data1"].storage.type == types.StorageType.LOCALFS
    assert domains["block1"].storage.type == types.StorageType.ISCSI


def test_a_thin_disk_on_a_block_domain_holds_its_lv_and_no_more(lab_clean, conn, small_block_domain, tmp_path):
    data = os.urandom(16 * MIB)
    # Without an initial size the LV is one chunk: 1 MiB here. Writing 16 MiB runs out of it,
    # imageio answers 500 (qemu-nbd: ENOSPC), the cancelled upload removes the disk.
    small = add_disk(conn, small_block_domain, size=64 * MIB)
    assert small.actual_size == 1 * MIB
    with pytest.raises(TransferError, match="imageio answered 500"):
        upload(conn, lab_clean, small.id, data)
    with pytest.raises(sdk.NotFoundError):
        conn.system_service().disks_service().disk_service(small.id).get()
    assert lab_clean.stats()["open_transfers"] == []
    # With qemu-img measure's size as initial_size (as the SDK's upload_disk.py does) it fits.
    required = measure_required(tmp_path, data, 64 * MIB)
    fitting = add_disk(conn, small_block_domain, size=64 * MIB, initial_size=required)
    assert fitting.actual_size == -(-int(required * 1.1) // MIB) * MIB
    upload(conn, lab_clean, fitting.id, data)
    conn.system_service().disks_service().disk_service(fitting.id).remove()


def test_block_domain_refusals_and_file_domains_ignore_initial_size(lab_clean, conn, small_block_domain):
    # ImagesHandler.checkImageConfiguration: no thin raw disk on a block domain.
    with pytest.raises(sdk.Error) as refused:
        add_disk(conn, small_block_domain, size=64 * MIB, fmt=types.DiskFormat.RAW, sparse=True)
    assert refused.value.code == 409 and "incompatible with the storage domain type" in str(refused.value)
    # vdsm refuses an initial size above the max size: the engine removes the new disk.
    disks = conn.system_service().disks_service()
    too_big = disks.add(types.Disk(name="too-big", format=types.DiskFormat.COW, sparse=True,
                                   provisioned_size=64 * MIB, initial_size=1 * GiB,
                                   storage_domains=[types.StorageDomain(name=small_block_domain)]))
    with pytest.raises(sdk.NotFoundError):
        poll(disks.disk_service(too_big.id).get, lambda d: False)
    assert any(e["code"] == "USER_ADD_DISK_FINISHED_FAILURE" for e in lab_clean.stats()["events"])
    # A file domain takes initial_size and ignores it: no LV, the file as small as its data.
    on_file = add_disk(conn, "data1", size=64 * MIB, initial_size=32 * MIB)
    assert on_file.actual_size < MIB
    disks.disk_service(on_file.id).remove()
