"""The guest side (lab control): writes to a VM's disks as its guest would, disk images, and
test VMs with some data."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Iterable

from ovirt_borg.lab.model.api import ApiFault, new_id, not_found
from ovirt_borg.lab.model.inventory import BLOCK, Disk, Tag, Vm

log = logging.getLogger(__name__)


class GuestRules:
    """Lab control commands that act as a VM's guest, or set up test VMs (mixed into
    ``LabEngine``)."""

    def vm_disk(self, vm_name: str, disk: int | str = 1) -> Disk:
        """Return a VM's disk by 1-based index or by id/name; raises ``ApiFault`` 404."""
        vm = self.vm_by_name(vm_name)
        disks = self.vm_disks(vm, active_only=False)
        if isinstance(disk, int) or (isinstance(disk, str) and disk.isdigit()):
            index = int(disk)
            if not 1 <= index <= len(disks):
                raise not_found("Disk", f"{vm.name} disk {index} (it has {len(disks)})")
            return disks[index - 1]
        for d in disks:
            if disk in (d.id, d.name):
                return d
        raise not_found("Disk", f"{vm.name} disk {disk}")

    def guest_write(self, vm_name: str, disk: int | str = 1, *, percent: float | None = None,
                    offset: int | None = None, length: int | None = None,
                    zero: bool = False, discard: bool = False,
                    seed: int | None = None) -> list[dict[str, int]]:
        """Write to a VM disk as its guest would; return the written ranges.

        ``percent`` writes that share of the disk as scattered 64 KiB-aligned runs of random
        data; otherwise ``offset``/``length`` are written (random data, or zeroes/discard).
        Raises ``ApiFault`` 409 while the disk is exported (an open backup or transfer) and
        400 for ranges outside the disk.
        """
        target = self.vm_disk(vm_name, disk)
        # The lab has no snapshot overlay to take a hybrid backup's writes: a disk in any open
        # backup keeps the data the backup reads, as a live backup's scratch disk would.
        in_backup = any(b.is_open and target.id in b.disk_ids for b in self.backups.values())
        if self.disk_exported(target.id) or target.status == "locked" or in_backup:
            raise ApiFault(409, f"[Cannot write to disk {target.name} of VM {vm_name}. The disk "
                           "is exported by an open backup or image transfer; finalize it first.]")
        rng = random.Random(seed) if seed is not None else self._rng
        size = target.provisioned_size
        if percent is not None:
            if not 0 < percent <= 100:
                raise ApiFault(400, "percent must be in (0, 100]")
            ranges = _scattered_ranges(size, percent, rng)
        else:
            if offset is None or length is None:
                raise ApiFault(400, "give percent, or offset and length")
            if offset < 0 or length <= 0 or offset + length > size:
                raise ApiFault(400, f"range {offset}+{length} is outside the disk "
                               f"({size} bytes)")
            # In pieces: random.randbytes() takes at most 256 MiB at a time.
            piece = 64 << 20
            ranges = [(start, min(piece, offset + length - start)) for start in range(offset, offset + length, piece)]
        writes = [(start, count, None if zero or discard else rng.randbytes(count))
                  for start, count in ranges]
        self.plane.guest_write(Path(target.path), target.qemu_format, writes,
                               zero=zero, discard=discard)
        log.info("guest wrote %d range(s) to disk %s of VM %s", len(ranges), target.name, vm_name)
        return [{"offset": s, "length": n} for s, n in ranges]

    def image(self, vm_name: str, disk: int | str, out: Path) -> Disk:
        """Write the disk's current content as a raw file ``out``; raises ``ApiFault``."""
        target = self.vm_disk(vm_name, disk)
        for transfer in self.transfers.values():
            if transfer.is_active and transfer.disk_id == target.id and transfer.direction == "upload":
                raise ApiFault(409, f"disk {target.name} is being uploaded; finish the transfer")
        self.plane.to_raw(Path(target.path), Path(out), target.qemu_format)
        return target

    def add_vm_disk(self, vm_name: str, *, size: int, fmt: str = "cow", storage_type: str = "image",
                    shareable: bool = False, active: bool = True) -> Disk:
        """Create a disk and attach it to the VM (a disk added between backups).

        ``storage_type`` "lun", "managed_block_storage" or "cinder" and ``shareable`` make the
        disks a backup leaves out (raw, without incremental backup); ``active=False`` attaches
        the disk unplugged. Raises ``ApiFault`` 400 for an unknown storage type.
        """
        if storage_type not in ("image", "lun", "managed_block_storage", "cinder"):
            raise ApiFault(400, f"unknown disk storage type {storage_type}")
        vm = self.vm_by_name(vm_name)
        sd = self.inv.storage_domains[0]
        index = len(vm.attachments) + 1
        if storage_type != "image" or shareable:
            fmt = "raw"
        disk = self.add_disk(name=f"{vm.name}_Disk{index}", fmt=fmt, provisioned_size=size,
                             backup="incremental" if fmt == "cow" else "none",
                             storage_domain={"id": sd.id})
        disk.storage_type, disk.shareable = storage_type, shareable
        disk.status = "ok"
        self._new_disks.discard(disk.id)
        self.attach_disk(vm.id, disk.id, active=active)
        return disk

    def add_sample_vm(self, name: str, *, disks: int = 1, size: int = 64 << 20,
                      fmt: str = "cow", status: str = "up", tags: Iterable[str] = (),
                      seed: int | None = None, origin: str = "ovirt", cluster: str | None = None) -> Vm:
        """Create a VM with ``disks`` data disks holding some random data (for isolated tests).

        Each disk gets random data in its first MiB and at its middle; ``origin``
        "managed_hosted_engine" makes it a hosted-engine VM. The VM goes to the cluster named
        ``cluster`` (default: the first). Raises ``ApiFault`` 409 when the name is taken, 400
        for a bad size or status, 404 for an unknown cluster.
        """
        if status not in ("up", "down"):
            raise ApiFault(400, f"status must be up or down, got {status}")
        if size < (2 << 20) or size % BLOCK:
            raise ApiFault(400, "size must be a multiple of 64 KiB and at least 2 MiB")
        target = {"name": cluster} if cluster else {"id": self.inv.clusters[0].id}
        vm = self.add_vm(name=name, cluster=target, ovf=None, description="lab test VM")
        vm.status = status
        vm.origin = origin
        for tag_name in tags:
            found = [t for t in self.inv.tags if t.name == tag_name]
            if not found:
                found = [Tag(id=new_id(), name=tag_name)]
                self.inv.tags.append(found[0])
            vm.tags.append(found[0].id)
        rng = random.Random(seed) if seed is not None else self._rng
        for _ in range(disks):
            disk = self.add_vm_disk(vm.name, size=size, fmt=fmt)
            writes = [(offset, 1 << 20, rng.randbytes(1 << 20)) for offset in (0, size // 2)]
            self.plane.guest_write(Path(disk.path), disk.qemu_format, writes,
                                   zero=False, discard=False)
        self.save()
        return vm


def _scattered_ranges(size: int, percent: float, rng: random.Random) -> list[tuple[int, int]]:
    """Pick non-overlapping 64 KiB-aligned runs (1-16 blocks) covering ``percent`` of ``size``.

    Returns sorted (offset, length) pairs; adjacent runs are merged.
    """
    blocks = size // BLOCK
    wanted = max(1, round(blocks * percent / 100))
    if wanted >= blocks:
        return [(0, blocks * BLOCK)]
    taken = bytearray(blocks)
    chosen = 0
    attempts = 0
    while chosen < wanted and attempts < 100000:
        attempts += 1
        run = min(rng.randint(1, 16), wanted - chosen)
        start = rng.randrange(0, blocks - run + 1)
        if any(taken[start:start + run]):
            continue
        taken[start:start + run] = b"\x01" * run
        chosen += run
    if chosen < wanted:  # a crowded disk: fill the first free blocks
        for i in range(blocks):
            if chosen >= wanted:
                break
            if not taken[i]:
                taken[i] = 1
                chosen += 1
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < blocks:
        if taken[i]:
            j = i
            while j < blocks and taken[j]:
                j += 1
            ranges.append((i * BLOCK, (j - i) * BLOCK))
            i = j
        else:
            i += 1
    return ranges
