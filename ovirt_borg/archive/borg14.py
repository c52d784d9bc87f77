"""The archive writer on Borg 1.4's Python internals, and what the reader needs of them.

The only module of ovirt-borg that imports Borg (on first use: it is a heavy import). It uses
``Repository``/``RemoteRepository``, ``Manifest``, ``Cache`` and its chunk index, ``Archive``
and ``Item``. A run of holes or reused blocks references its chunks in one step: the chunk
index's ``incref`` per chunk and one statistics update, what ``Cache.chunk_incref`` does per
call.

How the work is shared between threads (read from the Borg 1.4 sources): chunk-id hashing
(``hashlib`` blake2b / HMAC-SHA256) releases the GIL, so two worker threads hash in parallel.
Compression releases the GIL too, but all of Borg's compressors write into one module-global
buffer, so it admits one thread at a time. The cipher keeps the GIL for AES-CTR (only its MAC,
in ``hashlib``, releases it) and a cipher object carries state, so each worker encrypts with a
cipher of its own, taking its nonces from the key's counter under a lock. The calling thread
writes to the repository. All-zero blocks are never hashed. docs/BENCHMARKS.md has the
measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from ovirt_borg import borgcli, pagecache
from ovirt_borg.archive import DIR_MODE, FILE_MODE, OWNER, ArchiveWriter, BaseBlocks, Block, Holes, ImageStats, Reuse
from ovirt_borg.borgcli import SECRET_ENV, Repo
from ovirt_borg.errors import ConfigError, NotFound, OvirtBorgError, RepositoryError

log = logging.getLogger(__name__)

#: Borg versions whose internals this module was written against (>= first, < second).
SUPPORTED_BORG = ((1, 4), (1, 5))

#: Worker threads hashing and encrypting (or decrypting) data blocks; with 2 cores more only
#: adds contention.
WORKERS = max(1, min(2, os.cpu_count() or 1))
#: Data blocks in flight (each holds its data and, once encrypted, its ciphertext). More (tried:
#: 32 MiB worth of 1 MiB blocks) made backup and restore slower, not faster.
IN_FLIGHT = 2 * WORKERS + 2
#: Threads reading and decrypting the base chunks of rebuilt blocks ahead (``base_blocks``):
#: the MAC and id checks release the GIL, so two decrypt side by side.
BASE_READERS = WORKERS
#: Base blocks read ahead of the one the block iterator needs (each held whole until taken),
#: and so also the preloaded gets a remote repository has under way at a time.
BASE_AHEAD = 2 * BASE_READERS + 2
# Seconds a remote repository may take to open before the log says it may be locked.
_REMOTE_WAIT_NOTICE = 2.0
# Borg 1.x chunk ids are 32 bytes (keyed BLAKE2b-256 or HMAC-SHA256).
_ID_SIZE = 32


def open_writer(repo: Repo, archive_name: str, *, block_size: int, base_archive: str | None,
                comment: str) -> ArchiveWriter:
    """Return the internal writer (see ``archive.open_writer``, which checks the arguments)."""
    return _InternalWriter(repo, archive_name, block_size=block_size, base_archive=base_archive, comment=comment)


def check_compression(spec: str) -> None:
    """Raise ``ValueError`` (with Borg's words) unless Borg parses ``spec`` as a compression spec."""
    from borg.compress import CompressionSpec

    try:
        CompressionSpec(spec)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise ValueError(str(exc)) from None



class _BorgInternals:
    """The Borg 1.4 names this module uses, imported on first use (Borg is a heavy import)."""

    def __init__(self):
        import borg
        import borg.logger
        from borg.archive import Archive
        from borg.cache import Cache, ChunkListEntry
        from borg.compress import CompressionSpec
        from borg.constants import zeros
        from borg.helpers import Error, Manifest, bin_to_hex
        from borg.helpers.parseformat import ChunkerParams, Location
        from borg.crypto.low_level import IntegrityError
        from borg.item import Item
        from borg.locking import LockError, LockErrorT, LockTimeout
        from borg.remote import RemoteRepository
        from borg.repository import Repository

        version = tuple(int(part) for part in borg.__version__.split(".")[:2])
        if not SUPPORTED_BORG[0] <= version < SUPPORTED_BORG[1]:
            raise RepositoryError(
                f"borgbackup {borg.__version__} is installed, but the archive writer needs "
                f">= {'.'.join(map(str, SUPPORTED_BORG[0]))}, < {'.'.join(map(str, SUPPORTED_BORG[1]))}; "
                f"install a supported version or use the 'cli' writer")
        self.Archive = Archive
        self.Cache = Cache
        self.ChunkListEntry = ChunkListEntry
        self.CompressionSpec = CompressionSpec
        self.zeros = zeros
        self.Error = Error
        self.Manifest = Manifest
        self.bin_to_hex = bin_to_hex
        self.ChunkerParams = ChunkerParams
        self.Location = Location
        self.Item = Item
        self.LockTimeout = LockTimeout
        self.RemoteRepository = RemoteRepository
        self.Repository = Repository
        #: Everything Borg raises on purpose (translated into ovirt-borg's typed errors).
        self.errors = (Error, LockError, LockErrorT, IntegrityError, RemoteRepository.RPCError)
        # Borg's loggers refuse to log until borg.logger.setup_logging() ran, which would
        # install Borg's own root handler. Let its records flow into the application's logging.
        if not borg.logger.configured:
            borg.logger.configured = True
        borg_logger = logging.getLogger("borg")
        if not hasattr(borg_logger, "json"):
            borg_logger.json = False


_internals: _BorgInternals | None = None
# os.environ is process-wide: one internal writer at a time per process.
_internal_writer_lock = threading.Lock()
_writer_thread: int | None = None  # the thread whose internal writer holds the lock


def _release_writer_lock() -> None:
    global _writer_thread
    _writer_thread = None
    _internal_writer_lock.release()


def _borg() -> _BorgInternals:
    global _internals
    if _internals is None:
        _internals = _BorgInternals()
    return _internals


def _split_environment(repo: Repo) -> tuple[dict[str, str], dict[str, str | None]]:
    """``repo.env`` as the settings for Borg's internals and, apart, the passphrase variables
    (``borgcli.secret_environment``)."""
    settings = {name: value for name, value in repo.env.items() if name not in SECRET_ENV}
    return settings, borgcli.secret_environment(repo)


@contextlib.contextmanager
def _environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block (Borg's internals read it; None unsets),
    then restore."""
    saved = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Prepared(NamedTuple):
    chunk_id: bytes
    size: int
    encrypted: bytes | None  # None: the repository had the chunk when it was hashed


class _InternalWriter(ArchiveWriter):
    """ArchiveWriter on Borg 1.4's Python internals (see the module docstring)."""

    gives_chunk_ids = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stack = contextlib.ExitStack()
        self._pool: ThreadPoolExecutor | None = None
        # Borg's compressors share one output buffer: one thread at a time. The cipher lock
        # guards the key's nonce counter and Borg's own encryptions (items, manifest). The
        # repository lock keeps the calls to the repository object (which talks to one borg
        # serve over one pipe) one at a time: the calling thread's puts, the gets of base
        # blocks (read ahead in threads of their own, _BaseBlockReader), and the nonce
        # reservations a worker's encryption makes now and then (Borg's NonceManager calls the
        # repository). Taken in this order when more than one is needed.
        self._compress_lock = threading.Lock()
        self._cipher_lock = threading.Lock()
        self._repository_lock = threading.Lock()
        self._seal = None  # the cipher step of key.encrypt, when it can be run on its own
        self._write_behind: Callable[[], None] | None = None  # see _segment_write_behind
        self._zero_ids: dict[int, bytes] = {}
        # length -> the id of the all-zero block of that length (base_block's holes; unlike
        # _zero_ids, not a sign that the chunk was referenced in this archive)
        self._zero_hashes: dict[int, bytes] = {}
        self._opener: ChunkOpener | None = None  # decrypts base blocks (base_block)
        self._opener_lock = threading.Lock()
        # path -> the chunk ids (32 bytes each, in block order) of an image base_image() accepted
        self._base_images: dict[str, bytes] = {}
        self._repository = None

    # -- open / close ----------------------------------------------------------------------

    def _translate(self, exc: BaseException) -> OvirtBorgError:
        return borgcli.translate_error(type(exc).__qualname__, str(exc), repo=self.repo,
                                       archive=self.archive_name)

    @contextlib.contextmanager
    def _borg_errors(self) -> Iterator[None]:
        """Turn Borg's exceptions raised in the block into typed errors."""
        borg = _borg()
        try:
            yield
        except borg.errors as exc:
            raise self._translate(exc) from exc

    def _lock(self) -> None:
        global _writer_thread
        if not _internal_writer_lock.acquire(blocking=False):
            raise RuntimeError("another internal archive writer is open in this process")
        _writer_thread = threading.get_ident()
        self._stack.callback(_release_writer_lock)
        self._guarded(self._lock_repository)

    def _release(self) -> None:
        self._stack.close()

    def _open(self) -> None:
        if self._repository is None:
            self._lock()
        self._guarded(self._open_repository)

    def _guarded(self, step: Callable[[], None]) -> None:
        """Run an opening step; on failure close what is open (the lock too) and raise."""
        try:
            with self._borg_errors():
                step()
        except BaseException:
            try:
                self._stack.close()
            except Exception:
                log.exception("closing repository %s after a failed open failed", self.repo.location)
            raise

    def _lock_repository(self) -> None:
        borg = _borg()
        settings, self._secrets = _split_environment(self.repo)
        self._stack.enter_context(_environment(settings))
        try:
            self._compressor = borg.CompressionSpec(self.repo.compression).compressor
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"invalid Borg compression {self.repo.compression!r}: {exc}") from exc
        try:
            location = borg.Location(self.repo.location)
        except ValueError as exc:
            raise ConfigError(f"invalid Borg repository location {self.repo.location!r}: {exc}") from exc
        started = time.monotonic()
        if self.repo.lock_wait > 0:
            # A first try that does not wait tells whether another borg holds the lock, so the
            # log can say why the run stands still before it waits for up to lock_wait seconds.
            try:
                self._repository = self._stack.enter_context(self._locked_repository(location, lock_wait=0))
            except borg.LockTimeout:
                borgcli.log_lock_wait(self.repo)
        if self._repository is None:
            self._repository = self._stack.enter_context(
                self._locked_repository(location, lock_wait=self.repo.lock_wait))
        log.debug("locked repository %s in %.1f s", self.repo.location, time.monotonic() - started)

    def _open_repository(self) -> None:
        borg = _borg()
        # The secrets are in os.environ only while the key is read: the ssh started above must
        # not inherit them, and nothing later needs them.
        with _environment(self._secrets):
            self._manifest, self._key = borg.Manifest.load(self._repository, (borg.Manifest.Operation.WRITE,))
        self._key.compressor = self._compressor
        self._seal = _sealer(self._key, self._cipher_lock, self._repository_lock)
        self._cache = self._stack.enter_context(
            borg.Cache(self._repository, self._key, self._manifest, lock_wait=self.repo.lock_wait))
        # Leaving with an exception must undo the chunk references counted in this transaction.
        self._stack.push(lambda exc_type, exc, tb: self._cache.rollback() if exc_type else None)
        self._archive = borg.Archive(self._repository, self._key, self._manifest, self.archive_name,
                                     cache=self._cache, create=True, checkpoint_interval=0,
                                     chunker_params=borg.ChunkerParams(f"fixed,{self.block_size}"))
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="borg-chunks")
        self._stack.callback(self._pool.shutdown, wait=True, cancel_futures=True)
        self._write_behind = _segment_write_behind(self._repository)
        log.debug("writing archive %s to %s (block size %d, base %s)", self.archive_name,
                 self.repo.location, self.block_size, self.base_archive or "none")

    def _locked_repository(self, location, *, lock_wait: int):
        """Return the repository at ``location``, opened and exclusively locked, or raise LockTimeout.

        A remote repository is opened here; a local one when its context is entered.
        """
        return _repository(location, exclusive=True, lock_wait=lock_wait)

    def _abort(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            exc_type, exc = _NotCommitted, _NotCommitted()
        # Borg's Repository rolls its transaction back when left with an exception.
        self._stack.__exit__(exc_type, exc, tb)

    def commit(self) -> str:
        self._require_open()
        borg = _borg()
        try:
            with self._borg_errors(), self._compress_lock, self._cipher_lock, self._repository_lock:
                self._archive.save(comment=self.comment)
            archive_id = borg.bin_to_hex(self._archive.id)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        self._state = "committed"
        try:
            self._stack.close()
        except Exception:
            # The repository has committed: the archive exists whatever happens now.
            log.exception("archive %s is committed, but closing repository %s failed", self.archive_name,
                          self.repo.location)
        stats = self._archive.stats
        log.debug("committed archive %s (%s) to %s: %d files, %d bytes, %d bytes new in the repository",
                 self.archive_name, archive_id, self.repo.location, stats.nfiles, stats.osize, stats.usize)
        return archive_id

    # -- base archive ----------------------------------------------------------------------

    def base_image(self, path: str, size: int, chunk_ids: bytes) -> bool:
        self._require_open()
        if not self.base_archive:
            return False
        why = self._base_unusable(size, chunk_ids)
        if why:
            log.info("not reusing %s of base archive %s: %s", path, self.base_archive, why)
            return False
        self._base_images[path] = bytes(chunk_ids)
        log.debug("reusing blocks of %s from base archive %s", path, self.base_archive)
        return True

    def _base_unusable(self, size: int, chunk_ids: bytes) -> str | None:
        """Return why the blocks ``chunk_ids`` of an image of ``size`` bytes cannot be reused, or None."""
        if self.base_archive not in self._manifest.archives:
            return f"archive {self.base_archive} is not in {self.repo.location}"
        count = self._block_count(size)
        if len(chunk_ids) != count * _ID_SIZE:
            return (f"{len(chunk_ids) // _ID_SIZE} chunk ids recorded, {count} blocks of {self.block_size} "
                    f"bytes expected")
        # One look-up per distinct chunk (holes share one): the full blocks, then the short last one.
        split = size // self.block_size * _ID_SIZE
        for ids, length in ((chunk_ids[:split], self.block_size), (chunk_ids[split:], size % self.block_size)):
            for chunk_id in {ids[at:at + _ID_SIZE] for at in range(0, len(ids), _ID_SIZE)}:
                entry = self._cache.chunks.get(chunk_id)
                if entry is None or not entry.refcount:
                    return (f"chunk {_borg().bin_to_hex(chunk_id)} is not in the repository any more "
                            f"(pruned and compacted since?)")
                if entry.size != length:
                    return (f"chunk {_borg().bin_to_hex(chunk_id)} holds {entry.size} bytes, not {length}: "
                            f"not a block of {self.block_size} bytes")
        return None

    def is_base_block(self, path: str, index: int, data: bytes) -> bool:
        self._require_open()
        ids = self._base_images.get(path)
        if ids is None or not 0 <= index < len(ids) // _ID_SIZE:
            raise ValueError(f"block {index} of {path} is not in the accepted base image")
        return self._key.id_hash(data) == ids[index * _ID_SIZE:(index + 1) * _ID_SIZE]

    def base_block(self, path: str, index: int) -> bytes:
        self._require_open()
        chunk_id, length = self._base_chunk(path, index)
        return self._read_base(chunk_id, length, path, index)

    def base_blocks(self, path: str, indexes: Sequence[int]) -> BaseBlocks:
        self._require_open()
        reader = _BaseBlockReader(self, path, indexes)
        self._stack.callback(reader.close)  # never a read after the writer is closed
        return reader

    def _base_chunk(self, path: str, index: int) -> tuple[bytes | None, int]:
        """The chunk id and length of block ``index`` of the accepted base image ``path``; a
        hole's chunk id is None. Raises ValueError for a block the base image does not have."""
        ids = self._base_images.get(path)
        if ids is None or not 0 <= index < len(ids) // _ID_SIZE:
            raise ValueError(f"block {index} of {path} is not in the accepted base image")
        chunk_id = ids[index * _ID_SIZE:(index + 1) * _ID_SIZE]
        with self._borg_errors():
            # A look-up in Borg's C hash index is atomic under the GIL (see _prepare).
            entry = self._cache.chunks.get(chunk_id)
            if entry is None:
                raise ValueError(f"block {index} of {path}: chunk {_borg().bin_to_hex(chunk_id)} is not in "
                                 f"{self.repo.location}")
            length = entry.size
            zero_id = self._zero_hashes.get(length)
            if zero_id is None:
                zero_id = self._zero_hashes[length] = self._key.id_hash(memoryview(_borg().zeros)[:length])
        return (None if chunk_id == zero_id else chunk_id), length

    def _read_base(self, chunk_id: bytes | None, length: int, path: str, index: int, *,
                   preloaded: bool = False) -> bytes:
        """Read, decrypt and check the base chunk ``chunk_id`` of block ``index`` (zeros for
        None); ``preloaded``: the repository was asked to preload it (``repository.preload``).

        Any thread: the repository is called under the repository lock, so a get falls between
        the writer's puts (what Borg's own recreate does: locally, a chunk in the segment being
        written is synced before it is read; remotely, the answers of the puts sent without
        waiting are kept apart from the get's), and the nonce reservations a worker's
        encryption makes. Decompression takes the compression lock (Borg's compressors share
        one buffer); decryption uses a cipher of the thread's own (ChunkOpener), or the cipher
        lock for a key type whose cipher carries state.
        """
        if chunk_id is None:
            return bytes(length)
        with self._borg_errors():
            with self._repository_lock:
                if preloaded:
                    # Run to its end here, under the lock (a generator left open would finish
                    # later, in whichever thread collects it).
                    [stored] = self._repository.get_many([chunk_id], is_preloaded=True)
                else:
                    stored = self._repository.get(chunk_id)
            data = self._chunk_opener().open(chunk_id, stored)
        if len(data) != length:
            raise ValueError(f"block {index} of {path}: {len(data)} bytes read, {length} recorded")
        return data

    def _chunk_opener(self) -> ChunkOpener:
        with self._opener_lock:
            if self._opener is None:
                self._opener = ChunkOpener(self._key, compress_lock=self._compress_lock,
                                           cipher_lock=self._cipher_lock)
            return self._opener

    # -- writing ---------------------------------------------------------------------------

    def _write_directory(self, path: str) -> None:
        borg = _borg()
        with self._borg_errors():
            item = borg.Item(path=path, mode=DIR_MODE, uid=0, gid=0, user=OWNER, group=OWNER,
                             mtime=self._mtime_ns, ctime=self._mtime_ns)
            self._add_item(item)

    def _add_item(self, item) -> None:
        # A full item buffer is written out as a chunk: that encrypts in this thread.
        with self._compress_lock, self._cipher_lock, self._repository_lock:
            self._archive.add_item(item, show_progress=False)

    def _prepare(self, data: bytes) -> _Prepared:
        """Hash a data block and, unless the repository has it, compress and encrypt it.

        Runs in a worker thread. The hash runs in parallel (hashlib releases the GIL).
        """
        chunk_id = self._key.id_hash(data)
        # A lookup in Borg's C hash index is atomic under the GIL; a stale "not seen" only costs
        # an encryption, the calling thread checks again before storing.
        if self._cache.seen_chunk(chunk_id):
            return _Prepared(chunk_id, len(data), None)
        return _Prepared(chunk_id, len(data), self._encrypt(data))

    def _encrypt(self, data: bytes) -> bytes:
        """Return ``key.encrypt(data)``, computed so that two threads can share the work.

        Compression admits one thread at a time; each thread encrypts with a cipher of its own
        (see ``_sealer``), so one block can be compressed while others are encrypted. For key
        types whose ``encrypt`` this module does not know, ``key.encrypt`` runs under both locks.
        """
        if self._seal is None:
            with self._compress_lock, self._cipher_lock, self._repository_lock:
                return self._key.encrypt(data)
        with self._compress_lock:
            compressed = self._key.compressor.compress(data)
        return self._seal(compressed)

    def _store(self, prepared: _Prepared, counters: dict) -> object:
        """Store a prepared block (or reference it if the repository has it); return its chunk entry.

        This is ``LocalCache.add_chunk`` with the encryption already done by a worker.
        """
        borg = _borg()
        cache = self._cache
        if prepared.encrypted is None or cache.seen_chunk(prepared.chunk_id, prepared.size):
            counters["deduplicated"] += 1
            return cache.chunk_incref(prepared.chunk_id, self._archive.stats)
        if not cache.txn_active:
            cache.begin_txn()
        stored_size = len(prepared.encrypted)
        with self._repository_lock:
            self._repository.put(prepared.chunk_id, prepared.encrypted, wait=False)
            if self._write_behind is not None:
                self._write_behind()
        cache.chunks.add(prepared.chunk_id, 1, prepared.size, stored_size)
        self._archive.stats.update(prepared.size, stored_size, True)
        with self._repository_lock:
            self._repository.async_response(wait=False)
        counters["bytes_stored"] += stored_size
        return borg.ChunkListEntry(prepared.chunk_id, prepared.size, stored_size)

    def _holes(self, count: int, length: int) -> list:
        """Reference the all-zero chunk of ``length`` bytes ``count`` times; return the chunk entries."""
        chunk_id = self._zero_ids.get(length)
        if chunk_id is None:
            zero_block = memoryview(_borg().zeros)[:length]
            chunk_id = self._key.id_hash(zero_block)
            self._zero_ids[length] = chunk_id
            # add_chunk stores the all-zero chunk if the repository does not have it yet; it
            # encrypts in this thread, so it takes its turn with the workers.
            with self._compress_lock, self._cipher_lock, self._repository_lock:
                entry = self._cache.add_chunk(chunk_id, zero_block, self._archive.stats, wait=False)
        else:
            entry = self._cache.chunk_incref(chunk_id, self._archive.stats)
        if count > 1:
            # The same as count - 1 more chunk_incref calls, without a Python call per block.
            chunks = self._cache.chunks
            for _ in range(count - 1):
                chunks.incref(chunk_id)
            self._archive.stats.update(entry.size * (count - 1), entry.csize * (count - 1), False)
        return [entry] * count

    def _reuse(self, base_ids: bytes | None, reuse: Reuse, lengths: list[tuple[int, int]], path: str) -> list:
        """Reference blocks ``reuse.index`` .. of the base image; ``lengths``: (length, count) pieces."""
        borg = _borg()
        if base_ids is None:
            raise ValueError(f"{path}: Reuse given but base_image() did not accept {path}")
        if reuse.count < 1 or not 0 <= reuse.index or reuse.index + reuse.count > len(base_ids) // _ID_SIZE:
            raise ValueError(f"{path}: Reuse({reuse.index}, {reuse.count}) is outside the base image "
                             f"({len(base_ids) // _ID_SIZE} blocks)")
        cache = self._cache
        if not cache.txn_active:
            cache.begin_txn()
        entries = []
        size_total = csize_total = 0
        position = reuse.index * _ID_SIZE
        for length, count in lengths:
            for _ in range(count):
                chunk_id = base_ids[position:position + _ID_SIZE]
                position += _ID_SIZE
                _, size, csize = cache.chunks.incref(chunk_id)
                if size != length:
                    # base_image() checked the sizes: this is a Reuse of the wrong blocks. The
                    # writer is abandoned on this error, which rolls the references back.
                    raise ValueError(f"{path}: reused block {reuse.index + len(entries)} has {size} bytes "
                                     f"where {length} are needed")
                size_total += size
                csize_total += csize
                entries.append(borg.ChunkListEntry(chunk_id, size, csize))
        self._archive.stats.update(size_total, csize_total, False)
        return entries

    def _write_image(self, path: str, size: int, blocks: Iterable[Block], *, reusable: bool) -> ImageStats:
        borg = _borg()
        base_ids = self._base_images.get(path) if reusable else None
        zeros = borg.zeros
        counters = {"holes": 0, "reused": 0, "stored": 0, "bytes_new": 0, "bytes_stored": 0, "deduplicated": 0}
        entries: list = []
        # In block order: chunk entries done, or futures of data blocks being prepared.
        pending: deque[object] = deque()
        in_flight = 0
        started = time.monotonic()

        def settle(limit: int) -> None:
            nonlocal in_flight
            while pending and (not isinstance(pending[0], Future) or in_flight > limit):
                head = pending.popleft()
                if isinstance(head, Future):
                    in_flight -= 1
                    entries.append(self._store(head.result(), counters))
                else:
                    entries.extend(head)

        count = 0  # blocks given so far
        try:
            with self._borg_errors():
                for block in blocks:
                    if block is None:
                        block = Holes(1)
                    if isinstance(block, (Holes, Reuse)):
                        lengths = self._run_lengths(count, block.count, size, path)
                        if isinstance(block, Holes):
                            counters["holes"] += block.count
                            for length, times in lengths:
                                pending.append(self._holes(times, length))
                        else:
                            counters["reused"] += block.count
                            pending.append(self._reuse(base_ids, block, lengths, path))
                        count += block.count
                    else:
                        length = self._block_length(count, size, path)
                        data = block if isinstance(block, bytes) else bytes(block)
                        if len(data) != length:
                            raise ValueError(f"{path}: block {count} has {len(data)} bytes, {length} expected")
                        count += 1
                        counters["stored"] += 1
                        counters["bytes_new"] += length
                        if zeros.startswith(data):
                            # Read but all zero (allocated, never written): no need to hash it.
                            counters["deduplicated"] += 1
                            pending.append(self._holes(1, length))
                        else:
                            pending.append(self._pool.submit(self._prepare, data))
                            in_flight += 1
                    settle(IN_FLIGHT)
                if count != self._block_count(size):
                    raise ValueError(f"{path}: {count} blocks given, {self._block_count(size)} expected "
                                     f"for {size} bytes")
                settle(0)
                item = borg.Item(path=path, mode=FILE_MODE, uid=0, gid=0, user=OWNER, group=OWNER,
                                 mtime=self._mtime_ns, ctime=self._mtime_ns, size=size,
                                 chunks=entries, hardlink_master=False)
                self._archive.stats.nfiles += 1
                self._add_item(item)
        except BaseException:
            for waiting in pending:
                if isinstance(waiting, Future):
                    waiting.cancel()
            # Let running workers finish before the caller rolls back what they depend on.
            for waiting in pending:
                if isinstance(waiting, Future) and not waiting.cancelled():
                    with contextlib.suppress(BaseException):
                        waiting.result()
            raise
        elapsed = time.monotonic() - started
        result = ImageStats(blocks=count, **counters, chunk_ids=b"".join(entry.id for entry in entries))
        log.debug("%s: %d blocks (%d holes, %d reused, %d read, %d already stored), %d bytes new, "
                  "%.1f MiB/s", path, result.blocks, result.holes, result.reused, result.stored,
                  result.deduplicated, result.bytes_new, result.bytes_new / (1 << 20) / elapsed if elapsed > 0 else 0.0)
        return result


class _BaseBlockReader(BaseBlocks):
    """``base_blocks`` of the internal writer: the blocks read ahead in order, ``BASE_AHEAD``
    at a time, by ``BASE_READERS`` threads (``_InternalWriter._read_base``).

    Each block's chunk is looked up in the calling thread (the one running ``add_image``),
    which also asks the repository to preload it: a remote repository then sends the gets
    of the blocks ahead while it waits for the answer to the first, instead of one round trip
    per block (a local repository ignores preloading). A block whose read failed raises when
    it is taken; then, and on ``close()``, the reads not started are cancelled, those under
    way awaited, and the preloads not yet sent withdrawn.
    """

    def __init__(self, writer: _InternalWriter, path: str, indexes: Sequence[int]):
        super().__init__(lambda index: writer.base_block(path, index), indexes)
        self._writer = writer
        self._path = path
        self._ahead: deque[tuple[int, bytes | None, Future[bytes]]] = deque()  # (index, chunk id, read)
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=BASE_READERS,
                                                                   thread_name_prefix="borg-base-blocks")
        try:
            self._read_ahead()
        except BaseException:
            self.close()
            raise

    def _read_ahead(self) -> None:
        writer = self._writer
        while len(self._ahead) < BASE_AHEAD:
            index = next(self._indexes, None)
            if index is None:
                return
            chunk_id, length = writer._base_chunk(self._path, index)
            if chunk_id is not None:
                with writer._borg_errors(), writer._repository_lock:
                    writer._repository.preload([chunk_id])
            read = self._pool.submit(writer._read_base, chunk_id, length, self._path, index, preloaded=True)
            self._ahead.append((index, chunk_id, read))

    def __next__(self) -> tuple[int, bytes]:
        if not self._ahead:
            raise StopIteration
        index, _, read = self._ahead.popleft()
        try:
            data = read.result()
            self._read_ahead()
        except BaseException:
            self.close()
            raise
        return index, data

    def close(self) -> None:
        if self._pool is None:
            return
        self._indexes = iter(())
        for _, _, read in self._ahead:
            read.cancel()
        self._pool.shutdown(wait=True)
        self._pool = None
        withdrawn = [chunk_id for _, chunk_id, read in self._ahead if read.cancelled() and chunk_id is not None]
        self._ahead.clear()
        if withdrawn:
            _withdraw_preloads(self._writer._repository, withdrawn, self._writer._repository_lock)


def _withdraw_preloads(repository, chunk_ids: list[bytes], repository_lock: threading.Lock) -> None:
    """Take ``chunk_ids`` off a remote repository's preloads not yet sent, so that its later
    calls do not send gets nobody will take. (A get already sent is answered into the
    repository's table of answers, a block each, and dropped with the connection.)"""
    with repository_lock:
        waiting = getattr(repository, "preload_ids", None)  # RemoteRepository's list, in Borg 1.4
        if not isinstance(waiting, list):
            return
        for chunk_id in chunk_ids:
            with contextlib.suppress(ValueError):
                waiting.remove(chunk_id)


def _own_cipher(key):
    """Return a new cipher for ``key`` (same keys, a state of its own), or None.

    Only for the AES key types, whose ``encrypt``/``decrypt`` are ``AESKeyBase``'s and use
    ``key.cipher`` (built like ``AESKeyBase.init_ciphers`` does). A cipher object must not be
    used by two threads at once; one per thread lets their MACs (BLAKE2b in ``hashlib``, which
    releases the GIL) run side by side.
    """
    from borg.crypto.key import AESKeyBase

    if type(key).encrypt is not AESKeyBase.encrypt or type(key).decrypt is not AESKeyBase.decrypt \
            or type(getattr(key, "cipher", None)) is not key.CIPHERSUITE:
        return None
    return key.CIPHERSUITE(mac_key=key.enc_hmac_key, enc_key=key.enc_key, header_len=1, aad_offset=1)


def _sealer(key, nonce_lock: threading.Lock, repository_lock: threading.Lock):
    """Return the step of ``key.encrypt`` after compression, as a thread-safe function, or None.

    ``AESKeyBase.encrypt`` (all encrypting key types of Borg 1.4) is: compress, reserve nonces,
    ``cipher.encrypt``. Here each thread encrypts with a cipher of its own; the nonces are
    still taken, under ``nonce_lock``, from ``key.cipher``'s counter (advanced as if it had
    encrypted), so that Borg's own encryptions (items, manifest), made under the same lock,
    continue after them and no counter value is ever used twice. A reservation of nonces
    may call the repository (Borg's NonceManager, every 2**28 cipher blocks): that is made
    under ``repository_lock`` too. The plaintext and authenticated-only key types prefix the
    type byte to the compressed data. Any other ``encrypt`` is not split (None).
    """
    from borg.crypto.key import AuthenticatedKeyBase, PlaintextKey

    encrypt = type(key).encrypt
    if _own_cipher(key) is not None:
        local = threading.local()

        def seal(compressed: bytes) -> bytes:
            cipher = getattr(local, "cipher", None)
            if cipher is None:
                cipher = local.cipher = _own_cipher(key)
            blocks = cipher.block_count(len(compressed))
            with nonce_lock, repository_lock:
                iv = key.nonce_manager.ensure_reservation(key.cipher.next_iv(), blocks)
                key.cipher.set_iv(iv + blocks)
            return cipher.encrypt(compressed, header=key.TYPE_STR, iv=iv)
        return seal
    if encrypt is PlaintextKey.encrypt or encrypt is AuthenticatedKeyBase.encrypt:
        return lambda compressed: b"".join([key.TYPE_STR, compressed])
    return None


def _segment_write_behind(repository) -> Callable[[], None] | None:
    """A call to make after puts that writes the segment being filled out 16 MiB at a time.

    Borg 1.4's Linux ``SyncFile`` does so itself, but falls back to its base class (a whole
    segment, up to 500 MiB, through the page cache, synced at its end) when its
    ``sync_file_range`` extension does not import, as in the 1.4.5 wheels: None then, and for
    remote repositories (the server's Borg writes them).
    """
    from borg.platform import SyncFile
    from borg.platform.base import SyncFile as BaseSyncFile

    io = getattr(repository, "io", None)  # the LoggedIO of a local repository
    if io is None or not pagecache.AVAILABLE or SyncFile.write is not BaseSyncFile.write:
        return None
    behind = pagecache.WriteBehind()

    def wrote() -> None:
        nonlocal behind
        if behind is None:
            return
        try:
            sync_file = io._write_fd
            if sync_file is not None:
                behind.wrote(sync_file, sync_file.fd, io.offset, sync_file.f.flush)
        except AttributeError as e:  # not where Borg 1.4 keeps it: leave the page cache be
            log.debug("segment write-behind turned off: %s", e)
            behind = None
    return wrote


class SegmentReadBehind:
    """``pagecache.ReadBehind`` over the segment files a local repository reads chunks from."""

    def __init__(self, repository, io):
        self._repository = repository
        self._io = io
        self._behind: pagecache.ReadBehind | None = pagecache.ReadBehind()

    @classmethod
    def of(cls, repository) -> "SegmentReadBehind | None":
        io = getattr(repository, "io", None)  # remote repositories are read by the server
        return None if io is None else cls(repository, io)

    def read(self, chunk_id: bytes) -> None:
        """Call after ``repository.get(chunk_id)``."""
        if self._behind is None:
            return
        try:
            segment, offset = self._repository.index[chunk_id]
        except (KeyError, TypeError, ValueError, AttributeError):
            # not where Borg 1.4 keeps it: leave the page cache be
            self.close()
            self._behind = None
            return
        self._behind.read(segment, offset, lambda: self._io.segment_filename(segment))

    def close(self) -> None:
        if self._behind is not None:
            self._behind.close()


class _NotCommitted(Exception):
    """Stands for 'left without commit()' when Borg's cleanup needs an exception to roll back."""


# --------------------------------------------------------------------------------------------
# What the reader needs (ovirt_borg.archive.reader)


def _repository(location, *, exclusive: bool, lock_wait: int):
    """Return Borg's repository object for ``location`` (a ``borg.helpers.Location``).

    A remote repository is opened (and locked) here; a local one when its context is entered.
    """
    borg = _borg()
    if location.proto == "ssh":
        # RemoteRepository reads these options from Borg's parsed command line; BORG_RSH and
        # BORG_REMOTE_PATH come from the environment set by the caller.
        options = argparse.Namespace(rsh=None, remote_path=None, upload_ratelimit=0, upload_buffer=0,
                                     debug_topics=[])
        return borg.RemoteRepository(location, exclusive=exclusive, lock_wait=lock_wait, args=options)
    return borg.Repository(location.path, exclusive=exclusive, lock_wait=lock_wait)


@contextlib.contextmanager
def open_for_reading(repo: Repo, *, with_manifest: bool = True) -> Iterator[tuple[object, object, object]]:
    """Open ``repo`` without an exclusive lock; yield (repository, manifest, key).

    Without ``with_manifest`` the manifest is not read (no passphrase, no key derivation) and
    (repository, None, None) is yielded.
    """
    borg = _borg()
    settings, secrets = _split_environment(repo)
    from borg.locking import LockError, LockErrorT
    from borg.crypto.low_level import IntegrityError

    def translate(exc: BaseException) -> OvirtBorgError:
        return borgcli.translate_error(type(exc).__qualname__, str(exc), repo=repo)

    if _writer_thread == threading.get_ident():
        raise RuntimeError("reading a repository while this thread's archive writer is open would wait forever")
    with _internal_writer_lock, _environment(settings), contextlib.ExitStack() as stack:
        try:
            location = borg.Location(repo.location)
            # Not a first try without waiting, as the writer does: a shared lock taken with
            # timeout 0 keeps it for its release, which then fails whenever another reader is
            # updating the lock roster. The wait is announced instead: at once when a local
            # repository's roster names a writer, after a few seconds for a remote one.
            announce = None
            if repo.lock_wait > 0:
                if location.proto != "ssh":
                    if borgcli.lock_holders(repo, writers_only=True):
                        borgcli.log_lock_wait(repo)
                else:
                    announce = threading.Timer(_REMOTE_WAIT_NOTICE, borgcli.log_lock_wait, (repo,),
                                               {"certain": False})
                    announce.daemon = True
                    announce.start()
            try:
                repository = stack.enter_context(_repository(location, exclusive=False, lock_wait=repo.lock_wait))
            finally:
                if announce is not None:
                    announce.cancel()
            if not with_manifest:
                yield repository, None, None
                return
            with _environment(secrets):
                manifest, key = borg.Manifest.load(repository, (borg.Manifest.Operation.READ,))
            yield repository, manifest, key
        except (borg.Error, LockError, LockErrorT, IntegrityError, borg.RemoteRepository.RPCError) as exc:
            raise translate(exc) from exc


def file_item(repo: Repo, repository, manifest, key, archive_name: str, path: str):
    """Return the item of the regular file ``path`` of ``archive_name``; raise NotFound if missing."""
    if archive_name not in manifest.archives:
        raise NotFound(f"no archive named {archive_name!r} in {repo.location}")
    archive = _borg().Archive(repository, key, manifest, archive_name)
    item = next((i for i in archive.iter_items(lambda i: i.path == path)), None)
    if item is None or "chunks" not in item:
        raise NotFound(f"archive {archive_name} has no file {path}")
    return item


def chunk_entries(key, item) -> list[tuple[int, int, bytes, bool]]:
    """The file item's chunks as ``(offset, length, chunk id, hole)``, a hole being Borg's
    all-zero chunk of that length."""
    zeros = _borg().zeros
    zero_ids: dict[int, bytes] = {}
    entries = []
    offset = 0
    for chunk in item.chunks:
        if chunk.size not in zero_ids:
            zero_ids[chunk.size] = key.id_hash(zeros[:chunk.size])
        entries.append((offset, chunk.size, chunk.id, chunk.id == zero_ids[chunk.size]))
        offset += chunk.size
    return entries


class ChunkOpener:
    """``key.decrypt`` for threads that share the work of reading chunks back.

    Each thread decrypts with a copy of the key holding a cipher of its own (AES key types):
    the MAC checks (BLAKE2b in ``hashlib``, GIL released) and the id checks run in parallel.
    The decompressor (which releases the GIL but writes to a buffer shared by the process)
    admits one thread at a time; so does the cipher of a key type this module does not know.
    """

    def __init__(self, key, *, compress_lock: threading.Lock | None = None,
                 cipher_lock: threading.Lock | None = None):
        """``compress_lock`` and ``cipher_lock``: the locks of others using the same process's
        compressors and ``key``'s cipher (an archive writer's), instead of locks of its own."""
        from borg.crypto.key import AuthenticatedKeyBase, Blake2AuthenticatedKey, PlaintextKey

        self._key = key
        self._local = threading.local()
        self._compress_lock = compress_lock or threading.Lock()
        stateless = type(key).decrypt in (PlaintextKey.decrypt, AuthenticatedKeyBase.decrypt,
                                          Blake2AuthenticatedKey.decrypt)
        self._copies = _own_cipher(key) is not None
        self._cipher_lock = None if stateless or self._copies else cipher_lock or threading.Lock()

    def _thread_key(self):
        if not self._copies:
            return self._key
        key = getattr(self._local, "key", None)
        if key is None:
            key = self._local.key = copy.copy(self._key)
            key.cipher = _own_cipher(self._key)
        return key

    def open(self, chunk_id: bytes, stored: bytes) -> bytes:
        """Return the plaintext of a stored chunk; raise Borg's IntegrityError if it is corrupt."""
        key = self._thread_key()
        with self._cipher_lock or contextlib.nullcontext():
            payload = key.decrypt(chunk_id, stored, decompress=False)
        with self._compress_lock:
            data = bytes(key.decompress(payload))
        key.assert_id(chunk_id, data)
        return data


def top_file_items(repo: Repo, repository, manifest, key, archive_name: str, name: str) -> list:
    """Return the items of the regular files ``<directory>/<name>`` of ``archive_name`` (a
    directory at the top of the archive), in one pass over its metadata; raise NotFound when
    the archive is missing."""
    if archive_name not in manifest.archives:
        raise NotFound(f"no archive named {archive_name!r} in {repo.location}")
    archive = _borg().Archive(repository, key, manifest, archive_name)
    return [item for item in archive.iter_items(
                lambda i: i.path.count("/") == 1 and i.path.rpartition("/")[2] == name)
            if "chunks" in item]


def repository_hex_id(repository) -> str:
    """The id of an open repository, 64 hex digits (as ``borg info --json`` reports it)."""
    return _borg().bin_to_hex(repository.id)
