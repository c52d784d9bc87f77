"""The benchmark's own arithmetic: disk layouts of one kind of data, dirty bytes of guest writes,
and CPU seconds per GiB net of fixed costs (the floor of Borg's crypto, which needs a real
repository key, is in tests/test_bench.py)."""

import os
import sys
from pathlib import Path

import pytest

# The benchmark is a package of the repository, not of the installed distribution.
sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[2]))

from bench import image, report  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize("kind", [image.RANDOM, image.TEXT, image.ZERO])
@pytest.mark.parametrize("size", [2 * GiB, 600 * MiB, 64 * KiB * 7])
def test_kind_layout_is_half_data_of_one_kind(kind, size):
    regions = image.kind_layout(size, kind)
    assert regions[0].offset == 0 and regions[-1].end == size
    assert all(a.end == b.offset and a.kind != b.kind for a, b in zip(regions, regions[1:]))
    assert {r.kind for r in regions} <= {kind, image.HOLE}
    # Each period's first half holds the data (rounded down to 64 KiB), as layout()'s random part.
    assert image.data_bytes(regions) == sum(r.length for r in image.layout(size) if r.kind == image.RANDOM)


def test_kind_layout_refuses_holes_and_unknown_kinds():
    for kind in (image.HOLE, "video"):
        with pytest.raises(ValueError):
            image.kind_layout(GiB, kind)


def test_zero_content_reads_as_zeros():
    assert image.Content(1).piece(image.ZERO, 12345 * MiB, 3 * MiB) == bytes(3 * MiB)


@pytest.mark.parametrize("pattern", ["scattered", "sequential"])
def test_dirty_bytes_are_the_writes_in_whole_granules(pattern):
    change = image.Change(pattern, 1.0)
    size, seed = 256 * MiB, 7
    # The writes are 64 KiB aligned: in 64 KiB granules nothing is added.
    assert change.dirty_bytes(size, seed) == change.changed_bytes(size, seed)
    # In 1 MiB granules they are the blocks a block-level incremental reads.
    assert change.dirty_bytes(size, seed, MiB) == change.dirty_blocks(size, seed, MiB) * MiB


def test_dirty_bytes_stop_at_the_end_of_the_disk():
    # A disk of 1 MiB + 64 KiB, every 64 KiB written: its last 1 MiB granule is 64 KiB long.
    change = image.Change("sequential", 100.0)
    size = MiB + 64 * KiB
    assert change.dirty_bytes(size, 1, MiB) == size


def _measurement(cpu, lab=0.0, wall=1.0):
    return {"name": "", "wall": wall, "user": cpu, "system": 0.0, "cpu_percent": 100 * cpu / wall, "peak_rss": 0,
            "peak_rss_max": 0, "peak_rss_tree": 0, "machine_busy_percent": 0.0, "lab_cpu": {"imageio_host": lab}}


def _step(case, contender, run, cpu, lab=0.0, wall=1.0, data_bytes=GiB):
    return {"case": case, "contender": contender, "run": run, "measurement": _measurement(cpu, lab, wall),
            "provisioned": 2 * GiB, "moved": data_bytes, "stored": data_bytes,
            "extra": {"kind": "random", "data_bytes": data_bytes}}


def test_cpu_per_gib_is_net_of_each_contenders_fixed_cost_in_the_same_run():
    steps = []
    for run, (ob, ob_lab, create, ob_fixed, create_fixed) in enumerate([(6.0, 2.5, 5.0, 0.5, 0.4),
                                                                       (7.0, 2.6, 5.2, 1.5, 0.6),
                                                                       (6.4, 2.3, 4.9, 0.4, 0.5)]):
        steps += [_step("full random data", "ovirt-borg", run, ob, ob_lab, wall=4.0),
                  _step("full random data", "borg create (local raw)", run, create, wall=5.0),
                  _step(report.FIXED_CASE, "ovirt-borg", run, ob_fixed, 0.3, data_bytes=0),
                  _step(report.FIXED_CASE, "borg create (local raw)", run, create_fixed, data_bytes=0)]
    floors = [{"run": run, "kind": "random", "kind_bytes": GiB // 2, "cpu_seconds": 1.5 + run / 10,
               "seconds": {"zero test": 0.0, "chunk id": 0.7, "compression": 0.1, "encryption and MAC": 0.7 + run / 10}}
              for run in range(3)]
    results = {"steps": steps, "floor": floors, "options": {"block_size": MiB}}
    rows = report.cpu_per_gib(results)["random"]
    # Per run: ovirt-borg 5.5, 5.5, 6.0 CPU s over 1 GiB; the lab 2.2, 2.3, 2.0.
    assert rows["ovirt-borg"]["cpu_per_gib"] == pytest.approx(5.5)
    assert rows["ovirt-borg"]["lab_cpu_per_gib"] == pytest.approx(2.2)
    assert rows["borg create (local raw)"]["cpu_per_gib"] == pytest.approx(4.6)
    assert rows["borg create (local raw)"]["vs_ovirt_borg"] == pytest.approx(1.25)
    # The floor is per GiB of the kind's data: 0.5 GiB here.
    assert rows[report.FLOOR]["cpu_per_gib"] == pytest.approx(3.2)
    assert rows[report.FLOOR]["parts"]["encryption and MAC"] == pytest.approx(1.6)
    text = report.cpu_text(results)
    assert "5.50" in text and "1.72x" in text  # ovirt-borg against the floor: 5.5 / 3.2


def test_restore_and_dirty_tables_and_goals():
    steps = []
    for run in range(2):
        ob = _step("restore", "ovirt-borg", run, 4.0, 2.0, wall=4.0)
        two = _step("restore", "two-step restore", run, 6.5, 2.1, wall=8.0 + run)
        two["extra"].update(scratch_bytes=GiB, extract=_measurement(4.5, 0.0, 5.0),
                            upload=_measurement(2.0, 2.1, 3.0 + run))
        steps += [ob, two]
        for contender, read in (("ovirt-borg", 120 * MiB), ("two-step", 10 * MiB)):
            step = _step("incremental 1% scattered", contender, run, 1.0, wall=1.0)
            step["extra"].update(dirty_bytes=10 * MiB, **({"imageio_bytes_read": read} if contender == "ovirt-borg"
                                                          else {}))
            step["moved"] = read
            steps.append(step)
    results = {"steps": steps}
    restore = report.restore_text(results)
    assert "2.12x" in restore  # median of 8/4 and 9/4
    assert "of which borg extract" in restore and "1.0 GiB" in restore
    dirty = report.dirty_text(results)
    assert "12.00x" in dirty and "1.00x" in dirty
    goals = {g["goal"]: g["met"] for g in report.goals(report.summarize(results))}
    assert goals["restore at least 1.5x faster than the two-step restore (borg extract + upload), no scratch file"]
    assert goals["incremental 1% scattered: bytes read from imageio at most 1.3x the dirty bytes"] is False
