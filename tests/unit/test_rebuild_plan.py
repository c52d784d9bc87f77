"""Rebuilt blocks: which bytes of a changed block come from imageio, the base archive, or zeros;
and when an incremental rebuilds them (``[repository] rebuild_blocks``)."""

import random

import pytest

from ovirt_borg.archive import Repo
from ovirt_borg.backup import rebuilds_blocks
from ovirt_borg.config import from_dict, sample_config
from ovirt_borg.errors import ConfigError
from ovirt_borg.plan import Action, Extent, block_parts, plan_blocks, read_ranges, summarize

K = 1 << 10
B = 64 * K  # block size of these tests; the granule below is an eighth of it
G = 8 * K


def cover(parts):
    """Every (start, length) of the parts, in order, with its kind."""
    return sorted([(s, n, "fetch") for s, n in parts.fetch] + [(s, n, "base") for s, n in parts.base]
                  + [(s, n, "zero") for s, n in parts.zero])


def test_parts_of_a_block_inside_mixed_extents():
    extents = [Extent(0, 10 * K, zero=False, dirty=False), Extent(10 * K, 6 * K, zero=False, dirty=True),
               Extent(16 * K, 8 * K, zero=True, dirty=True), Extent(24 * K, 40 * K, zero=False, dirty=False)]
    parts = block_parts(0, B, extents)
    assert parts.fetch == ((10 * K, 6 * K),)
    assert parts.base == ((0, 10 * K), (24 * K, 40 * K))
    assert parts.zero == ((16 * K, 8 * K),)


def test_extents_crossing_block_boundaries_are_clipped_to_the_block():
    # One dirty extent from the middle of block 0 to the middle of block 1, clean data around.
    extents = [Extent(0, B // 2, zero=False, dirty=False), Extent(B // 2, B, zero=False, dirty=True),
               Extent(3 * B // 2, B // 2, zero=False, dirty=False)]
    assert block_parts(0, B, extents) == block_parts(0, B, extents, 0)
    first, second = block_parts(0, B, extents), block_parts(B, 2 * B, extents, 1)
    assert (first.fetch, first.base) == (((B // 2, B // 2),), ((0, B // 2),))
    assert (second.fetch, second.base) == (((B, B // 2),), ((3 * B // 2, B // 2),))
    blocks = plan_blocks(2 * B, B, extents, base_size=2 * B, rebuild=True)
    assert [b.action for b in blocks] == [Action.REBUILD, Action.REBUILD]
    # The dirty data across the boundary is still one request.
    assert read_ranges(blocks, 1 << 20) == [(B // 2, B)]


def test_clean_and_dirty_neighbours_of_a_kind_are_joined():
    extents = [Extent(0, 4 * K, zero=False, dirty=True), Extent(4 * K, 4 * K, zero=False, dirty=True),
               Extent(8 * K, 8 * K, zero=True, dirty=False), Extent(16 * K, 8 * K, zero=True, dirty=True),
               Extent(24 * K, 40 * K, zero=False, dirty=False)]
    parts = block_parts(0, B, extents)
    assert parts.fetch == ((0, 8 * K),)
    assert parts.zero == ((8 * K, 16 * K),)
    assert parts.base == ((24 * K, 40 * K),)


def test_zero_writes_inside_a_block_need_no_read():
    # Only a zero write (or a discard) changed the block: it is rebuilt from the base, nothing fetched.
    extents = [Extent(0, 16 * K, zero=False, dirty=False), Extent(16 * K, 16 * K, zero=True, dirty=True),
               Extent(32 * K, 32 * K, zero=False, dirty=False)]
    [block] = plan_blocks(B, B, extents, base_size=B, rebuild=True)
    assert block.action is Action.REBUILD
    assert block.segments == () and block.bytes_to_read == 0
    assert block.base == ((0, 16 * K), (32 * K, 32 * K))
    assert read_ranges([block], 1 << 20) == []


def test_entirely_dirty_blocks_are_read_whole():
    extents = [Extent(0, B + 8 * K, zero=False, dirty=True), Extent(B + 8 * K, 8 * K, zero=True, dirty=True),
               Extent(B + 16 * K, B - 16 * K, zero=False, dirty=True)]
    blocks = plan_blocks(2 * B, B, extents, base_size=2 * B, rebuild=True)
    assert [b.action for b in blocks] == [Action.READ, Action.READ]
    assert blocks[1].segments == ((B, 8 * K), (B + 16 * K, B - 16 * K))


def test_no_rebuild_without_a_base_block_of_the_same_length():
    extents = [Extent(0, 8 * K, zero=False, dirty=True), Extent(8 * K, 2 * B - 8 * K, zero=False, dirty=False),
               Extent(2 * B, 8 * K, zero=False, dirty=True), Extent(2 * B + 8 * K, 24 * K, zero=False, dirty=False)]
    size = 2 * B + 32 * K  # the last block is short
    # The base was smaller: its last block (now block 1, grown) and block 2 (new) are not in it.
    blocks = plan_blocks(size, B, extents, base_size=B + 16 * K, rebuild=True)
    assert [b.action for b in blocks] == [Action.REBUILD, Action.READ, Action.READ]
    # Without rebuild, the changed block is read as before.
    assert [b.action for b in plan_blocks(size, B, extents, base_size=size)] == \
        [Action.READ, Action.REUSE, Action.READ]
    assert [b.action for b in plan_blocks(size, B, extents, base_size=size, rebuild=True)] == \
        [Action.REBUILD, Action.REUSE, Action.REBUILD]


def test_summary_counts_rebuilt_blocks_among_those_stored():
    extents = [Extent(0, 8 * K, zero=False, dirty=True), Extent(8 * K, 2 * B - 8 * K, zero=False, dirty=False),
               Extent(2 * B, B, zero=False, dirty=True)]
    summary = summarize(plan_blocks(3 * B, B, extents, base_size=3 * B, rebuild=True))
    assert (summary.blocks, summary.reused, summary.read, summary.rebuilt) == (3, 1, 2, 1)
    assert summary.bytes_to_read == 8 * K + B


def _disk_and_extents(rng, size):
    """A base image, the image now (the base with dirty writes, zero writes and discards in
    granules of G) and the dirty-context extents that describe the change."""
    granules = -(-size // G)
    base = bytearray(rng.randbytes(size))
    for g in rng.sample(range(granules), granules // 4):  # parts of the base that are zeros
        base[g * G:(g + 1) * G] = bytes(len(base[g * G:(g + 1) * G]))
    now = bytearray(base)
    flags = []
    for g in range(granules):
        start, end = g * G, min((g + 1) * G, size)
        kind = rng.choice(["clean"] * 6 + ["write", "zero"])
        if kind == "write":
            now[start:end] = rng.randbytes(end - start)
        elif kind == "zero":
            now[start:end] = bytes(end - start)
        flags.append((kind != "clean", not any(now[start:end])))
    extents = []
    for g, (dirty, zero) in enumerate(flags):
        start, end = g * G, min((g + 1) * G, size)
        if extents and (extents[-1].dirty, extents[-1].zero) == (dirty, zero):
            extents[-1] = Extent(extents[-1].start, end - extents[-1].start, zero=zero, dirty=dirty)
        else:
            extents.append(Extent(start, end - start, zero=zero, dirty=dirty))
    return bytes(base), bytes(now), extents


@pytest.mark.parametrize("seed", range(12))
def test_rebuilt_blocks_equal_the_disk(seed):
    """Blocks assembled from their fetched parts (the disk now), their base parts (the base
    image) and zeros equal the disk, on disks whose last block is short; nothing clean is
    fetched, nothing zero is fetched or taken from the base."""
    rng = random.Random(seed)
    size = rng.randrange(2, 9) * B + rng.randrange(1, B // G) * G  # not a multiple of the block size
    base, now, extents = _disk_and_extents(rng, size)
    blocks = plan_blocks(size, B, extents, base_size=size, rebuild=True)
    assert any(block.action is Action.REBUILD for block in blocks)
    for block in blocks:
        for i in range(block.count):
            offset = block.offset + i * block.length
            data = now[offset:offset + block.length]
            if block.action is Action.HOLE:
                assert not any(data)
            elif block.action is Action.REUSE:
                assert data == base[offset:offset + block.length]
            elif block.action is Action.READ:
                assert block.base == ()
                assert not block_parts(offset, offset + block.length, extents).base
            else:
                rebuilt = bytearray(block.length)
                for start, length in block.base:
                    rebuilt[start - offset:start - offset + length] = base[start:start + length]
                for start, length in block.segments:
                    rebuilt[start - offset:start - offset + length] = now[start:start + length]
                assert bytes(rebuilt) == data, f"block {block.index}"
                parts = block_parts(offset, offset + block.length, extents)
                assert cover(parts)[0][0] == offset
                position = offset
                for start, length, _ in cover(parts):
                    assert start == position
                    position += length
                assert position == offset + block.length
    fetched = sum(n for s, n in read_ranges(blocks, 1 << 20))
    dirty_data = sum(e.length for e in extents if e.dirty and not e.zero)
    assert fetched <= dirty_data


@pytest.mark.parametrize("setting, remote, rebuilds", [
    ("auto", False, True), ("auto", True, False), ("always", True, True), ("always", False, True),
    ("never", False, False), ("never", True, False)])
def test_rebuild_setting_by_repository(setting, remote, rebuilds):
    assert rebuilds_blocks(setting, remote) is rebuilds


def test_a_bad_rebuild_setting_is_refused():
    with pytest.raises(ValueError):
        rebuilds_blocks("sometimes", False)
    with pytest.raises(ConfigError, match="rebuild_blocks"):
        from_dict({"engine": {"url": "https://e.example.com/ovirt-engine/api"},
                   "repository": {"rebuild_blocks": "sometimes"}})
    config = from_dict({"engine": {"url": "https://e.example.com/ovirt-engine/api"}})
    assert config.repository.rebuild_blocks == "auto"
    assert 'rebuild_blocks = "auto"' in sample_config()


@pytest.mark.parametrize("location, remote", [
    ("/srv/borg", False), ("relative/repo", False), ("file:///srv/borg", False),
    ("ssh://backup@borg.example.com/./ovirt", True), ("ssh://h:2222/srv/borg", True),
    ("backup@borg.example.com:ovirt", True)])
def test_remote_repositories(location, remote):
    assert Repo(location, {}).remote is remote


class _Disk:
    """Stands in for ImageioClient.read_ranges over the bytes of a disk (pieces cut at block
    boundaries, as the client does)."""

    def __init__(self, data: bytes):
        self.data = data

    def read_ranges(self, ranges, piece_size=None):
        for start, length in ranges:
            while length:
                taken = min(length, piece_size - start % piece_size) if piece_size else length
                yield start, self.data[start:start + taken]
                start += taken
                length -= taken


def test_rebuilt_blocks_are_assembled_from_fetched_base_and_zero_parts():
    from ovirt_borg.backup import _assemble

    rng = random.Random(5)
    base_disk = rng.randbytes(4 * B)
    now = bytearray(base_disk)
    extents = []
    position = 0
    # Per block: clean data, dirty data, a zero write, clean data again, in granules.
    for _ in range(4 * B // G):
        zero, dirty = rng.random() < 0.15, rng.random() < 0.3
        if zero:
            now[position:position + G] = bytes(G)
        elif dirty:
            now[position:position + G] = rng.randbytes(G)
        extents.append(Extent(position, G, zero=zero, dirty=dirty or zero))
        position += G
    blocks = [b for b in plan_blocks(4 * B, B, extents, base_size=4 * B, rebuild=True)
              if b.action in (Action.READ, Action.REBUILD)]
    assert any(b.action is Action.REBUILD for b in blocks)
    bases = ((b.index, base_disk[b.offset:b.end]) for b in blocks if b.action is Action.REBUILD)
    for block, data in zip(blocks, _assemble(_Disk(bytes(now)), blocks, B, bases), strict=True):
        assert data == bytes(now[block.offset:block.end]), block.index


def test_a_base_block_given_out_of_order_is_refused():
    from ovirt_borg.backup import _assemble

    extents = [Extent(0, G, zero=False, dirty=True), Extent(G, 2 * B - G, zero=False, dirty=False),
               Extent(2 * B, G, zero=False, dirty=True), Extent(2 * B + G, B - G, zero=False, dirty=False)]
    blocks = [b for b in plan_blocks(3 * B, B, extents, base_size=3 * B, rebuild=True) if b.action is Action.REBUILD]
    assert [b.index for b in blocks] == [0, 2]
    with pytest.raises(AssertionError, match="base block given is 2"):
        list(_assemble(_Disk(bytes(3 * B)), blocks, B, iter([(2, bytes(B)), (0, bytes(B))])))
