"""Restore files from a VM's file systems without mounting anything by hand: ``ovirt-borg files``.

``restore_files`` mounts the archive privately (``mount_archive`` into a new 0700 directory,
only the volumes asked for), copies the named files and directories out, and unmounts, also on
errors and signals. ``list_files`` browses the same way. A PATH names a volume as the mount
tree does (``DISK/VOLUME``, e.g. ``rhel/rhel-root``), then a path inside it.

The guest's tree is hostile, so the copy:

- resolves PATH inside the guest's file system as the guest would (its absolute symlinks
  lead to the volume's root, ``..`` stops there): nothing outside the volume is ever read;
- copies a symlink as a symlink (its target text unchanged, never followed), a directory's
  entries without following anything, and skips device nodes, FIFOs and sockets;
- creates every file and directory anew (``O_EXCL``, ``O_NOFOLLOW``): it overwrites nothing,
  and a PATH whose name exists in the target directory stops the run before anything is copied;
- keeps owner, group, permission bits and times where the target allows, never a setuid or
  setgid bit (``S_ISUID``/``S_ISGID`` are dropped).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ovirt_borg import archive
from ovirt_borg.errors import NotFound, OvirtBorgError
from ovirt_borg.mount import MountedArchive, MountedVolume, mount_archive, printable, umount_archive

log = logging.getLogger(__name__)

_MAX_SYMLINKS = 40  # as the kernel's path walk
_COPY_PIECE = 1 << 20


class FilesError(OvirtBorgError):
    """A PATH that cannot be restored as asked (its name exists in the target, a volume that
    cannot be read, a malformed PATH)."""


@dataclass(frozen=True)
class GuestPath:
    """A PATH of ``files``: a volume of the mount tree and a path inside it."""

    disk: str
    volume: str
    inside: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> GuestPath:
        """``DISK/VOLUME[/PATH...]`` (a leading ``/`` and ``.`` or empty parts are ignored);
        raises ``FilesError`` when the volume is not named."""
        parts = [part for part in text.split("/") if part not in ("", ".")]
        if len(parts) < 2:
            raise FilesError(f"{text!r} names no volume: give DISK/VOLUME[/PATH], e.g. "
                             "rhel/rhel-root/etc/hostname (see 'files ARCHIVE --list')")
        return cls(parts[0], parts[1], tuple(parts[2:]))

    def __str__(self) -> str:
        return "/".join((self.disk, self.volume, *self.inside))


@dataclass
class Copied:
    """What one PATH gave: counts, and what was left out or failed (with why)."""

    path: str
    to: str
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    metadata_kept: bool = True
    times: bool = True  # whether the guest's times are trusted and kept

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- the private mount ---------------------------------------------------------------------------


@contextlib.contextmanager
def _mounted(repo: archive.Repo, archive_name: str, paths: list[GuestPath]) -> Iterator[MountedArchive]:
    """Mount the archive, only the volumes of ``paths``, in a new private directory; unmount and
    remove it after, whatever happens."""
    directory = Path(tempfile.mkdtemp(prefix="ovirt-borg-files-"))
    try:
        result = mount_archive(repo, archive_name, directory / "mnt",
                               only={(p.disk, p.volume) for p in paths})
        try:
            yield result
        except BaseException:
            try:
                umount_archive(result.mountpoint)
            except OvirtBorgError as e:  # the error that stopped the copy is the one to report
                log.error("%s", e)
            raise
        umount_archive(result.mountpoint)
    finally:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _volume_root(mounted: MountedArchive, path: GuestPath) -> MountedVolume:
    """The mounted volume of ``path``; raises ``NotFound`` or ``FilesError``."""
    disks = [d.name for d in mounted.disks]
    if path.disk not in disks:
        raise NotFound(f"archive {mounted.archive} has no disk {path.disk!r}; it has: {', '.join(disks)}")
    volume = mounted.volume(path.disk, path.volume)
    if volume is None:
        names = [v.name for d in mounted.disks if d.name == path.disk for v in d.volumes]
        raise NotFound(f"disk {path.disk} has no volume {path.volume!r}; it has: {', '.join(names)}")
    if volume.path is None:
        raise FilesError(f"{path.disk}/{path.volume} ({volume.what}) cannot be read: {volume.reason}")
    return volume


# -- walking the guest's tree --------------------------------------------------------------------


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def resolve(root: Path, inside: tuple[str, ...]) -> tuple[int, str | None]:
    """Find ``inside`` below the volume root as the guest would, never leaving the root.

    Symlinks on the way are followed inside the guest (an absolute target starts again at the
    root, ``..`` at the root stays there); the last part is not followed. Returns an open
    directory fd and the last part's name in it (None for the root itself; the caller closes
    the fd). Raises ``NotFound`` for a missing part, ``FilesError`` for a symlink loop or a part
    that is no directory.
    """
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    fds = [root_fd]  # the directories walked, the root first
    pending = list(inside)
    followed = 0
    try:
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if len(fds) > 1:
                    os.close(fds.pop())
                continue
            if not pending:
                os.lstat(part, dir_fd=fds[-1])  # NotFound now, not later
                return os.dup(fds[-1]), part
            info = os.lstat(part, dir_fd=fds[-1])
            if stat.S_ISLNK(info.st_mode):
                followed += 1
                if followed > _MAX_SYMLINKS:
                    raise FilesError(f"too many symlinks in {'/'.join(inside)} (a loop?)")
                target = os.readlink(part, dir_fd=fds[-1])
                if target.startswith("/"):
                    while len(fds) > 1:
                        os.close(fds.pop())
                pending[:0] = target.split("/")
                continue
            if not stat.S_ISDIR(info.st_mode):
                raise FilesError(f"{part} in {'/'.join(inside)} is no directory")
            fds.append(_open_dir(part, fds[-1]))
        return os.dup(fds[-1]), None
    except FileNotFoundError:
        raise NotFound(f"{'/'.join(inside)} does not exist in the guest") from None
    finally:
        for fd in fds:
            os.close(fd)


# -- listing -------------------------------------------------------------------------------------


def list_files(repo: archive.Repo, archive_name: str, path: str | None) -> dict[str, Any]:
    """Browse the archive: without ``path`` its disks and volumes (what each holds or why it
    cannot be read), else the entries of a directory in a volume, or that one entry.

    Returns ``{"archive", "vm", "disks"}`` or ``{"archive", "path", "entries": [...]}``; each
    entry has name, type, mode, uid, gid, size, mtime and, for a symlink, its target.
    """
    wanted = [GuestPath.parse(path)] if path else []
    with _mounted(repo, archive_name, wanted) as mounted:
        if not wanted:
            return {**mounted.as_dict(), "mountpoint": None}
        root = Path(_volume_root(mounted, wanted[0]).path)
        dir_fd, name = resolve(root, wanted[0].inside)
        try:
            if name is not None and not stat.S_ISDIR(os.lstat(name, dir_fd=dir_fd).st_mode):
                entries = [_entry(name, dir_fd)]
            else:
                listed_fd = _open_dir(name, dir_fd) if name is not None else os.dup(dir_fd)
                try:
                    names = sorted(os.listdir(listed_fd))
                    entries = [_entry(entry, listed_fd) for entry in names]
                finally:
                    os.close(listed_fd)
        finally:
            os.close(dir_fd)
        return {"archive": archive_name, "path": str(wanted[0]), "entries": entries}


def _entry(name: str, dir_fd: int) -> dict[str, Any]:
    info = os.lstat(name, dir_fd=dir_fd)
    entry = {"name": name, "type": _kind(info.st_mode), "mode": stat.S_IMODE(info.st_mode),
             "uid": info.st_uid, "gid": info.st_gid, "size": info.st_size, "mtime": info.st_mtime}
    if stat.S_ISLNK(info.st_mode):
        entry["target"] = os.readlink(name, dir_fd=dir_fd)
    return entry


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


# -- restoring -----------------------------------------------------------------------------------


def restore_files(repo: archive.Repo, archive_name: str, paths: list[str], target: Path) -> list[Copied]:
    """Copy each PATH out of the archive's guest file systems into the directory ``target``.

    Given the repository, the archive, the PATHs (``DISK/VOLUME[/PATH]``) and the target
    directory (made 0700 when missing). Each PATH lands at ``target/<its last name>`` (the
    volume's name for a whole volume). Returns what each gave; entries that could not be read
    or written are in ``failed``. Raises ``FilesError`` before copying anything when a name
    exists in ``target`` or two PATHs end in the same name, ``NotFound`` for what does not
    exist.
    """
    wanted = [GuestPath.parse(text) for text in paths]
    if not wanted:
        raise FilesError("name at least one PATH to restore (see 'files ARCHIVE --list')")
    names = [path.inside[-1] if path.inside else path.volume for path in wanted]
    for name in names:
        if names.count(name) > 1:
            raise FilesError(f"two PATHs end in {printable(name)!r}; restore them into different directories")
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise FilesError(f"{target} is not a directory")
    for name in names:
        if os.path.lexists(target / name):
            raise FilesError(f"{target / printable(name)} exists already; nothing was copied "
                             "(ovirt-borg never overwrites: choose another --to or move it away)")
    with _mounted(repo, archive_name, wanted) as mounted:
        volumes = [_volume_root(mounted, path) for path in wanted]
        sources: list[tuple[int, str | None]] = []
        try:
            for volume, path in zip(volumes, wanted, strict=True):
                sources.append(resolve(Path(volume.path), path.inside))
            if not target.exists():
                target.mkdir(parents=True, mode=0o700)
            target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            try:
                results = []
                for path, name, volume, (dir_fd, source) in zip(wanted, names, volumes, sources, strict=True):
                    # fusefat (0.1a) shows vfat times a month late: better none than wrong ones.
                    copied = Copied(printable(str(path)), str(target / name), times=volume.driver != "fusefat")
                    if source is None:  # the volume's root
                        try:
                            _copy_directory(dir_fd, target_fd, name, copied, os.fstat(dir_fd), copied.path)
                        except OSError as e:
                            copied.failed.append(f"{copied.path}: {e.strerror or e}")
                    else:
                        _copy_entry(dir_fd, source, target_fd, name, copied, copied.path)
                    results.append(copied)
                return results
            finally:
                os.close(target_fd)
        finally:
            for dir_fd, _ in sources:
                os.close(dir_fd)


def _copy_entry(src_dir: int, name: str, dst_dir: int, dst_name: str, copied: Copied, shown: str) -> None:
    """Copy one guest entry (recursively for a directory); failures are noted, not raised.
    ``shown`` is its PATH, for messages."""
    try:
        info = os.lstat(name, dir_fd=src_dir)
        if stat.S_ISREG(info.st_mode):
            _copy_file(src_dir, name, dst_dir, dst_name, info, copied)
        elif stat.S_ISDIR(info.st_mode):
            fd = _open_dir(name, src_dir)
            try:
                _copy_directory(fd, dst_dir, dst_name, copied, info, shown)
            finally:
                os.close(fd)
        elif stat.S_ISLNK(info.st_mode):
            os.symlink(os.readlink(name, dir_fd=src_dir), dst_name, dir_fd=dst_dir)
            _keep_metadata(dst_dir, dst_name, None, info, copied, link=True)
            copied.symlinks += 1
        else:
            copied.skipped.append(f"{shown} ({_kind(info.st_mode)}: not restored)")
    except OSError as e:
        copied.failed.append(f"{shown}: {e.strerror or e}")
        log.error("could not restore %s: %s", shown, e.strerror or e)


def _copy_file(src_dir: int, name: str, dst_dir: int, dst_name: str, info: os.stat_result, copied: Copied) -> None:
    source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=src_dir)
    try:
        dest = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dst_dir)
        try:
            with open(source, "rb", closefd=False) as src, open(dest, "wb", closefd=False) as dst:
                shutil.copyfileobj(src, dst, _COPY_PIECE)
            _keep_metadata(dst_dir, dst_name, dest, info, copied)
        finally:
            os.close(dest)
    finally:
        os.close(source)
    copied.files += 1
    copied.bytes += info.st_size


def _copy_directory(src_fd: int, dst_dir: int, dst_name: str, copied: Copied, info: os.stat_result,
                    shown: str) -> None:
    os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
    dest = _open_dir(dst_name, dst_dir)
    try:
        copied.directories += 1
        for entry in sorted(os.listdir(src_fd)):
            _copy_entry(src_fd, entry, dest, entry, copied, f"{shown}/{printable(entry)}")
        # Last: writing the entries would change its times.
        _keep_metadata(dst_dir, dst_name, dest, info, copied)
    finally:
        os.close(dest)


def _keep_metadata(dst_dir: int, name: str, fd: int | None, info: os.stat_result, copied: Copied, *,
                   link: bool = False) -> None:
    """Give a restored entry the guest's owner, permission bits (never setuid or setgid) and
    times, as far as the target allows (``metadata_kept`` turns False where it did not)."""
    try:
        if link:
            os.chown(name, info.st_uid, info.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        else:
            os.fchown(fd, info.st_uid, info.st_gid)
            os.fchmod(fd, stat.S_IMODE(info.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        copied.metadata_kept = False
    if not copied.times:
        return
    times = (info.st_atime_ns, info.st_mtime_ns)
    try:
        if link:
            os.utime(name, ns=times, dir_fd=dst_dir, follow_symlinks=False)
        else:
            os.utime(fd, ns=times)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        copied.metadata_kept = False
