"""The room a qcow2 image of some data needs: ``qemu-img measure``'s arithmetic, pure.

A thin qcow2 disk on a block storage domain lives in an LV as large as the ``initial_size``
given when the disk was created, and an upload does not grow it; the SDK's
``examples/upload_disk.py`` passes ``qemu-img measure``'s ``required`` for that. Restore
computes the same figure from the archive's chunk list, without writing the image anywhere.

qemu's ``block/qcow2.c``: ``qcow2_measure`` takes the size of the fully allocated image
(``qcow2_calc_prealloc_size``: one header cluster, the L2 tables and the L1 table for the whole
virtual size, the refcount table and blocks for all of it, ``qcow2_refcount_metadata_size``)
and counts, instead of every data cluster, only those holding data in the source: each data
extent the source reports (a raw file's data, as ``SEEK_DATA`` finds it) from the start of
its first cluster to the end of its last, a cluster counted once. Defaults as ``qemu-img
create -f qcow2``: 64 KiB clusters, 16-bit refcounts, no extended L2 entries.
"""

from __future__ import annotations

from typing import Iterable

CLUSTER_SIZE = 64 * 1024
REFCOUNT_ORDER = 4  # 16-bit refcounts
_ENTRY = 8  # bytes per L1, L2 and refcount table entry


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def refcount_metadata_size(clusters: int, cluster_size: int = CLUSTER_SIZE,
                           refcount_order: int = REFCOUNT_ORDER) -> int:
    """Return the bytes of refcount table and blocks that count ``clusters`` clusters and
    themselves (the fixed point ``qcow2_refcount_metadata_size`` finds)."""
    per_block = cluster_size * 8 // (1 << refcount_order)
    per_table_cluster = cluster_size // _ENTRY
    table = blocks = total = 0
    while True:
        last = total
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        total = clusters + blocks + table
        if total == last:
            return (blocks + table) * cluster_size


def fully_allocated_size(virtual_size: int, cluster_size: int = CLUSTER_SIZE,
                         refcount_order: int = REFCOUNT_ORDER) -> int:
    """Return the bytes of a qcow2 image of ``virtual_size`` with every cluster allocated
    (``qemu-img measure``'s ``fully-allocated``)."""
    data = _round_up(virtual_size, cluster_size)
    meta = cluster_size  # the header
    l2_entries = _round_up(data // cluster_size, cluster_size // _ENTRY)
    meta += l2_entries * _ENTRY
    l1_entries = _round_up(l2_entries * _ENTRY // cluster_size, cluster_size // _ENTRY)
    meta += l1_entries * _ENTRY
    meta += refcount_metadata_size((meta + data) // cluster_size, cluster_size, refcount_order)
    return meta + data


def data_clusters(extents: Iterable[tuple[int, int]], cluster_size: int = CLUSTER_SIZE) -> int:
    """Return how many clusters the data ``extents`` touch.

    Given ``(offset, length)`` extents in ascending order, not overlapping: each counts from
    the start of its first cluster to the end of its last, a cluster shared with the previous
    extent once.
    """
    counted_to = clusters = 0
    for offset, length in extents:
        if length <= 0:
            continue
        start = max(offset // cluster_size * cluster_size, counted_to)
        end = _round_up(offset + length, cluster_size)
        if end > start:
            clusters += (end - start) // cluster_size
            counted_to = end
    return clusters


def required_size(virtual_size: int, extents: Iterable[tuple[int, int]],
                  cluster_size: int = CLUSTER_SIZE, refcount_order: int = REFCOUNT_ORDER) -> int:
    """Return ``qemu-img measure -O qcow2``'s ``required`` for an image of ``virtual_size``
    bytes whose data lies in ``extents`` (ascending ``(offset, length)`` pairs; the rest reads
    as zeros and needs no cluster)."""
    data = _round_up(virtual_size, cluster_size)
    return (fully_allocated_size(virtual_size, cluster_size, refcount_order) - data
            + data_clusters(extents, cluster_size) * cluster_size)
