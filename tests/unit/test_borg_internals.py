"""The Borg internals the archive writer (ovirt_borg/archive/borg14.py) was written for: checked
by introspection of the installed Borg, without a repository."""

from __future__ import annotations

import inspect


def test_borg_internals_are_what_the_writer_was_written_for():
    """Fails loudly when a Borg upgrade changes the internals archive/borg14.py uses."""
    import borg
    import borg.compress
    import borg.logger
    from borg.archive import Archive
    from borg.cache import Cache, ChunkListEntry, LocalCache
    from borg.helpers import Manifest
    from borg.item import Item
    from borg.remote import RemoteRepository
    from borg.repository import Repository

    major_minor = tuple(int(p) for p in borg.__version__.split(".")[:2])
    assert (1, 4) <= major_minor < (1, 5), borg.__version__

    def params(func):
        return list(inspect.signature(func).parameters)

    assert params(Repository.__init__)[:5] == ["self", "path", "create", "exclusive", "lock_wait"]
    assert params(RemoteRepository.__init__)[:5] == ["self", "location", "create", "exclusive", "lock_wait"]
    assert "args" in params(RemoteRepository.__init__)
    assert params(Manifest.load)[:2] == ["repository", "operations"]
    assert Manifest.Operation.WRITE
    assert "lock_wait" in params(Cache.__new__)
    archive_params = params(Archive.__init__)
    for name in ("repository", "key", "manifest", "name", "cache", "create", "chunker_params",
                 "checkpoint_interval"):
        assert name in archive_params
    assert params(Archive.add_item)[:3] == ["self", "item", "show_progress"]
    assert "comment" in params(Archive.save)
    assert params(LocalCache.add_chunk)[:6] == ["self", "id", "chunk", "stats", "overwrite", "wait"]
    assert params(LocalCache.seen_chunk) == ["self", "id", "size"]
    assert params(LocalCache.chunk_incref)[:4] == ["self", "id", "stats", "size"]
    assert params(LocalCache.rollback) == ["self"]
    assert ChunkListEntry._fields == ("id", "size", "csize")
    # The page-cache glue (_segment_write_behind, _SegmentReadBehind): what it reads of a local
    # repository's LoggedIO and index.
    from borg.platform.base import SyncFile
    from borg.repository import LoggedIO

    assert {"_write_fd", "offset", "segment"} <= set(vars(LoggedIO(".", 1 << 20, 10000)))
    assert params(LoggedIO.segment_filename) == ["self", "segment"]
    sync_file_init = inspect.getsource(SyncFile.__init__)
    assert "self.f = " in sync_file_init and "self.fd = " in sync_file_init
    get = inspect.getsource(Repository.get)
    assert "segment, offset = self.index[id]" in get and "self.io.read(segment, offset, id)" in get
    # The writer stores encrypted chunks itself exactly the way add_chunk does.
    add_chunk = inspect.getsource(LocalCache.add_chunk)
    for step in ("self.begin_txn()", "self.key.encrypt(chunk)", "self.repository.put(id, data, wait=wait)",
                 "self.chunks.add(id, 1, size, csize)", "stats.update(size, csize, not refcount)"):
        assert step in add_chunk, step
    # ... and splits key.encrypt into its compression and cipher steps exactly as they are.
    from borg.crypto.key import AESKeyBase, AuthenticatedKeyBase, PlaintextKey
    encrypt = inspect.getsource(AESKeyBase.encrypt)
    for step in ("data = self.compressor.compress(chunk)",
                 "next_iv = self.nonce_manager.ensure_reservation(self.cipher.next_iv(),",
                 "self.cipher.block_count(len(data)))",
                 "return self.cipher.encrypt(data, header=self.TYPE_STR, iv=next_iv)"):
        assert step in encrypt, step
    assert len([line for line in encrypt.splitlines() if line.strip()]) == 5
    for plain in (PlaintextKey.encrypt, AuthenticatedKeyBase.encrypt):
        source = [line.strip() for line in inspect.getsource(plain).splitlines() if line.strip()]
        assert source[1:] == ["data = self.compressor.compress(chunk)", "return b''.join([self.TYPE_STR, data])"]
    for key in ("path", "mode", "uid", "gid", "user", "group", "mtime", "ctime", "size", "chunks",
                "hardlink_master"):
        assert key in Item.VALID_KEYS, key
    # Borg's loggers are enabled by this flag rather than by setup_logging().
    assert hasattr(borg.logger, "configured")
    # The compressors share one output buffer: the reason encryption is serialised.
    assert isinstance(borg.compress.buffer, borg.helpers.Buffer)
