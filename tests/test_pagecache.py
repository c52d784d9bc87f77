"""Segment files written and read once do not pile up in the page cache (real Borg, real kernel).

The files live below /var/tmp, on a disk-backed file system: the page cache of a tmpfs
is its storage and is never dropped. Residency is read with util-linux ``fincore``.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from fixtures_borg import run_borg
from ovirt_borg import pagecache
from ovirt_borg.archive import Repo, open_writer, read_image

BLOCK = 1 << 20
SIZE = 96 << 20  # six windows of write-behind
DISK = "vm1/disks/root-0001.raw"


@pytest.fixture
def disk_repo(borg_env) -> Repo:
    directory = Path(tempfile.mkdtemp(prefix="ovirt-borg-test-", dir="/var/tmp"))
    try:
        repo = Repo(location=str(directory / "repo"), env=dict(borg_env), lock_wait=5)
        run_borg(repo, "init", "--encryption", "repokey-blake2", "{repo}")
        yield repo
    finally:
        shutil.rmtree(directory)


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def newest_segment(repo: Repo) -> Path:
    return max((p for p in Path(repo.location, "data").glob("*/*")), key=lambda p: int(p.name))


def image_blocks(seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(BLOCK) for _ in range(SIZE // BLOCK)]


def test_the_segment_being_written_is_written_out_and_dropped_as_it_grows(disk_repo):
    blocks = image_blocks(1)
    with open_writer(disk_repo, "a", block_size=BLOCK, base_archive=None, comment="test") as writer:
        writer.add_image(DISK, SIZE, iter(blocks))
        segment = newest_segment(disk_repo)
        # Before the commit: the segment holds the image, the page cache at most two windows.
        assert segment.stat().st_size > SIZE - BLOCK
        assert resident(segment) <= 2 * pagecache.WINDOW + 2 * BLOCK, resident(segment)
        writer.commit()
    digest = hashlib.sha256()
    for _, _, data in read_image(disk_repo, "a", DISK):
        digest.update(data)
    assert digest.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()


def test_reading_an_archive_back_drops_its_segment_behind_the_reads(disk_repo):
    """Borg drops a segment from the page cache when it closes the file; until then, without
    read-behind, all that was read of it stays there."""
    blocks = image_blocks(2)
    with open_writer(disk_repo, "a", block_size=BLOCK, base_archive=None, comment="test") as writer:
        writer.add_image(DISK, SIZE, iter(blocks))
        writer.commit()
    segment = max((p for p in Path(disk_repo.location, "data").glob("*/*")
                   if p.stat().st_size > SIZE - BLOCK), key=lambda p: int(p.name))
    read_back = []
    for index, (_, _, data) in enumerate(read_image(disk_repo, "a", DISK)):
        read_back.append(data)
        if index == 80:
            # 80 MiB read (and a few blocks fetched ahead): at most two windows and the read-ahead
            assert resident(segment) <= 2 * pagecache.WINDOW + (16 << 20), resident(segment)
    assert read_back == blocks


# -- the primitives, on plain files ------------------------------------------------------------


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
