"""Segment files written and read once do not pile up in the page cache (real Borg, real kernel).

The files live below /var/tmp, on a disk-backed file system: the page cache of a tmpfs
is its storage and is never dropped. Residency is read with util-linux ``fincore``. The
write-behind and read-behind primitives on plain files are in tests/unit/test_pagecache_primitives.py.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from fixtures_borg import run_borg
from helpers import page_cache_bytes as resident
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
