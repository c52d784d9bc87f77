"""The page-cache primitives (ovirt_borg.pagecache) on plain files, without Borg: write-behind
keeps at most two windows of a file cached, read-behind two windows behind the reads of each
file, and neither ever raises (real kernel).

The files live below /var/tmp, on a disk-backed file system: the page cache of a tmpfs
is its storage and is never dropped. Residency is read with util-linux ``fincore``.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import page_cache_bytes as resident
from ovirt_borg import pagecache

BLOCK = 1 << 20
SIZE = 96 << 20  # six windows of write-behind


@pytest.fixture
def disk_dir() -> Path:
    directory = Path(tempfile.mkdtemp(prefix="ovirt-borg-test-", dir="/var/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def write_file(path: Path, behind: pagecache.WriteBehind | None, size: int = SIZE) -> None:
    block = random.Random(4).randbytes(BLOCK)
    with open(path, "wb") as f:
        for _ in range(size // BLOCK):
            f.write(block)
            if behind is not None:
                behind.wrote(f, f.fileno(), f.tell(), f.flush)
        f.flush()
        if behind is not None:
            # what is still cached before the writer's own sync: at most two windows
            assert resident(path) <= 2 * pagecache.WINDOW + BLOCK, resident(path)
        else:
            assert resident(path) == size  # the comparison: everything stays
        os.fsync(f.fileno())
    assert path.stat().st_size == size


def test_write_behind_keeps_at_most_two_windows_of_a_file_cached(disk_dir):
    write_file(disk_dir / "plain", None)
    write_file(disk_dir / "behind", pagecache.WriteBehind())
    assert (disk_dir / "plain").read_bytes() == (disk_dir / "behind").read_bytes()


def test_write_behind_starts_over_with_each_new_file(disk_dir):
    behind = pagecache.WriteBehind()
    for name in ("a", "b"):
        write_file(disk_dir / name, behind, size=48 << 20)


def cold_files(directory: Path, count: int, size: int) -> list[Path]:
    paths = [directory / f"f{i}" for i in range(count)]
    for path in paths:
        write_file(path, None, size=size)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return paths


def read_blocks(behind: pagecache.ReadBehind, path: Path, start: int, end: int) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        for offset in range(start, end, BLOCK):
            f.readinto(bytearray(BLOCK))
            behind.read(path.name, offset, lambda: str(path))


def test_read_behind_keeps_two_windows_behind_the_reads_of_each_file(disk_dir):
    a, b = cold_files(disk_dir, 2, 64 << 20)
    behind = pagecache.ReadBehind()
    read_blocks(behind, a, 0, 48 << 20)
    assert resident(a) <= 2 * pagecache.WINDOW + (8 << 20), resident(a)
    # reads that go to another file and come back (an incremental's chunks) keep both files' state
    read_blocks(behind, b, 0, 8 << 20)
    read_blocks(behind, a, 48 << 20, 64 << 20)
    assert resident(a) <= 2 * pagecache.WINDOW + (8 << 20), resident(a)
    behind.close()
    assert resident(a) == resident(b) == 0


def test_read_behind_drops_a_file_whole_once_enough_others_were_read(disk_dir):
    paths = cold_files(disk_dir, pagecache.ReadBehind.FILES + 1, 4 << 20)
    behind = pagecache.ReadBehind()
    read_blocks(behind, paths[0], 0, 4 << 20)
    assert resident(paths[0]) > 0
    for path in paths[1:]:
        read_blocks(behind, path, 0, BLOCK)
    assert resident(paths[0]) == 0
    behind.close()


def test_they_turn_themselves_off_on_errors_and_never_raise(disk_dir):
    """They only ever change how fast a read or write goes: a failure stops them, not the I/O."""
    behind = pagecache.ReadBehind()
    behind.read("gone", 0, lambda: str(disk_dir / "no-such-file"))
    behind.read("a", 0, lambda: pytest.fail("turned off: no file is opened any more"))
    behind.close()
    writer = pagecache.WriteBehind()
    writer.wrote("f", -1, 64 << 20, lambda: None)  # a bad file descriptor
    writer.wrote("f", -1, 128 << 20, lambda: pytest.fail("turned off: nothing is flushed any more"))
