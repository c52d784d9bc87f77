"""ovirt_borg.qcow2 against the real ``qemu-img measure``, for sizes and allocation patterns."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from ovirt_borg import qcow2

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def qemu_img_measure(path) -> dict:
    out = subprocess.run(["qemu-img", "measure", "-f", "raw", "-O", "qcow2", "--output=json", os.fspath(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


CASES = {
    "empty 1 MiB": (1 * MiB, []),
    "one byte": (64 * MiB, [(70000, 1)]),
    "fully written 8 MiB": (8 * MiB, [(0, 8 * MiB)]),
    "two extents in one cluster": (64 * MiB, [(4 * KiB, 4 * KiB), (32 * KiB, 4 * KiB)]),
    "an extent across a cluster boundary": (64 * MiB, [(60 * KiB, 8 * KiB)]),
    "unaligned size, data in the last cluster": (100 * MiB + 12345, [(100 * MiB, 12345)]),
    "scattered 1 MiB blocks of 3 GiB": (3 * GiB, [(n * 97 * MiB, MiB) for n in range(31)]),
    "4 GiB, data past 2 GiB": (4 * GiB, [(0, 2 * MiB), (2 * GiB + 5 * KiB, 3 * MiB)]),
    "1 TiB, a few blocks": (1 * TiB, [(0, MiB), (512 * GiB, 4 * MiB), (1 * TiB - MiB, MiB)]),
    "8 TiB, two blocks": (8 * TiB, [(GiB, MiB), (7 * TiB, MiB)]),
}


@pytest.mark.parametrize("size, extents", CASES.values(), ids=CASES.keys())
def test_required_size_is_what_qemu_img_measure_says(tmp_path, size, extents):
    image = tmp_path / "image.raw"
    with open(image, "wb") as f:
        f.truncate(size)
        for offset, length in extents:
            f.seek(offset)
            f.write(os.urandom(length))
    measured = qemu_img_measure(image)
    assert qcow2.required_size(size, extents) == measured["required"]
    assert qcow2.fully_allocated_size(size) == measured["fully-allocated"]


def test_data_clusters_counts_each_touched_cluster_once():
    c = qcow2.CLUSTER_SIZE
    assert qcow2.data_clusters([]) == 0
    assert qcow2.data_clusters([(0, 1), (c - 1, 1)]) == 1
    assert qcow2.data_clusters([(c - 1, 2)]) == 2
    assert qcow2.data_clusters([(0, c), (c, c), (5 * c, 1)]) == 3
    assert qcow2.data_clusters([(0, 0), (3 * c, 0)]) == 0
