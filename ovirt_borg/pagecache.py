"""Keep files that are written or read once, and are large, from filling the page cache.

A backup writes, and a restore or verify reads, gigabytes of repository segment files once.
Pages used once and dropped soon are used again for the next megabytes; a file read or
written through the cache all the way takes fresh pages instead, which costs several times
the kernel time on some machines (virtual machines among them) and pushes other programs'
data out of the cache.

``WriteBehind`` starts the write-out of each ``WINDOW`` written to a file, waits for the one
before and drops it: Linux's ``sync_file_range`` then ``POSIX_FADV_DONTNEED``, the scheme of
Borg's own Linux ``SyncFile``. It never stands for an ``fdatasync``: durability is the
writer's business, unchanged. ``ReadBehind`` drops what was read of a file once the reads
have moved two windows past it, keeping the last window read, and the rest at the end.

Both know nothing of Borg (``archive`` tells them which file and offset), run on Linux (Python
has no ``sync_file_range``: it is called through ``ctypes``), and turn themselves off on the
first error (file systems and containers that refuse ``sync_file_range``): they only ever
change how fast, never what is written or read.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

WINDOW = 16 << 20  # bytes between two drops, as in Borg's SyncFile
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
AVAILABLE = _sync_file_range is not None and hasattr(os, "posix_fadvise")


def _write_out(fd: int, start: int, end: int, flags: int) -> None:
    if _sync_file_range(fd, start, end - start, flags) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _drop(fd: int, start: int = 0, end: int = 0) -> None:
    """Drop ``start``..``end`` of the file from the page cache (0, 0: all of it)."""
    os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)


class WriteBehind:
    """Write out and drop a growing file ``WINDOW`` by ``WINDOW`` behind its writer.

    Call ``wrote(file, fd, offset, flush)`` after writes, from the writing thread: ``file``
    tells one file from the next (compared with ``==``; a new one starts from offset 0),
    ``offset`` is how far it was written, ``flush`` hands what the writer buffers to the kernel.
    """

    def __init__(self):
        self._on = AVAILABLE
        self._file: object = None
        self._written_out = 0  # offset up to which a write-out was started
        self._dropped = 0  # offset up to which the write-out was waited for and dropped

    def wrote(self, file: object, fd: int, offset: int, flush: Callable[[], None]) -> None:
        if not self._on:
            return
        if file != self._file:
            self._file, self._written_out, self._dropped = file, 0, 0
        offset &= ~_PAGE_MASK
        if offset < self._written_out + WINDOW:
            return
        try:
            flush()
            _write_out(fd, self._written_out, offset, _WRITE)
            if self._written_out > self._dropped:
                _write_out(fd, self._dropped, self._written_out, _WAIT_BEFORE | _WRITE | _WAIT_AFTER)
                _drop(fd, self._dropped, self._written_out)
                self._dropped = self._written_out
            self._written_out = offset
        except (OSError, ValueError) as e:
            log.debug("write-behind turned off: %s", e)
            self._on = False


class ReadBehind:
    """Drop what was read of files from the page cache, one to two windows behind the reads.

    Call ``read(file, offset, path)`` after each read at ``offset`` of the file ``file`` (a
    hashable name; ``path()`` gives its path the first time), and ``close()`` at the end. Reads
    may go back and forth between a few files (the chunks of an incremental image come from the
    segments of several backups): each file keeps the one to two windows behind its furthest
    read, and is dropped whole only at ``close()``, or when ``FILES`` others were read
    since it was.
    """

    FILES = 8

    def __init__(self):
        self._on = hasattr(os, "posix_fadvise")
        self._files: dict[object, list[int]] = {}  # file -> [fd, dropped below, furthest read], oldest first

    def read(self, file: object, offset: int, path: Callable[[], str]) -> None:
        if not self._on:
            return
        try:
            state = self._files.pop(file, None)
            if state is None:
                if len(self._files) >= self.FILES:
                    self._forget(next(iter(self._files)))
                state = [os.open(path(), os.O_RDONLY), 0, 0]
            self._files[file] = state  # the most recent last
            fd, dropped, reached = state
            reached = state[2] = max(reached, offset)
            end = (reached - WINDOW) & ~_PAGE_MASK
            if end >= dropped + WINDOW:
                _drop(fd, dropped, end)
                state[1] = end
        except OSError as e:
            log.debug("read-behind turned off: %s", e)
            self.close()
            self._on = False

    def _forget(self, file: object) -> None:
        fd = self._files.pop(file)[0]
        try:
            _drop(fd)  # the rest of the file: the reads are done with it
        finally:
            os.close(fd)

    def close(self) -> None:
        while self._files:
            try:
                self._forget(next(iter(self._files)))
            except OSError:
                pass
