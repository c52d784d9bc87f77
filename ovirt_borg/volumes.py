"""The volumes of a VM's disks: what may hold a file system, where its bytes are, what it is.

Pure functions over one ``read(offset, size) -> bytes`` callable per disk image. ``discover``
reads each disk's partition table (``ovirt_borg.partitions``), probes each partition (or the
whole disk when it has none) for a file system signature, reads LVM physical volumes
(``ovirt_borg.lvm``) across all the VM's disks, and returns every volume (partitions, whole
disks, logical volumes) with the pieces of disk images it is made of, the file system type
found, or why it cannot be read.

The signatures, as util-linux's libblkid finds them (``libblkid/src/superblocks/*.c``):
ext2/3/4 magic 0xEF53 at byte 1080 (superblock at 1024, ``s_magic`` at 0x38; feature words at
0x5C, 0x60, 0x64), XFS ``XFSB`` at 0, btrfs ``_BHRfS_M`` at 65600 (superblock at 64 KiB, magic
at 0x40, ``num_devices`` at 0x88), NTFS ``NTFS    `` at 3, exFAT ``EXFAT   `` at 3, FAT
``FAT12``/``FAT16`` at 54 or ``FAT32`` at 82 with a boot sector ending 55 AA, BitLocker
``-FVE-FS-`` at 3, LUKS ``LUKS\\xba\\xbe`` at 0 (version u16 big-endian at 6), swap
``SWAPSPACE2``/``SWAP-SPACE`` in the last 10 bytes of the first page (4, 8, 16 or 64 KiB),
LVM2 ``LABELONE`` in one of the first four sectors.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from ovirt_borg import lvm
from ovirt_borg.partitions import PartitionTableError, read_partition_table

Reader = Callable[[int, int], bytes]

WHOLE_DISK = "whole-disk"
LVM_MEMBER = "LVM2_member"
LUKS = "crypto_LUKS"
_PROBE_HEAD = 4096
_BTRFS_SUPER = 64 << 10
_SWAP_PAGES = (4096, 8192, 16384, 65536)
# ext feature bits that ext3 lacks (e2fsprogs lib/ext2fs/ext2_fs.h): extents, 64bit, mmp,
# flex_bg, ea_inode, large_dir, inline_data, encrypt, casefold; ro_compat huge_file,
# gdt_csum, dir_nlink, extra_isize, metadata_csum...
_EXT4_INCOMPAT = 0x0040 | 0x0080 | 0x0100 | 0x0200 | 0x0400 | 0x4000 | 0x8000 | 0x10000 | 0x20000
_EXT4_RO_COMPAT = 0x0008 | 0x0010 | 0x0020 | 0x0040 | 0x0400
_EXT_HAS_JOURNAL = 0x0004


@dataclass(frozen=True)
class Piece:
    """A run of bytes of a volume: ``length`` bytes of disk ``disk`` from ``offset``."""

    disk: int
    offset: int
    length: int


@dataclass
class Volume:
    """A partition, a whole disk or a logical volume, listed under one disk of the VM.

    ``name`` is the name the guest's tools give it (``p2``, ``whole-disk``, ``rhel-root`` as
    device-mapper writes VG and LV, ``-`` doubled inside each); it comes from the guest and is
    made a host path component by the caller. ``fstype`` is what the probe found (``ext4``,
    ``xfs``, ``btrfs``, ``ntfs``, ``vfat``, ``exfat``, ``swap``, ``LVM2_member``,
    ``crypto_LUKS``, ``BitLocker``) or None; ``reason`` says why it cannot be read, when that
    is already known from the disks alone.
    """

    disk: int
    name: str
    what: str
    size: int
    pieces: list[Piece] = field(default_factory=list)
    fstype: str | None = None
    reason: str | None = None
    holds_volumes: bool = False  # an LVM PV whose logical volumes are listed too


def dm_name(vg: str, lv: str) -> str:
    """The device-mapper name of an LV, ``vg-lv`` with each ``-`` inside a name doubled."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def piece_reader(pieces: list[Piece], disks: list[Reader]) -> Reader:
    """A reader of the volume made of ``pieces`` of the disks read by ``disks``."""

    def read(offset: int, size: int) -> bytes:
        out, position = [], 0
        for piece in pieces:
            if size <= 0:
                break
            if offset < position + piece.length:
                start = max(offset - position, 0)
                length = min(piece.length - start, size)
                data = disks[piece.disk](piece.offset + start, length)
                out.append(data)
                offset += len(data)
                size -= len(data)
                if len(data) < length:
                    break
            position += piece.length
        return b"".join(out)

    return read


def probe(read: Reader) -> tuple[str | None, str]:  # noqa: PLR0911 (one return per signature)
    """What the volume read by ``read`` holds: (type or None, a detail for users or "")."""
    head = read(0, _PROBE_HEAD)
    if head[:6] == b"LUKS\xba\xbe":
        version = struct.unpack_from(">H", head, 6)[0] if len(head) >= 8 else 0
        return LUKS, f"LUKS{version}"
    if any(head[s * 512:s * 512 + 8] == lvm.LABEL_ID and head[s * 512 + 24:s * 512 + 32] == lvm.LABEL_TYPE
           for s in range(lvm.LABEL_SCAN_SECTORS)):
        return LVM_MEMBER, ""
    oem = head[3:11]
    if oem == b"-FVE-FS-":
        return "BitLocker", ""
    if oem == b"NTFS    ":
        return "ntfs", ""
    if oem == b"EXFAT   ":
        return "exfat", ""
    if head[510:512] == b"\x55\xaa" and (head[54:59] in (b"FAT12", b"FAT16") or head[82:87] == b"FAT32"):
        return "vfat", head[82:87].decode() if head[82:87] == b"FAT32" else head[54:59].decode()
    if head[:4] == b"XFSB":
        return "xfs", ""
    if head[1080:1082] == b"\x53\xef" and len(head) >= 1024 + 0x68:
        compat, incompat, ro_compat = struct.unpack_from("<III", head, 1024 + 0x5C)
        if incompat & _EXT4_INCOMPAT or ro_compat & _EXT4_RO_COMPAT:
            return "ext4", ""
        return ("ext3" if compat & _EXT_HAS_JOURNAL else "ext2"), ""
    btrfs = read(_BTRFS_SUPER, 0x90)
    if btrfs[0x40:0x48] == b"_BHRfS_M" and len(btrfs) == 0x90:
        devices = struct.unpack_from("<Q", btrfs, 0x88)[0]
        return "btrfs", f"{devices} devices" if devices != 1 else ""
    for page in _SWAP_PAGES:
        signature = read(page - 10, 10)
        if signature in (b"SWAPSPACE2", b"SWAP-SPACE"):
            return "swap", ""
    if not head.strip(b"\0"):
        return None, "only zeros at its start"
    return None, ""


def discover(disks: list[tuple[Reader, int]]) -> list[Volume]:
    """Every volume of a VM's disks, given each disk's reader and size in bytes.

    Partitions (or the whole disk) come first, disk by disk, then the logical volumes of each
    volume group found on them, each listed under the disk of its first extent. Nothing
    raises for damaged or hostile content: it becomes a volume's ``reason``.
    """
    readers = [read for read, _ in disks]
    volumes: list[Volume] = []
    physical: dict[str, tuple[int, int, int]] = {}  # PV UUID -> (disk, offset, size)
    holders: dict[str, Volume] = {}  # PV UUID -> the volume it is
    metadata: list[tuple[Volume, str]] = []
    for index, (read, size) in enumerate(disks):
        for volume in _disk_volumes(index, read, size):
            volumes.append(volume)
            if volume.reason is not None:
                continue
            volume_read = piece_reader(volume.pieces, readers)
            volume.fstype, detail = probe(volume_read)
            if volume.fstype == LVM_MEMBER:
                try:
                    pv = lvm.read_physical_volume(volume_read)
                except lvm.LvmError as e:
                    volume.reason = f"an LVM physical volume whose label or metadata is damaged: {e}"
                    continue
                if pv is None:
                    volume.reason = "an LVM label that is not LVM2's"
                    continue
                physical[pv.uuid] = (index, volume.pieces[0].offset, volume.size)
                holders[pv.uuid] = volume
                if pv.metadata is not None:
                    metadata.append((volume, pv.metadata))
            _set_reason(volume, detail)
    volumes.extend(_logical_volumes(metadata, physical, holders, readers))
    for volume in holders.values():
        if volume.reason is None:
            volume.reason = "an LVM physical volume whose volume group's metadata is on no disk of this VM"
    return volumes


def _disk_volumes(index: int, read: Reader, size: int) -> list[Volume]:
    """The partitions of one disk, or the disk itself when it has no partition table."""
    try:
        table = read_partition_table(read, size)
    except PartitionTableError as e:
        return [Volume(index, WHOLE_DISK, "the whole disk", size, [Piece(index, 0, size)],
                       reason=f"its partition table cannot be read: {e}")]
    if table.scheme == "none":
        return [Volume(index, WHOLE_DISK, "the whole disk", size, [Piece(index, 0, size)])]
    volumes = []
    for part in table.partitions:
        kind = {"gpt": "GPT", "primary": "MBR", "logical": "MBR logical"}[part.kind]
        what = f"partition {part.number} ({kind}{', ' + part.type_name if part.type_name else ''})"
        volume = Volume(index, f"p{part.number}", what, part.size, [Piece(index, part.offset, part.size)])
        if part.offset + part.size > size:
            volume.reason = (f"it ends at byte {part.offset + part.size}, beyond the end of the "
                             f"disk image ({size} bytes): the partition table does not fit this disk")
        volumes.append(volume)
    return volumes


def _set_reason(volume: Volume, detail: str) -> None:
    """Say why a probed volume holds nothing to mount, when it does not."""
    if volume.fstype == "swap":
        volume.reason = "swap space (it holds no files)"
    elif volume.fstype == LUKS:
        volume.reason = f"encrypted ({detail}); it cannot be read without its key"
    elif volume.fstype == "BitLocker":
        volume.reason = "encrypted (BitLocker); it cannot be read without its key"
    elif volume.fstype == "btrfs" and detail:
        volume.reason = f"a btrfs file system over {detail}, which is not read"
    elif volume.fstype is None:
        hint = f" ({detail})" if detail else ""
        volume.reason = f"no file system recognized{hint}"


def _logical_volumes(metadata: list[tuple[Volume, str]], physical: dict[str, tuple[int, int, int]],
                     holders: dict[str, Volume], readers: list[Reader]) -> list[Volume]:
    """The LVs of every volume group whose metadata was found, newest metadata per VG."""
    groups: dict[str, lvm.VolumeGroup] = {}
    for holder, text in metadata:
        try:
            group = lvm.volume_group(lvm.parse_metadata(text))
        except lvm.LvmError as e:
            holder.reason = f"an LVM physical volume whose metadata cannot be read: {e}"
            continue
        key = group.uuid or group.name
        if key not in groups or groups[key].seqno < group.seqno:
            groups[key] = group
    volumes = []
    for group in groups.values():
        present = [pv for pv in group.pvs.values() if pv.uuid in physical]
        home = physical[present[0].uuid][0] if present else 0
        for pv in present:
            holder = holders[pv.uuid]
            if holder.reason is None:
                holder.reason = f"LVM physical volume {pv.key} of VG {group.name}"
                holder.holds_volumes = True
        for lv in group.lvs:
            if not lv.visible:
                continue  # the hidden parts of thin pools, RAID and snapshots
            volume = Volume(home, dm_name(group.name, lv.name), f"logical volume {group.name}/{lv.name}",
                            sum(s.extent_count for s in lv.segments) * group.extent_size)
            volume.reason = lv.reason or _map_extents(volume, lv, group, physical)
            if volume.pieces:
                volume.disk = volume.pieces[0].disk
            if volume.reason is None:
                volume.fstype, detail = probe(piece_reader(volume.pieces, readers))
                _set_reason(volume, detail)
            volumes.append(volume)
    return volumes


def _map_extents(volume: Volume, lv: lvm.LogicalVolume, group: lvm.VolumeGroup,
                 physical: dict[str, tuple[int, int, int]]) -> str | None:
    """Fill ``volume.pieces`` from a linear LV's segments; return why not, when it fails."""
    pieces = []
    for segment in sorted(lv.segments, key=lambda s: s.start_extent):
        key, first = segment.stripes[0]
        pv = group.pvs.get(key)
        if pv is None:
            return f"its segment names {key!r}, which is no PV of VG {group.name}"
        if pv.uuid not in physical:
            return (f"its PV {pv.key} ({_dashed(pv.uuid)}) is on no disk of this VM "
                    "(a disk not backed up, or of another VM)")
        disk, offset, size = physical[pv.uuid]
        start = pv.pe_start + first * group.extent_size
        length = segment.extent_count * group.extent_size
        if start + length > size:
            return f"its extents run past the end of its PV {pv.key}"
        if pieces and pieces[-1].disk == disk and pieces[-1].offset + pieces[-1].length == offset + start:
            last = pieces.pop()  # adjacent segments read as one piece
            pieces.append(Piece(disk, last.offset, last.length + length))
        else:
            pieces.append(Piece(disk, offset + start, length))
    volume.pieces = pieces
    return None


def _dashed(uuid: str) -> str:
    """A PV UUID as LVM prints it (6-4-4-4-4-4-6)."""
    parts, position = [], 0
    for width in (6, 4, 4, 4, 4, 4, 6):
        parts.append(uuid[position:position + width])
        position += width
    return "-".join(parts)
