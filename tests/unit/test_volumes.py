"""The pure readers of file-level recovery: partition tables, LVM2 metadata, volume discovery.

Partition tables are written by the real sfdisk; LVM physical volumes by a small writer here
(the lab's guest disks are written by the real lvm2 and read end to end in test_mount.py), so
that damaged, wrapped and hostile metadata can be made on purpose.
"""

from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from ovirt_borg import lvm
from ovirt_borg.mount import host_name
from ovirt_borg.partitions import PartitionTableError, read_partition_table
from ovirt_borg.volumes import Piece, discover, dm_name, piece_reader, probe

MIB = 1 << 20


class Image:
    """A sparse in-memory disk: bytes written at offsets, zeros elsewhere."""

    def __init__(self, size: int, data: bytes = b""):
        self.size = size
        self.data = bytearray(data)

    def write(self, offset: int, chunk: bytes) -> None:
        if len(self.data) < offset + len(chunk):
            self.data.extend(bytes(offset + len(chunk) - len(self.data)))
        self.data[offset:offset + len(chunk)] = chunk

    def read(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        chunk = bytes(self.data[offset:end])
        return chunk + bytes(end - offset - len(chunk))


def sfdisk_image(tmp_path: Path, size: int, script: str) -> Image:
    """A disk of ``size`` bytes partitioned by the real sfdisk with ``script``."""
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(path)], input=script,
                   text=True, check=True, capture_output=True)
    return Image(size, path.read_bytes())


def sfdisk_logical_chain(tmp_path: Path) -> Image:
    """An MBR disk with three logical partitions: its EBRs lie inside the extended one."""
    return sfdisk_image(tmp_path, 64 * MIB, "label: dos\nsize=8MiB, type=83\ntype=5\nsize=8MiB, type=7\n"
                                            "size=8MiB, type=8e\nsize=8MiB, type=82\n")


# -- partition tables ----------------------------------------------------------------------------


def test_mbr_with_an_extended_partition_gives_primary_and_logical_numbers(tmp_path):
    image = sfdisk_logical_chain(tmp_path)
    table = read_partition_table(image.read, image.size)
    assert table.scheme == "mbr"
    assert [(p.number, p.kind, p.type_name, p.size) for p in table.partitions] == [
        (1, "primary", "Linux", 8 * MIB), (5, "logical", "NTFS/exFAT", 8 * MIB),
        (6, "logical", "Linux LVM", 8 * MIB), (7, "logical", "Linux swap", 8 * MIB)]
    offsets = [p.offset for p in table.partitions]
    assert offsets == sorted(offsets) and offsets[0] == MIB
    assert all(b.offset >= a.offset + a.size for a, b in zip(table.partitions, table.partitions[1:]))


def test_an_extended_partition_chain_that_loops_is_refused(tmp_path):
    image = sfdisk_logical_chain(tmp_path)
    link = 446 + 16  # an EBR's second entry links the next EBR, relative to the extended partition
    extended = struct.unpack_from("<I", image.data, 446 + 16 + 8)[0] * 512
    second = extended + struct.unpack_from("<I", image.data, extended + link + 8)[0] * 512
    third = extended + struct.unpack_from("<I", image.data, second + link + 8)[0] * 512
    # The third EBR links back to the second.
    image.data[third + link + 4] = 0x05
    struct.pack_into("<II", image.data, third + link + 8, (second - extended) // 512, 2048)
    with pytest.raises(PartitionTableError, match="loops"):
        read_partition_table(image.read, image.size)


def test_gpt_partitions_and_the_backup_header(tmp_path):
    script = ("label: gpt\nsize=4MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI System\"\n"
              "size=8MiB, type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")
    image = sfdisk_image(tmp_path, 32 * MIB, script)
    table = read_partition_table(image.read, image.size)
    assert table.scheme == "gpt" and not table.notes
    assert [(p.number, p.type_name, p.offset, p.size) for p in table.partitions] == [
        (1, "EFI system", MIB, 4 * MIB), (2, "Linux LVM", 5 * MIB, 8 * MIB)]
    assert table.partitions[0].name == "EFI System"
    image.data[512 + 30] ^= 0xFF  # the primary header's CRC no longer matches
    table = read_partition_table(image.read, image.size)
    assert [p.number for p in table.partitions] == [1, 2] and "backup header" in table.notes[0]
    # A disk shorter than the table says: the backup header is not where the table puts it.
    with pytest.raises(PartitionTableError, match="both damaged"):
        read_partition_table(image.read, image.size - MIB)


def test_a_file_system_boot_sector_is_no_partition_table():
    boot = bytearray(512)
    boot[3:11] = b"NTFS    "
    boot[446 + 4] = 0x07  # boot code that happens to look like an entry
    boot[446 + 8:446 + 16] = struct.pack("<II", 63, 1000)
    boot[510:512] = b"\x55\xaa"
    image = Image(MIB, bytes(boot))
    assert read_partition_table(image.read, image.size).scheme == "none"
    assert probe(image.read) == ("ntfs", "")


def test_a_partition_past_the_end_of_the_disk_is_reported(tmp_path):
    image = sfdisk_logical_chain(tmp_path)
    image.size = 12 * MIB  # the disk image is shorter than its partition table claims
    found = {v.name: v.reason for v in discover([(image.read, image.size)])}
    assert "beyond" not in found["p1"] and "beyond the end of the disk image (12582912 bytes)" in found["p5"]
    assert "p6" not in found  # its boot record lies past the end of the disk: the chain ends


# -- LVM -----------------------------------------------------------------------------------------


def test_lvm_crc_is_lvm2s():
    # lvm2's calc_crc(INITIAL_CRC, ...) is CRC-32 started at 0xf597a6cf without final inversion;
    # over nothing it is the initial value, and it continues across pieces like lvm2's.
    assert lvm.lvm_crc(b"") == lvm.INITIAL_CRC
    assert lvm.lvm_crc(b"world", lvm.lvm_crc(b"hello ")) == lvm.lvm_crc(b"hello world")
    assert lvm.lvm_crc(b"hello") == zlib.crc32(b"hello", 0x0A68_5930) ^ 0xFFFFFFFF


UUIDS = ["A" * 32, "B" * 32]


def vg_text(name: str = "rhel", *, lvs: str, pvs: int = 2, seqno: int = 3, extent_sectors: int = 8192) -> str:
    pv_text = "".join(
        f'pv{i} {{\nid = "{UUIDS[i][:6]}-{UUIDS[i][6:10]}-{UUIDS[i][10:14]}-{UUIDS[i][14:18]}-'
        f'{UUIDS[i][18:22]}-{UUIDS[i][22:26]}-{UUIDS[i][26:]}"\ndevice = "/dev/vd{i}"\n'
        f'status = ["ALLOCATABLE"]\npe_start = 2048\npe_count = 100\n}}\n' for i in range(pvs))
    return (f'{name} {{\nid = "VGID-xx"\nseqno = {seqno}\nformat = "lvm2"\n'
            f'status = ["RESIZEABLE", "READ", "WRITE"]\nextent_size = {extent_sectors}\n'
            f'physical_volumes {{\n{pv_text}}}\nlogical_volumes {{\n{lvs}}}\n}}\n'
            '# Generated by a test\ncontents = "Text Format Volume Group"\nversion = 1\n')


def linear(name: str, *segments: tuple[int, int, str, int], status: str = '"READ", "WRITE", "VISIBLE"') -> str:
    body = "".join(f'segment{i} {{\nstart_extent = {start}\nextent_count = {count}\ntype = "striped"\n'
                   f'stripe_count = 1 # linear\nstripes = [\n"{pv}", {first}\n]\n}}\n'
                   for i, (start, count, pv, first) in enumerate(segments, start=1))
    return f'{name} {{\nid = "LVID"\nstatus = [{status}]\nflags = []\nsegment_count = {len(segments)}\n{body}}}\n'


def write_pv(image: Image, offset: int, uuid: str, metadata: str | None, *, mda_size: int = 64 << 10,
             wrap_at: int | None = None) -> None:
    """Write an LVM2 label (sector 1) and one metadata area at 4 KiB holding ``metadata``.

    ``wrap_at``: put the text so that it wraps after that many bytes of the area's end.
    """
    label = bytearray(512)
    header = uuid.encode() + struct.pack("<Q", image.size - offset)
    header += struct.pack("<QQ", MIB, 0) + bytes(16)  # one data area from 1 MiB, end of list
    header += (struct.pack("<QQ", 4096, mda_size) if metadata is not None else b"") + bytes(16)
    label[32:32 + len(header)] = header
    label[:8] = lvm.LABEL_ID
    label[24:32] = lvm.LABEL_TYPE
    struct.pack_into("<QII", label, 8, 1, 0, 32)
    struct.pack_into("<I", label, 16, lvm.lvm_crc(bytes(label[20:])))
    image.write(offset + 512, bytes(label))
    if metadata is None:
        return
    text = metadata.encode() + b"\0"
    start = mda_size - wrap_at if wrap_at else 512 + 1024
    area = bytearray(mda_size)
    first = min(len(text), mda_size - start)
    area[start:start + first] = text[:first]
    area[512:512 + len(text) - first] = text[first:]
    mda = bytearray(512)
    mda[4:20] = lvm.MDA_MAGIC
    struct.pack_into("<IQQ", mda, 20, 1, 4096, mda_size)
    struct.pack_into("<QQII", mda, 40, start, len(text), lvm.lvm_crc(text), 0)
    struct.pack_into("<I", mda, 0, lvm.lvm_crc(bytes(mda[4:])))
    area[:512] = mda
    image.write(offset + 4096, bytes(area))


def two_disks(metadata: str, *, wrap_at: int | None = None) -> tuple[Image, Image]:
    first, second = Image(64 * MIB), Image(64 * MIB)
    write_pv(first, 0, UUIDS[0], metadata, wrap_at=wrap_at)
    write_pv(second, 0, UUIDS[1], None)  # a PV without a metadata area, as pvcreate --metadatacopies 0
    return first, second


def extent(pv_offset: int, number: int, extent_size: int = 4 * MIB) -> int:
    return pv_offset + MIB + number * extent_size


@pytest.mark.parametrize("wrap_at", [None, 100])
def test_a_linear_lv_of_segments_on_two_disks_reads_in_order(wrap_at):
    """Segments in LV order, on either disk, the second before the first on its disk; the
    metadata text read also when it wraps round the end of its circular area."""
    text = vg_text(lvs=linear("root", (0, 1, "pv0", 5), (1, 2, "pv0", 1), (3, 1, "pv1", 0)))
    first, second = two_disks(text, wrap_at=wrap_at)
    content = [b"A" * 4 * MIB, b"B" * 8 * MIB, b"C" * 4 * MIB]
    first.write(extent(0, 5), content[0])
    first.write(extent(0, 1), content[1])
    second.write(extent(0, 0), content[2])
    found = discover([(first.read, first.size), (second.read, second.size)])
    by_name = {v.name: v for v in found}
    root = by_name["rhel-root"]
    assert root.reason == "no file system recognized" and root.size == 16 * MIB
    assert root.pieces == [Piece(0, extent(0, 5), 4 * MIB), Piece(0, extent(0, 1), 8 * MIB),
                           Piece(1, extent(0, 0), 4 * MIB)]
    read = piece_reader(root.pieces, [first.read, second.read])
    assert read(0, 16 * MIB) == b"".join(content)
    assert read(4 * MIB - 2, 4) == b"AABB" and read(12 * MIB - 1, 2) == b"BC"
    holders = [v for v in found if v.name == "whole-disk"]
    assert [(v.disk, v.holds_volumes, v.reason) for v in holders] == [
        (0, True, "LVM physical volume pv0 of VG rhel"), (1, True, "LVM physical volume pv1 of VG rhel")]


def test_an_lv_on_a_missing_pv_is_reported_and_the_others_read():
    text = vg_text(lvs=linear("root", (0, 2, "pv0", 0)) + linear("home", (0, 1, "pv1", 0)))
    first, _ = two_disks(text)
    found = {v.name: v for v in discover([(first.read, first.size)])}
    assert found["rhel-root"].pieces == [Piece(0, extent(0, 0), 8 * MIB)]
    assert "its PV pv1 (BBBBBB-BBBB-BBBB-BBBB-BBBB-BBBB-BBBBBB) is on no disk of this VM" in found["rhel-home"].reason
    assert not found["rhel-home"].pieces


def test_thin_raid_striped_and_hidden_lvs():
    lvs = (linear("root", (0, 1, "pv0", 0))
           + 'thin1 {\nid = "x"\nstatus = ["READ", "WRITE", "VISIBLE"]\nsegment_count = 1\n'
             'segment1 {\nstart_extent = 0\nextent_count = 4\ntype = "thin"\nthin_pool = "pool"\n'
             'transaction_id = 1\ndevice_id = 1\n}\n}\n'
           + 'mirror {\nid = "y"\nstatus = ["READ", "WRITE", "VISIBLE"]\nsegment_count = 1\n'
             'segment1 {\nstart_extent = 0\nextent_count = 1\ntype = "raid1"\ndevice_count = 2\n'
             'raids = ["mirror_rmeta_0", "mirror_rimage_0", "mirror_rmeta_1", "mirror_rimage_1"]\n}\n}\n'
           + 'wide {\nid = "z"\nstatus = ["READ", "WRITE", "VISIBLE"]\nsegment_count = 1\n'
             'segment1 {\nstart_extent = 0\nextent_count = 2\ntype = "striped"\nstripe_count = 2\n'
             'stripe_size = 128\nstripes = [\n"pv0", 10,\n"pv1", 10\n]\n}\n}\n'
           + linear("mirror_rimage_0", (0, 1, "pv0", 20), status='"READ", "WRITE"'))
    first, second = two_disks(vg_text(lvs=lvs))
    found = {v.name: v for v in discover([(first.read, first.size), (second.read, second.size)])}
    assert "thin LVs need device-mapper" in found["rhel-thin1"].reason
    assert "raid1 LV" in found["rhel-mirror"].reason
    assert "striped LV over 2 PVs" in found["rhel-wide"].reason
    assert "rhel-mirror_rimage_0" not in found  # hidden: part of the RAID LV
    assert found["rhel-root"].reason == "no file system recognized (only zeros at its start)"


def test_damaged_metadata_is_reported_never_raised():
    first, _ = two_disks(vg_text(lvs=linear("root", (0, 1, "pv0", 0))))
    first.data[4096 + 512 + 1024 + 10] ^= 0x01  # a byte of the text: its checksum fails
    [pv] = discover([(first.read, first.size)])
    assert "wrong checksum" in pv.reason and pv.fstype == "LVM2_member"
    garbled, _ = two_disks("rhel { physical_volumes { pv0 { id = } } ")
    [pv] = discover([(garbled.read, garbled.size)])
    assert "metadata cannot be read" in pv.reason
    label_broken, _ = two_disks(vg_text(lvs=""))
    label_broken.data[512 + 100] ^= 0x01
    [pv] = discover([(label_broken.read, label_broken.size)])
    assert "label in sector 1 has a wrong checksum" in pv.reason


def test_hostile_vg_and_lv_names_become_harmless_path_components():
    # lvm2's own tools refuse such names; a guest's root can write any metadata.
    text = vg_text("..", lvs=linear("../../etc/x", (0, 1, "pv0", 0)) + linear(".hidden\x1b\x07", (1, 1, "pv0", 1)))
    first, _ = two_disks(text)
    names = [v.name for v in discover([(first.read, first.size)]) if v.what.startswith("logical")]
    assert names == [dm_name("..", "../../etc/x"), dm_name("..", ".hidden\x1b\x07")]
    assert [host_name(name) for name in names] == ["%2E.-..%2F..%2Fetc%2Fx", "%2E.-.hidden%1B%07"]


def test_the_newest_metadata_of_a_vg_wins():
    old = vg_text(lvs=linear("old", (0, 1, "pv0", 0)), seqno=4)
    new = vg_text(lvs=linear("new", (0, 1, "pv0", 0)), seqno=5)
    first, second = Image(64 * MIB), Image(64 * MIB)
    write_pv(first, 0, UUIDS[0], new)
    write_pv(second, 0, UUIDS[1], old)
    found = [v.name for v in discover([(second.read, second.size), (first.read, first.size)])]
    assert "rhel-new" in found and "rhel-old" not in found


def test_probe_finds_each_signature():
    def image_with(offset: int, chunk: bytes, size: int = MIB) -> Image:
        image = Image(size)
        image.write(offset, chunk)
        return image

    assert probe(image_with(0, b"LUKS\xba\xbe\x00\x01").read) == ("crypto_LUKS", "LUKS1")
    assert probe(image_with(0, b"XFSB").read)[0] == "xfs"
    assert probe(image_with(65536 + 0x40, b"_BHRfS_M" + bytes(64) + struct.pack("<Q", 1)).read) == ("btrfs", "")
    assert probe(image_with(4096 - 10, b"SWAPSPACE2").read)[0] == "swap"
    assert probe(image_with(3, b"-FVE-FS-").read)[0] == "BitLocker"
    fat = bytearray(512)
    fat[82:87], fat[510:512] = b"FAT32", b"\x55\xaa"
    assert probe(Image(MIB, bytes(fat)).read) == ("vfat", "FAT32")
    ext = bytearray(2048)
    ext[1080:1082] = b"\x53\xef"
    assert probe(Image(MIB, bytes(ext)).read)[0] == "ext2"
    struct.pack_into("<I", ext, 1024 + 0x5C, 0x4)  # has_journal
    assert probe(Image(MIB, bytes(ext)).read)[0] == "ext3"
    struct.pack_into("<I", ext, 1024 + 0x60, 0x40)  # extents
    assert probe(Image(MIB, bytes(ext)).read)[0] == "ext4"
    assert probe(Image(MIB).read) == (None, "only zeros at its start")


@pytest.mark.parametrize("text", [
    "rhel { physical_volumes = 5 extent_size = 8192 }",
    'rhel { physical_volumes { } logical_volumes = ["x"] extent_size = 8192 }',
    'rhel { physical_volumes { pv0 = 1 } logical_volumes { root { status = 7 segment1 { } } } extent_size = 8192 }',
    'rhel { physical_volumes { pv0 { id = "A" pe_start = "x" } } extent_size = 8192 }',
    "rhel { physical_volumes { } extent_size = -1 }",
    'a { physical_volumes { } } b { physical_volumes { } }',
    "[ ] = {",
])
def test_hostile_metadata_shapes_are_reported(text):
    first, _ = two_disks(text)
    [pv] = discover([(first.read, first.size)])
    assert pv.reason.startswith("an LVM physical volume") and not pv.holds_volumes, pv.reason
