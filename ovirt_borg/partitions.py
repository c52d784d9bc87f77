"""Partition tables of a disk image, read in user space: MBR (with extended and logical
partitions) and GPT. Pure functions over a ``read(offset, size) -> bytes`` callable.

The on-disk formats, as the UEFI specification (2.10, section 5, "GUID Partition Table
Disk Layout") and util-linux's libfdisk (``libfdisk/src/dos.c``, ``libfdisk/src/gpt.c``)
define them:

- MBR: the boot sector ends with ``55 AA`` at byte 510; four 16-byte entries start at byte
  446: boot flag (0x00 or 0x80), CHS, type, CHS, first LBA (u32 LE), sector count (u32 LE).
  Type 0x05, 0x0F or 0x85 is an extended partition: a chain of extended boot records (EBRs),
  each with the same layout, whose first entry is a logical partition (start relative to that
  EBR) and whose second entry links the next EBR (start relative to the extended partition).
  Logical partitions are numbered from 5, as Linux names them. Type 0xEE protects a GPT.
- GPT: the header at LBA 1 (``EFI PART``, revision, header size, CRC32 of the header with
  its CRC field zeroed, ..., partition entry LBA at byte 72, entry count at 80, entry size at
  84, CRC32 of the entry array at 88); the backup header at the disk's last LBA. Each entry:
  type GUID, unique GUID, first and last LBA (inclusive, u64 LE), attributes, UTF-16LE name.
  Partitions are numbered by their index in the array, from 1, as Linux names them.

Sectors are 512 bytes (oVirt's disks); a GPT written for 4096-byte sectors is found too.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Callable

Reader = Callable[[int, int], bytes]

SECTOR = 512
_EXTENDED = (0x05, 0x0F, 0x85)
_PROTECTIVE = 0xEE
_MAX_LOGICAL = 128  # an EBR chain longer than this is taken for a loop

#: What a partition's type says it is meant for (for the reasons shown to users).
MBR_TYPES = {0x01: "FAT12", 0x04: "FAT16", 0x06: "FAT16", 0x07: "NTFS/exFAT", 0x0B: "FAT32",
             0x0C: "FAT32", 0x0E: "FAT16", 0x27: "Windows recovery", 0x82: "Linux swap",
             0x83: "Linux", 0x8E: "Linux LVM", 0xEF: "EFI system", 0xFD: "Linux RAID"}
GPT_TYPES = {
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI system",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "ca7d7ccb-63ed-4c53-861c-1742536059cc": "Linux LUKS",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
    "de94bba4-06d1-4d40-a16a-bfd50179d6ac": "Windows recovery",
}


class PartitionTableError(ValueError):
    """A partition table that cannot be read as a whole (its partitions are then unknown)."""


@dataclass(frozen=True)
class Partition:
    """One partition: its Linux number, byte range on the disk and what its type says."""

    number: int
    offset: int
    size: int
    kind: str  # "primary", "logical" or "gpt"
    type: str  # e.g. "0x83" or a GPT type GUID
    type_name: str  # e.g. "Linux LVM", or "" when unknown
    name: str = ""  # the GPT partition name (guest-chosen: never used in a path)


@dataclass(frozen=True)
class PartitionTable:
    scheme: str  # "gpt", "mbr" or "none"
    partitions: tuple[Partition, ...]
    notes: tuple[str, ...] = ()  # what was odd but not fatal (a damaged primary GPT header)


def _guid(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def read_partition_table(read: Reader, disk_size: int) -> PartitionTable:
    """Return the partition table of a disk of ``disk_size`` bytes read through ``read``.

    ``scheme`` is ``"none"`` when the disk holds no partition table (a file system, an LVM
    physical volume or nothing at its start). Raises ``PartitionTableError`` when a table is
    there but cannot be used (a GPT whose headers are both damaged, an extended partition
    chain that loops).
    """
    mbr = read(0, SECTOR)
    if len(mbr) < SECTOR:
        return PartitionTable("none", ())
    for sector_size in (SECTOR, 4096):
        header = read(sector_size, 512)
        if header[:8] == b"EFI PART":
            return _read_gpt(read, disk_size, sector_size)
    if mbr[510:512] != b"\x55\xaa" or not _looks_like_mbr(mbr):
        return PartitionTable("none", ())
    entries = _mbr_entries(mbr)
    if any(entry[1] == _PROTECTIVE for entry in entries):
        # A protective MBR whose GPT header is gone: try the backup GPT header at the end.
        return _read_gpt(read, disk_size, SECTOR)
    partitions: list[Partition] = []
    for number, (_status, kind, start, count) in enumerate(entries, start=1):
        if not kind or not count:
            continue
        if kind in _EXTENDED:
            partitions.extend(_logical_partitions(read, start * SECTOR))
            continue
        partitions.append(Partition(number, start * SECTOR, count * SECTOR, "primary",
                                    f"0x{kind:02x}", MBR_TYPES.get(kind, "")))
    return PartitionTable("mbr", tuple(partitions))


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """(boot flag, type, first LBA, sector count) of the four entries of a boot record."""
    return [(sector[446 + 16 * i], sector[446 + 16 * i + 4],
             *struct.unpack_from("<II", sector, 446 + 16 * i + 8)) for i in range(4)]


def _looks_like_mbr(sector: bytes) -> bool:
    """True when the boot sector's entries are plausible, and it is no file system's boot
    sector (NTFS, exFAT and FAT boot sectors also end with 55 AA)."""
    if sector[3:11] in (b"NTFS    ", b"EXFAT   ", b"-FVE-FS-") or \
            sector[54:59] in (b"FAT12", b"FAT16") or sector[82:87] == b"FAT32":
        return False
    entries = _mbr_entries(sector)
    return all(status in (0x00, 0x80) for status, *_ in entries) and \
        any(kind and count for _, kind, _, count in entries)


def _logical_partitions(read: Reader, extended_offset: int) -> list[Partition]:
    """Follow the EBR chain of an extended partition starting at ``extended_offset``."""
    partitions: list[Partition] = []
    ebr_offset, seen = extended_offset, set()
    while True:
        if ebr_offset in seen or len(seen) >= _MAX_LOGICAL:
            raise PartitionTableError(f"the extended partition's chain of boot records loops "
                                      f"(at byte {ebr_offset})")
        seen.add(ebr_offset)
        ebr = read(ebr_offset, SECTOR)
        if len(ebr) < SECTOR or ebr[510:512] != b"\x55\xaa":
            if not partitions:
                raise PartitionTableError(f"the extended partition at byte {extended_offset} "
                                          "has no valid boot record")
            break  # a damaged link ends the chain; what came before stays usable
        (_, kind, start, count), (_, next_kind, next_start, _) = _mbr_entries(ebr)[:2]
        if kind and count:
            partitions.append(Partition(5 + len(partitions), ebr_offset + start * SECTOR,
                                        count * SECTOR, "logical", f"0x{kind:02x}",
                                        MBR_TYPES.get(kind, "")))
        if next_kind not in _EXTENDED or not next_start:
            break
        ebr_offset = extended_offset + next_start * SECTOR
    return partitions


def _read_gpt(read: Reader, disk_size: int, sector_size: int) -> PartitionTable:
    notes: list[str] = []
    last_lba = disk_size // sector_size - 1
    header = _gpt_header(read, sector_size, 1)
    if header is None:
        header = _gpt_header(read, sector_size, last_lba)
        if header is None:
            raise PartitionTableError("the GPT header and its backup at the end of the disk are "
                                      "both damaged (or the disk is shorter than its table says)")
        notes.append("the primary GPT header is damaged; the backup header at the end was used")
    entries_lba, count, entry_size = header
    raw = read(entries_lba * sector_size, count * entry_size)
    partitions = []
    for index in range(count):
        entry = raw[index * entry_size:(index + 1) * entry_size]
        if len(entry) < 128 or entry[:16] == bytes(16):
            continue
        type_guid = _guid(entry[:16])
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            continue
        name = entry[56:128].decode("utf-16-le", "replace").split("\x00", 1)[0]
        partitions.append(Partition(index + 1, first * sector_size, (last - first + 1) * sector_size,
                                    "gpt", type_guid, GPT_TYPES.get(type_guid, ""), name))
    return PartitionTable("gpt", tuple(partitions), tuple(notes))


def _gpt_header(read: Reader, sector_size: int, lba: int) -> tuple[int, int, int] | None:
    """(entries LBA, entry count, entry size) of a valid GPT header at ``lba``, else None.

    Valid: the signature, the header's CRC32, and the entry array's CRC32 all match.
    """
    if lba <= 0:
        return None
    header = read(lba * sector_size, sector_size)
    if len(header) < 92 or header[:8] != b"EFI PART":
        return None
    size, crc = struct.unpack_from("<II", header, 12)
    if not 92 <= size <= sector_size:
        return None
    zeroed = header[:16] + b"\0\0\0\0" + header[20:size]
    if zlib.crc32(zeroed) != crc:
        return None
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
    if not count or entry_size < 128 or entry_size % 8 or count * entry_size > 16 << 20:
        return None
    entries = read(entries_lba * sector_size, count * entry_size)
    if len(entries) != count * entry_size or zlib.crc32(entries) != entries_crc:
        return None
    return entries_lba, count, entry_size
