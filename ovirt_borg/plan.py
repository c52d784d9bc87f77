"""Read plans: which blocks of a disk are holes, which are reused, which are read.

Pure functions, no I/O. A disk is cut into fixed, aligned blocks (``block_size``, the last
one may be short). Given imageio's extents, each block becomes:

- ``HOLE``: every byte reads as zero. Nothing is read or sent; the archive references the
  all-zero chunk.
- ``REUSE``: the block did not change since the base archive (no dirty extent touches it), and
  the base archive holds it with the same length: its chunk is referenced, nothing is read.
  Its ``segments`` are kept so that a few clean blocks can be re-read as a check of the dirty
  bitmap (``choose_sample``).
- ``READ``: the block is read from imageio and stored. Only its non-zero ``segments`` are
  fetched; the zero parts are filled in locally, so zero extents never cross the wire.
- ``REBUILD`` (planned only when asked, ``rebuild=True``): the block changed in part and the
  base archive holds it with the same length. Only its dirty data (``segments``) is fetched
  from imageio; its clean data (``base``) is taken from the base archive's chunk for the block,
  its zero parts (dirty or clean) are filled in locally; the rebuilt block is stored. A block
  whose every data byte is dirty is a READ block: nothing of the base is needed.
  ``block_parts`` tells the three kinds of ranges of a block apart.

Consecutive HOLE blocks, and consecutive REUSE blocks, of the same length are planned as one
run (``Block.count`` > 1), so planning, memory and the writer's work grow with the number of
extents and of blocks read, not with the disk's provisioned size (a 1 TiB disk is a million
1 MiB blocks). READ blocks are always planned one by one.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from typing import Iterable, Sequence


class Action(enum.Enum):
    HOLE = "hole"
    REUSE = "reuse"
    READ = "read"
    REBUILD = "rebuild"


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of the disk with the same state, as imageio reports it.

    ``zero``: reads as zeros; ``dirty``: changed since the checkpoint (only the dirty context
    tells; an extent of the zero context counts as changed, so a full backup reads all its
    data); ``hole``: not allocated (zero context only).
    """

    start: int
    length: int
    zero: bool
    dirty: bool = True
    hole: bool = False

    @property
    def end(self) -> int:
        """Offset just past the extent."""
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class Block:
    """Planned blocks: the first one's index and offset, each one's length, their action, how
    many (``count``, a run of HOLE or REUSE blocks; always 1 for READ and REBUILD), the data
    segments in them (what a READ or REBUILD block fetches; where a REUSE run holds data) and,
    for a REBUILD block, the ranges (``base``, disk offsets) taken from the base archive."""

    index: int
    offset: int
    length: int
    action: Action
    segments: tuple[tuple[int, int], ...] = ()
    count: int = 1
    base: tuple[tuple[int, int], ...] = ()

    @property
    def bytes_to_read(self) -> int:
        return sum(length for _, length in self.segments)

    @property
    def end(self) -> int:
        return self.offset + self.length * self.count


@dataclass(frozen=True)
class PlanSummary:
    """Blocks by action; ``read`` counts the blocks stored (READ and REBUILD), ``rebuilt`` the
    REBUILD ones among them; ``bytes_to_read`` what is fetched from imageio."""

    blocks: int
    holes: int
    reused: int
    read: int
    bytes_to_read: int
    rebuilt: int = 0


@dataclass(frozen=True)
class BlockParts:
    """The byte ranges of one block by where their bytes come from, each as (disk offset,
    length) in order, neighbours of a kind joined: ``fetch``, dirty data read from imageio;
    ``base``, clean data as the base archive holds it; ``zero``, what reads as zeros now (a
    zero write, a discard, a hole), never read from anywhere."""

    fetch: tuple[tuple[int, int], ...]
    base: tuple[tuple[int, int], ...]
    zero: tuple[tuple[int, int], ...]


def block_count(size: int, block_size: int) -> int:
    """Number of blocks of a disk of ``size`` bytes (the last may be short)."""
    return (size + block_size - 1) // block_size


def check_extents(extents: Sequence[Extent], size: int) -> None:
    """Raise ValueError unless the extents cover [0, size) contiguously, in order."""
    position = 0
    for extent in extents:
        if extent.start != position or extent.length <= 0:
            raise ValueError(f"extents are not contiguous at offset {position}")
        position = extent.end
    if position != size:
        raise ValueError(f"extents cover {position} bytes, the disk has {size}")


def plan_blocks(
    size: int,
    block_size: int,
    extents: Sequence[Extent],
    *,
    base_size: int | None = None,
    rebuild: bool = False,
) -> list[Block]:
    """Plan every block of a disk.

    Given the disk ``size``, the ``block_size``, imageio's extents covering the whole disk
    (for a full backup from ``context=zero``, all marked dirty; for an incremental from
    ``context=dirty``) and ``base_size``, the size of the disk in the base archive (None when
    there is no usable base), return the planned blocks in order, runs of HOLE and REUSE blocks
    as one Block each (see the module docstring). With ``rebuild``, a block that changed in
    part and that the base holds with the same length is planned REBUILD (only its dirty data
    fetched), else READ. Raises ValueError on extents that do not cover the disk.
    """
    check_extents(extents, size)
    base_blocks = block_count(base_size, block_size) if base_size is not None else 0
    base_full_blocks = base_size // block_size if base_size is not None else 0
    blocks: list[Block] = []
    total = block_count(size, block_size)
    position = 0  # index of the first extent that may overlap the current block
    index = 0
    while index < total:
        offset = index * block_size
        while extents[position].end <= offset:
            position += 1
        extent = extents[position]
        # Whole blocks inside this one extent (never the short last block): planned at once.
        inside = min((extent.end - offset) // block_size, size // block_size - index)
        if inside >= 1 and extent.zero:
            _append(blocks, Block(index, offset, block_size, Action.HOLE, (), inside))
            index += inside
            continue
        if inside >= 1 and not extent.dirty and index < base_full_blocks:
            count = min(inside, base_full_blocks - index)
            _append(blocks, Block(index, offset, block_size, Action.REUSE,
                                  ((offset, count * block_size),), count))
            index += count
            continue
        if inside >= 1:
            # Data that changed, or that the base does not hold: read block by block.
            for i in range(index, index + inside):
                blocks.append(Block(i, i * block_size, block_size, Action.READ, ((i * block_size, block_size),)))
            index += inside
            continue
        _append(blocks, _plan_one(index, block_size, size, extents, position, base_blocks, base_size, rebuild))
        index += 1
    return blocks


def _plan_one(index: int, block_size: int, size: int, extents: Sequence[Extent], position: int,
              base_blocks: int, base_size: int | None, rebuild: bool) -> Block:
    """Plan block ``index``, which extents[position] and its followers cover in part each."""
    offset = index * block_size
    end = min(offset + block_size, size)
    segments: list[tuple[int, int]] = []
    dirty = False
    cursor = position
    while cursor < len(extents) and extents[cursor].start < end:
        extent = extents[cursor]
        dirty = dirty or extent.dirty
        if not extent.zero:
            seg_start, seg_end = max(offset, extent.start), min(end, extent.end)
            _add_segment(segments, seg_start, seg_end - seg_start)
        cursor += 1
    length = end - offset
    in_base = index < base_blocks and _base_block_length(index, base_size, block_size) == length
    if not segments:
        return Block(index, offset, length, Action.HOLE)
    if not dirty and in_base:
        return Block(index, offset, length, Action.REUSE, tuple(segments))
    if rebuild and in_base:
        parts = block_parts(offset, end, extents, position)
        if parts.base:
            return Block(index, offset, length, Action.REBUILD, parts.fetch, base=parts.base)
    return Block(index, offset, length, Action.READ, tuple(segments))


def block_parts(offset: int, end: int, extents: Sequence[Extent], position: int = 0) -> BlockParts:
    """Split the block [``offset``, ``end``) by where its bytes come from (``BlockParts``).

    Given the block's bounds, the extents of the disk in order (dirty-context extents: each
    with its ``dirty`` and ``zero`` flags) covering the block, and the index of an extent at or
    before the first one that overlaps it. Extents may begin before the block and end after
    it: only their part inside counts. A clean zero range is zeros, as the base holds it.
    """
    fetch: list[tuple[int, int]] = []
    base: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    cursor = position
    while cursor < len(extents) and extents[cursor].start < end:
        extent = extents[cursor]
        cursor += 1
        start, stop = max(offset, extent.start), min(end, extent.end)
        if start >= stop:
            continue
        kind = zero if extent.zero else fetch if extent.dirty else base
        _add_segment(kind, start, stop - start)
    return BlockParts(tuple(fetch), tuple(base), tuple(zero))


def _add_segment(segments: list[tuple[int, int]], start: int, length: int) -> None:
    """Add the data segment (start, length) after ``segments``, joined to the last if it follows it."""
    if segments and segments[-1][0] + segments[-1][1] == start:
        segments[-1] = (segments[-1][0], segments[-1][1] + length)
    else:
        segments.append((start, length))


def _append(blocks: list[Block], block: Block) -> None:
    """Append ``block``, joining it to the previous run of the same kind if it follows it."""
    if blocks and block.action in (Action.HOLE, Action.REUSE):
        last = blocks[-1]
        if last.action is block.action and last.length == block.length and last.end == block.offset:
            segments = list(last.segments)
            for start, length in block.segments:
                _add_segment(segments, start, length)
            blocks[-1] = Block(last.index, last.offset, last.length, last.action, tuple(segments),
                               last.count + block.count)
            return
    blocks.append(block)


def _base_block_length(index: int, base_size: int | None, block_size: int) -> int:
    assert base_size is not None
    return min(block_size, base_size - index * block_size)


def choose_sample(blocks: Sequence[Block], count: int, rng: random.Random) -> list[Block]:
    """Pick up to ``count`` distinct REUSE blocks holding data, to re-read as a check of the bitmap.

    Returned in disk order as single READ blocks with their own data segments: re-reading one
    fetches only its data, its zero parts are filled in locally.
    """
    runs = [b for b in blocks if b.action is Action.REUSE and b.segments]
    # Only the blocks of a run that hold data are candidates.
    candidates: list[tuple[Block, int]] = []  # (run, first block of a stretch), ...
    weights: list[int] = []
    for run in runs:
        covered = -1  # the last block of this run already a candidate
        for start, seg_length in run.segments:
            first = max((start - run.offset) // run.length, covered + 1)
            last = (start + seg_length - 1 - run.offset) // run.length
            if last >= first:
                candidates.append((run, first))
                weights.append(last - first + 1)
                covered = last
    total = sum(weights)
    picks = sorted(rng.sample(range(total), min(count, total))) if total else []
    sample = []
    stretch, passed = 0, 0
    for pick in picks:
        while pick >= passed + weights[stretch]:
            passed += weights[stretch]
            stretch += 1
        run, first = candidates[stretch]
        within = first + pick - passed
        block_offset = run.offset + within * run.length
        block_end = block_offset + run.length
        # The data of this block: its part of the run's segments.
        segments = tuple((max(s, block_offset), min(s + n, block_end) - max(s, block_offset))
                         for s, n in run.segments if s < block_end and s + n > block_offset)
        sample.append(Block(run.index + within, block_offset, run.length, Action.READ, segments))
    return sample


def summarize(blocks: Iterable[Block]) -> PlanSummary:
    """Count holes, reused, read and rebuilt blocks, and the bytes that will be read."""
    holes = reused = read = rebuilt = to_read = total = 0
    for block in blocks:
        total += block.count
        if block.action is Action.HOLE:
            holes += block.count
        elif block.action is Action.REUSE:
            reused += block.count
        else:
            read += block.count
            rebuilt += block.count if block.action is Action.REBUILD else 0
            to_read += block.bytes_to_read
    return PlanSummary(total, holes, reused, read, to_read, rebuilt)


def read_ranges(blocks: Iterable[Block], max_range: int) -> list[tuple[int, int]]:
    """The (offset, length) requests for all READ and REBUILD blocks' segments, in order.

    Data that continues from one block into the next is read in one request, so the request
    size does not depend on the block size; no request is longer than ``max_range``.
    """
    ranges: list[tuple[int, int]] = []
    for block in blocks:
        if block.action is not Action.READ and block.action is not Action.REBUILD:
            continue
        for start, length in block.segments:
            if ranges and ranges[-1][0] + ranges[-1][1] == start and ranges[-1][1] < max_range:
                joined = min(length, max_range - ranges[-1][1])
                ranges[-1] = (ranges[-1][0], ranges[-1][1] + joined)
                start += joined
                length -= joined
            while length > 0:
                ranges.append((start, min(length, max_range)))
                start += ranges[-1][1]
                length -= ranges[-1][1]
    return ranges
