"""File-level recovery: mount an archive and expose each disk's file systems read-only.

``mount_archive`` runs ``borg mount`` of the archive at ``MOUNTPOINT/.archive``, attaches each
disk image to a read-only loop device with partition scanning (``losetup -r -P``) and mounts
every partition that holds a file system read-only at ``MOUNTPOINT/<disk alias>[-pN]``.
``umount_archive`` undoes all of it. The manual way is the same three steps::

    borg mount REPO::ARCHIVE /mnt/archive
    losetup -r -P -f --show /mnt/archive/VM/disks/DISK.raw       # prints /dev/loopN
    mount -o ro /dev/loopNp1 /mnt/disk                            # or /dev/loopN without partitions
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ovirt_borg import archive, borgcli
from ovirt_borg.errors import OvirtBorgError, RepositoryBusy

log = logging.getLogger(__name__)

ARCHIVE_DIR = ".archive"


@dataclass
class MountedDisk:
    image: str
    loop: str
    filesystems: list[str] = field(default_factory=list)


def _run(cmd: list[str], env: dict | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        if "Failed to create/acquire the lock" in proc.stderr:
            raise RepositoryBusy(f"the repository is busy: {message}")
        raise OvirtBorgError(f"{os.path.basename(cmd[0])} {cmd[1]} failed: {message}")
    return proc.stdout


def mount_archive(repo: archive.Repo, archive_name: str, mountpoint: Path) -> list[MountedDisk]:
    """Mount the archive and its disks' file systems read-only under ``mountpoint``."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    archive_dir = mountpoint / ARCHIVE_DIR
    archive_dir.mkdir(exist_ok=True)
    _run([borgcli.borg_executable(), "--lock-wait", str(repo.lock_wait), "mount",
          borgcli.archive_location(repo, archive_name), str(archive_dir)], env=borgcli.borg_environment(repo))
    disks = []
    try:
        for image in sorted(archive_dir.glob("*/disks/*.raw")):
            loop = _run(["losetup", "-r", "-P", "-f", "--show", str(image)]).strip()
            disk = MountedDisk(str(image), loop)
            disks.append(disk)
            alias = image.stem.rsplit("-", 5)[0] if image.stem.count("-") >= 5 else image.stem
            if shutil.which("udevadm"):  # partition nodes appear through udev where it runs
                subprocess.run(["udevadm", "settle"], capture_output=True)
            parts = sorted(Path("/dev").glob(Path(loop).name + "p*")) or [Path(loop)]
            for part in parts:
                fstype = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", str(part)],
                                        capture_output=True, text=True).stdout.strip()
                if not fstype or fstype == "swap":
                    continue
                suffix = "" if part == Path(loop) else "-" + part.name[len(Path(loop).name):]
                target = mountpoint / f"{alias}{suffix}"
                target.mkdir(exist_ok=True)
                options = "ro,noload" if fstype.startswith("ext") else "ro,norecovery" if fstype == "xfs" else "ro"
                _run(["mount", "-t", fstype, "-o", options, str(part), str(target)])
                disk.filesystems.append(str(target))
    except BaseException:
        umount_archive(mountpoint)
        raise
    return disks


def umount_archive(mountpoint: Path) -> None:
    """Unmount the file systems, detach the loop devices and unmount the archive."""
    mountpoint = mountpoint.resolve()
    archive_dir = mountpoint / ARCHIVE_DIR
    with open("/proc/mounts") as f:
        mounted = [line.split()[1] for line in f]
    for target in sorted((m for m in mounted if m.startswith(str(mountpoint) + "/") and m != str(archive_dir)),
                         key=len, reverse=True):
        _run(["umount", target])
        if Path(target).parent == mountpoint:
            Path(target).rmdir()
    listing = json.loads(subprocess.run(["losetup", "--list", "--json"], capture_output=True, text=True).stdout
                         or '{"loopdevices": []}')
    for loop in listing.get("loopdevices", []):
        if (loop.get("back-file") or "").startswith(str(archive_dir) + "/"):
            _run(["losetup", "-d", loop["name"]])
    if str(archive_dir) in mounted:
        _run([borgcli.borg_executable(), "umount", str(archive_dir)])
    if archive_dir.is_dir():
        archive_dir.rmdir()
