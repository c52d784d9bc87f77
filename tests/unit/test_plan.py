"""Read plans: pure planning logic, no servers."""

import random

import pytest

from ovirt_borg.plan import Action, Extent, choose_sample, plan_blocks, read_ranges, summarize

MiB = 1 << 20
B = 4 * MiB


def expand(blocks):
    """The plan block by block: (index, offset, length, action, segments in that block)."""
    out = []
    for run in blocks:
        for i in range(run.count):
            offset = run.offset + i * run.length
            end = offset + run.length
            segments = tuple((max(s, offset), min(s + n, end) - max(s, offset)) for s, n in run.segments
                             if s < end and s + n > offset)
            out.append((run.index + i, offset, run.length, run.action, segments))
    return out


def actions(blocks):
    return [b[3] for b in expand(blocks)]


def reference_plan(size, block_size, extents, base_size=None):
    """Block by block, the plainest way: what plan_blocks must equal once runs are expanded."""
    base_blocks = -(-base_size // block_size) if base_size is not None else 0
    out = []
    for index in range(-(-size // block_size)):
        offset, end = index * block_size, min((index + 1) * block_size, size)
        segments, dirty = [], False
        for e in extents:
            if e.start < end and e.end > offset:
                dirty = dirty or e.dirty
                if not e.zero:
                    start, stop = max(offset, e.start), min(end, e.end)
                    if segments and sum(segments[-1]) == start:
                        segments[-1] = (segments[-1][0], segments[-1][1] + stop - start)
                    else:
                        segments.append((start, stop - start))
        if not segments:
            action = Action.HOLE
        elif not dirty and index < base_blocks and min(block_size, base_size - offset) == end - offset:
            action = Action.REUSE
        else:
            action = Action.READ
        out.append((index, offset, end - offset, action, tuple(segments)))
    return out


def test_full_backup_holes_and_partial_blocks():
    size = 3 * B + MiB  # last block short
    # block 0 data, block 1 zero, block 2 one MiB of data among zeros, short block 3 zero
    extents = [Extent(0, B, False), Extent(B, B + MiB, True), Extent(2 * B + MiB, MiB, False),
               Extent(2 * B + 2 * MiB, size - (2 * B + 2 * MiB), True)]
    blocks = plan_blocks(size, B, extents)
    assert actions(blocks) == [Action.READ, Action.HOLE, Action.READ, Action.HOLE]
    assert expand(blocks)[2][4] == ((2 * B + MiB, MiB),)  # zeros are never read
    assert expand(blocks)[3][2] == MiB
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
    assert expand(blocks)[1][4] == ((B, B),)


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


def test_sample_picks_clean_data_blocks_to_read_whole():
    extents = [Extent(0, 6 * B, zero=False, dirty=False), Extent(6 * B, 2 * B, zero=True, dirty=False)]
    blocks = plan_blocks(8 * B, B, extents, base_size=8 * B)
    sample = choose_sample(blocks, 3, random.Random(1))
    assert len(sample) == 3 and len({block.index for block in sample}) == 3
    for block in sample:
        assert block.index < 6  # a clean data block, never a hole
        assert (block.offset, block.length, block.action, block.count) == (block.index * B, B, Action.READ, 1)
        assert block.segments == ((block.offset, B),)
    assert [b.index for b in sample] == sorted(b.index for b in sample)
    assert sorted(b.index for b in choose_sample(blocks, 10, random.Random(1))) == [0, 1, 2, 3, 4, 5]


def test_sample_reads_only_the_data_of_a_partly_empty_block():
    # One clean block, data in two pieces with a zero extent between them; a short last block.
    extents = [Extent(0, 4096, zero=False, dirty=False), Extent(4096, B - 8192, zero=True, dirty=False),
               Extent(B - 4096, 4096 + B // 2, zero=False, dirty=False)]
    blocks = plan_blocks(B + B // 2, B, extents, base_size=B + B // 2)
    sample = choose_sample(blocks, 5, random.Random(3))
    assert [(b.index, b.offset, b.length, b.segments) for b in sample] == [
        (0, 0, B, ((0, 4096), (B - 4096, 4096))), (1, B, B // 2, ((B, B // 2),))]


def test_read_ranges_split_long_segments():
    blocks = plan_blocks(2 * B, 2 * B, [Extent(0, 2 * B, False)])
    assert read_ranges(blocks, B) == [(0, B), (B, B)]


def test_runs_plan_a_huge_sparse_disk_in_a_few_entries():
    size = 1 << 40  # 1 TiB, 1 MiB blocks: a million blocks
    extents = [Extent(0, 64 * MiB, zero=False, dirty=False), Extent(64 * MiB, MiB // 2, zero=False, dirty=True),
               Extent(64 * MiB + MiB // 2, size - 64 * MiB - MiB // 2, zero=True, dirty=False)]
    blocks = plan_blocks(size, MiB, extents, base_size=size)
    assert [(b.action, b.count) for b in blocks] == [(Action.REUSE, 64), (Action.READ, 1),
                                                     (Action.HOLE, (1 << 20) - 65)]
    summary = summarize(blocks)
    assert (summary.blocks, summary.reused, summary.read, summary.holes) == (1 << 20, 64, 1, (1 << 20) - 65)
    assert summary.bytes_to_read == MiB // 2


@pytest.mark.parametrize("seed", range(40))
def test_plan_equals_the_block_by_block_reference(seed):
    rng = random.Random(seed)
    block = rng.choice([64 * 1024, 256 * 1024, MiB])
    size = rng.randrange(1, 40) * block - rng.choice([0, 0, 512, block // 2])
    base_size = rng.choice([None, size, size - block // 2, size + block, block * 3])
    cuts = sorted({0, size} | {rng.randrange(1, size) // 512 * 512 for _ in range(rng.randrange(0, 12))}
                  | {rng.randrange(1, max(2, size // block)) * block for _ in range(3)})
    cuts = [c for c in cuts if 0 <= c <= size]
    extents = [Extent(a, b - a, zero=rng.random() < 0.4, dirty=rng.random() < 0.5)
               for a, b in zip(cuts, cuts[1:]) if b > a]
    if base_size is not None and base_size <= 0:
        base_size = None
    assert expand(plan_blocks(size, block, extents, base_size=base_size)) == \
        reference_plan(size, block, extents, base_size)
    # Runs never hold READ blocks, never mix lengths, and follow each other without gaps.
    blocks = plan_blocks(size, block, extents, base_size=base_size)
    assert all(b.count == 1 for b in blocks if b.action is Action.READ)
    assert all(a.end == b.offset for a, b in zip(blocks, blocks[1:])) and blocks[-1].end == size
    sample = choose_sample(blocks, 5, rng)
    clean = {i for i, _, _, action, segments in expand(blocks) if action is Action.REUSE and segments}
    assert len(sample) == min(5, len(clean)) and {p.index for p in sample} <= clean


def test_read_ranges_join_data_across_blocks_up_to_the_request_size():
    rng = random.Random(7)
    for _ in range(40):
        size = rng.randrange(1, 40) * B + rng.choice((0, 4096, B // 2))
        cuts = sorted({0, size, *(rng.randrange(0, size // 4096) * 4096 for _ in range(rng.randrange(0, 12)))})
        extents = [Extent(a, b - a, zero=rng.random() < 0.4) for a, b in zip(cuts, cuts[1:])]
        blocks = plan_blocks(size, B, extents)
        max_range = rng.choice((B // 2, B, 3 * B, 4 * B))
        ranges = read_ranges(blocks, max_range)
        wanted = bytearray(size)
        for block in blocks:
            for start, length in block.segments:
                wanted[start:start + length] = b"\1" * length
        got = bytearray(size)
        for (start, length), following in zip(ranges, ranges[1:] + [(size + 1, 0)]):
            assert 0 < length <= max_range and start + length <= following[0]
            # A range stops short of the next one only at the request size.
            assert start + length < following[0] or length == max_range
            got[start:start + length] = b"\1" * length
        assert got == wanted
