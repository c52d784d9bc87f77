"""Guest disks for file-level recovery: a VM whose disks hold what real guests hold.

``add_guest_vm`` adds a VM (default name ``guests``) to a running lab engine. Its disks are
built from images the lab writes itself with the real tools (sfdisk, lvm2, mkfs.xfs with a
protofile, mkfs.ext4 -d, mkswap, mkntfs + ntfscp, mkfs.vfat + mtools, mkfs.btrfs --rootdir,
cryptsetup), never by mounting anything on the host:

1. ``rhel``, GPT as a default RHEL install: p1 BIOS boot (no file system), p2 ``/boot``
   (ext4), p3 an LVM physical volume of VG ``rhel`` (named like the host's own VG on many
   backup hosts) holding ``root`` (XFS, 300 MiB, in two segments, the second before the first
   on the disk), ``swap`` and ``home`` (ext4, its second segment on disk 2).
2. ``rhel-data``: a partitionless disk that is the second PV of VG ``rhel``.
3. ``windows``, MBR: p1 "System Reserved" and p2 the system volume, both NTFS.
4. ``data``: a partitionless ext4 file system.
5. ``misc``, MBR with an extended partition: p1 LUKS2 (no key given), then logical p5 vfat
   (an EFI system partition), p6 btrfs, p7 ext2, p8 an LVM PV of VG ``broken`` whose metadata
   text was damaged after it was written, p9 an ext4 whose superblock claims more blocks than
   its partition holds (the kernel refuses to mount it).
6. ``../hostile`` (an alias with a slash and a leading dot, as a hostile engine user could
   choose): a partitionless ext4 file system holding a setuid-root copy of ``id``
   (``/suid-id``), a block device node 7,0 (``/loop0``, the host's first loop device) and a
   known text file, written with ``debugfs``.

lvm2 runs on loop devices of the images being built, with a private configuration (its
devices filter names only those loop devices, no udev, no metadata backups) and
``--driverloaded n``: it writes labels and metadata and never touches device-mapper. Where each
LV lies is taken from lvm2's own report (``lvs --segments``, ``pvs``), and the file system
images are written into those extents.

The disks are qcow2 with incremental backup enabled, like the sample disks. What each holds is
added to ``sample.json`` under ``vms.<name>.disks.<n>``: the alias and, per volume (``p2``,
``whole-disk``, ``rhel-root``...), its file system type and the sha256 of its whole content,
or ``readable: false`` with a word its reason contains; and its known files (size, sha256,
mode, uid, gid, and mtime where the builder sets it; symlinks with their target).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ovirt_borg.lab import LabError
from ovirt_borg.lab.model import Attachment, Disk, LabEngine, LabLayout, new_id, timestamp
from ovirt_borg.lab.sample import file_sha256, tool

log = logging.getLogger(__name__)

MIB = 1 << 20
EXTENT = 4 * MIB
HOSTILE_ALIAS = "../hostile"
HOSTILE_TEXT = b"This guest file system is hostile.\n"
WHOLE_DISK = "whole-disk"
#: A fixed modification time (2021-03-04 05:06:07 UTC) for files whose times are checked.
MTIME = 1614834367
_LVM_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}

Files = dict[str, dict[str, Any]]


def add_guest_vm(engine: LabEngine, name: str = "guests", *, seed: int = 19) -> dict[str, Any]:
    """Create the VM ``name`` with the guest disks; return its ``sample.json`` entry.

    Given the running lab engine (the caller holds its lock). Raises ``LabError`` when a tool
    fails and ``ApiFault`` 409 when the name is taken.
    """
    layout = LabLayout(engine.state_file.parent)
    vm = engine.add_vm(name=name, cluster={"id": engine.inv.clusters[0].id}, ovf=None,
                       description="lab VM with the guest disks of file-level recovery")
    vm.status = "up"
    sd = engine.inv.storage_domains[0]
    rng = random.Random(seed)
    info: dict[str, Any] = {"id": vm.id, "status": vm.status, "disks": {}}
    with tempfile.TemporaryDirectory(dir=sd.path, prefix=".guests-") as tmp:
        work = Path(tmp)
        disks = _build_disks(work, rng)
        for index, (alias, raw, volumes) in enumerate(disks, start=1):
            disk_id = new_id()
            path = Path(sd.path) / f"{disk_id}.qcow2"
            size = raw.stat().st_size
            tool("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
            raw.unlink()
            engine.inv.disks.append(Disk(
                id=disk_id, image_id=new_id(), name=alias, format="cow", provisioned_size=size,
                path=str(path), storage_domain_id=sd.id, backup="incremental", created=timestamp()))
            vm.attachments.append(Attachment(disk_id=disk_id, bootable=index == 1))
            info["disks"][str(index)] = {"id": disk_id, "alias": alias, "volumes": volumes}
    engine.save()
    sample = json.loads(layout.sample.read_text())
    sample["vms"][name] = info
    layout.sample.write_text(json.dumps(sample, indent=1))
    log.info("added guest VM %s with %d disks", name, len(disks))
    return info


def _build_disks(work: Path, rng: random.Random) -> list[tuple[str, Path, dict[str, Any]]]:
    """Build every guest disk as a raw image in ``work``: (alias, raw path, volumes)."""
    rhel, rhel_data = _rhel_disks(work / "rhel", rng)
    return [("rhel", *rhel), ("rhel-data", *rhel_data), ("windows", *_windows_disk(work / "windows", rng)),
            ("data", *_data_disk(work / "data", rng)), ("misc", *_misc_disk(work / "misc", rng)),
            (HOSTILE_ALIAS, *_hostile_disk(work / "hostile"))]


# -- the disks -----------------------------------------------------------------------------------


def _rhel_disks(work: Path, rng: random.Random) -> tuple[tuple[Path, dict], tuple[Path, dict]]:
    """The two disks of an LVM guest: GPT with /boot and a PV, and a partitionless second PV."""
    work.mkdir()
    disk1, disk2 = work / "disk1.raw", work / "disk2.raw"
    _blank(disk1, 480 * MIB)
    _blank(disk2, 32 * MIB)
    parts = _partition(disk1, "label: gpt\n"
                       "start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n"
                       "size=32MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"
                       "type=E6D6D379-F507-44C2-A23C-238F2A3DF928\n")
    boot_files: Files = {}
    boot = _ext4_image(work / "boot", 32 * MIB, "boot", {
        "grub2/grub.cfg": b"set default=0\nmenuentry 'Lab Linux' { linux /vmlinuz root=/dev/mapper/rhel-root }\n",
        "vmlinuz": rng.randbytes(256 << 10),
    }, boot_files)
    _write_at(disk1, parts[1][0], boot)
    with _lvm(work) as lvm:
        pv1 = lvm.attach(disk1, parts[2][0], parts[2][1])
        pv2 = lvm.attach(disk2)
        lvm.run("pvcreate", "-ff", "-y", pv1, pv2)
        lvm.run("vgcreate", "-s", f"{EXTENT >> 20}m", "rhel", pv1, pv2)
        # root: extent 0 high on the disk, the other 74 before it, so a reader that does not
        # follow the segments in order reads the wrong bytes from the start of the LV.
        lvm.run("lvcreate", "-an", "-Zn", "-y", "-l", "1", "-n", "root", "rhel", f"{pv1}:100")
        lvm.run("lvextend", "-y", "-l", "+74", "rhel/root", f"{pv1}:10-83")
        lvm.run("lvcreate", "-an", "-Zn", "-y", "-l", "2", "-n", "swap", "rhel", f"{pv1}:0-1")
        lvm.run("lvcreate", "-an", "-Zn", "-y", "-l", "2", "-n", "home", "rhel", f"{pv1}:2-3")
        lvm.run("lvextend", "-y", "-l", "+4", "rhel/home", f"{pv2}:0-3")
        extents = lvm.extents("rhel", {pv1: (disk1, parts[2][0]), pv2: (disk2, 0)})
    root_files: Files = {}
    root = _xfs_image(work / "root", 75 * EXTENT, rng, root_files)
    swap = work / "swap.img"
    _blank(swap, 2 * EXTENT)
    tool("mkswap", "-q", str(swap))
    home_files: Files = {}
    home = _ext4_image(work / "home", 6 * EXTENT, "home", {
        "alice/notes.txt": b"Remember the milk.\n",
        "alice/photo.raw": rng.randbytes(3 * MIB),
        "bob/.bashrc": b"export EDITOR=vi\n",
    }, home_files, owners={"alice": 1000, "bob": 1001})
    for lv, image in (("root", root), ("swap", swap), ("home", home)):
        _write_extents(image, extents[lv])
    volumes1 = {
        "p1": {"readable": False, "reason": "no file system"},
        "p2": {"fstype": "ext4", "sha256": file_sha256(boot), "files": boot_files},
        "p3": {"pv_of": "rhel"},
        "rhel-root": {"fstype": "xfs", "sha256": file_sha256(root), "files": root_files},
        "rhel-swap": {"readable": False, "reason": "swap"},
        "rhel-home": {"fstype": "ext4", "sha256": file_sha256(home), "files": home_files},
    }
    volumes2 = {WHOLE_DISK: {"pv_of": "rhel"}}
    return (disk1, volumes1), (disk2, volumes2)


def _windows_disk(work: Path, rng: random.Random) -> tuple[Path, dict[str, Any]]:
    """MBR with two NTFS partitions, as Windows installs itself on BIOS machines."""
    work.mkdir()
    disk = work / "disk.raw"
    _blank(disk, 80 * MIB)
    parts = _partition(disk, "label: dos\nstart=2048, size=16MiB, type=7, bootable\nsize=60MiB, type=7\n")
    reserved_files: Files = {}
    reserved = _ntfs_image(work / "reserved", 16 * MIB, "System Reserved", parts[0][0], {
        "bootmgr": rng.randbytes(64 << 10)}, reserved_files)
    system_files: Files = {}
    system = _ntfs_image(work / "system", 60 * MIB, "Windows", parts[1][0], {
        "hosts": b"127.0.0.1 localhost\r\n",
        "Überweisung März.pdf": rng.randbytes(300 << 10),
    }, system_files)
    _write_at(disk, parts[0][0], reserved)
    _write_at(disk, parts[1][0], system)
    return disk, {"p1": {"fstype": "ntfs", "sha256": file_sha256(reserved), "files": reserved_files},
                  "p2": {"fstype": "ntfs", "sha256": file_sha256(system), "files": system_files}}


def _data_disk(work: Path, rng: random.Random) -> tuple[Path, dict[str, Any]]:
    """A data disk formatted without a partition table."""
    work.mkdir()
    files: Files = {}
    disk = _ext4_image(work / "fs", 24 * MIB, "data", {
        "notes.txt": b"The data disk has no partition table.\n",
        "projects/plan.bin": rng.randbytes(2 * MIB),
    }, files)
    return disk, {WHOLE_DISK: {"fstype": "ext4", "sha256": file_sha256(disk), "files": files}}


def _misc_disk(work: Path, rng: random.Random) -> tuple[Path, dict[str, Any]]:
    """MBR with a LUKS partition and logical vfat, btrfs, ext2 and damaged-LVM partitions."""
    work.mkdir()
    disk = work / "disk.raw"
    _blank(disk, 128 * MIB)
    parts = _partition(disk, "label: dos\nstart=2048, size=32MiB, type=83\ntype=5\n"
                             "size=16MiB, type=ef\nsize=24MiB, type=83\nsize=8MiB, type=83\n"
                             "size=8MiB, type=8e\nsize=8MiB, type=83\n")
    by_number = {number: (offset, size) for offset, size, number in parts}
    luks = work / "luks.img"
    _blank(luks, 32 * MIB)
    key = work / "key"
    key.write_bytes(rng.randbytes(32))
    tool("cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--pbkdf", "pbkdf2",
          "--pbkdf-force-iterations", "1000", "--key-file", str(key), str(luks))
    _write_at(disk, by_number[1][0], luks)
    esp_files: Files = {}
    esp = _vfat_image(work / "esp", 16 * MIB, {"EFI/BOOT/BOOTX64.EFI": rng.randbytes(96 << 10),
                                               "A long file name.txt": b"vfat keeps long names\n"}, esp_files)
    _write_at(disk, by_number[5][0], esp)
    btrfs_files: Files = {}
    btrfs = _btrfs_image(work / "btrfs", 24 * MIB, {"srv/www/index.html": b"<h1>lab</h1>\n",
                                                    "srv/blob.bin": rng.randbytes(MIB)}, btrfs_files)
    _write_at(disk, by_number[6][0], btrfs)
    ext2_files: Files = {}
    ext2 = _ext4_image(work / "ext2", 8 * MIB, "old", {"readme.txt": b"an ext2 file system\n"},
                       ext2_files, fs_type="ext2")
    _write_at(disk, by_number[7][0], ext2)
    with _lvm(work) as lvm:
        pv = lvm.attach(disk, *by_number[8])
        lvm.run("pvcreate", "-ff", "-y", pv)
        lvm.run("vgcreate", "-s", "1m", "broken", pv)
        lvm.run("lvcreate", "-an", "-Zn", "-y", "-l", "2", "-n", "lost", "broken")
    _damage_lvm_metadata(disk, by_number[8][0])
    # An ext4 whose superblock claims more blocks than its partition has: the kernel refuses it.
    bad = _ext4_image(work / "bad", 8 * MIB, "bad", {"lost.txt": b"never seen\n"}, {})
    tool("debugfs", "-w", "-R", "ssv blocks_count 1000000", str(bad))
    _write_at(disk, by_number[9][0], bad)
    return disk, {"p1": {"readable": False, "reason": "encrypted"},
                  "p5": {"fstype": "vfat", "sha256": file_sha256(esp), "files": esp_files},
                  "p6": {"fstype": "btrfs", "sha256": file_sha256(btrfs), "files": btrfs_files},
                  "p7": {"fstype": "ext2", "sha256": file_sha256(ext2), "files": ext2_files},
                  "p8": {"readable": False, "reason": "checksum"},
                  "p9": {"readable": False, "reason": "could not be mounted"}}


def _hostile_disk(work: Path) -> tuple[Path, dict[str, Any]]:
    """A partitionless ext4 disk with a setuid-root binary and a block device node."""
    work.mkdir()
    raw = work / "disk.raw"
    _blank(raw, 16 * MIB)
    tool("mkfs.ext4", "-q", "-F", "-L", "hostile", "-E", "root_owner=0:0", str(raw))
    text = work / "readme.txt"
    text.write_bytes(HOSTILE_TEXT)
    suid = Path(shutil.which("id") or "/usr/bin/id")
    commands = work / "debugfs.cmd"
    # 0104755: a regular file, setuid, rwxr-xr-x; 060666: a block device anyone may open.
    commands.write_text(f"write {text} readme.txt\n"
                        f"write {suid} suid-id\nsif suid-id mode 0104755\n"
                        "sif suid-id uid 0\nsif suid-id gid 0\n"
                        "mknod loop0 b 7 0\nsif loop0 mode 060666\n")
    tool("debugfs", "-w", "-f", str(commands), str(raw))
    files = {"/readme.txt": _known(HOSTILE_TEXT), "/suid-id": _known(suid.read_bytes(), mode=0o4755)}
    return raw, {WHOLE_DISK: {"fstype": "ext4", "sha256": file_sha256(raw), "files": files,
                              "setuid": "/suid-id", "device": "/loop0"}}


# -- file system images --------------------------------------------------------------------------


def _source_tree(root: Path, contents: dict[str, bytes], files: Files, *,
                 owners: dict[str, int] | None = None) -> None:
    """Write ``contents`` (relative path -> bytes) below ``root``, 0644 files with the fixed
    mtime, owned by root or by ``owners`` (top directory -> uid = gid); note them in ``files``."""
    owners = owners or {}
    for relative, content in contents.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        owner = owners.get(relative.split("/", 1)[0], 0)
        os.chown(path, owner, owner)
        os.chmod(path, 0o640 if owner else 0o644)
        os.utime(path, (MTIME, MTIME))
        files["/" + relative] = _known(content, mode=0o640 if owner else 0o644, uid=owner, gid=owner,
                                       mtime=MTIME)
    for top, owner in owners.items():
        for directory in [root / top, *(p for p in (root / top).rglob("*") if p.is_dir())]:
            os.chown(directory, owner, owner)


def _ext4_image(work: Path, size: int, label: str, contents: dict[str, bytes], files: Files, *,
                owners: dict[str, int] | None = None, fs_type: str = "ext4") -> Path:
    """An ext2/3/4 image of ``size`` bytes holding ``contents`` (mkfs -d: times and owners kept)."""
    work.mkdir()
    tree = work / "tree"
    tree.mkdir()
    _source_tree(tree, contents, files, owners=owners)
    image = work / "fs.img"
    _blank(image, size)
    tool(f"mkfs.{fs_type}", "-q", "-F", "-L", label, "-d", str(tree), "-E", "root_owner=0:0", str(image))
    return image


def _xfs_image(work: Path, size: int, rng: random.Random, files: Files) -> Path:
    """An XFS root file system made from a protofile (mkfs.xfs -p), as RHEL installs it:
    known files, a setuid file, symlinks inside the tree and ones pointing out of it (to
    /etc/shadow, and up past the root), which must resolve inside the guest, never the host."""
    work.mkdir()
    sources = {"hostname": b"guest.lab.example\n",
               "os-release": b'NAME="Lab Linux"\nVERSION_ID="9.4"\nID="rhel"\n',
               "random.bin": rng.randbytes(2 * MIB),
               "UTC": b"TZif2 (a stand-in)\n",
               "sudo": rng.randbytes(32 << 10),
               "secret": b"root's own\n"}
    for name, content in sources.items():
        (work / name).write_bytes(content)
    proto = work / "proto"
    proto.write_text(f"""/dev/null
0 0
d--755 0 0
etc d--755 0 0
hostname ---644 0 0 {work / 'hostname'}
os-release ---644 0 0 {work / 'os-release'}
localtime l--777 0 0 ../usr/share/zoneinfo/UTC
shadow-link l--777 0 0 /etc/shadow
zoneinfo l--777 0 0 /usr/share/zoneinfo
up l--777 0 0 ../../../../..
$
usr d--755 0 0
bin d--755 0 0
sudo -u-755 0 0 {work / 'sudo'}
$
share d--755 0 0
zoneinfo d--755 0 0
UTC ---644 0 0 {work / 'UTC'}
$
$
$
var d--755 0 0
lib d--755 0 0
random.bin ---640 0 4 {work / 'random.bin'}
$
$
root d--550 0 0
secret ---600 0 0 {work / 'secret'}
$
$
""")
    image = work / "fs.img"
    _blank(image, size)
    tool("mkfs.xfs", "-q", "-f", "-L", "root", "-p", str(proto), str(image))
    files.update({
        "/etc/hostname": _known(sources["hostname"]),
        "/etc/os-release": _known(sources["os-release"]),
        "/usr/bin/sudo": _known(sources["sudo"], mode=0o4755),
        "/usr/share/zoneinfo/UTC": _known(sources["UTC"]),
        "/var/lib/random.bin": _known(sources["random.bin"], mode=0o640, gid=4),
        "/root/secret": _known(sources["secret"], mode=0o600),
        "/etc/localtime": {"symlink": "../usr/share/zoneinfo/UTC"},
        "/etc/shadow-link": {"symlink": "/etc/shadow"},
        "/etc/zoneinfo": {"symlink": "/usr/share/zoneinfo"},
        "/etc/up": {"symlink": "../../../../.."},
    })
    return image


def _ntfs_image(work: Path, size: int, label: str, start: int, contents: dict[str, bytes],
                files: Files) -> Path:
    """An NTFS image (mkntfs) with files in its root directory (ntfscp makes no directories)."""
    work.mkdir()
    image = work / "fs.img"
    _blank(image, size)
    tool("mkntfs", "-q", "-F", "-f", "-L", label, "-s", "512", "-p", str(start // 512),
          "-H", "255", "-S", "63", str(image))
    for name, content in contents.items():
        source = work / "source"
        source.write_bytes(content)
        tool("ntfscp", "-f", str(image), str(source), name)
        files["/" + name] = _known(content)
    return image


def _vfat_image(work: Path, size: int, contents: dict[str, bytes], files: Files) -> Path:
    """A FAT image (mkfs.vfat) written with mtools."""
    work.mkdir()
    image = work / "fs.img"
    _blank(image, size)
    tool("mkfs.vfat", "-n", "ESP", str(image))
    made: set[str] = set()
    for relative, content in contents.items():
        parts = relative.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in made:
                tool("mmd", "-i", str(image), f"::/{directory}")
                made.add(directory)
        source = work / "source"
        source.write_bytes(content)
        tool("mcopy", "-i", str(image), str(source), f"::/{relative}")
        files["/" + relative] = _known(content)
    return image


def _btrfs_image(work: Path, size: int, contents: dict[str, bytes], files: Files) -> Path:
    """A btrfs image made from a directory (mkfs.btrfs --rootdir)."""
    work.mkdir()
    tree = work / "tree"
    tree.mkdir()
    _source_tree(tree, contents, files)
    image = work / "fs.img"
    _blank(image, size)
    tool("mkfs.btrfs", "-q", "--mixed", "-L", "srv", "--rootdir", str(tree), str(image))
    return image


# -- partitions and LVM --------------------------------------------------------------------------


def _partition(disk: Path, script: str) -> list[tuple[int, int, int]]:
    """Write a partition table with sfdisk; return (offset, size, number) per partition, as
    sfdisk reports them (the extended partition's container left out)."""
    tool("sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(disk), stdin=script)
    table = json.loads(tool("sfdisk", "--json", str(disk)))["partitiontable"]
    sector = table.get("sectorsize", 512)
    out = []
    for part in table["partitions"]:
        if part.get("type") in ("5", "f", "85"):
            continue
        number = int(part["node"][len(str(disk)):].lstrip("p"))
        out.append((part["start"] * sector, part["size"] * sector, number))
    return out


class _Lvm:
    """lvm2 commands confined to the loop devices this build attaches."""

    def __init__(self, work: Path):
        self.dir = work / "lvm"
        self.dir.mkdir()
        self.loops: list[str] = []

    def attach(self, image: Path, offset: int = 0, size: int | None = None) -> str:
        command = ["losetup", "-f", "--show"]
        if offset or size:
            command += ["--offset", str(offset), "--sizelimit", str(size)]
        device = tool(*command, str(image)).strip()
        self.loops.append(device)
        accept = ", ".join(f'"a|^{loop}$|"' for loop in self.loops)
        (self.dir / "lvm.conf").write_text(
            f'devices {{ filter = [ {accept}, "r|.*|" ] use_devicesfile = 0 '
            'obtain_device_list_from_udev = 0 hints = "none" }\n'
            f'global {{ use_lvmlockd = 0 event_activation = 0 locking_dir = "{self.dir}/lock" }}\n'
            "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }\n"
            "backup { backup = 0 archive = 0 }\n")
        return device

    def run(self, command: str, *args: str) -> str:
        return tool(command, "--driverloaded", "n", *args,
                     env={**os.environ, **_LVM_ENV, "LVM_SYSTEM_DIR": str(self.dir)})

    def extents(self, vg: str, where: dict[str, tuple[Path, int]]) -> dict[str, list[tuple[Path, int, int]]]:
        """Per LV, its (disk image, offset, length) runs in LV order, from lvm2's own report.

        ``where`` gives the image and offset of each PV's loop device."""
        pe_start = {}
        for pv in json.loads(self.run("pvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                                      "-o", "pv_name,pe_start"))["report"][0]["pv"]:
            pe_start[pv["pv_name"]] = int(pv["pe_start"])
        report = json.loads(self.run("lvs", "--reportformat", "json", "--segments", "-o",
                                     "lv_name,seg_start_pe,seg_pe_ranges", vg))["report"][0]["seg"]
        runs: dict[str, list[tuple[int, Path, int, int]]] = {}
        for seg in report:
            device, extent_range = seg["seg_pe_ranges"].rsplit(":", 1)
            first, last = (int(x) for x in extent_range.split("-"))
            image, base = where[device]
            runs.setdefault(seg["lv_name"], []).append(
                (int(seg["seg_start_pe"]), image, base + pe_start[device] + first * EXTENT,
                 (last - first + 1) * EXTENT))
        return {lv: [(image, offset, length) for _, image, offset, length in sorted(segments)]
                for lv, segments in runs.items()}


@contextlib.contextmanager
def _lvm(work: Path) -> Iterator[_Lvm]:
    lvm = _Lvm(work)
    try:
        yield lvm
    finally:
        for device in lvm.loops:
            subprocess.run(["losetup", "-d", device], capture_output=True)


def _write_extents(image: Path, runs: list[tuple[Path, int, int]]) -> None:
    """Write a volume image into the runs of disk images that make up its LV."""
    position = 0
    for disk, offset, length in runs:
        _write_at(disk, offset, image, source_offset=position, length=length)
        position += length
    if position != image.stat().st_size:
        raise LabError(f"{image} has {image.stat().st_size} bytes, its LV {position}")


def _damage_lvm_metadata(disk: Path, pv_offset: int) -> None:
    """Flip a byte in the middle of the PV's metadata text (its checksum no longer matches)."""
    with open(disk, "r+b") as f:
        f.seek(pv_offset + 4096)  # the first metadata area starts at 4 KiB, its header first
        area = f.read(MIB - 4096)
        text_start = area.rindex(b"broken {")  # the newest copy: the one the header points at
        f.seek(pv_offset + 4096 + text_start + 20)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x20]))


# -- helpers -------------------------------------------------------------------------------------


def _blank(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _write_at(disk: Path, offset: int, image: Path, *, source_offset: int = 0, length: int | None = None) -> None:
    """Copy ``length`` bytes (all) of ``image`` from ``source_offset`` into ``disk`` at
    ``offset``, skipping holes so the disk stays sparse."""
    length = image.stat().st_size - source_offset if length is None else length
    with open(image, "rb") as src, open(disk, "r+b") as dst:
        position = source_offset
        end = source_offset + length
        while position < end:
            try:
                data_start = os.lseek(src.fileno(), position, os.SEEK_DATA)
            except OSError:
                break  # only a hole is left
            if data_start >= end:
                break
            hole = min(os.lseek(src.fileno(), data_start, os.SEEK_HOLE), end)
            src.seek(data_start)
            remaining = hole - data_start
            dst.seek(offset + data_start - source_offset)
            while remaining:
                piece = src.read(min(remaining, 4 * MIB))
                dst.write(piece)
                remaining -= len(piece)
            position = hole


def _known(content: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0,
           mtime: int | None = None) -> dict[str, Any]:
    known: dict[str, Any] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest(),
                             "mode": mode, "uid": uid, "gid": gid}
    if mtime is not None:
        known["mtime"] = mtime
    return known
