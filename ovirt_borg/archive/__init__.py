"""Borg archives whose every disk is one complete raw image: the writer and reader interface.

A disk image is cut into fixed-size, aligned blocks (``block_size``, one Borg chunk each) and
given to :meth:`ArchiveWriter.add_image` in order, each block being one of:

- ``None`` or ``Holes(n)``: one or ``n`` holes (all zeros, not read). The item references the
  all-zero chunk of that length, stored once per repository, so ``borg extract --sparse``
  writes a hole;
- ``Reuse(i, n)``: blocks ``i`` .. ``i + n - 1`` of the same image in the base archive, known by
  the chunk ids ``add_image`` returned for it (see :meth:`ArchiveWriter.base_image`). Those
  chunks are referenced: no read, no upload;
- bytes-like data of the block. It is hashed, compressed, encrypted and stored as a new chunk,
  or referenced if the repository has that chunk already.

Only the last block may be shorter than ``block_size``. The result is an archive whose items
look like regular files (mode 0o100600, owner root, mtime = time of the backup) below
directories for their parent paths, so ``borg list``, ``extract``, ``extract --sparse``,
``mount``, ``check --verify-data``, ``prune``, ``delete`` and ``compact`` treat it like any
other archive: a *synthetic full*.

``open_writer(kind=...)`` picks the writer's backend from ``WRITERS`` (kind -> module of this
package, imported on first use); each backend module has ``open_writer(repo, archive_name, *,
block_size, base_archive, comment)`` returning an :class:`ArchiveWriter`:

``internal`` (default): :mod:`ovirt_borg.archive.borg14`
    Borg 1.4's Python internals, the only module of ovirt-borg that imports Borg. Borg 2
    (``borg create --map/--reuse-from``) would be one more backend module.
``cli``: :mod:`ovirt_borg.archive.tarpipe`
    No internals: a tar stream piped into ``borg import-tar --chunker-params fixed,<block>``.
    Holes are sent as zero bytes and nothing can be reused, so it reads every block.

Both write nothing visible unless :meth:`ArchiveWriter.commit` is called inside the ``with``
block: leaving it otherwise (an exception, ``KeyboardInterrupt``) rolls the repository back and
releases its lock.

Images are read back (restore, verify) by the functions of :mod:`ovirt_borg.archive.reader`,
re-exported here: ``read_image`` and its kin, ``read_file``, ``repository_view``.
"""

from __future__ import annotations

import errno
import importlib
import logging
import math
import stat
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Union

from ovirt_borg import borgcli
from ovirt_borg.borgcli import Repo
from ovirt_borg.errors import ConfigError

__all__ = ["WRITERS", "ArchiveWriter", "BaseBlocks", "Block", "Holes", "ImageStats", "Repo", "RepositoryView", "Reuse",
           "check_compression", "image_chunk_ids", "image_data_extents", "open_writer", "read_file",
           "read_image", "read_image_with_ids", "read_top_files", "repository_id", "repository_view"]

log = logging.getLogger(__name__)

#: The writer backends: kind (the ``repository.writer`` setting) -> module of this package.
WRITERS = {"internal": "borg14", "cli": "tarpipe"}

#: Mode, owner and directory mode of the items written.
FILE_MODE = stat.S_IFREG | 0o600
DIR_MODE = stat.S_IFDIR | 0o700
OWNER = "root"


class Reuse(NamedTuple):
    """Reuse blocks ``index`` .. ``index + count - 1`` of the base image, in place of as many
    blocks (their chunks are referenced, not read or sent)."""

    index: int
    count: int = 1


class Holes(NamedTuple):
    """``count`` blocks that read as zeros (they reference the all-zero chunk)."""

    count: int


#: Blocks of an image as given to ``add_image``: a hole (None), a run of holes, a run of reused
#: blocks, or one block's data.
Block = Union[None, Holes, Reuse, bytes, bytearray, memoryview]


@dataclass(frozen=True)
class ImageStats:
    """What ``add_image`` did with the blocks of one image.

    ``blocks`` = ``holes`` + ``reused`` + ``stored``; ``stored`` counts the data blocks given
    and ``bytes_new`` their bytes. Of those, ``deduplicated`` blocks were already in the
    repository; ``bytes_stored`` is what the others took in it (compressed and encrypted; 0 for
    the command-line writer, which cannot tell). ``chunk_ids`` holds the Borg chunk id of every
    block in order, 32 bytes each (empty from the command-line writer, which cannot tell):
    what a later ``base_image`` needs to reuse these blocks, and a keyed digest of each block
    that ``verify`` can check the archive against.
    """

    blocks: int
    holes: int
    reused: int
    stored: int
    bytes_new: int
    bytes_stored: int = 0
    deduplicated: int = 0
    chunk_ids: bytes = b""


def open_writer(repo: Repo, archive_name: str, *, block_size: int, base_archive: str | None,
                comment: str = "", kind: str = "internal") -> ArchiveWriter:
    """Return a writer for the new archive ``archive_name`` in ``repo``; use it with ``with``.

    Given the repository, the archive name, the block (chunk) size of the images, the name of
    the archive whose images blocks may be reused from (or None), the archive comment and the
    writer kind (``internal`` or ``cli``). The repository is opened (and locked) when the
    ``with`` block is entered. Raises ``ConfigError`` for a bad kind, name or block size.
    """
    if not archive_name or "/" in archive_name or len(archive_name) > 255 or archive_name != archive_name.strip():
        raise ConfigError(f"invalid archive name {archive_name!r}: it must be 1..255 characters, without "
                          f"'/' or surrounding blanks")
    if not 64 <= block_size <= 20971478:
        raise ConfigError(f"invalid block size {block_size}: Borg needs 64 bytes .. 20 MiB")
    module = WRITERS.get(kind)
    if module is None:
        raise ConfigError(f"unknown archive writer {kind!r}: use {' or '.join(map(repr, WRITERS))}")
    backend = importlib.import_module(f"{__name__}.{module}")
    return backend.open_writer(repo, archive_name, block_size=block_size, base_archive=base_archive,
                               comment=comment)


def check_compression(spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` is a Borg compression spec (as ``lz4`` or ``zstd,3``).

    Both writers hand it to Borg, so Borg's own parser decides; given at configuration time so
    that a bad spec fails before any backup starts.
    """
    importlib.import_module(f"{__name__}.borg14").check_compression(spec)


class BaseBlocks:
    """Blocks of a base image in the order asked, as ``(index, data)``; from
    ``ArchiveWriter.base_blocks``. An iterator and a context manager: leaving it, or
    ``close()``, stops the blocks read ahead and waits for the reads under way, so that nothing
    reads the repository after it (closing twice is harmless).

    This one reads each block when it is asked for (``read(index)``); a writer that can read
    ahead gives a subclass of its own.
    """

    def __init__(self, read: Callable[[int], bytes], indexes: Sequence[int]):
        self._read = read
        self._indexes = iter(indexes)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return self

    def __next__(self) -> tuple[int, bytes]:
        index = next(self._indexes)
        return index, self._read(index)

    def close(self) -> None:
        """Stop reading; return once no read of this object is under way."""
        self._indexes = iter(())

    def __enter__(self) -> BaseBlocks:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


@dataclass(frozen=True)
class RepositoryView:
    """What a run needs to know of a repository before writing to it."""

    id: str  # 64 hex digits, as ``borg info --json`` reports it
    archives: frozenset[str]  # the names of its archives, checkpoints included


class ArchiveWriter(ABC):
    """Writes one archive: images, small files, then ``commit()``; a context manager.

    Entering opens and locks the repository (raising ``RepositoryBusy``, ``AuthError`` or
    ``RepositoryError``); leaving without ``commit()`` leaves no archive and releases the lock.
    """

    #: Whether ``add_image`` returns the chunk id of every block (``ImageStats.chunk_ids``).
    gives_chunk_ids = False
    #: Whether ``comment`` is read when the writer is entered (else when it commits).
    comment_at_open = False

    def __init__(self, repo: Repo, archive_name: str, *, block_size: int, base_archive: str | None,
                 comment: str):
        self.repo = repo
        self.archive_name = archive_name
        self.block_size = block_size
        self.base_archive = base_archive
        self.comment = comment
        self._state = "new"  # new -> open -> committed | aborted
        self._paths: set[str] = set()
        self._dirs: set[str] = set()
        self._mtime_ns = time.time_ns()

    # -- context manager -------------------------------------------------------------------

    def lock(self) -> None:
        """Take the repository's lock now, before the writer is entered (which then opens the rest).

        Raises ``RepositoryBusy`` after ``lock_wait`` when another borg holds it (a shared lock,
        as ``borg mount`` or ``borg list`` take, included), other typed errors when the
        repository cannot be reached. Call ``release()`` if the writer is then never entered.
        """
        if self._state != "new":
            raise RuntimeError(f"archive writer for {self.archive_name} is {self._state}, not new")
        self._lock()
        self._state = "locked"

    def release(self) -> None:
        """Give the lock taken by ``lock()`` back when the writer was not entered (else nothing)."""
        if self._state == "locked":
            self._state = "aborted"
            self._release()

    def __enter__(self) -> ArchiveWriter:
        if self._state not in ("new", "locked"):
            raise RuntimeError("an ArchiveWriter can be entered only once")
        self._open()
        self._state = "open"
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        if exc_type is None:
            log.warning("archive %s was not committed: nothing was written to %s",
                        self.archive_name, self.repo.location)
        else:
            log.info("archive %s aborted (%s): rolling back %s", self.archive_name,
                     exc_type.__name__, self.repo.location)
        try:
            self._abort(exc_type, exc, tb)
        except Exception:
            # Cleanup must not hide the error that made us abort.
            if exc_type is None:
                raise
            log.exception("rollback of archive %s in %s failed", self.archive_name, self.repo.location)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Borg writes its segments (and its cache) with plain file writes; after the rollback
            # above freed what this archive took, say it as the repository error it is.
            raise borgcli.translate_error("Repository.InsufficientFreeSpaceError", str(exc), repo=self.repo,
                                          archive=self.archive_name) from exc

    # -- interface -------------------------------------------------------------------------

    def _lock(self) -> None:  # noqa: B027 (optional: a backend without a lock of its own)
        """Take (or make sure of) the repository's lock for ``lock()``; raises typed errors."""

    def _release(self) -> None:  # noqa: B027 (optional, as _lock)
        """Give back what ``_lock()`` took."""

    @abstractmethod
    def base_image(self, path: str, size: int, chunk_ids: bytes) -> bool:
        """Say whether ``Reuse`` blocks of the image ``path`` may refer to its blocks in the base archive.

        Given the image path, its size (the same in the base archive and now) and the chunk
        ids of its blocks in the base archive (``ImageStats.chunk_ids`` of the backup that wrote
        it). The base image is not read: True if the base archive exists, there is one id per
        block of this block size, and the repository holds every one of those chunks with the
        length of its block; otherwise False, logging why.
        """

    def is_base_block(self, path: str, index: int, data: bytes) -> bool:
        """Say whether ``data`` is block ``index`` of ``path`` in the base archive.

        Only after ``base_image(path, size)`` returned True. Used to compare blocks the dirty
        bitmap calls clean with what the disk holds now; the base archive is not read (the
        chunk id of ``data`` is compared with the recorded one). Raises ``ValueError`` when the
        image was not accepted as a base or has no such block.
        """
        raise ValueError(f"{path} has no usable base image in this writer")

    def base_block(self, path: str, index: int) -> bytes:
        """Return block ``index`` of the image ``path`` as the base archive holds it.

        Only after ``base_image(path, size)`` returned True; for a block changed in part, whose
        clean parts are taken from it (``plan.Action.REBUILD``). Called while ``add_image``
        runs (by its block iterator, or by ``base_blocks`` reading ahead in threads of the
        writer): the repository is read through the writer's own open repository and key,
        between its writes. A hole (the all-zero chunk)
        gives zeros without a read; any other block is read from the repository, decrypted and
        checked against its chunk id. Raises ``ValueError`` when the image was not accepted as
        a base or has no such block, typed errors for repository failures.
        """
        raise ValueError(f"{path} has no usable base image in this writer")

    def base_blocks(self, path: str, indexes: Sequence[int]) -> BaseBlocks:
        """Return blocks ``indexes`` (in that order) of the image ``path`` as the base archive
        holds them, as ``base_block`` gives each; a writer may read them ahead, a bounded
        number at a time, in threads of its own, while ``add_image`` runs.

        Only after ``base_image(path, size)`` returned True. Use it as a context manager
        around the ``add_image`` whose block iterator takes the blocks. Iterating raises what
        ``base_block`` raises, for the block that failed.
        """
        self._require_open()
        return BaseBlocks(lambda index: self.base_block(path, index), indexes)

    def add_image(self, path: str, size: int, blocks: Iterable[Block]) -> ImageStats:
        """Add the image ``path`` of ``size`` bytes, given as its blocks in order.

        Each item is ``None`` (a hole), ``Holes(n)`` (n holes), ``Reuse(i, n)`` (blocks i ..
        i + n - 1 of the base image, only after ``base_image(path, size)`` returned True) or one
        block's bytes; together ``ceil(size / block_size)`` blocks, all ``block_size`` long but
        the last. Data blocks are copied if they are not ``bytes``
        (the caller may reuse its buffers). Returns what was done. Raises ``ValueError`` for
        blocks that do not fit, typed errors for repository failures, and whatever the block
        iterator raises; the archive must then be abandoned (leave the ``with`` block).
        """
        self._require_open()
        self._claim(path)
        if size < 0:
            raise ValueError(f"negative size {size} for {path}")
        self._ensure_parents(path)
        return self._write_image(path, size, blocks, reusable=True)

    def add_file(self, path: str, data: bytes) -> None:
        """Add a small regular file (the OVF, the sidecar) with content ``data``.

        Raises ``ValueError`` for a bad or repeated path, typed errors for repository failures.
        """
        self._require_open()
        self._claim(path)
        self._ensure_parents(path)
        data = bytes(data)
        pieces = [data[offset:offset + self.block_size] for offset in range(0, len(data), self.block_size)]
        self._write_image(path, len(data), pieces, reusable=False)

    @abstractmethod
    def commit(self) -> str:
        """Commit the archive; return its id (64 hex digits) and release the repository.

        Raises typed errors if Borg fails (then nothing was committed).
        """

    @property
    def committed(self) -> bool:
        """The archive is in the repository (also when closing the repository after failed)."""
        return self._state == "committed"

    # -- shared helpers --------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"archive writer for {self.archive_name} is {self._state}, not open "
                               f"(use it inside 'with', before commit())")

    def _claim(self, path: str) -> None:
        parts = path.split("/")
        if not path or path.startswith("/") or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"invalid archive path {path!r}: it must be relative, without '.', '..' or '//'")
        if path in self._paths or path in self._dirs:
            raise ValueError(f"{path} is already in archive {self.archive_name}")
        for depth in range(1, len(parts)):
            if "/".join(parts[:depth]) in self._paths:
                raise ValueError(f"{path}: its parent is a file in archive {self.archive_name}")
        self._paths.add(path)

    def _ensure_parents(self, path: str) -> None:
        # Borg create writes a directory before its contents; do the same so extract and
        # mount give the directories sensible modes.
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in self._dirs:
                self._dirs.add(directory)
                self._write_directory(directory)

    def _block_length(self, position: int, size: int, path: str) -> int:
        remaining = size - position * self.block_size
        if remaining <= 0:
            raise ValueError(f"{path}: more blocks than {size} bytes in blocks of {self.block_size} hold")
        return min(self.block_size, remaining)

    def _block_count(self, size: int) -> int:
        return math.ceil(size / self.block_size)

    def _run_lengths(self, position: int, count: int, size: int, path: str) -> list[tuple[int, int]]:
        """The blocks ``position`` .. ``position + count - 1`` of an image of ``size`` bytes as
        (block length, how many) pieces: the full blocks, then the short last one if included."""
        if count < 1:
            raise ValueError(f"{path}: a run of {count} blocks")
        last = self._block_length(position + count - 1, size, path)
        if last == self.block_size or count == 1:
            return [(last, count)]
        return [(self.block_size, count - 1), (last, 1)]

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _abort(self, exc_type, exc, tb) -> None: ...

    @abstractmethod
    def _write_directory(self, path: str) -> None: ...

    @abstractmethod
    def _write_image(self, path: str, size: int, blocks: Iterable[Block], *, reusable: bool) -> ImageStats:
        """Write the item ``path`` from its blocks; ``reusable``: ``Reuse`` blocks are allowed."""


# The reader's functions are part of this package's surface; the reader and the backends import
# the interface above, so they are imported after it.
from ovirt_borg.archive.reader import (image_chunk_ids, image_data_extents, read_file, read_image,  # noqa: E402
                                       read_image_with_ids, read_top_files, repository_id, repository_view)
