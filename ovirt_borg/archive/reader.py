"""Reading images and small files back from archives, for restore and verify.

Everything is read in-process through the Borg 1.4 backend (:mod:`ovirt_borg.archive.borg14`),
without starting a borg process, under Borg's shared lock. A chunk that is Borg's all-zero
chunk of its length is a hole: it is neither fetched nor decrypted. Data chunks are fetched in a
thread of their own and opened (decrypted, MAC and id checked) by worker threads while the
caller consumes the ones before.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ovirt_borg.archive import RepositoryView, borg14
from ovirt_borg.borgcli import Repo


def repository_id(repo: Repo) -> str:
    """Return the id (64 hex digits) of ``repo`` without reading its manifest (no passphrase needed).

    Raises typed errors: a missing repository, a lock held too long.
    """
    with borg14.open_for_reading(repo, with_manifest=False) as (repository, _, _):
        return borg14.repository_hex_id(repository)


def repository_view(repo: Repo) -> RepositoryView:
    """Return the id and the archive names of ``repo``, read in-process (no borg process).

    Takes Borg's shared lock for a moment and reads the manifest (so it needs the passphrase).
    Raises typed errors: a missing repository, a wrong passphrase, a lock held too long.
    """
    with borg14.open_for_reading(repo) as (repository, manifest, _key):
        return RepositoryView(borg14.repository_hex_id(repository), frozenset(manifest.archives))


def image_chunk_ids(repo: Repo, archive_name: str, path: str) -> bytes:
    """Return the chunk ids of the file ``path`` of ``archive_name`` in order, 32 bytes each.

    Only the archive's metadata is read. Raises NotFound when the archive or file is missing.
    """
    with borg14.open_for_reading(repo) as (repository, manifest, key):
        item = borg14.file_item(repo, repository, manifest, key, archive_name, path)
        return b"".join(chunk.id for chunk in item.chunks)


def read_image(repo: Repo, archive_name: str, path: str) -> Iterator[tuple[int, int, bytes | None]]:
    """Yield the image ``path`` of ``archive_name`` chunk by chunk, in order.

    Each item is ``(offset, length, data)``; ``data`` is None for a chunk that is Borg's
    all-zero chunk of that length (a hole: it is neither fetched nor decrypted). Data chunks are
    fetched ahead (pipelined for ``ssh://`` repositories) and decrypted, which also checks their
    MAC. Raises ``NotFound``-like typed errors when the archive or item is missing.
    """
    for offset, length, data, _ in read_image_with_ids(repo, archive_name, path):
        yield offset, length, data


def image_data_extents(repo: Repo, archive_name: str, path: str) -> list[tuple[int, int]]:
    """Return ``(offset, length)`` of each data chunk of the image ``path``, in order.

    Holes (Borg's all-zero chunks) are left out. Only the archive's metadata is read, no chunk.
    Raises NotFound when the archive or file is missing.
    """
    with borg14.open_for_reading(repo) as (repository, manifest, key):
        item = borg14.file_item(repo, repository, manifest, key, archive_name, path)
        return [(offset, length) for offset, length, _, hole in borg14.chunk_entries(key, item) if not hole]


def read_image_with_ids(repo: Repo, archive_name: str, path: str
                        ) -> Iterator[tuple[int, int, bytes | None, bytes]]:
    """``read_image`` with each chunk's id (32 bytes) as a fourth item, from the same read."""
    with borg14.open_for_reading(repo) as (repository, manifest, key):
        item = borg14.file_item(repo, repository, manifest, key, archive_name, path)
        entries = borg14.chunk_entries(key, item)
        data_ids = [chunk_id for _, _, chunk_id, hole in entries if not hole]
        with ThreadPoolExecutor(max_workers=borg14.WORKERS, thread_name_prefix="borg-read") as pool, \
                _ChunkFetcher(repository, data_ids, borg14.ChunkOpener(key), pool) as opened:
            for start, length, chunk_id, hole in entries:
                yield start, length, None if hole else opened.next(), chunk_id


class _ChunkFetcher:
    """Fetch chunks from the repository in a thread of its own and have the workers open them.

    The repository is not thread-safe: while the fetcher runs, no other thread uses it. Segment
    reads (the kernel's copy into a new buffer, GIL released) then overlap with the consumer's
    work instead of taking turns with it. At most ``borg14.IN_FLIGHT`` chunks wait for the consumer.
    ``next()`` returns the plaintexts in order and raises what fetching or opening raised.
    """

    def __init__(self, repository, ids: list[bytes], opener: borg14.ChunkOpener, pool: ThreadPoolExecutor):
        self._repository = repository
        self._ids = ids
        self._opener = opener
        self._pool = pool
        self._queue: queue.Queue = queue.Queue(maxsize=borg14.IN_FLIGHT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="borg-fetch", daemon=True)

    def __enter__(self) -> "_ChunkFetcher":
        if self._ids:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        while True:  # unblock the fetcher and drop what it prepared
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Future):
                item.cancel()
        if self._thread.is_alive():
            self._thread.join()

    def next(self) -> bytes:
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item.result()

    def _run(self) -> None:
        behind = borg14.SegmentReadBehind.of(self._repository)
        try:
            for chunk_id, stored in zip(self._ids, self._repository.get_many(self._ids, is_preloaded=False), strict=True):
                if behind is not None:
                    behind.read(chunk_id)
                if not self._put(self._pool.submit(self._opener.open, chunk_id, stored)):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)
        finally:
            if behind is not None:
                behind.close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        if isinstance(item, Future):
            item.cancel()
        return False


def read_top_files(repo: Repo, archive_name: str, name: str) -> dict[str, bytes]:
    """Return the content of each regular file ``<directory>/<name>`` of ``archive_name`` (a
    directory at the top of the archive), by path; empty when there is none.

    One pass over the archive's metadata, whatever the archive is called: how restore finds the
    VM's directory of an archive renamed since. Raises NotFound when the archive is missing.
    """
    with borg14.open_for_reading(repo) as (repository, manifest, key):
        items = borg14.top_file_items(repo, repository, manifest, key, archive_name, name)
        opener = borg14.ChunkOpener(key)
        found = {}
        for item in items:
            found[item.path] = b"".join(
                bytes(length) if hole else opener.open(chunk_id, repository.get(chunk_id))
                for _, length, chunk_id, hole in borg14.chunk_entries(key, item))
        return found


def read_file(repo: Repo, archive_name: str, path: str) -> bytes:
    """Return the content of a small file of an archive (the sidecar, block digests, the OVF).

    In-process, without starting a borg process; raises NotFound when the archive or file is
    missing.
    """
    return b"".join(bytes(length) if data is None else data
                    for _, length, data in read_image(repo, archive_name, path))
