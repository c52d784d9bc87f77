"""What ``ovirt-borg mount`` made below a mountpoint, recorded step by step, and its undoing.

Each step (a directory, a file, the ``borg mount``, the volume file system, a loop device, a
file system mount) is written to ``MOUNTPOINT/.ovirt-borg-mount.json`` (0600) *before* it is
taken and completed after (the loop device attached, the kernel's mount id). So a mount stopped
at any point, by an error, a signal or a crash, can be undone from the record alone: by the
rollback of ``mount`` itself or by a later ``ovirt-borg umount``.

Undoing trusts nothing else: it unmounts a mount only when ``/proc/self/mountinfo`` shows it at a
recorded target with the recorded source and type (and mount id, once recorded), detaches a
loop device only when it is still attached to the recorded file, and refuses to start at all
while anything it did not record is mounted below the mountpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ovirt_borg.errors import Interrupted, OvirtBorgError

log = logging.getLogger(__name__)

RECORD_NAME = ".ovirt-borg-mount.json"
RECORD_FORMAT = "ovirt-borg-mount"
RECORD_VERSION = 1
#: Kinds of step that are a mount at ``target``.
MOUNT_KINDS = ("borg", "volumes", "mount")
# How long an internal FUSE file system (borg's, the volume files') may stay busy after what
# used it was unmounted: its server and the loop devices let go of it a moment later.
_SETTLE_SECONDS = 15.0


class MountError(OvirtBorgError):
    """A mount or umount step failed, or was refused to protect what is mounted."""


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


def inside(relative: Any) -> bool:
    """True when ``relative`` is a relative path of plain names (no ``..``, nothing absolute)."""
    if not isinstance(relative, str) or not relative or relative.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in relative.split("/"))


class MountRecord:
    """The record of one mount. A step is a dict with a ``kind``:

    - ``dir``: ``path``, a directory made (relative to the mountpoint);
    - ``file``: ``path``, a file written;
    - ``borg``, ``volumes``, ``mount``: ``target`` (relative), ``source`` and ``fstype`` as
      mountinfo will show them, then ``mount_id``; ``borg`` and ``volumes`` also the ``pid``
      of the process serving the file system (its command line names the target);
    - ``loop``: ``backing`` (absolute path), ``offset``, then ``device``.
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
        not ours (not a regular file of this user, readable by others, or malformed)."""
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
                not isinstance(doc.get("steps"), list) or \
                not all(isinstance(step, dict) for step in doc["steps"]):
            raise MountError(f"{path} is not an ovirt-borg mount record; nothing was unmounted")
        for step in doc["steps"]:
            for key in ("path", "target"):
                if key in step and not inside(step[key]):
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
        """Record what a step made (a loop device, a mount id, a pid)."""
        step.update(fields)
        self.save()

    def save(self) -> None:
        tmp = self.mountpoint / (RECORD_NAME + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.doc, indent=1))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def make_dir(self, relative: str) -> Path:
        """Make ``MOUNTPOINT/relative`` (0700), recorded first; raises ``MountError``."""
        path = self.mountpoint / relative
        self.add("dir", path=relative)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise MountError(f"{path} exists already; the mountpoint must be empty") from None
        os.chmod(path, 0o700)  # whatever the umask
        return path

    def write_file(self, relative: str, text: str) -> Path:
        """Write ``MOUNTPOINT/relative`` (0600), recorded first."""
        path = self.mountpoint / relative
        self.add("file", path=relative)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def wait_mounted(self, step: dict[str, Any], process: subprocess.Popen, timeout: float | None = None) -> bool:
        """Wait until the server ``process`` has mounted ``step``; record the mount id and
        return True, or return False when it ended (or ``timeout`` passed) first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not any(self._matches(step, entry, with_id=False) for entry in mounts()):
            if process.poll() is not None or (deadline is not None and time.monotonic() > deadline):
                return False
            time.sleep(0.02)
        self.mount_id(step)
        return True

    def mount_id(self, step: dict[str, Any]) -> None:
        """Record the mount id of a mount step that has just been mounted."""
        found = [m for m in mounts() if self._matches(step, m, with_id=False)]
        self.update(step, mount_id=found[-1].mount_id if found else None)

    def _matches(self, step: dict[str, Any], entry: MountEntry, *, with_id: bool = True) -> bool:
        if step.get("kind") not in MOUNT_KINDS or \
                entry.mount_point != str(self.mountpoint / step["target"]):
            return False
        if entry.source != step.get("source") or entry.fstype != step.get("fstype"):
            return False
        return not with_id or step.get("mount_id") is None or step["mount_id"] == entry.mount_id

    def foreign(self) -> list[MountEntry]:
        """The mounts below the mountpoint that the record does not name."""
        return [entry for entry in mounts_below(self.mountpoint)
                if not any(self._matches(step, entry) for step in self.steps)]

    # -- undoing ----------------------------------------------------------------------------

    def undo(self) -> None:
        """Undo every recorded step, newest first, then remove the record (and the mountpoint
        when the mount made it). Raises ``MountError`` before touching anything when a mount
        below the mountpoint is not recorded, and midway when a step cannot be undone (the
        record then keeps what is left)."""
        foreign = self.foreign()
        if foreign:
            listed = ", ".join(f"{m.mount_point} ({m.fstype} from {m.source})" for m in foreign)
            raise MountError(f"refusing to unmount {self.mountpoint}: {listed} is mounted below it "
                             "but was not made by 'ovirt-borg mount'; unmount it yourself, then "
                             f"run 'ovirt-borg umount {self.mountpoint}' again. Nothing was unmounted.")
        self.undo_steps(list(self.steps))
        self.path.unlink()
        if self.doc.get("made_mountpoint"):
            with contextlib.suppress(OSError):
                self.mountpoint.rmdir()

    def undo_steps(self, steps: list[dict[str, Any]]) -> None:
        """Undo ``steps`` (recorded ones), newest first, forgetting each once undone."""
        for step in reversed(steps):
            self._undo_step(step)
            self.steps.remove(step)
            self.save()

    def _undo_step(self, step: dict[str, Any]) -> None:
        kind = step.get("kind")
        if kind in ("dir", "file"):
            path = self.mountpoint / step["path"]
            try:
                path.rmdir() if kind == "dir" else path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise MountError(f"cannot remove {path}: {e.strerror}; run 'ovirt-borg umount "
                                 f"{self.mountpoint}' again once it is free") from None
        elif kind in MOUNT_KINDS:
            unmounted = self._unmount(step)
            pid = step.get("pid")
            marker = str(self.mountpoint / step["target"])
            if pid and _alive(int(pid), marker):
                # Once its file system is unmounted a server ends by itself; one still starting
                # (stopped midway) is told to stop, and what it mounted meanwhile unmounted.
                if not (unmounted and _wait_gone(int(pid), marker)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGTERM)
                    if not _wait_gone(int(pid), marker):
                        os.kill(int(pid), signal.SIGKILL)
                self._unmount(step)
        elif kind == "loop":
            devices = [step["device"]] if step.get("device") else loops_of(step["backing"])
            for device in devices:
                if loop_backing(device) == (step["backing"], int(step.get("offset", 0))):
                    run(["losetup", "-d", device])
                    _wait_detached(device)


    def _unmount(self, step: dict[str, Any]) -> bool:
        """Unmount a recorded mount while it is mounted; return True when there was one.

        The internal FUSE file systems (the archive, the volume files) may stay busy a moment
        after what used them went away: those are tried again for a while."""
        target = self.mountpoint / step["target"]
        deadline = time.monotonic() + (_SETTLE_SECONDS if step["kind"] != "mount" else 0)
        unmounted = False
        while any(self._matches(step, entry) for entry in mounts()):
            try:
                run(["umount", str(target)])
                unmounted = True
            except MountError as e:
                if "busy" in str(e) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise MountError(f"could not unmount {target} ({e}); if it is busy, leave it "
                                 f"(see: fuser -vm {target}) and run 'ovirt-borg umount "
                                 f"{self.mountpoint}' again") from None
        return unmounted


def loop_backing(device: str) -> tuple[str, int] | None:
    """(file, offset) a loop device is attached to, None when it is free."""
    base = Path(f"/sys/block/{Path(device).name}/loop")
    try:
        return (base / "backing_file").read_text().rstrip("\n"), int((base / "offset").read_text())
    except (OSError, ValueError):
        return None


def loops_of(backing: str) -> list[str]:
    """The loop devices attached to ``backing`` (for a step whose device was never recorded)."""
    found = []
    for entry in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if entry.read_text().rstrip("\n") == backing:
                found.append("/dev/" + entry.parent.parent.name)
    return found


def _wait_detached(device: str) -> None:
    # A loop device still open (a FUSE driver's server exiting) detaches on its last close.
    deadline = time.monotonic() + _SETTLE_SECONDS
    while loop_backing(device) is not None and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_gone(pid: int, marker: str) -> bool:
    """Wait up to a while for a process to end; True when it has."""
    deadline = time.monotonic() + _SETTLE_SECONDS
    while _alive(pid, marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs, is no zombie, and its command line holds ``marker``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except (OSError, IndexError):
        return False


# -- running tools -------------------------------------------------------------------------------


def run(cmd: list[str], timeout: float = 120) -> str:
    """Run a host tool (losetup, mount, umount, ntfs-3g...) to its end; return its stdout or
    raise ``MountError`` with the tool's last line of error.

    The tool runs in a session of its own and a stop signal waits for it to finish (then
    ``Interrupted`` is raised): a step is done or not, never half done, so the record says
    what to undo."""
    log.debug("running %s", " ".join(cmd))
    with signals_deferred():
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  start_new_session=True, timeout=timeout)
        except FileNotFoundError:
            raise MountError(f"{cmd[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise MountError(f"{os.path.basename(cmd[0])} did not finish within {timeout:.0f} s") from None
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines()
        message = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise MountError(f"{os.path.basename(cmd[0])} failed: {message}")
    return proc.stdout


_deferred: list[int] | None = None  # the stop signals received while they are held back


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back while a step or a cleanup runs; raise
    ``Interrupted`` after it when one came.

    A Ctrl-C would otherwise leave a step or a rollback half done. Nested uses hold them until
    the outermost ends. Only in the main thread (elsewhere signals are not delivered to Python
    code anyway).
    """
    global _deferred
    if _deferred is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.getsignal(signum) for signum in stops}
    for signum in stops:
        if previous[signum] is not signal.SIG_IGN:
            signal.signal(signum, lambda number, frame: received.append(number))
    _deferred = received
    try:
        yield
    finally:
        _deferred = None
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise Interrupted(received[0])
