"""File-level recovery: mount an archive and expose each disk's file systems read-only.

``mount_archive`` runs ``borg mount`` of the archive at ``MOUNTPOINT/.archive``, attaches each
disk image to a read-only loop device with partition scanning (``losetup -r -P``) and mounts
every partition that holds a file system read-only at ``MOUNTPOINT/<disk>/<pN>`` (or
``MOUNTPOINT/<disk>/whole-disk``). ``umount_archive`` undoes all of it. The manual way is the
same three steps::

    borg mount REPO::ARCHIVE /mnt/archive
    losetup -r -P -f --show /mnt/archive/VM/disks/DISK.raw                 # prints /dev/loopN
    mount -o ro,nosuid,nodev,noexec /dev/loopNp1 /mnt/disk                  # or /dev/loopN

Every guest file system is hostile: each mount is ``nosuid,nodev,noexec`` (a setuid binary or
a device node in a guest gives nothing on this host), every directory made here is 0700, and
no name a guest or the engine chose is used in a host path before ``host_name`` made it one
harmless path component.

What a mount made is recorded as it is made in ``MOUNTPOINT/.ovirt-borg-mount.json`` (0600):
each step is written *before* it is taken, so a mount stopped at any point (an error, a signal,
a crash) is undone from the record, by the rollback or by a later ``umount``. ``umount`` undoes
only what the record names and refuses to touch a directory with any other mount below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ovirt_borg import archive, borgcli, sidecar as sc
from ovirt_borg.errors import ConfigError, Interrupted, NotFound, OvirtBorgError

log = logging.getLogger(__name__)

ARCHIVE_DIR = ".archive"
RECORD_NAME = ".ovirt-borg-mount.json"
RECORD_FORMAT = "ovirt-borg-mount"
RECORD_VERSION = 1
WHOLE_DISK = "whole-disk"

#: Options of every guest file system mount, whatever its type: nothing in a guest may act
#: as a setuid program, a device or an executable on this host.
SAFE_OPTIONS = ("ro", "nosuid", "nodev", "noexec")
#: Per type: read without replaying a journal or log (the image is read-only, and a replay
#: would trust the guest's log); XFS also without its UUID, so a second night of the same VM
#: (or a clone of a file system the host mounts) can be mounted beside the first.
_TYPE_OPTIONS = {"ext2": ("noload",), "ext3": ("noload",), "ext4": ("noload",),
                 "xfs": ("norecovery", "nouuid")}

_NAME_MAX = 255


class MountError(OvirtBorgError):
    """A mount or umount step failed, or was refused to protect what is mounted."""


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
    out = []
    for index, char in enumerate(name):
        if char == "/" or char == "%" or (index == 0 and char == ".") or \
                unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.extend(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogateescape"))
        else:
            out.append(char)
    text = "".join(out) or "%"
    encoded = text.encode("utf-8")
    if len(encoded) <= _NAME_MAX:
        return text
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    head = encoded[:_NAME_MAX - 17].decode("utf-8", "ignore")
    return f"{head}~{digest}"


def unique_name(name: str, taken: set[str]) -> str:
    """Return ``name``, or ``name~2``, ``name~3``... the first not in ``taken``; adds it there."""
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        suffix = f"~{number}"
        candidate = name.encode()[:_NAME_MAX - len(suffix)].decode("utf-8", "ignore") + suffix
    taken.add(candidate)
    return candidate


# -- what the kernel has mounted -----------------------------------------------------------------


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    parent_id: int
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str


def _unescape_mountinfo(field_text: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo.
    out, index = bytearray(), 0
    raw = field_text.encode("utf-8", "surrogateescape")
    while index < len(raw):
        if raw[index:index + 1] == b"\\" and raw[index + 1:index + 4].isdigit():
            out.append(int(raw[index + 1:index + 4], 8))
            index += 4
        else:
            out.append(raw[index])
            index += 1
    return out.decode("utf-8", "surrogateescape")


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Parse the text of ``/proc/PID/mountinfo`` (proc(5)); returns the entries in its order."""
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        if " - " not in line or len(fields) < 10:
            continue
        separator = fields.index("-", 6)
        entries.append(MountEntry(
            mount_id=int(fields[0]), parent_id=int(fields[1]),
            mount_point=_unescape_mountinfo(fields[4]), options=frozenset(fields[5].split(",")),
            fstype=fields[separator + 1], source=_unescape_mountinfo(fields[separator + 2])))
    return entries


def mounts() -> list[MountEntry]:
    """Return what is mounted in this process's mount namespace."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def mounts_below(directory: Path) -> list[MountEntry]:
    """Return the mounts strictly below ``directory`` (a resolved path)."""
    prefix = str(directory).rstrip("/") + "/"
    return [m for m in mounts() if m.mount_point.startswith(prefix)]


# -- the record ----------------------------------------------------------------------------------


class MountRecord:
    """What one ``ovirt-borg mount`` made below its mountpoint, step by step.

    The record is ``MOUNTPOINT/.ovirt-borg-mount.json`` (0600), rewritten atomically (temporary
    file, fsync, rename) whenever a step is added, completed or undone. A step is a dict with a
    ``kind``:

    - ``dir``: ``path``, a directory made here (relative to the mountpoint);
    - ``borg``: ``target``, the ``borg mount`` of the archive;
    - ``loop``: ``backing`` (absolute path of the image), then ``device`` once attached;
    - ``mount``: ``target``, ``source`` (a device), ``fstype``, then ``mount_id`` once mounted.
    """

    def __init__(self, mountpoint: Path, doc: dict[str, Any]):
        self.mountpoint = mountpoint
        self.doc = doc

    @property
    def path(self) -> Path:
        return self.mountpoint / RECORD_NAME

    @property
    def steps(self) -> list[dict[str, Any]]:
        return self.doc["steps"]

    @classmethod
    def create(cls, mountpoint: Path, archive_name: str, *, made_mountpoint: bool) -> MountRecord:
        """Start the record of a new mount (written at once)."""
        record = cls(mountpoint, {"format": RECORD_FORMAT, "version": RECORD_VERSION,
                                  "archive": archive_name, "made_mountpoint": made_mountpoint,
                                  "pid": os.getpid(), "steps": []})
        record.save()
        return record

    @classmethod
    def load(cls, mountpoint: Path) -> MountRecord:
        """Read the record of ``mountpoint``; raises ``MountError`` when there is none or it is
        not ours (not a regular file owned by this user, readable by others, or malformed)."""
        path = mountpoint / RECORD_NAME
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise MountError(f"{mountpoint} was not mounted by 'ovirt-borg mount' (it has no "
                             f"{RECORD_NAME}); nothing was unmounted") from None
        except OSError as e:
            raise MountError(f"cannot read the mount record {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
                raise MountError(f"refusing the mount record {path}: it must be a file of this user "
                                 "readable by no one else; nothing was unmounted")
            try:
                doc = json.loads(f.read())
            except ValueError as e:
                raise MountError(f"the mount record {path} is damaged ({e}); nothing was unmounted") from None
        if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT or \
                not isinstance(doc.get("steps"), list):
            raise MountError(f"{path} is not an ovirt-borg mount record; nothing was unmounted")
        for step in doc["steps"]:
            for key in ("path", "target"):
                if key in step and not _inside(step[key]):
                    raise MountError(f"the mount record {path} names {step[key]!r}, which is not "
                                     "below the mountpoint; nothing was unmounted")
        return cls(mountpoint, doc)

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Record a step about to be taken; returns it (complete it with ``update``)."""
        step = {"kind": kind, **fields}
        self.steps.append(step)
        self.save()
        return step

    def update(self, step: dict[str, Any], **fields: Any) -> None:
        """Record what a step made (a loop device, a mount id)."""
        step.update(fields)
        self.save()

    def remove(self, step: dict[str, Any]) -> None:
        """Forget an undone step."""
        self.steps.remove(step)
        self.save()

    def save(self) -> None:
        tmp = self.mountpoint / (RECORD_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.doc, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _inside(relative: Any) -> bool:
    """True when ``relative`` is a relative path of plain names (no ``..``, nothing absolute)."""
    if not isinstance(relative, str) or not relative or relative.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in relative.split("/"))


# -- running tools -------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str:
    """Run a host tool (losetup, mount, umount); return its stdout or raise ``MountError``."""
    log.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise MountError(f"{cmd[0]} is not installed (Debian package util-linux or mount)") from None
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        message = lines[-1] if lines else f"exit code {proc.returncode}"
        raise MountError(f"{os.path.basename(cmd[0])} failed: {message}")
    return proc.stdout


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while cleaning up; raise ``Interrupted`` after.

    A second Ctrl-C during a rollback would otherwise leave it half done. Only in the main
    thread (elsewhere signals are not delivered to Python code anyway).
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.getsignal(signum) for signum in stops}
    for signum in stops:
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise Interrupted(received[0])


def _make_dir(record: MountRecord, relative: str) -> Path:
    """Make ``MOUNTPOINT/relative`` (0700), recorded first; raises ``MountError``."""
    path = record.mountpoint / relative
    record.add("dir", path=relative)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        raise MountError(f"{path} exists already; the mountpoint must be empty") from None
    os.chmod(path, 0o700)  # whatever the umask
    return path


# -- mount ---------------------------------------------------------------------------------------


@dataclass
class Volume:
    """One place of a disk that may hold a file system: a partition or the whole disk."""

    name: str
    fstype: str | None = None
    path: str | None = None  # where it is mounted, when it is
    reason: str | None = None  # why it is not, when it is not

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class MountedDisk:
    alias: str
    id: str
    name: str
    image: str
    volumes: list[Volume] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"alias": self.alias, "id": self.id, "name": self.name, "image": self.image,
                "volumes": [v.as_dict() for v in self.volumes]}


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


def mount_archive(repo: archive.Repo, archive_name: str, mountpoint: Path) -> list[MountedDisk]:
    """Mount the archive and its disks' file systems read-only under ``mountpoint``.

    Given the repository, the archive name and a new or empty directory. Returns the disks
    with, per volume, where it is mounted or why not. On any error or signal everything made so
    far is undone before the error is raised (``MountError``, a Borg error, ``Interrupted``).
    """
    mountpoint = Path(os.path.abspath(mountpoint))
    made = _prepare_mountpoint(mountpoint)
    mountpoint = mountpoint.resolve()
    record = MountRecord.create(mountpoint, archive_name, made_mountpoint=made)
    try:
        archive_dir = _make_dir(record, ARCHIVE_DIR)
        step = record.add("borg", target=ARCHIVE_DIR)
        borgcli.mount(repo, archive_name, archive_dir, options=("noexec",))
        record.update(step, mount_id=_mount_id(archive_dir, _BORG_SOURCE))
        disks = []
        taken: set[str] = set()
        for alias, disk_id, image in _archive_disks(archive_dir, archive_name):
            disk = MountedDisk(alias, disk_id, unique_name(host_name(alias), taken), str(image))
            disks.append(disk)
            _mount_disk(record, disk, image)
    except BaseException:
        with _signals_deferred():
            try:
                _undo(record)
            except OvirtBorgError as e:
                log.error("could not undo the mount at %s: %s", mountpoint, e)
        raise
    return disks


def umount_archive(mountpoint: Path) -> None:
    """Undo ``mount_archive``: unmount, detach and remove what its record names, newest first.

    Raises ``MountError`` without touching anything when ``mountpoint`` has no record or a
    mount below it that the record does not name; raises it midway when a step fails (a file
    system still in use): the record then keeps what is left, for the next try.
    """
    mountpoint = Path(os.path.abspath(mountpoint)).resolve()
    record = MountRecord.load(mountpoint)
    with _signals_deferred():
        _undo(record)


# -- the steps -----------------------------------------------------------------------------------

_BORG_SOURCE, _BORG_FSTYPE = "borgfs", "fuse"


def _archive_disks(archive_dir: Path, archive_name: str) -> list[tuple[str, str, Path]]:
    """Return (alias, id, image path) of each disk in the mounted archive, from its sidecar.

    Raises ``NotFound`` when the archive holds no ovirt-borg sidecar, ``MountError`` when the
    sidecar names an image outside the archive or one that is not a regular file.
    """
    found = sorted(p for p in archive_dir.iterdir() if (p / sc.SIDECAR_NAME).is_file())
    if not found:
        raise NotFound(f"archive {archive_name} holds no ovirt-borg sidecar; is it an ovirt-borg archive?")
    disks = []
    for vm_dir in found:
        try:
            sidecar = sc.parse((vm_dir / sc.SIDECAR_NAME).read_bytes())
        except sc.SidecarInvalid as e:
            raise MountError(f"the sidecar of archive {archive_name} is damaged: {e}") from None
        for record in sidecar.disks:
            image = archive_dir / record.image
            # A tampered sidecar could point anywhere: the image must be a plain file inside.
            if not _inside(record.image) or os.path.realpath(image) != str(image) or \
                    not stat.S_ISREG(os.lstat(image).st_mode):
                raise MountError(f"the sidecar of archive {archive_name} names the image "
                                 f"{record.image!r}, which is not a file in the archive")
            disks.append((record.alias, record.id, image))
    return disks


def _mount_disk(record: MountRecord, disk: MountedDisk, image: Path) -> None:
    """Attach one disk image and mount each file system on it below ``MOUNTPOINT/disk.name``."""
    _make_dir(record, disk.name)
    step = record.add("loop", backing=str(image))
    loop = _run(["losetup", "-r", "-P", "-f", "--show", str(image)]).strip()
    record.update(step, device=loop)
    if shutil.which("udevadm"):  # partition nodes appear through udev where it runs
        subprocess.run(["udevadm", "settle"], capture_output=True)
    loop_name = Path(loop).name
    partitions = sorted(Path("/dev").glob(loop_name + "p*"),
                        key=lambda p: int(p.name[len(loop_name) + 1:]))
    for device in partitions or [Path(loop)]:
        volume = Volume("p" + device.name[len(loop_name) + 1:] if partitions else WHOLE_DISK)
        disk.volumes.append(volume)
        volume.fstype = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", str(device)],
                                       capture_output=True, text=True).stdout.strip() or None
        if not volume.fstype:
            volume.reason = "no file system recognized"
            continue
        if volume.fstype == "swap":
            volume.reason = "swap space"
            continue
        relative = f"{disk.name}/{volume.name}"
        _make_dir(record, relative)
        _mount(record, relative, str(device), volume.fstype)
        volume.path = str(record.mountpoint / relative)


def _mount(record: MountRecord, relative: str, source: str, fstype: str) -> None:
    """Mount ``source`` read-only, nosuid, nodev, noexec at ``MOUNTPOINT/relative``."""
    target = record.mountpoint / relative
    step = record.add("mount", target=relative, source=source, fstype=fstype)
    options = ",".join(SAFE_OPTIONS + _TYPE_OPTIONS.get(fstype, ()))
    _run(["mount", "-t", fstype, "-o", options, source, str(target)])
    record.update(step, mount_id=_mount_id(target, source))


def _mount_id(target: Path, source: str) -> int | None:
    """The id of the newest mount of ``source`` at ``target``, None when there is none."""
    found = [m for m in mounts() if m.mount_point == str(target) and m.source == source]
    return found[-1].mount_id if found else None


def _expected(step: dict[str, Any]) -> tuple[str, str]:
    """(source, fstype) that /proc/self/mountinfo shows for a recorded mount step."""
    if step["kind"] == "borg":
        return _BORG_SOURCE, _BORG_FSTYPE
    return step["source"], step["fstype"]


def _is_ours(step: dict[str, Any], entry: MountEntry, mountpoint: Path) -> bool:
    if step["kind"] not in ("borg", "mount") or entry.mount_point != str(mountpoint / step["target"]):
        return False
    source, fstype = _expected(step)
    if entry.source != source or entry.fstype != fstype:
        return False
    return step.get("mount_id") is None or step["mount_id"] == entry.mount_id


def _foreign(record: MountRecord) -> list[MountEntry]:
    """The mounts below the mountpoint that the record does not name."""
    return [entry for entry in mounts_below(record.mountpoint)
            if not any(_is_ours(step, entry, record.mountpoint) for step in record.steps)]


def _undo(record: MountRecord) -> None:
    """Undo the recorded steps, newest first, then remove the record (and the mountpoint when
    it was made by the mount). Raises ``MountError`` before doing anything when a mount below
    the mountpoint is not in the record, and when a step cannot be undone."""
    mountpoint = record.mountpoint
    foreign = _foreign(record)
    if foreign:
        listed = ", ".join(f"{m.mount_point} ({m.fstype} from {m.source})" for m in foreign)
        raise MountError(f"refusing to unmount {mountpoint}: {listed} is mounted below it but was "
                         "not made by 'ovirt-borg mount'; unmount it yourself, then run "
                         f"'ovirt-borg umount {mountpoint}' again. Nothing was unmounted.")
    for step in reversed(list(record.steps)):
        _undo_step(record, step)
        record.remove(step)
    record.path.unlink()
    if record.doc.get("made_mountpoint"):
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def _undo_step(record: MountRecord, step: dict[str, Any]) -> None:
    mountpoint = record.mountpoint
    kind = step.get("kind")
    if kind == "dir":
        with contextlib.suppress(FileNotFoundError):
            (mountpoint / step["path"]).rmdir()
    elif kind in ("borg", "mount"):
        target = mountpoint / step["target"]
        while any(_is_ours(step, entry, mountpoint) for entry in mounts()):
            try:
                _run(["umount", str(target)])
            except MountError as e:
                raise MountError(f"could not unmount {target} ({e}); if it is busy, leave it "
                                 f"(see: fuser -vm {target}) and run 'ovirt-borg umount "
                                 f"{mountpoint}' again") from None
    elif kind == "loop":
        devices = [step["device"]] if step.get("device") else _loops_of(step["backing"])
        for device in devices:
            if _loop_backing(device) == step["backing"]:
                _run(["losetup", "-d", device])


def _loop_backing(device: str) -> str | None:
    """The file a loop device is attached to, None when it is free."""
    try:
        return Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().rstrip("\n")
    except OSError:
        return None


def _loops_of(backing: str) -> list[str]:
    """The loop devices attached to ``backing`` (for a step whose device was never recorded)."""
    found = []
    for entry in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if entry.read_text().rstrip("\n") == backing:
                found.append("/dev/" + entry.parent.parent.name)
    return found
