"""The lab engine's pure rules, without a running lab: its search grammar, the guest's scattered
writes, disk sizes, and the size vdsm gives a block volume."""

from __future__ import annotations

import pytest

from ovirt_borg.lab.model import BLOCK, MIB, ApiFault, StorageDomain, block_volume_size, parse_search
from ovirt_borg.lab.model.guest import _scattered_ranges
from ovirt_borg.lab.sample import parse_size

MiB = 1 << 20
GiB = 1 << 30



def test_search_grammar():
    assert parse_search("name=vm*") == [[("name", "=", "vm*")]]
    assert parse_search("Vms: name=a and tag=prod cluster=Default") == [
        [("name", "=", "a"), ("tag", "=", "prod"), ("cluster", "=", "Default")]]
    assert parse_search('name="my vm" or name!=x*') == [
        [("name", "=", "my vm")], [("name", "!=", "x*")]]
    with pytest.raises(ApiFault):
        parse_search("name=")


def test_scattered_writes_are_aligned_and_cover_the_share():
    import random

    size = 64 * MiB
    ranges = _scattered_ranges(size, 10, random.Random(3))
    assert all(o % BLOCK == 0 and n % BLOCK == 0 for o, n in ranges)
    assert all(a[0] + a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # sorted, merged
    assert sum(n for _, n in ranges) == round(size // BLOCK * 0.10) * BLOCK
    assert len(ranges) > 3  # scattered, not one run
    assert _scattered_ranges(size, 100, random.Random(1)) == [(0, size)]


def test_size_parsing():
    assert parse_size("64M") == 64 * MiB
    assert parse_size("1G") == 1 << 30
    assert parse_size("1T") == 1 << 40
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_block_volume_sizes_follow_vdsm():
    block = StorageDomain(id="sd", name="block", path="/nowhere", type="iscsi")
    # A thin qcow2 without an initial size: one chunk (2560 MiB), at most its virtual size,
    # in whole 128 MiB extents.
    assert block_volume_size(block, fmt="cow", sparse=True, capacity=10 * GiB, initial_size=None) == 2560 * MIB
    assert block_volume_size(block, fmt="cow", sparse=True, capacity=1 * GiB, initial_size=None) == 1 * GiB
    assert block_volume_size(block, fmt="cow", sparse=True, capacity=100 * MIB, initial_size=None) == 128 * MIB
    # Older hosts (volume_utilization_chunk_mb = 1024).
    old = StorageDomain(id="sd", name="old", path="/nowhere", type="iscsi", chunk_size=1024 * MIB)
    assert block_volume_size(old, fmt="cow", sparse=True, capacity=10 * GiB, initial_size=None) == 1 * GiB
    # With an initial size: 1.1 times it, in whole MiB, in whole extents.
    assert block_volume_size(block, fmt="cow", sparse=True, capacity=4 * GiB, initial_size=952320) == 128 * MIB
    assert block_volume_size(block, fmt="cow", sparse=True, capacity=4 * GiB, initial_size=3 * GiB) == 27 * 128 * MIB
    # Preallocated volumes: their virtual size.
    assert block_volume_size(block, fmt="raw", sparse=False, capacity=200 * MIB, initial_size=None) == 256 * MIB
    # vdsm refuses an initial size above the volume's max size, and any for a raw volume.
    with pytest.raises(ValueError, match="bigger than the max size"):
        block_volume_size(block, fmt="cow", sparse=True, capacity=1 * GiB, initial_size=2 * GiB)
    with pytest.raises(ValueError, match="raw"):
        block_volume_size(block, fmt="raw", sparse=False, capacity=1 * GiB, initial_size=MIB)
