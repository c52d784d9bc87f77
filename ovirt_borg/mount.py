"""File-level recovery: mount an archive and every file system of its VM's disks, read-only.

``mount_archive`` runs ``borg mount`` of the archive at ``MOUNTPOINT/.archive``, finds each
disk's volumes in user space (``ovirt_borg.volumes``: MBR and GPT partitions, partitionless
disks, LVM logical volumes read from their metadata, across the VM's disks) and mounts every
file system it can read at ``MOUNTPOINT/<disk>/<volume>`` (``p2``, ``whole-disk``,
``rhel-root``). A contiguous volume is a read-only loop device over its range of the disk image
(``losetup -r --offset --sizelimit``); an LV made of several pieces is first shown as one file
by a small FUSE file system (``ovirt_borg.volumefs``, at ``MOUNTPOINT/.volumes``). Nothing needs
device-mapper, and no guest volume group is ever activated on the host. The kernel mounts ext2/3/4,
XFS and btrfs; ntfs-3g mounts NTFS and fusefat vfat (both FUSE) when the kernel has no driver.
What cannot be read (encrypted, swap, unknown, thin or RAID LVs, damaged metadata...) is listed
with the reason in ``MOUNTPOINT/README`` and never stops the rest. ``umount_archive`` undoes it.

Every guest file system is hostile: each mount is ``nosuid,nodev,noexec`` (a setuid binary or a
device node in a guest gives nothing on this host), every directory made here is 0700, and no
name a guest or the engine chose is used in a host path before ``host_name`` made it one harmless
path component. Every step is recorded before it is taken (``ovirt_borg.mountrecord``), so an
error, a signal or a crash midway is undone from the record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ovirt_borg import archive, borgcli, sidecar as sc, volumefs, volumes as vol
from ovirt_borg.errors import NotFound
from ovirt_borg.mountrecord import (
    RECORD_NAME, MountError, MountRecord, inside, loop_backing, mounts_below, run, signals_deferred,
)

__all__ = ["ARCHIVE_DIR", "README_NAME", "MountError", "MountedArchive", "host_name", "mount_archive",
           "mounts_below", "printable", "umount_archive", "unique_name"]

log = logging.getLogger(__name__)

ARCHIVE_DIR = ".archive"
VOLUMES_DIR = ".volumes"
VOLUMES_LOG = ".volumes.log"
BORG_LOG = ".borg.log"
README_NAME = "README"

#: Options of every guest file system mount, whatever its type: nothing in a guest may act
#: as a setuid program, a device or an executable on this host.
SAFE_OPTIONS = ("ro", "nosuid", "nodev", "noexec")
#: Per type: read without replaying a journal or log (the image is read-only, and a replay
#: would trust the guest's log); XFS also without its UUID, so a second night of the same VM
#: (or a clone of a file system the host mounts) can be mounted beside the first. Under
#: ntfs-3g and fusefat the files are root's alone (umask 077 and the FUSE default).
_KERNEL_OPTIONS = {"ext4": ("noload",), "xfs": ("norecovery", "nouuid"), "btrfs": ("rescue=nologreplay",),
                   "vfat": ("umask=077",), "exfat": ("umask=077",)}
_NTFS_OPTIONS = ("umask=077",)
_KERNEL_TYPES = {"ext2": "ext4", "ext3": "ext4", "ext4": "ext4", "xfs": "xfs", "btrfs": "btrfs"}
_NAME_MAX = 255
_VOLUMES_START_SECONDS = 30


# -- names ---------------------------------------------------------------------------------------


def host_name(name: str) -> str:
    """Return a guest- or engine-chosen name as one harmless path component of this host.

    Given any text (a disk alias, a VG or LV name, possibly with undecodable bytes carried as
    surrogates). Returns a non-empty name without ``/``, not starting with ``.`` (so never
    ``.`` or ``..``, nor hidden), without control or invisible format characters, at most 255
    bytes. Such characters, ``%`` itself and a leading ``.`` are written as ``%XX`` (their
    UTF-8 bytes), so different names stay different; a name longer than 255 bytes is cut and
    ends with ``~`` and 16 hex digits of its sha256. The empty name becomes ``%``.
    """
    text = _escaped(name, lambda index, char: char in "/%" or (index == 0 and char == ".")) or "%"
    encoded = text.encode("utf-8")
    if len(encoded) <= _NAME_MAX:
        return text
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    head = encoded[:_NAME_MAX - 17].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def printable(text: str) -> str:
    """Guest-chosen text (a VG name in a message) with control and invisible format characters
    written as ``%XX``, so that it cannot move a terminal's cursor or reorder what it shows."""
    return _escaped(text, lambda index, char: False)


def _escaped(text: str, also: Callable[[int, str], bool]) -> str:
    out = []
    for index, char in enumerate(text):
        if also(index, char) or unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogateescape"))
        else:
            out.append(char)
    return "".join(out)


def unique_name(name: str, taken: set[str]) -> str:
    """Return ``name``, or ``name~2``, ``name~3``... the first not in ``taken``; adds it there."""
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        suffix = f"~{number}"
        candidate = name.encode()[:_NAME_MAX - len(suffix)].decode("utf-8", "ignore") + suffix
    taken.add(candidate)
    return candidate


# -- what a mount shows --------------------------------------------------------------------------


@dataclass
class MountedVolume:
    """A volume of a disk: where it is mounted (``path``) or why not (``reason``)."""

    name: str  # its directory's name below the disk's
    what: str  # e.g. "partition 2 (GPT, Linux LVM)", "logical volume rhel/root"
    size: int
    fstype: str | None = None
    path: str | None = None
    reason: str | None = None
    holds_volumes: bool = False  # an LVM PV whose logical volumes are listed too
    driver: str | None = None  # what mounted it: "kernel", "ntfs-3g" or "fusefat"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "what": self.what, "size": self.size, "fstype": self.fstype,
                "mounted": self.path is not None, "path": self.path, "driver": self.driver,
                "reason": self.reason}


@dataclass
class MountedDisk:
    alias: str
    id: str
    name: str  # its directory's name below the mountpoint
    volumes: list[MountedVolume] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "id": self.id, "name": self.name,
                "volumes": [v.as_dict() for v in self.volumes]}


@dataclass
class MountedArchive:
    archive: str
    vm: str
    mountpoint: Path
    disks: list[MountedDisk]

    def as_dict(self) -> dict[str, Any]:
        return {"archive": self.archive, "vm": self.vm, "mountpoint": str(self.mountpoint),
                "disks": [d.as_dict() for d in self.disks]}

    def volume(self, disk_name: str, volume_name: str) -> MountedVolume | None:
        for disk in self.disks:
            if disk.name == disk_name:
                return next((v for v in disk.volumes if v.name == volume_name), None)
        return None


# -- mount ---------------------------------------------------------------------------------------


def mount_archive(repo: archive.Repo, archive_name: str, mountpoint: Path, *,
                  only: set[tuple[str, str]] | None = None) -> MountedArchive:
    """Mount the archive and its disks' file systems read-only under ``mountpoint``.

    Given the repository, the archive name, a new or empty directory of this user, and
    optionally the only volumes to mount, as (disk directory, volume directory) names (the rest
    are listed, not mounted). Returns what was found: per disk, per volume, where it is mounted
    or why not. On any error or signal everything made so far is undone before the error is
    raised (``MountError``, ``NotFound``, a Borg error, ``Interrupted``).
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    made = _prepare_mountpoint(mountpoint)
    mountpoint = mountpoint.resolve()
    record = MountRecord.create(mountpoint, archive_name, made_mountpoint=made)
    try:
        archive_dir = record.make_dir(ARCHIVE_DIR)
        borg_log = record.write_file(BORG_LOG, "")
        step = record.add("borg", target=ARCHIVE_DIR, source="borgfs", fstype="fuse")
        with signals_deferred():
            borg = borgcli.start_mount(repo, archive_name, archive_dir, log_file=borg_log, options=("noexec",))
            record.update(step, pid=borg.pid)
        if not record.wait_mounted(step, borg):
            borgcli.raise_for_mount(repo, archive_name, borg.wait(), borg_log)
        vm_name, images = _archive_disks(archive_dir, archive_name)
        result = MountedArchive(archive_name, vm_name, mountpoint, [])
        _mount_volumes(record, result, images, only)
        record.write_file(README_NAME, _readme(result))
    except BaseException:
        with signals_deferred():
            try:
                record.undo()
            except MountError as e:
                log.error("could not undo the mount at %s: %s", mountpoint, e)
        raise
    return result


def umount_archive(mountpoint: Path) -> None:
    """Undo ``mount_archive``: unmount, detach and remove what its record names, newest first.

    Raises ``MountError`` without touching anything when ``mountpoint`` has no record or a
    mount below it that the record does not name; raises it midway when a step fails (a file
    system still in use): the record then keeps what is left, for the next try.
    """
    mountpoint = Path(os.path.abspath(mountpoint)).resolve()
    record = MountRecord.load(mountpoint)
    with signals_deferred():
        record.undo()


def _prepare_mountpoint(mountpoint: Path) -> bool:
    """Make sure ``mountpoint`` can be used: made here (0700), or an empty directory of this
    user that no one else may write to. Returns True when it was made here; raises
    ``MountError``."""
    try:
        info = os.lstat(mountpoint)
    except FileNotFoundError:
        mountpoint.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(mountpoint, 0o700)
        os.chmod(mountpoint, 0o700)
        return True
    if not stat.S_ISDIR(info.st_mode):
        raise MountError(f"{mountpoint} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise MountError(f"{mountpoint} must belong to this user and be writable by no one else "
                         f"(it is mode {stat.S_IMODE(info.st_mode):04o}, uid {info.st_uid}); "
                         "or name a new directory, which is made 0700")
    if (mountpoint / RECORD_NAME).exists():
        raise MountError(f"{mountpoint} holds a mount already; run 'ovirt-borg umount {mountpoint}' first")
    if any(os.scandir(mountpoint)):
        raise MountError(f"{mountpoint} is not empty; name an empty or a new directory")
    return False


def _archive_disks(archive_dir: Path, archive_name: str) -> tuple[str, list[tuple[str, str, Path]]]:
    """The VM's name and (alias, id, image path) of each disk in the mounted archive, from its
    sidecar. Raises ``NotFound`` when the archive holds no ovirt-borg sidecar, ``MountError``
    when the sidecar names an image outside the archive or one that is not a regular file."""
    found = sorted(p for p in archive_dir.iterdir() if (p / sc.SIDECAR_NAME).is_file())
    if len(found) != 1:
        raise NotFound(f"archive {archive_name} holds {len(found)} ovirt-borg sidecars, not one; "
                       "is it an archive of 'ovirt-borg backup'?")
    try:
        sidecar = sc.parse((found[0] / sc.SIDECAR_NAME).read_bytes())
    except sc.SidecarInvalid as e:
        raise MountError(f"the sidecar of archive {archive_name} is damaged: {e}") from None
    disks = []
    for record in sidecar.disks:
        image = archive_dir / record.image
        # A tampered sidecar could point anywhere: the image must be a plain file inside.
        if not inside(record.image) or os.path.realpath(image) != str(image) or \
                not stat.S_ISREG(os.lstat(image).st_mode):
            raise MountError(f"the sidecar of archive {archive_name} names the image "
                             f"{record.image!r}, which is not a file in the archive")
        disks.append((record.alias, record.id, image))
    return sidecar.vm_name, disks


def _mount_volumes(record: MountRecord, result: MountedArchive, images: list[tuple[str, str, Path]],
                   only: set[tuple[str, str]] | None) -> None:
    """Find every volume of the disk images and mount those that can be read (all, or ``only``)."""
    files = [open(image, "rb") for _, _, image in images]
    try:
        readers = [_reader(f) for f in files]
        found = vol.discover([(read, os.fstat(f.fileno()).st_size) for read, f in zip(readers, files, strict=True)])
    finally:
        for f in files:
            f.close()
    taken = {README_NAME}
    for alias, disk_id, _ in images:
        result.disks.append(MountedDisk(alias, disk_id, unique_name(host_name(alias), taken)))
    names: dict[int, set[str]] = {index: set() for index in range(len(images))}
    plans = []
    for volume in found:
        disk = result.disks[volume.disk]
        mounted = MountedVolume(unique_name(host_name(volume.name), names[volume.disk]),
                                printable(volume.what), volume.size, volume.fstype,
                                reason=printable(volume.reason) if volume.reason else None,
                                holds_volumes=volume.holds_volumes)
        disk.volumes.append(mounted)
        if mounted.reason is None:
            mounted.reason = _no_driver(volume.fstype)
        if mounted.reason is None and (only is None or (disk.name, mounted.name) in only):
            plans.append((disk, mounted, volume))
    for disk in result.disks:
        record.make_dir(disk.name)
    pieced = [(mounted, volume) for _, mounted, volume in plans if len(volume.pieces) > 1]
    volume_files = _start_volume_server(record, pieced, images) if pieced else {}
    for disk, mounted, volume in plans:
        if len(volume.pieces) > 1:
            backing, offset, size = volume_files[id(mounted)], 0, None
        else:
            piece = volume.pieces[0]
            backing, offset, size = images[piece.disk][2], piece.offset, piece.length
        _mount_volume(record, disk, mounted, backing, offset, size)
    for disk in result.disks:
        for mounted in disk.volumes:
            where = f"{disk.name}/{mounted.name}"
            if mounted.holds_volumes:
                log.debug("%s: %s", where, mounted.reason)
            elif mounted.path is None and (only is None or (disk.name, mounted.name) in only):
                log.warning("%s (%s) is not mounted: %s", where, mounted.what, mounted.reason)


def _reader(f) -> vol.Reader:
    fd = f.fileno()
    return lambda offset, size: os.pread(fd, size, offset) if size > 0 else b""


def _no_driver(fstype: str | None) -> str | None:
    """Why this host cannot mount ``fstype``, None when it can."""
    if fstype in _KERNEL_TYPES:
        return None
    if fstype == "ntfs":
        return None if _which("ntfs-3g") else "NTFS needs ntfs-3g on this host (Debian package ntfs-3g)"
    if fstype == "vfat":
        if _kernel_has("vfat") or _which("fusefat"):
            return None
        return "this host's kernel has no vfat and fusefat (Debian package fusefat) is not installed"
    if fstype == "exfat":
        return None if _kernel_has("exfat") else "this host's kernel has no exfat"
    return f"a {fstype} volume, which is not read"


def _which(program: str) -> bool:
    return shutil.which(program) is not None


def _kernel_has(fstype: str) -> bool:
    """True when the kernel mounts ``fstype``: built in, loaded, or a module it can load."""
    try:
        with open("/proc/filesystems") as f:
            if any(line.split()[-1] == fstype for line in f if line.strip()):
                return True
    except OSError:
        pass
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}/kernel/fs").glob(f"**/{fstype}.ko*"))


def _mount_volume(record: MountRecord, disk: MountedDisk, mounted: MountedVolume, backing: Path,
                  offset: int, size: int | None) -> None:
    """Attach one volume to a read-only loop device and mount it; a failure of this volume
    alone becomes its ``reason`` (what it made is undone), other errors propagate."""
    first = len(record.steps)
    relative = f"{disk.name}/{mounted.name}"
    try:
        target = record.make_dir(relative)
        step = record.add("loop", backing=str(backing), offset=offset)
        command = ["losetup", "-r", "-f", "--show"]
        if offset or size is not None:
            command += ["--offset", str(offset), "--sizelimit", str(size)]
        device = run([*command, str(backing)]).strip()
        record.update(step, device=device)
        if loop_backing(device) != (str(backing), offset):
            raise MountError(f"the loop device {device} is not attached to {backing}")
        mounted.driver = _mount_fs(record, relative, device, mounted.fstype or "")
        mounted.path = str(target)
    except MountError as e:
        mounted.reason = f"it could not be mounted: {e}"
        record.undo_steps(record.steps[first:])


def _mount_fs(record: MountRecord, relative: str, device: str, fstype: str) -> str:
    """Mount the file system on ``device`` at ``MOUNTPOINT/relative`` read-only, nosuid, nodev,
    noexec, with the kernel's driver or a FUSE one; return which (``kernel``, ``ntfs-3g``,
    ``fusefat``)."""
    target = str(record.mountpoint / relative)
    if fstype == "ntfs":
        driver = "ntfs-3g"
        step = record.add("mount", target=relative, source=device, fstype="fuseblk")
        run(["ntfs-3g", "-o", ",".join(SAFE_OPTIONS + _NTFS_OPTIONS), device, target])
    elif fstype == "vfat" and not _kernel_has("vfat"):
        driver = "fusefat"
        step = record.add("mount", target=relative, source="fusefat", fstype="fuse.fusefat")
        run(["fusefat", "-o", ",".join(SAFE_OPTIONS), device, target])
    else:
        driver = "kernel"
        kernel_type = _KERNEL_TYPES.get(fstype, fstype)
        step = record.add("mount", target=relative, source=device, fstype=kernel_type)
        options = ",".join(SAFE_OPTIONS + _KERNEL_OPTIONS.get(kernel_type, ()))
        run(["mount", "-t", kernel_type, "-o", options, device, target])
    record.mount_id(step)
    return driver


def _start_volume_server(record: MountRecord, pieced: list[tuple[MountedVolume, vol.Volume]],
                         images: list[tuple[str, str, Path]]) -> dict[int, Path]:
    """Start the volume file system for the volumes made of several pieces; return the file
    of each (by ``id`` of its MountedVolume). Raises ``MountError`` when it does not start."""
    directory = record.make_dir(VOLUMES_DIR)
    log_file = record.write_file(VOLUMES_LOG, "")
    documents, files = [], {}
    for number, (mounted, volume) in enumerate(pieced, start=1):
        name = f"v{number}"
        files[id(mounted)] = directory / name
        documents.append({"name": name, "size": volume.size,
                          "pieces": [[str(images[p.disk][2]), p.offset, p.length] for p in volume.pieces]})
    step = record.add("volumes", target=VOLUMES_DIR, source=volumefs.FSNAME, fstype="fuse")
    with signals_deferred():
        # A session of its own: it serves after this command ends, and a Ctrl-C here is not for it.
        server = subprocess.Popen([sys.executable, "-m", "ovirt_borg.volumefs", str(directory), str(log_file)],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        record.update(step, pid=server.pid)
    with contextlib.suppress(BrokenPipeError):
        server.stdin.write(json.dumps({"volumes": documents}).encode())
        server.stdin.close()
    if not record.wait_mounted(step, server, timeout=_VOLUMES_START_SECONDS):
        lines = log_file.read_text(errors="replace").strip().splitlines()
        raise MountError("the volume file system (ovirt_borg.volumefs) did not start: "
                         + (lines[-1] if lines else "no answer"))
    return files


def _readme(result: MountedArchive) -> str:
    """The plain-text ``README`` of a mount: every disk and volume, mounted or why not."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [f"Archive {result.archive} of VM {printable(result.vm)}, mounted by 'ovirt-borg mount' at {now}.",
             "Every file system is mounted read-only, nosuid, nodev, noexec.",
             f"Unmount with: ovirt-borg umount {result.mountpoint}", ""]
    for disk in result.disks:
        lines.append(f"{disk.name}/  disk {printable(disk.alias)} ({printable(disk.id)})")
        for volume in disk.volumes:
            if volume.path:
                state = f"{volume.fstype}, mounted at {disk.name}/{volume.name}/"
            else:
                state = ("" if volume.holds_volumes else "not mounted: ") + (volume.reason or "not asked for")
            lines.append(f"  {volume.name:<16} {volume.what}, {volume.size >> 20} MiB: {state}")
        lines.append("")
    return "\n".join(lines)
