"""The archive writer without Borg's internals: a tar stream piped into ``borg import-tar``.

Each image becomes a tar member streamed to ``borg import-tar --chunker-params fixed,<block>``,
so Borg cuts it into the same blocks as the internal writer would. Holes are sent as zero
bytes and nothing can be reused, so it reads every block; it cannot tell the chunk ids either.
The fallback when Borg's internals are not usable, and the baseline the internal writer is
measured against.
"""

from __future__ import annotations

import contextlib
import json
import logging
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from typing import IO

from ovirt_borg import borgcli
from ovirt_borg.archive import DIR_MODE, FILE_MODE, OWNER, ArchiveWriter, Block, Holes, ImageStats, Reuse
from ovirt_borg.borgcli import Repo
from ovirt_borg.errors import RepositoryError

log = logging.getLogger(__name__)


def open_writer(repo: Repo, archive_name: str, *, block_size: int, base_archive: str | None,
                comment: str) -> ArchiveWriter:
    """Return the command-line writer (see ``archive.open_writer``, which checks the arguments)."""
    return _CliWriter(repo, archive_name, block_size=block_size, base_archive=base_archive, comment=comment)



class _CountingPipe:
    """Write-only file object over a pipe that knows its position (tarfile asks ``tell()``)."""

    def __init__(self, pipe: IO[bytes]):
        self._pipe = pipe
        self._position = 0

    def write(self, data) -> int:
        self._pipe.write(data)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def flush(self) -> None:
        self._pipe.flush()


class _ImageReader:
    """Read-only file object giving an image's bytes from its blocks (holes as zeros)."""

    def __init__(self, writer: _CliWriter, path: str, size: int, blocks: Iterable[Block]):
        self._writer = writer
        self._path = path
        self._size = size
        self._blocks = iter(blocks)
        self._holes_left = 0  # of a Holes run being given out
        self._buffer = memoryview(b"")
        self.exhausted = False
        self.counters = {"holes": 0, "reused": 0, "stored": 0, "bytes_new": 0}
        self.count = 0

    def _next_block(self) -> bytes | memoryview | None:
        if self._holes_left:
            self._holes_left -= 1
            block = None
        else:
            try:
                block = next(self._blocks)
            except StopIteration:
                self.exhausted = True
                return None
            if isinstance(block, Holes):
                if block.count < 1:
                    raise ValueError(f"{self._path}: a run of {block.count} blocks")
                self._holes_left = block.count - 1
                block = None
        position = self.count
        self.count += 1
        length = self._writer._block_length(position, self._size, self._path)
        if block is None:
            self.counters["holes"] += 1
            return self._writer._zero_block(length)
        if isinstance(block, Reuse):
            raise ValueError(f"{self._path}: the command-line writer cannot reuse blocks")
        if len(block) != length:
            raise ValueError(f"{self._path}: block {position} has {len(block)} bytes, {length} expected")
        self.counters["stored"] += 1
        self.counters["bytes_new"] += length
        return block if isinstance(block, bytes) else bytes(block)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise ValueError("the image reader reads in blocks only")
        if not self._buffer:
            block = self._next_block()
            if block is None:
                return b""
            if len(block) == size:
                return block  # the usual case: tarfile reads exactly one block
            self._buffer = memoryview(block)
        piece, self._buffer = self._buffer[:size], self._buffer[size:]
        return bytes(piece)

    def finish(self) -> None:
        """Raise ``ValueError`` if blocks were left over or missing."""
        if self._buffer or self._next_block() is not None:
            raise ValueError(f"{self._path}: more blocks than {self._size} bytes hold")
        expected = self._writer._block_count(self._size)
        if self.count != expected:
            raise ValueError(f"{self._path}: {self.count} blocks given, {expected} expected")


# Borg failures that happen before borg import-tar could write anything.
_NEVER_WROTE = frozenset({"LockTimeout", "PassphraseWrong", "NoPassphraseFailure", "PasscommandFailure",
                          "Repository.DoesNotExist", "Repository.InvalidRepository", "Archive.AlreadyExists"})


class _CliWriter(ArchiveWriter):
    """ArchiveWriter streaming a tar into ``borg import-tar`` (see the module docstring)."""

    comment_at_open = True  # it is borg import-tar's --comment

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._process: borgcli.BorgProcess | None = None
        self._tar: tarfile.TarFile | None = None
        self._zeros: dict[int, bytes] = {}

    def _lock(self) -> None:
        # borg import-tar takes the lock itself when it starts, which is after the engine
        # prepared its backup (the comment names the checkpoint); until then, make sure no
        # other borg holds it.
        borgcli.wait_for_lock(self.repo)

    def _open(self) -> None:
        args = ["import-tar", "--json", "--checkpoint-interval", "0",
                "--chunker-params", f"fixed,{self.block_size}", "--compression", self.repo.compression]
        if self.comment:
            args += ["--comment", self.comment]
        args += [borgcli.archive_location(self.repo, self.archive_name), "-"]
        self._process = borgcli.BorgProcess(self.repo, *args, stdin=subprocess.PIPE, archive=self.archive_name,
                                            die_with_parent=True, writes=True)
        try:
            # PAX headers carry sizes beyond 8 GiB; reading a whole block at a time keeps it fast.
            self._tar = tarfile.open(fileobj=_CountingPipe(self._process.proc.stdin), mode="w",
                                     format=tarfile.PAX_FORMAT, copybufsize=self.block_size)
        except BaseException:
            self._process.terminate()
            raise
        log.debug("writing archive %s to %s through borg import-tar (block size %d)", self.archive_name,
                  self.repo.location, self.block_size)

    def _zero_block(self, length: int) -> bytes:
        block = self._zeros.get(length)
        if block is None:
            block = self._zeros[length] = bytes(length)
        return block

    def base_image(self, path: str, size: int, chunk_ids: bytes) -> bool:
        self._require_open()
        if self.base_archive:
            log.info("not reusing %s of base archive %s: the command-line writer reads every block",
                     path, self.base_archive)
        return False

    def _tarinfo(self, path: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = kind
        info.mode = stat.S_IMODE(mode)
        info.size = size
        info.mtime = self._mtime_ns // 1_000_000_000
        info.uid = info.gid = 0
        info.uname = info.gname = OWNER
        return info

    @contextlib.contextmanager
    def _borg_pipe(self) -> Iterator[None]:
        """Turn a write to a borg that has exited into borg's own error."""
        try:
            yield
        except (BrokenPipeError, ConnectionResetError) as exc:
            returncode = self._process.wait()
            borgcli.raise_for_borg(self.repo, returncode or 2, self._process.log, archive=self.archive_name,
                                   allow_warning=False)
            raise RepositoryError(f"borg import-tar stopped reading: {exc}") from exc

    def _write_directory(self, path: str) -> None:
        with self._borg_pipe():
            self._tar.addfile(self._tarinfo(path, tarfile.DIRTYPE, DIR_MODE, 0))

    def _write_image(self, path: str, size: int, blocks: Iterable[Block], *, reusable: bool) -> ImageStats:
        reader = _ImageReader(self, path, size, blocks)
        started = time.monotonic()
        with self._borg_pipe():
            try:
                self._tar.addfile(self._tarinfo(path, tarfile.REGTYPE, FILE_MODE, size), reader if size else None)
            except OSError as exc:
                if reader.exhausted:
                    raise ValueError(f"{path}: {reader.count} blocks given, {self._block_count(size)} "
                                     f"expected for {size} bytes") from exc
                raise
        reader.finish()
        result = ImageStats(blocks=reader.count, **reader.counters)
        elapsed = time.monotonic() - started
        log.debug("%s: %d blocks (%d holes, %d read) sent to borg, %.1f MiB/s", path, result.blocks,
                  result.holes, result.stored, result.bytes_new / (1 << 20) / elapsed if elapsed > 0 else 0.0)
        return result

    def commit(self) -> str:
        self._require_open()
        try:
            with self._borg_pipe():
                self._tar.close()
                self._process.proc.stdin.close()
            output = self._process.proc.stdout.read()
            self._process.check(allow_warning=True)
            archive_id = json.loads(output)["archive"]["id"]
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self._process.proc.stdout.close()
        self._state = "committed"
        log.debug("committed archive %s (%s) to %s", self.archive_name, archive_id, self.repo.location)
        return archive_id

    def _abort(self, exc_type, exc, tb) -> None:
        process = self._process
        process.terminate()
        created = process.proc.returncode == 0
        msgid, _ = process.log.error()
        if msgid in _NEVER_WROTE:
            return
        # Borg writes no checkpoint with --checkpoint-interval 0 and SIGTERM, but a checkpoint
        # or (if it got that far) the archive itself must not outlive an aborted run.
        leftovers = [entry["name"] for entry in borgcli.list_archives(self.repo, checkpoints=True)
                     if entry["name"].startswith(self.archive_name + ".checkpoint")
                     or (created and entry["name"] == self.archive_name)]
        for name in leftovers:
            log.warning("deleting %s left in %s by the aborted borg import-tar", name, self.repo.location)
            borgcli.delete_archive(self.repo, name)
