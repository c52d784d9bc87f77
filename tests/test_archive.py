"""The archive writer against real Borg repositories (local and ssh://), both writer kinds."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path

import pytest

from helpers import file_sha256
from fixtures_borg import PASSPHRASE, archive_names, lock_holder, run_borg
from ovirt_borg.archive import ImageStats, Repo, Reuse, image_chunk_ids, open_writer
from ovirt_borg.errors import AuthError, ConfigError, OvirtBorgError, RepositoryBusy, RepositoryError

BLOCK = 256 * 1024
DISK = "vm1/disks/root-0001.raw"
KINDS = ["internal", "cli"]


# --------------------------------------------------------------------------------------------
# helpers


class Boom(Exception):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_image(seed: int, layout: str, tail: int = 12345) -> tuple[list, bytes]:
    """Blocks and bytes of an image: layout has one letter per block, 'D' data, 'Z' hole.

    The last block is ``tail`` bytes long (a short block) unless tail is 0.
    """
    rnd = random.Random(seed)
    blocks = []
    for position, kind in enumerate(layout):
        length = tail if tail and position == len(layout) - 1 else BLOCK
        blocks.append(None if kind == "Z" else rnd.randbytes(length))
    sizes = [tail if tail and i == len(layout) - 1 else BLOCK for i in range(len(layout))]
    image = b"".join(bytes(n) if b is None else b for b, n in zip(blocks, sizes))
    return blocks, image


def extract(repo: Repo, archive: str, dest: Path, *, sparse: bool = False, path: str = DISK) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    args = ["extract"] + (["--sparse"] if sparse else []) + [f"{{repo}}::{archive}", path]
    run_borg(repo, *args, cwd=dest)
    return dest / path


def write_archive(repo, name, blocks, size, *, kind="internal", base=None, reuse_ok=None, ovf=b"<ovf/>"):
    # The base image's chunk ids as its archive lists them (the backup keeps what add_image returned).
    base_ids = image_chunk_ids(repo, base, DISK) if reuse_ok is not None else b""
    with open_writer(repo, name, block_size=BLOCK, base_archive=base, comment="test", kind=kind) as writer:
        if reuse_ok is not None:
            assert writer.base_image(DISK, size, base_ids) is reuse_ok
        stats = writer.add_image(DISK, size, blocks)
        writer.add_file("vm1/vm.ovf", ovf)
        archive_id = writer.commit()
    return stats, archive_id


# --------------------------------------------------------------------------------------------
# what the writer relies on in Borg's internals


# --------------------------------------------------------------------------------------------
# full images


@pytest.mark.parametrize("kind", KINDS)
def test_full_image_with_holes_extracts_identically_and_sparse(local_repo, tmp_path, kind):
    blocks, image = make_image(1, "DZZDDZZZDZZD")
    stats, archive_id = write_archive(local_repo, "full", blocks, len(image), kind=kind)

    assert stats.blocks == 12 and stats.holes == 7 and stats.stored == 5 and stats.reused == 0
    assert stats.bytes_new == 4 * BLOCK + 12345
    assert len(archive_id) == 64
    listing = json.loads(run_borg(local_repo, "list", "--json", "{repo}").stdout)["archives"]
    assert [(a["name"], a["id"]) for a in listing] == [("full", archive_id)]

    items = [json.loads(line) for line in
             run_borg(local_repo, "list", "--json-lines", "{repo}::full").stdout.splitlines()]
    by_path = {item["path"]: item for item in items}
    assert [item["path"] for item in items] == ["vm1", "vm1/disks", DISK, "vm1/vm.ovf"]
    assert by_path[DISK]["mode"] == "-rw-------" and by_path[DISK]["size"] == len(image)
    assert by_path["vm1/disks"]["type"] == "d"
    assert by_path[DISK]["uid"] == 0 and by_path[DISK]["user"] == "root"

    plain = extract(local_repo, "full", tmp_path / "plain")
    assert file_sha256(plain) == sha256(image)
    sparse = extract(local_repo, "full", tmp_path / "sparse", sparse=True)
    assert file_sha256(sparse) == sha256(image)
    # 7 of 12 blocks are holes: the sparse copy allocates about 5 blocks, the plain one all.
    assert sparse.stat().st_blocks * 512 <= 5 * BLOCK + 64 * 1024
    assert plain.stat().st_blocks * 512 >= len(image)
    ovf = extract(local_repo, "full", tmp_path / "ovf", path="vm1/vm.ovf")
    assert ovf.read_bytes() == b"<ovf/>"

    run_borg(local_repo, "check", "--verify-data", "{repo}")


def test_holes_share_one_zero_chunk_stored_once(local_repo):
    blocks, image = make_image(2, "ZZZZZZZZ", tail=0)
    with open_writer(local_repo, "zeros", block_size=BLOCK, base_archive=None) as writer:
        stats = writer.add_image(DISK, len(image), blocks)
        writer.commit()
    assert stats == ImageStats(blocks=8, holes=8, reused=0, stored=0, bytes_new=0, bytes_stored=0, deduplicated=0,
                               chunk_ids=stats.chunk_ids[:32] * 8)
    info = json.loads(run_borg(local_repo, "info", "--json", "{repo}::zeros").stdout)
    archive_stats = info["archives"][0]["stats"]
    assert archive_stats["original_size"] == 8 * BLOCK
    # One compressed zero chunk plus the archive metadata: far below one block.
    assert archive_stats["deduplicated_size"] < BLOCK // 8


def test_all_zero_data_blocks_become_holes(local_repo, tmp_path):
    data = random.Random(9).randbytes(BLOCK)
    blocks = [bytes(BLOCK), data, bytearray(BLOCK), None]
    with open_writer(local_repo, "zero-data", block_size=BLOCK, base_archive=None) as writer:
        stats = writer.add_image(DISK, 4 * BLOCK, blocks)
        writer.commit()
    assert (stats.stored, stats.deduplicated, stats.holes, stats.bytes_new) == (3, 2, 1, 3 * BLOCK)
    assert stats.bytes_stored < BLOCK + 4096
    extracted = extract(local_repo, "zero-data", tmp_path / "z", sparse=True)
    assert file_sha256(extracted) == sha256(bytes(BLOCK) + data + bytes(2 * BLOCK))
    assert extracted.stat().st_blocks * 512 <= BLOCK + 65536


def test_repeated_data_blocks_in_flight_are_stored_once(local_repo, tmp_path):
    rnd = random.Random(3)
    same = rnd.randbytes(BLOCK)
    blocks = [same, same, rnd.randbytes(BLOCK), same, bytearray(same), memoryview(same)]
    image = b"".join(bytes(b) for b in blocks)
    with open_writer(local_repo, "repeats", block_size=BLOCK, base_archive=None) as writer:
        stats = writer.add_image(DISK, len(image), blocks)
        writer.commit()
    assert stats.stored == 6 and stats.deduplicated == 4
    assert stats.bytes_stored < 2 * BLOCK + 4096
    assert file_sha256(extract(local_repo, "repeats", tmp_path / "x")) == sha256(image)
    run_borg(local_repo, "check", "--verify-data", "{repo}")


@pytest.mark.parametrize("encryption", ["repokey", "authenticated-blake2", "none"])
def test_other_encryption_modes(tmp_path, borg_env, encryption):
    env = dict(borg_env, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
    repo = Repo(str(tmp_path / encryption), env, lock_wait=5)
    run_borg(repo, "init", "--encryption", encryption, "{repo}")
    blocks, image = make_image(5, "DZDD")
    write_archive(repo, "a", blocks, len(image))
    new = random.Random(6).randbytes(BLOCK)
    write_archive(repo, "b", [Reuse(0), None, new, Reuse(3)], len(image), base="a", reuse_ok=True)
    expected = image[:BLOCK] + bytes(BLOCK) + new + image[3 * BLOCK:]
    assert file_sha256(extract(repo, "b", tmp_path / "b")) == sha256(expected)
    run_borg(repo, "check", "--verify-data", "{repo}")


@pytest.mark.parametrize("encryption", ["repokey-blake2", "repokey"])
def test_no_nonce_is_used_twice(tmp_path, borg_env, encryption):
    """Worker threads encrypt with ciphers of their own: the AES-CTR counter ranges of every
    object in the repository (data blocks, items, manifest; two archives) never overlap."""
    from borg.repository import Repository

    repo = Repo(str(tmp_path / encryption), dict(borg_env), lock_wait=5)
    run_borg(repo, "init", "--encryption", encryption, "{repo}")
    blocks, image = make_image(8, "D" * 40 + "Z" + "D" * 23)
    write_archive(repo, "a", blocks, len(image))
    changed = [Reuse(0, 10)] + [random.Random(9).randbytes(BLOCK) for _ in range(30)] + [Reuse(40, 24)]
    write_archive(repo, "b", changed, len(image), base="a", reuse_ok=True)

    header = 1 + 32  # type byte, MAC; then the 8 low bytes of the counter, then the ciphertext
    ranges = []
    with Repository(repo.location, exclusive=False) as repository:
        for chunk_id in repository.list(limit=100000):
            envelope = repository.get(chunk_id)
            start = int.from_bytes(envelope[header:header + 8], "big")
            ranges.append((start, start + -(-(len(envelope) - header - 8) // 16)))
    ranges.sort()
    assert len(ranges) > 70
    overlaps = [(a, b) for a, b in zip(ranges, ranges[1:]) if a[1] > b[0]]
    assert not overlaps
    run_borg(repo, "check", "--verify-data", "{repo}")


@pytest.mark.parametrize("encryption", ["repokey-blake2", "repokey"])
def test_a_swapped_chunk_is_caught_on_reading(tmp_path, borg_env, encryption):
    """A chunk whose stored object was replaced by another valid one (its MAC checks out)
    fails the id check when the image is read back: an error, never the wrong bytes."""
    from borg.repository import Repository
    from ovirt_borg.archive import read_image

    repo = Repo(str(tmp_path / encryption), dict(borg_env), lock_wait=5)
    run_borg(repo, "init", "--encryption", encryption, "{repo}")
    blocks, image = make_image(11, "DD", tail=0)
    stats, _ = write_archive(repo, "a", blocks, len(image))
    first, second = stats.chunk_ids[:32], stats.chunk_ids[32:64]
    with Repository(repo.location, exclusive=True) as repository:
        repository.put(first, repository.get(second))
        repository.commit(compact=False)
    with pytest.raises(OvirtBorgError, match="id verification failed"):
        list(read_image(repo, "a", DISK))

def test_is_base_block_compares_data_with_a_block_of_the_base_image(local_repo):
    blocks, image = make_image(7, "DZD")
    stats, _ = write_archive(local_repo, "base", blocks, len(image))
    with open_writer(local_repo, "next", block_size=BLOCK, base_archive="base") as writer:
        with pytest.raises(ValueError):
            writer.is_base_block(DISK, 0, blocks[0])
        assert writer.base_image(DISK, len(image), stats.chunk_ids)
        assert writer.is_base_block(DISK, 0, blocks[0])
        assert writer.is_base_block(DISK, 1, bytes(BLOCK))
        assert writer.is_base_block(DISK, 2, blocks[2])
        changed = bytearray(blocks[2])
        changed[len(changed) // 2] ^= 1
        assert not writer.is_base_block(DISK, 2, bytes(changed))
        assert not writer.is_base_block(DISK, 0, blocks[2])
        assert not writer.is_base_block(DISK, 1, bytes(BLOCK - 1))
        with pytest.raises(ValueError):
            writer.is_base_block(DISK, 3, blocks[0])
        # Comparing while data blocks are being encrypted by the workers is safe.
        fresh = [random.Random(8).randbytes(BLOCK), None, blocks[2]]

        def interleaved():
            for position, block in enumerate(fresh):
                assert writer.is_base_block(DISK, position, blocks[position] or bytes(BLOCK))
                yield block

        writer.add_image(DISK, len(image), interleaved())
        writer.commit()
    run_borg(local_repo, "check", "--verify-data", "{repo}")


@pytest.mark.parametrize("where", ["local", "ssh", "repokey", "none"])
def test_base_blocks_are_read_between_writes(request, tmp_path, borg_env, where):
    """Blocks rebuilt on the base image's blocks, read through the writer's own repository
    while its workers encrypt and (remotely) its puts are under way: each equals the base's
    block, a hole is zeros, the short last block is whole; base written with another
    compression."""
    if where in ("local", "ssh"):
        repo = request.getfixturevalue(f"{where}_repo")
    else:
        env = dict(borg_env, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes")
        repo = Repo(str(tmp_path / where), env, lock_wait=5)
        run_borg(repo, "init", "--encryption", where, "{repo}")
    assert repo.remote is (where == "ssh")
    blocks, image = make_image(30, "D" * 10 + "Z" + "DD")
    zstd = Repo(repo.location, repo.env, repo.lock_wait, compression="zstd,3")
    stats, _ = write_archive(zstd, "base", blocks, len(image))
    expected = bytearray(image)
    with open_writer(repo, "rebuilt", block_size=BLOCK, base_archive="base") as writer:
        with pytest.raises(ValueError):
            writer.base_block(DISK, 0)
        assert writer.base_image(DISK, len(image), stats.chunk_ids)

        def rebuilt():
            for position, block in enumerate(blocks):
                base = writer.base_block(DISK, position)
                assert base == (block if block is not None else bytes(BLOCK))
                data = bytearray(base)
                data[100:100 + 4096] = random.Random(position).randbytes(4096)  # a dirty part
                expected[position * BLOCK + 100:position * BLOCK + 100 + 4096] = data[100:100 + 4096]
                yield data

        writer.add_image(DISK, len(image), rebuilt())
        with pytest.raises(ValueError):
            writer.base_block(DISK, len(blocks))
        writer.commit()
    assert file_sha256(extract(repo, "rebuilt", tmp_path / "r")) == sha256(bytes(expected))
    run_borg(repo, "check", "--verify-data", "{repo}")


def _base_readers() -> list:
    """The threads of ``base_blocks`` alive in this process."""
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("borg-base-blocks")]


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_base_blocks_are_read_ahead_in_order(request, tmp_path, where):
    """``base_blocks`` reads a base image's blocks ahead while ``add_image`` writes (reused
    blocks between): asked with gaps, a hole, two blocks of one chunk and the short last
    block, each comes as (index, data) equal to the base's; the rebuilt archive extracts as
    expected and no thread of the reads outlives it."""
    repo = request.getfixturevalue(f"{where}_repo")
    blocks, _ = make_image(31, "D" * 14 + "Z" + "D" * 4)
    blocks[9] = blocks[3]
    image = b"".join(bytes(BLOCK) if b is None else b for b in blocks)
    stats, _ = write_archive(repo, "base", blocks, len(image))
    rebuilt = [0, 2, 3, 9, 10, 11, 12, 13, 14, 16, 18]
    expected = bytearray(image)
    with open_writer(repo, "rebuilt", block_size=BLOCK, base_archive="base") as writer:
        assert writer.base_image(DISK, len(image), stats.chunk_ids)
        with writer.base_blocks(DISK, rebuilt) as reader:

            def rebuilding():
                for position, block in enumerate(blocks):
                    if position not in rebuilt:
                        yield Reuse(position, 1)
                        continue
                    index, base = next(reader)
                    assert index == position
                    assert base == (block if block is not None else bytes(BLOCK))
                    data = bytearray(base)
                    data[200:200 + 4096] = random.Random(position).randbytes(4096)  # a dirty part
                    expected[position * BLOCK:position * BLOCK + len(data)] = data
                    yield data

            stats = writer.add_image(DISK, len(image), rebuilding())
            assert next(reader, None) is None
        assert stats.reused == len(blocks) - len(rebuilt)
        writer.commit()
    assert not _base_readers()
    assert file_sha256(extract(repo, "rebuilt", tmp_path / "r")) == sha256(bytes(expected))
    run_borg(repo, "check", "--verify-data", "{repo}")


@pytest.mark.parametrize("where", ["local", "ssh"])
@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
def test_failure_while_base_blocks_are_read_ahead_leaves_no_thread_and_no_archive(request, tmp_path, where,
                                                                                   exc_type):
    """The block iterator fails (or is interrupted) with base blocks still being read ahead:
    no archive, no thread of the reads left, the repository's lock free, and a rebuild on the
    same base right after gives the base's image."""
    repo = request.getfixturevalue(f"{where}_repo")
    blocks, image = make_image(32, "D" * 16, tail=0)
    stats, _ = write_archive(repo, "base", blocks, len(image))
    with pytest.raises(exc_type):
        with open_writer(repo, "broken", block_size=BLOCK, base_archive="base") as writer:
            assert writer.base_image(DISK, len(image), stats.chunk_ids)
            with writer.base_blocks(DISK, range(len(blocks))) as reader:

                def failing():
                    for position, (_, base) in enumerate(reader):
                        if position == 3:
                            assert _base_readers()  # the blocks ahead are under way or done
                            raise exc_type("reading the disk failed")
                        yield base

                writer.add_image(DISK, len(image), failing())
    assert not _base_readers()
    assert archive_names(repo) == ["base"]
    with open_writer(Repo(repo.location, repo.env, lock_wait=0), "after", block_size=BLOCK,
                     base_archive="base") as writer:
        assert writer.base_image(DISK, len(image), stats.chunk_ids)
        with writer.base_blocks(DISK, range(len(blocks))) as reader:
            writer.add_image(DISK, len(image), (base for _, base in reader))
        writer.commit()
    assert not _base_readers()
    assert file_sha256(extract(repo, "after", tmp_path / "a")) == sha256(image)
    run_borg(repo, "check", "--verify-data", "{repo}")


def test_a_base_block_failing_its_check_fails_when_taken(local_repo):
    """A base chunk replaced by another valid one (its MAC checks out) fails the id check when
    its block is taken, after the blocks before it: no archive, no thread left."""
    from borg.repository import Repository

    blocks, image = make_image(33, "D" * 10, tail=0)
    stats, _ = write_archive(local_repo, "base", blocks, len(image))
    with Repository(local_repo.location, exclusive=True) as repository:
        repository.put(stats.chunk_ids[5 * 32:6 * 32], repository.get(stats.chunk_ids[32:64]))
        repository.commit(compact=False)
    taken = []
    with pytest.raises(OvirtBorgError, match="id verification failed"):
        with open_writer(local_repo, "rebuilt", block_size=BLOCK, base_archive="base") as writer:
            assert writer.base_image(DISK, len(image), stats.chunk_ids)
            with writer.base_blocks(DISK, range(len(blocks))) as reader:

                def rebuilding():
                    for index, base in reader:
                        taken.append(index)
                        yield base

                writer.add_image(DISK, len(image), rebuilding())
    assert taken == [0, 1, 2, 3, 4]
    assert not _base_readers()
    assert archive_names(local_repo) == ["base"]


def test_writer_and_borg_mount(local_repo, tmp_path):
    if not Path("/dev/fuse").exists():
        pytest.fail("/dev/fuse is missing: borg mount cannot be tested on this machine")
    blocks, image = make_image(4, "DZD")
    write_archive(local_repo, "mountable", blocks, len(image))
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run_borg(local_repo, "mount", "{repo}::mountable", str(mountpoint))
    try:
        assert file_sha256(mountpoint / DISK) == sha256(image)
        assert (mountpoint / "vm1" / "vm.ovf").read_bytes() == b"<ovf/>"
    finally:
        run_borg(local_repo, "umount", str(mountpoint))


# --------------------------------------------------------------------------------------------
# incrementals


def test_incremental_reuse_equals_new_source_and_survives_deleting_the_base(local_repo, tmp_path):
    layout = "DDZDDDZDDD"
    blocks1, image1 = make_image(10, layout)
    write_archive(local_repo, "monday", blocks1, len(image1))

    # Tuesday: block 1 rewritten, block 2 (a hole) written, block 4 zeroed, the rest unchanged.
    rnd = random.Random(11)
    new1, new2 = rnd.randbytes(BLOCK), rnd.randbytes(BLOCK)
    blocks2 = [Reuse(i) if b is not None else None for i, b in enumerate(blocks1)]
    blocks2[1], blocks2[2], blocks2[4] = new1, new2, None
    expected = bytearray(image1)
    expected[1 * BLOCK:2 * BLOCK] = new1
    expected[2 * BLOCK:3 * BLOCK] = new2
    expected[4 * BLOCK:5 * BLOCK] = bytes(BLOCK)

    stats, _ = write_archive(local_repo, "tuesday", blocks2, len(image1), base="monday", reuse_ok=True)
    assert (stats.reused, stats.stored, stats.holes) == (6, 2, 2)
    assert stats.bytes_new == 2 * BLOCK
    assert 2 * BLOCK <= stats.bytes_stored < 2 * BLOCK + 4096

    assert file_sha256(extract(local_repo, "tuesday", tmp_path / "t")) == sha256(bytes(expected))
    assert file_sha256(extract(local_repo, "monday", tmp_path / "m")) == sha256(image1)
    run_borg(local_repo, "check", "--verify-data", "{repo}")

    run_borg(local_repo, "delete", "{repo}::monday")
    run_borg(local_repo, "compact", "{repo}")
    assert archive_names(local_repo) == ["tuesday"]
    assert file_sha256(extract(local_repo, "tuesday", tmp_path / "t2", sparse=True)) == sha256(bytes(expected))
    run_borg(local_repo, "check", "--verify-data", "{repo}")


def test_incremental_chain_of_synthetic_fulls(local_repo, tmp_path):
    """Each night reuses the previous night: every archive stays a complete image."""
    blocks, image = make_image(20, "DDDDDD", tail=0)
    write_archive(local_repo, "night0", blocks, len(image))
    current = bytearray(image)
    rnd = random.Random(21)
    for night in range(1, 4):
        changed = night % 6
        fresh = rnd.randbytes(BLOCK)
        current[changed * BLOCK:(changed + 1) * BLOCK] = fresh
        plan = [fresh if i == changed else Reuse(i) for i in range(6)]
        stats, _ = write_archive(local_repo, f"night{night}", plan, len(current), base=f"night{night - 1}",
                                 reuse_ok=True)
        assert stats.reused == 5 and stats.stored == 1
    run_borg(local_repo, "delete", "{repo}::night0")
    run_borg(local_repo, "delete", "{repo}::night1")
    run_borg(local_repo, "compact", "{repo}")
    assert file_sha256(extract(local_repo, "night3", tmp_path / "n3")) == sha256(bytes(current))
    run_borg(local_repo, "check", "--verify-data", "{repo}")


def test_add_image_gives_the_chunk_ids_the_archive_lists(local_repo):
    blocks, image = make_image(31, "DZDD")
    blocks[3] = blocks[0][:len(blocks[3])]  # the short last block
    stats, _ = write_archive(local_repo, "base", blocks, len(image))
    assert stats.chunk_ids == image_chunk_ids(local_repo, "base", DISK)
    assert len(stats.chunk_ids) == 4 * 32 and len({stats.chunk_ids[i:i + 32] for i in range(0, 128, 32)}) == 4


def test_base_image_refuses_what_cannot_be_reused(local_repo, tmp_path):
    blocks, image = make_image(30, "DDZD")
    stats, _ = write_archive(local_repo, "base", blocks, len(image))
    ids = stats.chunk_ids
    with open_writer(local_repo, "next", block_size=BLOCK, base_archive="base") as writer:
        assert writer.base_image(DISK, len(image), ids) is True
        assert writer.base_image(DISK, len(image) + BLOCK, ids) is False       # one id too few
        assert writer.base_image(DISK, len(image) + 1, ids) is False           # the last chunk is too short
        assert writer.base_image(DISK, len(image), ids[96:] + ids[32:]) is False    # a short chunk as a full block
        assert writer.base_image(DISK, len(image), bytes(32) + ids[32:]) is False   # a chunk the repository lacks
    assert archive_names(local_repo) == ["base"]
    with open_writer(local_repo, "next", block_size=BLOCK // 2, base_archive="base") as writer:
        assert writer.base_image(DISK, len(image), ids) is False               # other block size
    with open_writer(local_repo, "next", block_size=BLOCK, base_archive="gone") as writer:
        assert writer.base_image(DISK, len(image), ids) is False               # no such archive
    with open_writer(local_repo, "next", block_size=BLOCK, base_archive=None) as writer:
        assert writer.base_image(DISK, len(image), ids) is False
        with pytest.raises(ValueError, match="base_image"):
            writer.add_image(DISK, len(image), [Reuse(0), None, None, None])
    assert archive_names(local_repo) == ["base"]


def test_misaligned_chunks_from_plain_borg_create_are_refused(local_repo, tmp_path):
    # A file archived by borg create with the default (buzhash) chunker: chunks are not aligned.
    source = tmp_path / "src"
    disk = source / DISK
    disk.parent.mkdir(parents=True)
    size = 6 * 1024 * 1024
    disk.write_bytes(random.Random(40).randbytes(size))
    run_borg(local_repo, "create", "--chunker-params", "buzhash,10,23,16,4095", "{repo}::plain", "vm1",
             cwd=source)
    # As many of its chunk ids as the image has blocks (it has more): their lengths are not the blocks'.
    ids = image_chunk_ids(local_repo, "plain", DISK)[:size // BLOCK * 32]
    assert len(ids) == size // BLOCK * 32
    with open_writer(local_repo, "next", block_size=BLOCK, base_archive="plain") as writer:
        assert writer.base_image(DISK, size, ids) is False
    # ... while one made with borg create and the same fixed chunker is usable.
    run_borg(local_repo, "create", "--chunker-params", f"fixed,{BLOCK}", "{repo}::fixed", "vm1", cwd=source)
    ids = image_chunk_ids(local_repo, "fixed", DISK)
    with open_writer(local_repo, "next", block_size=BLOCK, base_archive="fixed") as writer:
        assert writer.base_image(DISK, size, ids) is True
        writer.add_image(DISK, size, [Reuse(i) for i in range(size // BLOCK)])
        writer.commit()
    assert file_sha256(extract(local_repo, "next", tmp_path / "n")) == file_sha256(disk)


def test_reading_the_repository_inside_an_open_writer_is_refused_not_a_hang(local_repo):
    write_archive(local_repo, "a", [b"a" * BLOCK], BLOCK)
    ids = image_chunk_ids(local_repo, "a", DISK)
    with open_writer(local_repo, "b", block_size=BLOCK, base_archive="a") as writer:
        with pytest.raises(RuntimeError, match="would wait forever"):
            image_chunk_ids(local_repo, "a", DISK)
        assert writer.base_image(DISK, BLOCK, ids)
        writer.add_image(DISK, BLOCK, [Reuse(0)])
        writer.commit()
    assert len(image_chunk_ids(local_repo, "b", DISK)) == 32


# --------------------------------------------------------------------------------------------
# failures: nothing committed, repository consistent, lock released


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("exc_type", [Boom, KeyboardInterrupt])
def test_exception_inside_leaves_no_archive_and_releases_the_lock(local_repo, tmp_path, kind, exc_type):
    blocks, image = make_image(50, "DZDDDDDD")

    def failing_blocks():
        for position, block in enumerate(blocks):
            if position == 5:
                raise exc_type("reading the disk failed")
            yield block

    with pytest.raises(exc_type):
        with open_writer(local_repo, "broken", block_size=BLOCK, base_archive=None, kind=kind) as writer:
            writer.add_file("vm1/vm.ovf", b"<ovf/>")
            writer.add_image(DISK, len(image), failing_blocks())
    assert archive_names(local_repo) == []
    run_borg(local_repo, "check", "{repo}")
    # The lock is free: a writer with no patience gets it at once and can commit.
    good = Repo(local_repo.location, local_repo.env, lock_wait=0)
    write_archive(good, "after", blocks, len(image), kind=kind)
    assert archive_names(local_repo) == ["after"]
    assert file_sha256(extract(local_repo, "after", tmp_path / "a")) == sha256(image)
    run_borg(local_repo, "check", "--verify-data", "{repo}")


@pytest.mark.parametrize("kind", KINDS)
def test_leaving_without_commit_or_with_bad_blocks_leaves_no_archive(local_repo, kind):
    blocks, image = make_image(51, "DDD")
    with open_writer(local_repo, "forgotten", block_size=BLOCK, base_archive=None, kind=kind) as writer:
        writer.add_image(DISK, len(image), blocks)
    with pytest.raises(ValueError, match="expected"):
        with open_writer(local_repo, "short", block_size=BLOCK, base_archive=None, kind=kind) as writer:
            writer.add_image(DISK, len(image), blocks[:2])
    with pytest.raises(ValueError, match="more blocks"):
        with open_writer(local_repo, "long", block_size=BLOCK, base_archive=None, kind=kind) as writer:
            writer.add_image(DISK, len(image), blocks + [blocks[0]])
    with pytest.raises(ValueError, match="bytes"):
        with open_writer(local_repo, "badblock", block_size=BLOCK, base_archive=None, kind=kind) as writer:
            writer.add_image(DISK, len(image), [blocks[0], blocks[1][:100], blocks[2]])
    assert archive_names(local_repo) == []
    run_borg(local_repo, "check", "{repo}")


@pytest.mark.parametrize("kind", KINDS)
def test_lock_held_by_another_borg_raises_repository_busy_after_lock_wait(local_repo, kind):
    busy = Repo(local_repo.location, local_repo.env, lock_wait=1)
    blocks, image = make_image(60, "DD")
    with lock_holder(local_repo) as holder:
        with pytest.raises(RepositoryBusy, match=r"busy: another borg process holds its lock.*; waited 1 s "):
            with open_writer(busy, "blocked", block_size=BLOCK, base_archive=None, kind=kind) as writer:
                writer.add_image(DISK, len(image), blocks)
                writer.commit()
        assert holder.poll() is None, "the writer gave up while the lock was still held"
    assert archive_names(local_repo) == []


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_passphrase_is_an_auth_error(local_repo, kind):
    wrong = Repo(local_repo.location, {**local_repo.env, "BORG_PASSPHRASE": "wrong"}, lock_wait=1)
    blocks, image = make_image(61, "D")
    with pytest.raises(AuthError, match="passphrase"):
        with open_writer(wrong, "x", block_size=BLOCK, base_archive=None, kind=kind) as writer:
            writer.add_image(DISK, len(image), blocks)
            writer.commit()


@pytest.mark.parametrize("kind", KINDS)
def test_missing_repository_is_a_repository_error(tmp_path, borg_env, kind):
    missing = Repo(str(tmp_path / "nothere"), borg_env, lock_wait=1)
    blocks, image = make_image(62, "D")
    with pytest.raises(RepositoryError, match="does not exist"):
        with open_writer(missing, "x", block_size=BLOCK, base_archive=None, kind=kind) as writer:
            writer.add_image(DISK, len(image), blocks)
            writer.commit()


def test_existing_archive_name_is_refused(local_repo):
    blocks, image = make_image(63, "D")
    write_archive(local_repo, "taken", blocks, len(image))
    with pytest.raises(RepositoryError, match="already exists"):
        with open_writer(local_repo, "taken", block_size=BLOCK, base_archive=None) as writer:
            writer.commit()


def test_bad_arguments_are_config_errors(local_repo):
    with pytest.raises(ConfigError):
        open_writer(local_repo, "a/b", block_size=BLOCK, base_archive=None)
    with pytest.raises(ConfigError):
        open_writer(local_repo, "x", block_size=32, base_archive=None)
    with pytest.raises(ConfigError):
        open_writer(local_repo, "x", block_size=BLOCK, base_archive=None, kind="borg2")
    bad_compression = Repo(local_repo.location, local_repo.env, compression="nonsense")
    with pytest.raises(ConfigError, match="compression"):
        with open_writer(bad_compression, "x", block_size=BLOCK, base_archive=None):
            pass
    with open_writer(local_repo, "x", block_size=BLOCK, base_archive=None) as writer:
        for path in ("/abs", "a/../b", "a//b", ""):
            with pytest.raises(ValueError):
                writer.add_file(path, b"")
        writer.add_file("vm1/vm.ovf", b"")
        with pytest.raises(ValueError, match="already"):
            writer.add_file("vm1/vm.ovf", b"")


# --------------------------------------------------------------------------------------------
# secrets and remote repositories


def test_secrets_stay_out_of_logs_and_environment(local_repo, caplog):
    caplog.set_level(logging.DEBUG)
    before = os.environ.get("BORG_PASSPHRASE")
    blocks, image = make_image(70, "DZ")
    with open_writer(local_repo, "quiet", block_size=BLOCK, base_archive=None) as writer:
        assert os.environ.get("BORG_PASSPHRASE") == before
        writer.add_image(DISK, len(image), blocks)
        writer.commit()
    assert os.environ.get("BORG_BASE_DIR") != local_repo.env["BORG_BASE_DIR"]
    assert PASSPHRASE not in caplog.text
    assert "committed archive quiet" in caplog.text
    assert PASSPHRASE not in repr(local_repo)


@pytest.mark.parametrize("kind", KINDS)
def test_ssh_repository_full_and_incremental(ssh_repo, tmp_path, kind):
    blocks, image = make_image(80, "DZDD")
    write_archive(ssh_repo, "full", blocks, len(image), kind=kind)
    new = random.Random(81).randbytes(BLOCK)
    expected = bytearray(image)
    expected[BLOCK:2 * BLOCK] = new
    reusable = kind == "internal"
    plan = [Reuse(0) if reusable else blocks[0], new, Reuse(2) if reusable else blocks[2],
            Reuse(3) if reusable else blocks[3]]
    stats, _ = write_archive(ssh_repo, "incr", plan, len(image), kind=kind, base="full", reuse_ok=reusable)
    assert stats.reused == (3 if reusable else 0)
    assert file_sha256(extract(ssh_repo, "incr", tmp_path / "i")) == sha256(bytes(expected))
    run_borg(ssh_repo, "check", "--verify-data", "{repo}")


def test_ssh_repository_lock_held_is_busy(ssh_repo, tmp_path):
    local_view = Repo(ssh_repo.location.split(":2222", 1)[1], ssh_repo.env, lock_wait=1)
    busy = Repo(ssh_repo.location, ssh_repo.env, lock_wait=1)
    with lock_holder(local_view):
        with pytest.raises(RepositoryBusy):
            with open_writer(busy, "blocked", block_size=BLOCK, base_archive=None) as writer:
                writer.commit()
    # The borg serve started behind the fake ssh is gone with the writer.
    assert child_processes() == []


def processes_using(location: str) -> list[str]:
    """Return the command lines of live processes that have ``location`` among their arguments."""
    found = []
    for cmdline_file in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline_file.read_bytes().split(b"\0")
            state = (cmdline_file.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(location.encode() in arg for arg in args):
            found.append(b" ".join(args).decode(errors="replace"))
    return found


def child_processes(grace: float = 10.0) -> list[str]:
    """Return the command lines of the live child processes of this test process.

    A child that is still exiting (its pipes closed, not yet reaped) gets ``grace`` seconds.
    """
    deadline = time.monotonic() + grace
    while (children := _live_children()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return children


def _live_children() -> list[str]:
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat_file.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        # The session lab (started by whichever lab test ran first) is no child of a writer.
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and "-m ovirt_borg.lab " not in cmdline:
            children.append(cmdline)
    return children


_KILLED_WRITER = """
import sys, time
from ovirt_borg.archive import Repo, open_writer
repo = Repo(sys.argv[1], {"BORG_PASSPHRASE": sys.argv[2], "BORG_BASE_DIR": sys.argv[3]})
blocks = [bytes([n]) * 65536 for n in range(1, 9)]
with open_writer(repo, "killed", block_size=65536, base_archive=None, kind=sys.argv[4]) as writer:
    writer.add_file("vm1/vm.ovf", b"<ovf/>")
    writer.add_image("vm1/disks/a.raw", 8 * 65536, blocks)
    print("ready", flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("kind", KINDS)
def test_killed_writer_leaves_no_archive(local_repo, tmp_path, kind):
    """ovirt-borg killed with SIGKILL between two images: nothing is committed, the lock heals."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    child = subprocess.Popen([sys.executable, str(script), local_repo.location, PASSPHRASE,
                              local_repo.env["BORG_BASE_DIR"], kind], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    # borg import-tar (cli) gets SIGTERM and rolls back; an internal writer leaves a stale lock
    # of a dead process, which Borg removes on the next access.
    deadline = time.monotonic() + 30
    while processes_using(local_repo.location):
        assert time.monotonic() < deadline, processes_using(local_repo.location)
        time.sleep(0.1)
    assert archive_names(Repo(local_repo.location, local_repo.env, lock_wait=20)) == []
    run_borg(local_repo, "check", "{repo}")
    assert child_processes() == []


def test_cli_abort_deletes_a_checkpoint_archive_borg_made(local_repo, caplog):
    """A checkpoint borg import-tar committed (here on SIGINT) does not outlive an abort."""
    import signal

    repo_dir = Path(local_repo.location)
    indexes_before = set(repo_dir.glob("index.*"))
    rnd = random.Random(90)

    def committed() -> bool:
        return set(repo_dir.glob("index.*")) != indexes_before

    def blocks(writer):
        for position in range(40):
            if position == 2:
                writer._process.proc.send_signal(signal.SIGINT)
            if position > 2:
                # borg writes its checkpoint as it goes on reading: before each further block,
                # a while for it to do so (however slow the machine, at most 37 of these)
                deadline = time.monotonic() + 1
                while not committed() and time.monotonic() < deadline:
                    time.sleep(0.02)
                if committed():
                    # borg committed a checkpoint transaction: now give up.
                    raise Boom("disk read failed")
            yield rnd.randbytes(BLOCK)

    caplog.set_level(logging.INFO, logger="ovirt_borg")
    with pytest.raises(Boom):
        with open_writer(local_repo, "interrupted", block_size=BLOCK, base_archive=None, kind="cli") as writer:
            writer.add_image(DISK, 40 * BLOCK, blocks(writer))
    assert "deleting interrupted.checkpoint" in caplog.text
    assert archive_names(local_repo) == []
    run_borg(local_repo, "check", "{repo}")
