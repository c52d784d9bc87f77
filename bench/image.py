"""Disk content for the benchmark: the image layout, its data, and guest writes.

The benchmark disk is half random data, a quarter compressible text-like data and a quarter
holes, laid out in periods of 256 MiB (128 MiB random, 64 MiB text, 64 MiB never written), so
every part of the disk looks alike. The content is a pure function of the seed and the offset:
the same bytes go into a local sparse raw file (for ``borg create`` and as the reference) and
into lab disks (written through a writable qemu-nbd export, the way a guest's writes reach a
qcow2 file, so the disks' persistent dirty bitmaps record them).

The CPU cases use disks of one kind of content each (``kind_layout``): random, text-like or
zero data (zeros the guest wrote: allocated, unlike holes), in the same periods, half data and
half holes.

Guest writes for the incremental cases are either scattered 64 KiB writes at distinct
aligned offsets or one sequential run, of random data, also a function of a seed.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ovirt_borg.lab import qemu

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: Guest write granularity (the qcow2 cluster size and the bitmaps' granularity).
GUEST_BLOCK = 64 * KiB
#: Data is generated and written in pieces of this size.
PIECE = 4 * MiB
#: One period of the layout: half random, a quarter text, a quarter holes.
PERIOD = 256 * MiB

RANDOM = "random"
TEXT = "text"
ZERO = "zero"  # zeros written by the guest: allocated data that reads as zeros
HOLE = "hole"


@dataclass(frozen=True)
class Region:
    """A run of the image holding one kind of content."""

    offset: int
    length: int
    kind: str

    @property
    def end(self) -> int:
        return self.offset + self.length


def layout(size: int) -> list[Region]:
    """Return the regions of an image of ``size`` bytes (a multiple of 64 KiB), in order.

    Each period (256 MiB, or the rest of the disk) is half random, a quarter text and the rest
    holes, each part rounded down to 64 KiB. Raises ValueError for a bad size.
    """
    if size <= 0 or size % GUEST_BLOCK:
        raise ValueError(f"the image size must be a positive multiple of 64 KiB, got {size}")
    regions: list[Region] = []
    offset = 0
    while offset < size:
        length = min(PERIOD, size - offset)
        random_part = length // 2 // GUEST_BLOCK * GUEST_BLOCK
        text_part = length // 4 // GUEST_BLOCK * GUEST_BLOCK
        for kind, part in ((RANDOM, random_part), (TEXT, text_part),
                           (HOLE, length - random_part - text_part)):
            if part:
                regions.append(Region(offset, part, kind))
                offset += part
    return regions


def kind_layout(size: int, kind: str) -> list[Region]:
    """Return the regions of an image of ``size`` bytes holding one kind of data: each period
    (256 MiB, or the rest of the disk) is half ``kind``, half holes, rounded to 64 KiB.

    Raises ValueError for a bad size or kind.
    """
    if kind not in (RANDOM, TEXT, ZERO):
        raise ValueError(f"no content for {kind!r}")
    regions = []
    for region in layout(size):
        if region.kind == RANDOM:
            regions.append(Region(region.offset, region.length, kind))
        elif regions and regions[-1].kind == HOLE:
            regions[-1] = Region(regions[-1].offset, region.end - regions[-1].offset, HOLE)
        else:
            regions.append(Region(region.offset, region.length, HOLE))
    return regions


def sparse_layout(size: int, data: int, run: int = 64 * MiB, seed: int = 0) -> list[Region]:
    """Return the regions of a large sparse image: ``data`` bytes of random data, rest holes.

    The data is written in runs of ``run`` bytes at distinct ``run``-aligned offsets chosen
    with ``seed``; the image must hold at least as many runs. Raises ValueError otherwise.
    """
    runs = max(1, data // run)
    slots = size // run
    if runs > slots:
        raise ValueError(f"{data} bytes in runs of {run} do not fit in {size} bytes")
    chosen = sorted(random.Random(seed).sample(range(slots), runs))
    regions: list[Region] = []
    offset = 0
    for slot in chosen:
        start = slot * run
        if start > offset:
            regions.append(Region(offset, start - offset, HOLE))
        regions.append(Region(start, run, RANDOM))
        offset = start + run
    if offset < size:
        regions.append(Region(offset, size - offset, HOLE))
    return regions


def data_bytes(regions: list[Region]) -> int:
    """The bytes of ``regions`` that hold data (not holes)."""
    return sum(r.length for r in regions if r.kind != HOLE)


class Content:
    """The bytes of each region, a pure function of the seed and the offset."""

    def __init__(self, seed: int = 1):
        self.seed = seed
        self._corpus = _text_corpus(random.Random(seed))

    def piece(self, kind: str, offset: int, length: int) -> bytes:
        """Return ``length`` bytes of content ``kind`` for the image offset ``offset``."""
        rng = random.Random((self.seed << 48) ^ offset)
        if kind == RANDOM:
            return rng.randbytes(length)
        if kind == ZERO:
            return bytes(length)
        if kind == TEXT:
            # Slices of a log-like corpus at random places: lz4 compresses it to about 55%,
            # and no two 4 MiB blocks are alike (nothing deduplicates by accident).
            out = bytearray()
            slice_length = 4 * KiB
            while len(out) < length:
                start = rng.randrange(0, len(self._corpus) - slice_length)
                out += self._corpus[start:start + slice_length]
            return bytes(out[:length])
        raise ValueError(f"no content for {kind!r}")

    def pieces(self, regions: list[Region]) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` pieces of at most 4 MiB covering the data regions."""
        for region in regions:
            if region.kind == HOLE:
                continue
            for offset in range(region.offset, region.end, PIECE):
                length = min(PIECE, region.end - offset)
                yield offset, self.piece(region.kind, offset, length)


def _text_corpus(rng: random.Random, size: int = MiB) -> bytes:
    """About ``size`` bytes of log-like lines: timestamps, hosts, a Zipf-like vocabulary."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(2000)]
    weights = [1 / (rank + 1) for rank in range(len(words))]
    lines: list[str] = []
    total = 0
    while total < size:
        line = (f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} host{rng.randint(1, 40)} "
                f"svc{rng.randint(1, 30)}[{rng.randint(100, 65000)}]: "
                + " ".join(rng.choices(words, weights, k=rng.randint(5, 14)))
                + f" id={rng.getrandbits(32):08x}\n")
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


def write_raw(path: Path, size: int, regions: list[Region], content: Content) -> None:
    """Write the image as a sparse raw file ``path`` (holes are never written)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for offset, data in content.pieces(regions):
            os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def writable_export(image: Path, socket_dir: Path) -> Iterator[object]:
    """Export the qcow2 ``image`` writable with qemu-nbd; yield a connected NBD client.

    Writes go through qemu's block layer, so the image's persistent dirty bitmaps record them,
    as a running guest's writes would be. The export is flushed and stopped (SIGTERM, which
    closes the bitmaps cleanly) on leaving. No backup or transfer may have the disk open.
    """
    from ovirt_imageio._internal import nbd

    socket_path = socket_dir / f"fill-{os.getpid()}.sock"
    export = qemu.start_export(image, socket_path, fmt="qcow2", read_only=False, shared=1)
    try:
        with nbd.Client(nbd.UnixAddress(os.fspath(socket_path))) as client:
            yield client
            client.flush()
    finally:
        export.stop()
        socket_path.unlink(missing_ok=True)


def fill_disk(image: Path, size: int, regions: list[Region], content: Content, socket_dir: Path) -> None:
    """Write the image's content into the lab disk ``image`` like a guest.

    Holes are zeroed where the disk may hold data already (a new lab disk has random data in
    its first MiB and at its middle), so the disk reads exactly like the raw file.
    """
    preset = [(0, MiB), (size // 2, MiB)]
    with writable_export(image, socket_dir) as client:
        for region in regions:
            if region.kind != HOLE:
                continue
            for start, length in preset:
                low, high = max(start, region.offset), min(start + length, region.end)
                if low < high:
                    client.zero(low, high - low)
        for offset, data in content.pieces(regions):
            client.write(offset, data)


@dataclass(frozen=True)
class Change:
    """A guest write pattern: ``scattered`` 64 KiB writes or one ``sequential`` run."""

    pattern: str
    percent: float

    @property
    def name(self) -> str:
        return f"{self.percent:g}% {self.pattern}"

    def ranges(self, size: int, seed: int) -> list[tuple[int, int]]:
        """Return the written ``(offset, length)`` ranges on a disk of ``size`` bytes, sorted."""
        rng = random.Random(seed)
        blocks = size // GUEST_BLOCK
        count = max(1, round(blocks * self.percent / 100))
        if self.pattern == "scattered":
            return [(index * GUEST_BLOCK, GUEST_BLOCK) for index in sorted(rng.sample(range(blocks), count))]
        if self.pattern == "sequential":
            start = rng.randrange(0, blocks - count + 1)
            return [(start * GUEST_BLOCK, count * GUEST_BLOCK)]
        raise ValueError(f"unknown write pattern {self.pattern!r}")

    def writes(self, size: int, seed: int) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, random data)`` writes of at most 4 MiB; the same for the same seed."""
        rng = random.Random(seed ^ 0x5EED)
        for offset, length in self.ranges(size, seed):
            for start in range(offset, offset + length, PIECE):
                yield start, rng.randbytes(min(PIECE, offset + length - start))

    def changed_bytes(self, size: int, seed: int) -> int:
        return sum(length for _, length in self.ranges(size, seed))

    def dirty_bytes(self, size: int, seed: int, granularity: int = GUEST_BLOCK) -> int:
        """The bytes a dirty bitmap of ``granularity`` marks after these writes (the writes
        rounded out to whole bitmap granules): what an incremental must read at the least."""
        granules = set()
        for offset, length in self.ranges(size, seed):
            granules.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
        return sum(min(granularity, size - g * granularity) for g in granules)

    def dirty_blocks(self, size: int, seed: int, block_size: int) -> int:
        """How many ``block_size`` blocks the writes touch (what a block-level incremental reads)."""
        touched = set()
        for offset, length in self.ranges(size, seed):
            touched.update(range(offset // block_size, (offset + length - 1) // block_size + 1))
        return len(touched)


def apply_change(image: Path, size: int, change: Change, seed: int, socket_dir: Path) -> int:
    """Write ``change`` into the lab disk ``image`` as its guest; return the bytes written."""
    written = 0
    with writable_export(image, socket_dir) as client:
        for offset, data in change.writes(size, seed):
            client.write(offset, data)
            written += len(data)
    return written

