"""Sample VMs for a new lab: real qcow2 disks, one with a real ext4 file system.

- ``vm1`` (up, tagged ``prod``): disk 1 is an ext4 file system made with ``mkfs.ext4`` on a
  raw file, with ``/hello.txt`` and ``/data/random.bin`` written by ``debugfs``, converted to
  qcow2; disk 2 is a qcow2 with data in a few regions and holes elsewhere.
- ``vm2`` (down, tagged ``test``): one qcow2 disk with some data.
- ``vm3``... (``vms`` > 2): alternately up and down, one data disk each.

All disks are qcow2 with incremental backup enabled, under ``DIR/storage``. The sha256 of the
files in vm1's file system and digests of every disk's initial raw content go to
``sample.json``: ``initial_data_sha256`` (``data_sha256``: its data blocks only, for any size)
and, for disks up to ``FULL_SHA256_LIMIT``, ``initial_sha256`` (the sha256 of the whole raw
image). Both are computed from the image's data extents (``qemu-img map``), so a sparse 2 TiB
sample starts in seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ovirt_borg.lab import LabError, qemu
from ovirt_borg.lab.model import (
    Attachment, Cluster, Disk, Host, Inventory, LabLayout, StorageDomain, Tag, Vm, new_id,
    timestamp,
)

log = logging.getLogger(__name__)

DEFAULT_DISK_SIZE = 64 << 20
MIN_DISK_SIZE = 8 << 20  # mkfs.ext4 and the sample regions need a few MiB
#: Data regions of a non-sparse sample disk are an eighth of the disk each, at most this: a
#: large lab disk starts in seconds (and random.randbytes() takes at most 256 MiB at a time).
MAX_REGION = 64 << 20
#: Disks up to this size also get the plain sha256 of their raw image; hashing the zeros of a
#: larger disk costs about a second per GiB (the 2T sample: half an hour).
FULL_SHA256_LIMIT = 1 << 30
#: ``data_sha256`` hashes data in blocks of this size (the qcow2 cluster size), all-zero
#: blocks left out.
DIGEST_BLOCK = 64 << 10
HELLO_TEXT = b"Hello from the ovirt-borg lab!\n"

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Given ``64M``, ``1G``, ``1T``, ``512K`` or a number of bytes, return bytes.

    Raises ValueError for anything else.
    """
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text.upper())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 64M, 1G, 1T)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def create_sample(layout: LabLayout, *, vms: int = 2,
                  disk_size: int = DEFAULT_DISK_SIZE, seed: int = 1) -> Inventory:
    """Create the sample inventory and disk images in the lab directory.

    Given the lab layout, the number of VMs (at least 1), the size of each disk (a multiple of
    64 KiB, at least 8 MiB) and a seed for the sample content. Writes the images under
    ``storage/``, ``engine-state.json`` and ``sample.json``; returns the inventory.
    Raises ValueError for bad arguments and ``LabError`` when a tool (qemu-img, qemu-io,
    mkfs.ext4, debugfs) fails.
    """
    if vms < 1:
        raise ValueError("a lab needs at least one VM")
    if disk_size < MIN_DISK_SIZE or disk_size % (64 << 10):
        raise ValueError(f"disk size must be a multiple of 64 KiB and at least "
                         f"{MIN_DISK_SIZE >> 20} MiB, got {disk_size}")
    rng = random.Random(seed)
    layout.storage.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(id=new_id(), name="Default")
    host = Host(id=new_id(), name="host1", address="127.0.0.1", cluster_id=cluster.id)
    sd = StorageDomain(id=new_id(), name="data1", path=str(layout.storage))
    # A block domain beside it (no disk at first): thin disks there hold what vdsm allocates.
    block = StorageDomain(id=new_id(), name="block1", path=str(layout.dir / "storage-block1"), type="iscsi")
    tags = {name: Tag(id=new_id(), name=name) for name in ("prod", "test")}
    inv = Inventory(clusters=[cluster], hosts=[host], storage_domains=[sd, block],
                    tags=list(tags.values()))
    sample: dict[str, Any] = {"disk_size": disk_size, "vms": {}}

    def new_disk(vm: Vm, index: int) -> Disk:
        disk_id = new_id()
        disk = Disk(id=disk_id, image_id=new_id(), name=f"{vm.name}_Disk{index}", format="cow",
                    provisioned_size=disk_size, path=str(layout.storage / f"{disk_id}.qcow2"),
                    storage_domain_id=sd.id, backup="incremental", created=timestamp())
        inv.disks.append(disk)
        vm.attachments.append(Attachment(disk_id=disk_id, bootable=index == 1))
        return disk

    for number in range(1, vms + 1):
        status = "up" if number % 2 == 1 else "down"
        vm = Vm(id=new_id(), name=f"vm{number}", status=status, cluster_id=cluster.id,
                memory=(2 if number == 1 else 1) << 30, sockets=2 if number == 1 else 1,
                description=f"lab sample VM {number}", creation_time=timestamp())
        if number == 1:
            vm.tags.append(tags["prod"].id)
        elif number == 2:
            vm.tags.append(tags["test"].id)
        inv.vms.append(vm)
        info: dict[str, Any] = {"id": vm.id, "status": status, "disks": {}}
        if number == 1:
            fs_disk = new_disk(vm, 1)
            files = _make_ext4_disk(Path(fs_disk.path), disk_size, rng)
            info["disks"]["1"] = {"id": fs_disk.id, "files": files}
            data_disk = new_disk(vm, 2)
            regions = _make_data_disk(Path(data_disk.path), disk_size, rng, sparse=True)
            info["disks"]["2"] = {"id": data_disk.id, "regions": regions}
        else:
            data_disk = new_disk(vm, 1)
            regions = _make_data_disk(Path(data_disk.path), disk_size, rng, sparse=False)
            info["disks"]["1"] = {"id": data_disk.id, "regions": regions}
        for entry in info["disks"].values():
            entry.update(_initial_digests(Path(inv_disk(inv, entry["id"]).path), disk_size))
        sample["vms"][vm.name] = info

    inv.save(layout.engine_state)
    layout.sample.write_text(json.dumps(sample, indent=1))
    log.info("created %d sample VMs with %d disks of %d bytes", vms, len(inv.disks), disk_size)
    return inv


def inv_disk(inv: Inventory, disk_id: str) -> Disk:
    """Return the inventory's disk with this id; raises KeyError."""
    for disk in inv.disks:
        if disk.id == disk_id:
            return disk
    raise KeyError(disk_id)


def _make_ext4_disk(path: Path, size: int, rng: random.Random) -> dict[str, dict[str, Any]]:
    """Make an ext4 qcow2 image with two known files; return {path: {size, sha256}}."""
    random_bin = rng.randbytes(min(1 << 20, size // 16))
    files = {"/hello.txt": HELLO_TEXT, "/data/random.bin": random_bin}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".sample-") as tmp:
        tmp_dir = Path(tmp)
        raw = tmp_dir / "fs.raw"
        with open(raw, "wb") as f:
            f.truncate(size)
        tool("mkfs.ext4", "-q", "-F", "-L", "vm1-root", "-E", "root_owner=0:0", str(raw))
        hello = tmp_dir / "hello.txt"
        hello.write_bytes(HELLO_TEXT)
        data = tmp_dir / "random.bin"
        data.write_bytes(random_bin)
        commands = tmp_dir / "debugfs.cmd"
        commands.write_text(f"write {hello} hello.txt\nmkdir data\ncd data\n"
                            f"write {data} random.bin\n")
        tool("debugfs", "-w", "-f", str(commands), str(raw))
        tool("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    return {name: {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
            for name, content in files.items()}


def _make_data_disk(path: Path, size: int, rng: random.Random, *,
                    sparse: bool) -> list[dict[str, int]]:
    """Make a qcow2 image with random data in a few regions; return the regions.

    ``sparse`` leaves most of the disk as holes (three small regions); otherwise two regions
    of an eighth of the disk each (at most ``MAX_REGION``) hold data.
    """
    qemu.create_image(path, size, "qcow2")
    mib = 1 << 20
    if sparse:
        regions = [(0, mib), (size // 2, 256 << 10), (size - 2 * mib, 128 << 10)]
    else:
        region = min(size // 8, MAX_REGION)
        regions = [(mib, region), (size // 2, region)]
    for offset, length in regions:
        qemu.write(path, offset, length, fmt="qcow2", data=rng.randbytes(length))
    # A zeroed range: allocated as zero clusters, never data.
    qemu.write(path, size // 4, 64 << 10, fmt="qcow2", zero=True)
    return [{"offset": o, "length": n} for o, n in regions]


def _initial_digests(path: Path, size: int) -> dict[str, str]:
    """Digests of a qcow2 image's guest-visible content for ``sample.json``.

    ``initial_data_sha256`` always, ``initial_sha256`` for disks up to ``FULL_SHA256_LIMIT``.
    Only the data extents are read, from a sparse raw copy.
    """
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".sample-") as tmp:
        raw = Path(tmp) / "disk.raw"
        qemu.to_raw(path, raw, "qcow2")
        extents = qemu.data_extents(path, "qcow2")
        digests = {"initial_data_sha256": data_sha256(raw, extents, size)}
        if size <= FULL_SHA256_LIMIT:
            digests["initial_sha256"] = _sparse_sha256(raw, extents, size)
        return digests


def data_sha256(raw: Path, extents: list[tuple[int, int]], size: int) -> str:
    """The digest of a raw image's data: what ``initial_data_sha256`` records.

    Given a raw file, the ranges that may hold data (everything else must read as zeros) and
    the image size: the sha256 over each ``DIGEST_BLOCK``-aligned block of those ranges that
    is not all zeros, as its offset (8 bytes, big-endian) and its bytes, then the size. How
    zeros are stored (holes, zeroed clusters, written zeros) does not change it, so a restored
    image gives the same digest as the original.
    """
    digest = hashlib.sha256()
    zero = bytes(DIGEST_BLOCK)
    blocks = sorted({index for offset, length in extents
                     for index in range(offset // DIGEST_BLOCK, -(-(offset + length) // DIGEST_BLOCK))})
    with open(raw, "rb") as f:
        for index in blocks:
            block = os.pread(f.fileno(), DIGEST_BLOCK, index * DIGEST_BLOCK)
            if block != zero[:len(block)]:
                digest.update((index * DIGEST_BLOCK).to_bytes(8, "big"))
                digest.update(block)
    digest.update(size.to_bytes(8, "big"))
    return digest.hexdigest()


def _sparse_sha256(raw: Path, extents: list[tuple[int, int]], size: int) -> str:
    """The sha256 of a whole raw image, reading only ``extents`` (the rest is zeros)."""
    digest = hashlib.sha256()
    zero = memoryview(bytes(1 << 20))
    position = 0

    def zeros(count: int) -> None:
        while count:
            piece = min(count, len(zero))
            digest.update(zero[:piece])
            count -= piece

    with open(raw, "rb") as f:
        for offset, length in extents:
            zeros(offset - position)
            f.seek(offset)
            remaining = length
            while remaining:
                piece = f.read(min(remaining, 1 << 20))
                if not piece:
                    raise LabError(f"{raw} ends at {offset + length - remaining}, before its data")
                digest.update(piece)
                remaining -= len(piece)
            position = offset + length
    zeros(size - position)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def tool(*cmd: str, stdin: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run a tool that builds an image; return its stdout; raises ``LabError``."""
    try:
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300,
                              input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                              env=env)
    except FileNotFoundError as e:
        raise LabError(f"{cmd[0]} is not installed (see the Makefile's APT_PACKAGES)") from e
    except subprocess.CalledProcessError as e:
        raise LabError(f"{' '.join(cmd[:2])} failed: {(e.stderr or e.stdout).strip()}") from e
    return proc.stdout
