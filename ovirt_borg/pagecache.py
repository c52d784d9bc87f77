"""Keep what ovirt-borg writes to and reads from a local repository out of the page cache.

A backup writes, and a restore or verify reads, gigabytes of Borg segment files once. Borg
1.4 means to write a segment out every 16 MiB and drop it from the page cache (its Linux
``SyncFile``), but falls back to buffering a whole segment (up to 500 MiB) and syncing it at
the end when its ``sync_file_range`` extension does not import, as in the 1.4.5 wheels; and
what it reads stays cached. Pages used once and dropped soon are used again for the next
megabytes; a file read or written through the cache instead takes fresh pages all the way,
which costs several times the kernel time on some machines (virtual machines among them) and
pushes other programs' data out of the cache.

``WriteBehind`` does for the segment being written what Borg's Linux ``SyncFile`` does:
start the write-out of each 16 MiB written, wait for the one before and drop it. It never
replaces Borg's ``fdatasync`` at the end of a segment and at commit, so durability is
unchanged. ``ReadBehind`` drops what was read of a segment once the reads have moved on.

Both are for local repositories on Linux (``ssh://`` repositories are read and written by the
server's Borg) and turn themselves off on the first error (file systems and containers that
refuse ``sync_file_range``): they only ever change how fast, never what is written or read.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

WINDOW = 16 << 20  # bytes written out (or read) between two drops, as Borg's SyncFile does
_PAGE_MASK = os.sysconf("SC_PAGESIZE") - 1
# sync_file_range(2) flags
_WAIT_BEFORE, _WRITE, _WAIT_AFTER = 1, 2, 4


def _load_sync_file_range():
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def _write_out(fd: int, start: int, end: int, flags: int) -> None:
    if _sync_file_range(fd, start, end - start, flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _drop(fd: int, start: int, end: int) -> None:
    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


def _local_io(repository):
    """Borg's ``LoggedIO`` of a local repository, or None (remote, or no ``posix_fadvise``)."""
    if not hasattr(os, "posix_fadvise"):
        return None
    return getattr(repository, "io", None)


class WriteBehind:
    """Write out and drop the segment a local repository is writing, 16 MiB at a time.

    Call ``wrote()`` after puts, from the thread that makes them.
    """

    def __init__(self, io):
        self._io = io
        self._file = None  # Borg's SyncFile of the segment being written
        self._written_out = 0  # offset up to which a write-out was started
        self._waited = 0  # offset up to which the write-out was waited for and dropped

    @classmethod
    def of(cls, repository) -> WriteBehind | None:
        """For ``repository`` when it is local and Borg does not do it itself, else None."""
        from borg.platform import SyncFile
        from borg.platform.base import SyncFile as BaseSyncFile

        io = _local_io(repository)
        if io is None or _sync_file_range is None or SyncFile.write is not BaseSyncFile.write:
            return None
        return cls(io)

    def wrote(self) -> None:
        if self._io is None:
            return
        sync_file = getattr(self._io, "_write_fd", None)
        if sync_file is None:
            self._file = None
            return
        if sync_file is not self._file:
            self._file, self._written_out, self._waited = sync_file, 0, 0
        offset = self._io.offset & ~_PAGE_MASK
        if offset < self._written_out + WINDOW:
            return
        try:
            sync_file.f.flush()
            _write_out(sync_file.fd, self._written_out, offset, _WRITE)
            if self._written_out > self._waited:
                _write_out(sync_file.fd, self._waited, self._written_out, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
                _drop(sync_file.fd, self._waited, self._written_out)
                self._waited = self._written_out
            self._written_out = offset
        except (OSError, ValueError) as e:
            log.debug("segment write-behind turned off: %s", e)
            self._io = None


class ReadBehind:
    """Drop what was read of a local repository's segments from the page cache.

    Call ``read(chunk_id)`` after each ``repository.get`` of that chunk, from the thread that
    reads, and ``close()`` at the end.
    """

    def __init__(self, repository, io):
        self._repository = repository
        self._io = io
        self._segment: int | None = None
        self._fd: int | None = None
        self._dropped = 0  # offset of the current segment below which it was dropped
        self._reached = 0  # highest offset read in the current segment

    @classmethod
    def of(cls, repository) -> ReadBehind | None:
        io = _local_io(repository)
        return None if io is None else cls(repository, io)

    def read(self, chunk_id: bytes) -> None:
        if self._io is None:
            return
        try:
            segment, offset = self._repository.index[chunk_id]
            if segment != self._segment:
                self._leave_segment()
                self._fd = os.open(self._io.segment_filename(segment), os.O_RDONLY)
                self._segment, self._dropped, self._reached = segment, 0, 0
            self._reached = max(self._reached, offset)
            end = self._reached & ~_PAGE_MASK
            if end >= self._dropped + WINDOW:
                _drop(self._fd, self._dropped, end)
                self._dropped = end
        except (OSError, KeyError, TypeError, AttributeError) as e:
            log.debug("segment read-behind turned off: %s", e)
            self._leave_segment()
            self._io = None

    def _leave_segment(self) -> None:
        if self._fd is not None:
            try:
                _drop(self._fd, 0, 0)  # what remains of the segment: the reads moved on
            finally:
                os.close(self._fd)
                self._fd = None

    def close(self) -> None:
        try:
            self._leave_segment()
        except OSError:
            pass
