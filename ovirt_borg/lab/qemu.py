"""Wrappers around the real qemu tools the lab's disks are made of.

Each lab disk is a qcow2 (or raw) file. Guest writes go through ``qemu-io`` so that qemu's
block layer records them in the image's persistent dirty bitmaps, exactly as a running VM's
qemu would; exports for imageio are ``qemu-nbd`` processes on unix sockets.

Facts this relies on (see LAB.md): ``qemu-img bitmap`` needs the image closed by every other
qemu process; a qemu process that dies while it has the image open for writing leaves its
bitmaps flagged ``in-use`` (inconsistent), which is how the lab breaks a bitmap for real.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ovirt_borg.lab import LabError

log = logging.getLogger(__name__)

# Random data is produced and handed to qemu-io in pieces of this size to bound memory.
_RANDOM_PIECE = 8 * 1024 * 1024

# A unix socket path longer than this does not fit in sockaddr_un.
_MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Bitmap:
    """A persistent dirty bitmap of a qcow2 image, as ``qemu-img info`` reports it."""

    name: str
    granularity: int
    flags: tuple[str, ...]

    @property
    def inconsistent(self) -> bool:
        """True when the bitmap is flagged in-use while no qemu has the image open.

        qemu sets ``in-use`` when it opens the image for writing and clears it on a clean
        close, so on a closed image the flag means the bitmap missed writes.
        """
        return "in-use" in self.flags


def _run(tool: str, *args: str | os.PathLike, timeout: float = 300) -> str:
    """Run a qemu tool; return its stdout.

    Raises ``LabError`` with the tool's stderr when it fails, is missing or hangs.
    """
    cmd = [tool, *(os.fspath(a) for a in args)]
    try:
        result = subprocess.run(
            cmd, check=True, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as e:
        raise LabError(f"{tool} is not installed; install the Debian package qemu-utils") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{tool} {' '.join(cmd[1:3])} did not finish in {timeout} s") from e
    except subprocess.CalledProcessError as e:
        message = (e.stderr or e.stdout or "").strip()
        raise LabError(f"{' '.join(cmd)} failed (exit {e.returncode}): {message}") from e
    return result.stdout


def create_image(path: Path, size: int, fmt: str = "qcow2") -> None:
    """Create an empty image of ``size`` bytes in format ``fmt`` ("qcow2" or "raw").

    Raises ``LabError`` when qemu-img fails (for example when the file exists and is locked).
    """
    _run("qemu-img", "create", "-q", "-f", fmt, path, str(size))


def image_info(path: Path, fmt: str | None = None, *, force_share: bool = False) -> dict:
    """Return ``qemu-img info --output=json`` of ``path`` as a dict.

    ``force_share`` reads an image that a running qemu-nbd holds open (the answer may then
    lag behind that process). Raises ``LabError`` when qemu-img fails.
    """
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    if force_share:
        args.append("-U")
    return json.loads(_run("qemu-img", *args, path))


def add_bitmap(path: Path, name: str, granularity: int | None = None) -> None:
    """Add a persistent dirty bitmap ``name`` to the qcow2 image ``path``.

    The granularity defaults to the cluster size (64 KiB). Raises ``LabError`` when the image
    is open in another qemu process or the bitmap already exists.
    """
    args = ["bitmap", "--add", "-f", "qcow2"]
    if granularity:
        args += ["-g", str(granularity)]
    _run("qemu-img", *args, path, name)


def remove_bitmap(path: Path, name: str) -> None:
    """Remove the persistent bitmap ``name`` from the qcow2 image ``path``.

    Raises ``LabError`` when the bitmap does not exist or the image is open elsewhere.
    """
    _run("qemu-img", "bitmap", "--remove", "-f", "qcow2", path, name)


def list_bitmaps(path: Path) -> list[Bitmap]:
    """Return the persistent bitmaps of the qcow2 image ``path`` (empty list when none).

    Raises ``LabError`` when qemu-img fails.
    """
    info = image_info(path, "qcow2", force_share=True)
    data = info.get("format-specific", {}).get("data", {})
    return [
        Bitmap(name=b["name"], granularity=b["granularity"], flags=tuple(b.get("flags", ())))
        for b in data.get("bitmaps", [])
    ]


def bitmap_is_broken(path: Path, name: str) -> bool:
    """Return True when bitmap ``name`` of the closed qcow2 image ``path`` is inconsistent.

    Only meaningful while no qemu process has the image open for writing (such a process
    flags its bitmaps in-use while it runs). Raises ``LabError`` when there is no such bitmap.
    """
    for bitmap in list_bitmaps(path):
        if bitmap.name == name:
            return bitmap.inconsistent
    raise LabError(f"image {path} has no bitmap {name!r}")


def break_bitmap(path: Path, name: str) -> None:
    """Make bitmap ``name`` of the qcow2 image ``path`` inconsistent, the way a crash does.

    A qemu process (qemu-io) opens the image for writing, which flags every persistent bitmap
    in-use on disk, and then kills itself with SIGKILL before it can clear the flags: the same
    state a host crash or a SIGKILLed writable qemu-nbd leaves. Guest data is not changed.
    Every bitmap of the image is affected, as in a real crash.

    Raises ``LabError`` when the image has no such bitmap or the flag did not stick.
    """
    if not any(b.name == name for b in list_bitmaps(path)):
        raise LabError(f"image {path} has no bitmap {name!r}")
    cmd = ["qemu-io", "-f", "qcow2", "-c", "flush", "-c", f"sigraise {signal.SIGKILL.value}",
           os.fspath(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if result.returncode != -signal.SIGKILL:
        raise LabError(
            f"qemu-io did not die by SIGKILL on {path} (exit {result.returncode}): "
            f"{result.stderr.strip()}"
        )
    if not bitmap_is_broken(path, name):
        raise LabError(f"bitmap {name!r} of {path} is still consistent after a crash")
    log.info("broke bitmap %s of %s", name, path)


def write(
    path: Path,
    offset: int,
    length: int,
    *,
    fmt: str,
    data: bytes | None = None,
    zero: bool = False,
    discard: bool = False,
) -> None:
    """Write to the image like a guest would, through qemu's block layer (qemu-io).

    Given the byte range ``offset``/``length`` and exactly one kind of write: ``data`` (its
    length must equal ``length``), ``zero=True`` (write zeroes, may unmap), ``discard=True``,
    or none of them for fresh random bytes from ``os.urandom`` (so deduplication cannot make
    a test pass by accident). Persistent bitmaps record every kind of write.

    Raises ``ValueError`` for contradictory arguments and ``LabError`` when qemu-io fails
    (for example when a qemu-nbd holds the image open).
    """
    if sum((data is not None, zero, discard)) > 1:
        raise ValueError("give at most one of data, zero and discard")
    if data is not None and len(data) != length:
        raise ValueError(f"data has {len(data)} bytes, expected length {length}")
    if zero:
        _run("qemu-io", "-f", fmt, "-c", f"write -q -z -u {offset} {length}", path)
        return
    if discard:
        _run("qemu-io", "-f", fmt, "-c", f"discard -q {offset} {length}", path)
        return
    # qemu-io fills its write buffer from a file (-s); a temp file next to the image keeps it
    # on the same file system as the test's own directory.
    with tempfile.NamedTemporaryFile(dir=Path(path).parent, prefix=".qemu-io-") as source:
        if data is not None:
            source.write(data)
        else:
            remaining = length
            while remaining:
                piece = min(remaining, _RANDOM_PIECE)
                source.write(os.urandom(piece))
                remaining -= piece
        source.flush()
        _run("qemu-io", "-f", fmt, "-c", f"write -q -s {source.name} {offset} {length}", path)


def data_extents(path: Path, fmt: str) -> list[tuple[int, int]]:
    """Return the ``(offset, length)`` ranges of the image that hold data, in order.

    What ``qemu-img map`` reports as data and not zero; everything else reads as zeros. The
    map is made from the image's allocation (qcow2 tables, or the file's holes for raw), so it
    costs what the allocated part costs, not the disk's size. Raises ``LabError``.
    """
    extents = json.loads(_run("qemu-img", "map", "--output=json", "-f", fmt, path))
    return [(e["start"], e["length"]) for e in extents if e.get("data") and not e.get("zero")]


def to_raw(path: Path, out: Path, fmt: str) -> None:
    """Convert image ``path`` (format ``fmt``) to the sparse raw file ``out``.

    Raises ``LabError`` when qemu-img fails.
    """
    _run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)


class NbdExport:
    """A running ``qemu-nbd`` exporting one image on a unix socket.

    Use ``start_export`` to create one. Stop it with ``stop()`` (SIGTERM, so persistent
    bitmaps are closed cleanly) or use it as a context manager.
    """

    def __init__(self, process: subprocess.Popen, image: Path, socket_path: Path, log_path: Path):
        self._process = process
        self.image = image
        self.socket_path = socket_path
        self.log_path = log_path

    @property
    def pid(self) -> int:
        """Process id of the qemu-nbd."""
        return self._process.pid

    @property
    def url(self) -> str:
        """The NBD URL imageio tickets use: ``nbd:unix:/path/to.sock``."""
        return f"nbd:unix:{self.socket_path}"

    @property
    def running(self) -> bool:
        """True while the qemu-nbd process is alive."""
        return self._process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop qemu-nbd with SIGTERM and wait for it; idempotent.

        Falls back to SIGKILL (which leaves the bitmaps inconsistent for a writable export)
        only when SIGTERM was ignored for ``timeout`` seconds.
        """
        if self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("qemu-nbd %s ignored SIGTERM for %s s, killing it", self.pid, timeout)
            self._process.kill()
            self._process.wait()
        log.debug("stopped qemu-nbd %s for %s", self.pid, self.image)

    def kill(self) -> None:
        """Kill qemu-nbd with SIGKILL (a crash); idempotent."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> NbdExport:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NbdExport pid={self.pid} image={self.image} url={self.url}>"


def _direct_io(path: Path) -> bool:
    """True when ``path`` can be opened with O_DIRECT (some file systems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def start_export(
    image: Path,
    socket_path: Path,
    *,
    fmt: str,
    read_only: bool = True,
    bitmap: str | None = None,
    shared: int = 8,
    discard: bool = False,
    limit: int = 0,
    timeout: float = 10.0,
) -> NbdExport:
    """Start qemu-nbd exporting ``image`` on the unix socket ``socket_path``.

    ``bitmap`` exposes that persistent bitmap (for dirty extents); ``shared`` is the number of
    NBD clients allowed at once (imageio opens one per HTTP connection); ``discard`` lets a
    writable export unmap; ``limit`` (bytes, at most the file's size) is where the image's file
    ends for qemu: a ``raw`` node of that size between the format and the file refuses writes
    past it with ENOSPC, as the end of an LV does. Waits until the socket accepts connections.

    Returns the running ``NbdExport``. Raises ``LabError`` when qemu-nbd exits or does not
    listen within ``timeout`` seconds (its log is in the message), or the path is too long.
    """
    image = Path(image)
    socket_path = Path(socket_path)
    if len(os.fspath(socket_path)) > _MAX_SOCKET_PATH:
        raise LabError(f"unix socket path too long ({len(os.fspath(socket_path))} bytes): {socket_path}")
    socket_path.unlink(missing_ok=True)
    cmd = [
        "qemu-nbd", "--persistent", f"--shared={shared}", "--allocation-depth",
        f"--socket={socket_path}",
    ]
    if not limit:
        cmd.append(f"--format={fmt}")
    if _direct_io(image):
        # As on oVirt hosts: the image is read and written around the page cache.
        cmd += ["--cache=none", "--aio=native"]
    if read_only:
        cmd.append("--read-only")
    if bitmap:
        cmd.append(f"--bitmap={bitmap}")
    if discard:
        cmd.append("--discard=unmap")
    if limit:
        # A json: filename, as vdsm's nbd.py json_uri gives qemu-nbd its volume.
        cmd.append("json:" + json.dumps({"driver": fmt, "file": {
            "driver": "raw", "size": limit,
            "file": {"driver": "file", "filename": os.fspath(image.resolve())}}}))
    else:
        cmd.append(os.fspath(image))
    log_path = socket_path.with_name(socket_path.name + ".log")
    with open(log_path, "ab") as log_file:
        try:
            # Its own session: a Ctrl-C aimed at the caller must not SIGINT the export.
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                start_new_session=True,
            )
        except FileNotFoundError as e:
            raise LabError("qemu-nbd is not installed; install the Debian package qemu-utils") from e
    export = NbdExport(process, image, socket_path, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            socket_path.unlink(missing_ok=True)
            raise LabError(
                f"qemu-nbd for {image} exited with {process.returncode}: "
                f"{log_path.read_text(errors='replace').strip()}"
            )
        if _accepts(socket_path):
            log.debug("qemu-nbd %s exports %s on %s", process.pid, image, socket_path)
            return export
        if time.monotonic() > deadline:
            export.stop()
            socket_path.unlink(missing_ok=True)
            raise LabError(f"qemu-nbd for {image} did not listen on {socket_path} in {timeout} s")
        time.sleep(0.01)


def _accepts(socket_path: Path) -> bool:
    """Return True when the NBD export on ``socket_path`` completes a handshake.

    qemu-nbd creates its socket before it checks the export (an inconsistent bitmap is found
    only then), so a plain connect is not enough: the handshake waits for the export and fails
    if qemu-nbd gives up.
    """
    if not socket_path.exists():
        return False
    from ovirt_imageio._internal import nbd

    try:
        with nbd.Client(nbd.UnixAddress(os.fspath(socket_path))):
            return True
    except (OSError, nbd.Error):
        return False
