"""Read plans: which blocks of a disk are holes, which are reused, which are read.

Pure functions, no I/O. A disk is cut into fixed, aligned blocks (``block_size``, the last
one may be short). Given imageio's extents, each block becomes:

- ``HOLE``: every byte reads as zero. Nothing is read or sent; the archive references the
  all-zero chunk.
- ``REUSE``: the block did not change since the base archive (no dirty extent touches it), and
  the base archive holds it with the same length: its chunk is referenced, nothing is read.
  Its ``segments`` are kept so that pieces of clean blocks can be re-read as a check of the
  dirty bitmap (``choose_sample``).
- ``READ``: the block is read from imageio and stored. Only its non-zero ``segments`` are
  fetched; the zero parts are filled in locally, so zero extents never cross the wire.
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


@dataclass(frozen=True)
class Extent:
    """A run of the disk as imageio reports it: ``zero`` reads as zeros, ``dirty`` changed."""

    start: int
    length: int
    zero: bool
    dirty: bool = True

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Block:
    """One planned block: index, absolute offset, length, action, and data segments to read."""

    index: int
    offset: int
    length: int
    action: Action
    segments: tuple[tuple[int, int], ...] = ()

    @property
    def bytes_to_read(self) -> int:
        return sum(length for _, length in self.segments)


@dataclass(frozen=True)
class PlanSummary:
    blocks: int
    holes: int
    reused: int
    read: int
    bytes_to_read: int


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
) -> list[Block]:
    """Plan every block of a disk.

    Given the disk ``size``, the ``block_size``, imageio's extents covering the whole disk
    (for a full backup from ``context=zero``, all marked dirty; for an incremental from
    ``context=dirty``) and ``base_size``, the size of the disk in the base archive (None when
    there is no usable base), return one Block per block in order. Raises ValueError on
    extents that do not cover the disk.
    """
    check_extents(extents, size)
    base_blocks = block_count(base_size, block_size) if base_size is not None else 0
    blocks: list[Block] = []
    position = 0  # index of the first extent that may overlap the current block
    for index in range(block_count(size, block_size)):
        offset = index * block_size
        end = min(offset + block_size, size)
        while extents[position].end <= offset:
            position += 1
        segments: list[tuple[int, int]] = []
        dirty = False
        cursor = position
        while cursor < len(extents) and extents[cursor].start < end:
            extent = extents[cursor]
            dirty = dirty or extent.dirty
            if not extent.zero:
                seg_start, seg_end = max(offset, extent.start), min(end, extent.end)
                if segments and segments[-1][0] + segments[-1][1] == seg_start:
                    segments[-1] = (segments[-1][0], segments[-1][1] + seg_end - seg_start)
                else:
                    segments.append((seg_start, seg_end - seg_start))
            cursor += 1
        length = end - offset
        if not segments:
            action = Action.HOLE
        elif not dirty and index < base_blocks and _base_block_length(index, base_size, block_size) == length:
            action = Action.REUSE
        else:
            action = Action.READ
        blocks.append(Block(index, offset, length, action, tuple(segments)))
    return blocks


def _base_block_length(index: int, base_size: int | None, block_size: int) -> int:
    assert base_size is not None
    return min(block_size, base_size - index * block_size)


SAMPLE_LENGTH = 64 * 1024


@dataclass(frozen=True)
class SampleRange:
    """A piece of a clean (REUSE) block to re-read and compare with the base archive."""

    block: Block
    offset: int
    length: int


def choose_sample(blocks: Sequence[Block], count: int, rng: random.Random,
                  length: int = SAMPLE_LENGTH) -> list[SampleRange]:
    """Pick up to ``count`` REUSE blocks holding data and, in each, a ``length`` piece of data.

    The piece starts at a ``length``-aligned offset inside one of the block's data segments,
    so re-reading it costs ``length`` bytes on the wire, not a whole block.
    """
    candidates = [b for b in blocks if b.action is Action.REUSE and b.segments]
    chosen = candidates if len(candidates) <= count else rng.sample(candidates, count)
    sample = []
    for block in sorted(chosen, key=lambda b: b.index):
        start, seg_length = rng.choice(block.segments)
        first = -(-start // length) * length
        last = (start + seg_length - length) // length * length
        offset = rng.randrange(first, last + 1, length) if last >= first else start
        sample.append(SampleRange(block, offset, min(length, start + seg_length - offset)))
    return sample


def summarize(blocks: Iterable[Block]) -> PlanSummary:
    """Count holes, reused and read blocks, and the bytes that will be read."""
    holes = reused = read = to_read = total = 0
    for block in blocks:
        total += 1
        if block.action is Action.HOLE:
            holes += 1
        elif block.action is Action.REUSE:
            reused += 1
        else:
            read += 1
            to_read += block.bytes_to_read
    return PlanSummary(total, holes, reused, read, to_read)


def read_ranges(blocks: Iterable[Block], max_range: int) -> list[tuple[int, int]]:
    """The (offset, length) requests for all READ blocks' segments, none longer than max_range."""
    ranges = []
    for block in blocks:
        if block.action is not Action.READ:
            continue
        for start, length in block.segments:
            while length > max_range:
                ranges.append((start, max_range))
                start += max_range
                length -= max_range
            ranges.append((start, length))
    return ranges
