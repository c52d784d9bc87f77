"""Blocks changed in part, rebuilt from their dirty bytes and the previous archive's chunk.

Against the lab with real Borg: a disk whose size is not a multiple of the block size gets
scattered 64 KiB writes, writes across a block boundary, zero writes and discards inside
blocks, writes into blocks the previous archive holds as holes, and a write into the short last
block. With ``[repository] rebuild_blocks`` ``always`` the incremental reads from imageio only
the dirty granules (plus the clean blocks the bitmap check samples); with ``never`` whole
blocks. Either way the archive's image equals the disk (sha256), and so does a restore of the
newest archive of a chain of rebuilt incrementals.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_job
from helpers import file_sha256, temporary_vm, wait_for

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")

KiB, MiB = 1 << 10, 1 << 20
BLOCK = MiB  # the default block_size
GRANULE = 64 * KiB  # the dirty bitmap's granularity (the qcow2 cluster size)
SIZE = 16 * MiB + 320 * KiB  # the last block is 320 KiB
SAMPLE = 1  # clean blocks the bitmap check re-reads (each at most a block)


@pytest.fixture
def vm(lab_clean):
    """A running VM with one disk of SIZE: data everywhere but [12 MiB, 16 MiB), holes there."""
    with temporary_vm(lab_clean, "r", disks=1, size=SIZE) as name:
        lab_clean.write(name, disk=1, offset=0, length=12 * MiB)
        lab_clean.write(name, disk=1, offset=16 * MiB, length=SIZE - 16 * MiB)
        yield name


def _job(lab, directory, setting):
    """A job with ``[repository] rebuild_blocks = setting`` and a bitmap check of SAMPLE blocks."""
    job = make_job(lab, directory, f"[backup]\nverify_sample = {SAMPLE}\n")
    text = job.config.read_text().replace("[repository]\n", f'[repository]\nrebuild_blocks = "{setting}"\n', 1)
    job.config.write_text(text)
    return job


def host_bytes(lab) -> int:
    return lab.stats()["imageio.host.bytes"]


def granules(ranges) -> int:
    """The bytes a dirty bitmap marks for the written ``ranges`` (whole granules, each once)."""
    marked = set()
    for r in ranges:
        marked.update(range(r["offset"] // GRANULE, (r["offset"] + r["length"] - 1) // GRANULE + 1))
    return len(marked) * GRANULE


def blocks_of(ranges) -> set[int]:
    touched = set()
    for r in ranges:
        touched.update(range(r["offset"] // BLOCK, (r["offset"] + r["length"] - 1) // BLOCK + 1))
    return touched


def guest_writes(lab, vm, seed):
    """Writes of every kind inside blocks; returns (data ranges, zero and discard ranges)."""
    data = lab.write(vm, disk=1, percent=2, seed=seed)  # scattered 64 KiB runs
    data += lab.write(vm, disk=1, offset=2 * MiB + 128 * KiB, length=64 * KiB)
    data += lab.write(vm, disk=1, offset=4 * MiB - 64 * KiB, length=128 * KiB)  # across a block boundary
    data += lab.write(vm, disk=1, offset=13 * MiB + 64 * KiB, length=64 * KiB)  # into a hole of the base
    data += lab.write(vm, disk=1, offset=16 * MiB + 128 * KiB, length=64 * KiB)  # the short last block
    zeroed = lab.write(vm, disk=1, offset=5 * MiB + 256 * KiB, length=128 * KiB, zero=True)
    zeroed += lab.write(vm, disk=1, offset=7 * MiB + 512 * KiB, length=64 * KiB, discard=True)
    zeroed += lab.write(vm, disk=1, offset=9 * MiB, length=64 * KiB, zero=True)
    return data, zeroed


@pytest.mark.parametrize("setting", ["always", "never"])
def test_rebuilt_and_whole_blocks_give_the_disk(lab_clean, vm, tmp_path, setting):
    job = _job(lab_clean, tmp_path / "job", setting)
    full = job.backup(vm)[vm]
    assert full["mode"] == "full" and full["disks"][0]["size"] == SIZE
    job.assert_identical(full)

    data, _ = guest_writes(lab_clean, vm, seed=7)
    before = host_bytes(lab_clean)
    incr = job.backup(vm)[vm]
    served = host_bytes(lab_clean) - before
    assert incr["mode"] == "incremental", incr["reason"]
    job.assert_identical(incr)
    disk = incr["disks"][0]
    assert disk["mode"] == "incremental"
    assert 0 < disk["bytes_read"] <= served  # what ovirt-borg counts is what imageio served
    # With rebuilding: the dirty data, and the clean blocks the bitmap check samples.
    limit = granules(data) + SAMPLE * BLOCK
    if setting == "always":
        assert disk["rebuilt"] > 0
        assert served <= limit, (served, limit)
    else:
        # Each touched block is read whole (but its zero parts).
        assert disk["rebuilt"] == 0
        assert served > limit, (served, limit)
    assert disk["stored"] >= len(blocks_of(data))
    assert disk["stored"] + disk["reused"] + disk["holes"] == disk["blocks"] == 17


def test_chain_of_rebuilt_incrementals_restores_the_disk(lab_clean, vm, tmp_path):
    """Each incremental rebuilds on blocks the one before rebuilt; the newest archive restores
    (``ovirt-borg restore --to-dir``) to the disk as it is."""
    job = _job(lab_clean, tmp_path / "job", "always")
    job.backup(vm)
    results = []
    for seed in (1, 2, 3):
        guest_writes(lab_clean, vm, seed=seed)
        result = job.backup(vm)[vm]
        assert result["mode"] == "incremental", result["reason"]
        assert result["disks"][0]["rebuilt"] > 0
        results.append(result)
    newest = results[-1]
    job.assert_identical(newest)
    out = tmp_path / "restored"
    job.run("restore", newest["archive"], "--to-dir", str(out))
    disk = newest["disks"][0]
    assert file_sha256(out / f"{disk['alias']}-{disk['id']}.raw") == job.lab_image_sha(vm, 0)
    job.borg("check", "--verify-data", str(job.repo))


def test_deleted_base_archive_is_read_in_full(lab_clean, vm, tmp_path):
    """With the previous archive deleted between runs, the next one reads the disk in full, as
    without rebuilding, and the one after rebuilds on it."""
    job = _job(lab_clean, tmp_path / "job", "always")
    first = job.backup(vm)[vm]
    guest_writes(lab_clean, vm, seed=4)
    job.borg("delete", f"{job.repo}::{first['archive']}")
    job.borg("compact", str(job.repo))
    second = job.backup(vm)[vm]
    assert second["mode"] == "full" and "no longer in the repository" in second["reason"], second["reason"]
    assert second["disks"][0]["rebuilt"] == 0
    job.assert_identical(second)
    guest_writes(lab_clean, vm, seed=5)
    third = job.backup(vm)[vm]
    assert third["mode"] == "incremental" and third["disks"][0]["rebuilt"] > 0
    job.assert_identical(third)


def test_interrupted_while_base_blocks_are_read_leaves_no_archive(lab_clean, vm, tmp_path):
    """SIGINT while an incremental rebuilds (its dirty parts trickling in under a bandwidth
    limit while the base blocks are read ahead): the run stops with 130 and leaves no
    archive; the next one is an incremental that rebuilds, its image equal to the disk."""
    job = _job(lab_clean, tmp_path / "job", "always")
    job.backup(vm)
    archives = job.archives()
    guest_writes(lab_clean, vm, seed=9)
    settings = job.config.read_text()
    # No bitmap check first: the first bytes served are the rebuilt blocks' dirty parts.
    job.config.write_text(settings.replace(f"verify_sample = {SAMPLE}", "verify_sample = 0")
                          + '[transfer]\nbandwidth_limit = "128K"\n')
    start_bytes = host_bytes(lab_clean)
    proc = subprocess.Popen([OVIRT_BORG, "-c", str(job.config), "backup", vm], env=job.env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for(lambda: host_bytes(lab_clean) > start_bytes, what="the first dirty bytes read")
        assert proc.poll() is None, "the run must still be reading"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err, err
    assert job.archives() == archives
    job.config.write_text(settings)
    result = job.backup(vm)[vm]
    assert result["mode"] == "incremental", result["reason"]
    assert result["disks"][0]["rebuilt"] > 0
    job.assert_identical(result)
