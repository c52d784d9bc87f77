"""Read plans: pure planning logic, no servers."""

import random

import pytest

from ovirt_borg.plan import Action, Extent, choose_sample, plan_blocks, read_ranges, summarize

MiB = 1 << 20
B = 4 * MiB


def actions(blocks):
    return [b.action for b in blocks]


def test_full_backup_holes_and_partial_blocks():
    size = 3 * B + MiB  # last block short
    # block 0 data, block 1 zero, block 2 one MiB of data among zeros, short block 3 zero
    extents = [Extent(0, B, False), Extent(B, B + MiB, True), Extent(2 * B + MiB, MiB, False),
               Extent(2 * B + 2 * MiB, size - (2 * B + 2 * MiB), True)]
    blocks = plan_blocks(size, B, extents)
    assert actions(blocks) == [Action.READ, Action.HOLE, Action.READ, Action.HOLE]
    assert blocks[2].segments == ((2 * B + MiB, MiB),)  # zeros are never read
    assert blocks[3].length == MiB
    summary = summarize(blocks)
    assert (summary.holes, summary.read, summary.bytes_to_read) == (2, 2, B + MiB)


def test_incremental_reuses_clean_blocks_and_reads_dirty_whole_data():
    size = 4 * B
    extents = [
        Extent(0, B, zero=False, dirty=False),
        Extent(B, 64 * 1024, zero=False, dirty=True),          # a 64 KiB write in block 1
        Extent(B + 64 * 1024, B - 64 * 1024, zero=False, dirty=False),
        Extent(2 * B, B, zero=True, dirty=True),                # block 2 discarded: now zero
        Extent(3 * B, B, zero=True, dirty=False),               # block 3 clean hole
    ]
    blocks = plan_blocks(size, B, extents, base_size=size)
    assert actions(blocks) == [Action.REUSE, Action.READ, Action.HOLE, Action.HOLE]
    # the dirty block is read whole (clean parts too), so the new chunk is complete
    assert blocks[1].segments == ((B, B),)


def test_disk_grown_since_base_reads_new_and_changed_tail():
    size = 3 * B
    extents = [Extent(0, size, zero=False, dirty=False)]
    blocks = plan_blocks(size, B, extents, base_size=B + MiB)
    # block 0 same as base, block 1 was short in the base, block 2 is new
    assert actions(blocks) == [Action.REUSE, Action.READ, Action.READ]


def test_no_base_means_full_read_even_if_clean():
    extents = [Extent(0, 2 * B, zero=False, dirty=False)]
    assert actions(plan_blocks(2 * B, B, extents, base_size=None)) == [Action.READ, Action.READ]


def test_extents_must_cover_disk():
    with pytest.raises(ValueError):
        plan_blocks(2 * B, B, [Extent(0, B, False)])
    with pytest.raises(ValueError):
        plan_blocks(2 * B, B, [Extent(0, B, False), Extent(B + 1, B - 1, False)])


def test_sample_picks_small_aligned_pieces_of_clean_data_blocks():
    extents = [Extent(0, 6 * B, zero=False, dirty=False), Extent(6 * B, 2 * B, zero=True, dirty=False)]
    blocks = plan_blocks(8 * B, B, extents, base_size=8 * B)
    sample = choose_sample(blocks, 3, random.Random(1))
    assert len(sample) == 3
    for piece in sample:
        assert piece.block.action is Action.REUSE and piece.block.index < 6  # never a hole
        assert piece.length == 64 * 1024 and piece.offset % (64 * 1024) == 0
        assert piece.block.offset <= piece.offset < piece.block.offset + B
    assert len(choose_sample(blocks, 10, random.Random(1))) == 6


def test_read_ranges_split_long_segments():
    blocks = plan_blocks(2 * B, 2 * B, [Extent(0, 2 * B, False)])
    assert read_ranges(blocks, B) == [(0, B), (B, B)]
