"""Backup against the lab with real Borg: synthetic fulls, incrementals, and the fallbacks.

Every test works on VMs of its own in the session lab and checks real bytes: the image
extracted from the archive equals the lab disk (sha256), and imageio's byte counters show
what crossed the wire.
"""

from __future__ import annotations

import itertools
import json
import os

import pytest

from conftest import BORG, make_job
from helpers import temporary_vm
from ovirt_borg.config import BackupConfig

BLOCK = 1 << 20  # the default block_size
_names = itertools.count(1)


@pytest.fixture
def vm(lab_clean):
    """A fresh running VM with two 64 MiB disks (data in two regions each); deleted afterwards."""
    with temporary_vm(lab_clean, "b", disks=2, size="64M") as name:
        yield name


def host_bytes(lab) -> int:
    return lab.stats()["imageio.host.bytes"]


def read_bound(touched: int, disks: int = 2) -> float:
    """The most an incremental may read from imageio after writes touching ``touched`` blocks:
    those blocks (a quarter more for the unaligned ends of writes) and the clean blocks each
    disk re-reads whole to check its bitmap (``verify_sample``; the jobs keep its default)."""
    return 1.25 * touched * BLOCK + BackupConfig.verify_sample * BLOCK * disks


def touched_blocks(ranges) -> set[int]:
    blocks = set()
    for r in ranges:
        blocks.update(range(r["offset"] // BLOCK, (r["offset"] + r["length"] - 1) // BLOCK + 1))
    return blocks


def test_full_then_incremental_reads_only_touched_blocks(job, vm):
    lab = job.lab
    full = job.backup(vm)[vm]
    assert full["mode"] == "full" and full["path"] == "backup"
    job.assert_identical(full)
    assert all(d["holes"] > 0 for d in full["disks"]), "the partly empty disks must have holes"

    ranges = lab.write(vm, disk=1, percent=1)
    before = host_bytes(lab)
    incr = job.backup(vm)[vm]
    served = host_bytes(lab) - before
    assert incr["mode"] == "incremental", incr["reason"]
    job.assert_identical(incr)
    limit = read_bound(len(touched_blocks(ranges)))
    assert 0 < served <= limit, (served, limit)
    assert incr["disks"][1]["stored"] == 0 and incr["disks"][1]["reused"] > 0
    # the sidecar links the archive to the one it was built on
    sidecar = json.loads(job.borg("extract", "--stdout", f"{job.repo}::{incr['archive']}",
                                  f"{vm}/ovirt-borg.json").stdout)
    assert sidecar["previous_archive"] == full["archive"]
    assert sidecar["checkpoint_id"] == incr["checkpoint"]
    # older engine checkpoints are purged: only the one the next incremental needs is kept
    assert [c["id"] for c in lab.stats()["checkpoints"][vm]] == [incr["checkpoint"]]


def test_ten_incrementals_then_check_and_prune(job, lab_vm):
    vm = lab_vm["name"]
    results = [job.backup(vm)[vm]]
    for i in range(10):
        job.lab.write(vm, disk=1, offset=(i * 1_310_720) % (16 << 20), length=65536 * (1 + i % 3))
        if i == 4:
            job.lab.write(vm, disk=1, offset=8 << 20, length=1 << 20, zero=True)
        if i == 7:
            job.lab.write(vm, disk=1, offset=4 << 20, length=2 << 20, discard=True)
        result = job.backup(vm)[vm]
        assert result["mode"] == "incremental", result["reason"]
        job.assert_identical(result)
        results.append(result)
    job.borg("check", "--verify-data", str(job.repo))
    newest = results[-1]
    job.borg("prune", "--keep-last", "1", "--glob-archives", f"ovirt-{vm}-*", str(job.repo))
    job.borg("compact", str(job.repo))
    assert job.archives() == [newest["archive"]]
    job.assert_identical(newest)
    job.borg("check", "--verify-data", str(job.repo))
    # and the chain goes on from the pruned repository
    job.lab.write(vm, disk=1, offset=0, length=65536)
    after = job.backup(vm)[vm]
    assert after["mode"] == "incremental"
    job.assert_identical(after)


@pytest.mark.parametrize("fault, reason", [
    ("invalid_checkpoint", "invalid"),
    ("missing_checkpoint", "no longer exists"),
    ("broken_bitmap", "the incremental backup failed"),  # hybrid: the disk's transfer is stopped
])
def test_checkpoint_problems_fall_back_to_full(job, lab_vm, fault, reason):
    vm = lab_vm["name"]
    job.backup(vm)
    job.lab.write(vm, disk=1, offset=0, length=1 << 20)
    job.lab.fault(fault, vm=vm)
    result = job.backup(vm)[vm]
    assert result["mode"] == "full" and reason in result["reason"], result["reason"]
    job.assert_identical(result)
    job.lab.write(vm, disk=1, offset=2 << 20, length=65536)
    again = job.backup(vm)[vm]
    assert again["mode"] == "incremental", again["reason"]
    job.assert_identical(again)


def test_lost_local_chunk_ids_are_read_from_the_archive(job, vm):
    """The incremental needs each disk's chunk ids: a deleted or damaged local copy is replaced
    by the one in the previous archive, and the run stays incremental."""
    job.backup(vm)
    first, second = sorted((job.dir / "state").glob("*/*.blocks"))
    first.unlink()
    second.write_bytes(b"\0" * second.stat().st_size)
    touched = sum(len(touched_blocks(job.lab.write(vm, disk=d, percent=1))) for d in (1, 2))
    before = host_bytes(job.lab)
    incr = job.backup(vm)[vm]
    served = host_bytes(job.lab) - before
    assert incr["mode"] == "incremental", incr["reason"]
    assert all(d["mode"] == "incremental" for d in incr["disks"]), incr["disks"]
    assert served <= read_bound(touched), served
    job.assert_identical(incr)
    # the run stored fresh local copies: the next one needs no archive read
    stored = sorted((job.dir / "state").glob("*/*.blocks"))
    assert len(stored) == 2 and all(any(p.read_bytes()) for p in stored)


def test_missing_archive_falls_back_to_full(job, lab_vm):
    vm = lab_vm["name"]
    first = job.backup(vm)[vm]
    job.borg("delete", f"{job.repo}::{first['archive']}")
    result = job.backup(vm)[vm]
    assert result["mode"] == "full" and "no longer in the repository" in result["reason"]
    job.assert_identical(result)


def test_base_archive_deleted_during_the_run_is_read_in_full(job, lab_vm):
    """The run lists the repository's archives once; a base archive deleted after that (here
    by a before_vm command) is found out by the writer: the disks are read in full."""
    vm = lab_vm["name"]
    first = job.backup(vm)[vm]
    job.config.write_text(job.config.read_text() + "[hooks.command]\n"
                          f"before_vm = \"{BORG} delete {job.repo}::{first['archive']}\"\n")
    lab = job.lab
    before = host_bytes(lab)
    result = job.backup(vm)[vm]
    served = host_bytes(lab) - before
    assert first["archive"] not in job.archives()
    job.assert_identical(result)
    assert all(d["reused"] == 0 for d in result["disks"])
    assert served >= sum(d["bytes_read"] for d in first["disks"])


def test_block_size_per_vm(job, vm):
    """A VM matching a vm_block_sizes pattern is cut into blocks of that size; when its size
    changes, its next backup reads it in full (no block can be reused), and both are whole."""
    def sidecar(result):
        return json.loads(job.borg("extract", "--stdout", f"{job.repo}::{result['archive']}",
                                   f"{vm}/ovirt-borg.json").stdout)

    original = job.config.read_text()
    job.config.write_text(original.replace("[repository]\n", f"[repository]\nvm_block_sizes = {{ \"{vm[:2]}*\" = \"256K\" }}\n"))
    small = job.backup(vm)[vm]
    job.assert_identical(small)
    assert sidecar(small)["block_size"] == 256 * 1024
    listing = job.borg("list", "--format", "{path} {size} {num_chunks}{NL}", f"{job.repo}::{small['archive']}",
                       f"{vm}/disks").stdout.decode().splitlines()
    images = [line.split()[1:] for line in listing if line.split()[0].endswith(".raw")]
    assert images == [[str(64 << 20), "256"]] * 2  # two 64 MiB disks in 256 KiB chunks

    job.config.write_text(original)
    job.lab.write(vm, disk=1, percent=1)
    result = job.backup(vm)[vm]
    assert result["mode"] == "full" and "block size changed" in result["reason"], result["reason"]
    assert sidecar(result)["block_size"] == BLOCK
    job.assert_identical(result)

def test_stale_backup_is_finalized_first(job, lab_vm):
    vm = lab_vm["name"]
    # The fault's backup has no description: it counts as another tool's unless told otherwise.
    job.config.write_text(job.config.read_text() + "[backup]\nforeign_stale_hours = 0\n")
    job.lab.fault("stale_backup", vm=vm)
    assert job.lab.stats()["open_backups"], "the fault leaves a backup open"
    proc = job.run("backup", vm, "--json")
    assert "stale backup" in proc.stderr
    job.assert_identical(json.loads(proc.stdout)["archives"][0])
    assert job.lab.stats()["open_backups"] == []


def test_new_disk_is_read_in_full_and_removed_disk_disappears(job, lab_vm):
    vm = lab_vm["name"]
    job.backup(vm)
    job.lab.add_disk(vm, size="16M")
    result = job.backup(vm)[vm]
    modes = [d["mode"] for d in result["disks"]]
    assert result["mode"] == "incremental" and modes == ["incremental", "full"], modes
    job.assert_identical(result)
    job.lab.detach_disk(vm, 2)
    after = job.backup(vm)[vm]
    assert len(after["disks"]) == 1 and after["mode"] == "incremental"
    listing = job.borg("list", "--short", f"{job.repo}::{after['archive']}").stdout.decode()
    assert result["disks"][1]["id"] not in listing


def test_powered_off_vm_cold_backup_and_old_engine_proxy(job, lab_clean):
    lab = lab_clean
    name = f"off{next(_names)}-{os.getpid()}"
    lab.add_vm(name, disks=1, size="16M", status="down")
    try:
        before = lab.stats()
        cold = job.backup(name)[name]
        after = lab.stats()
        assert cold["path"] == "backup" and cold["checkpoint"]
        assert after["imageio.host.bytes"] > before["imageio.host.bytes"]
        assert after["imageio.proxy.bytes"] == before["imageio.proxy.bytes"]
        job.assert_identical(cold)

        lab.fault("old_engine")
        proc = job.run("backup", name, "--json")
        routed = json.loads(proc.stdout)["archives"][0]
        final = lab.stats()
        assert routed["path"] == "engine-transfer" and routed["mode"] == "full"
        assert "engine image transfers" in proc.stderr
        assert final["imageio.proxy.bytes"] > after["imageio.proxy.bytes"], "data must pass the proxy"
        job.assert_identical(routed)
        sidecar = json.loads(job.borg("extract", "--stdout", f"{job.repo}::{routed['archive']}",
                                      f"{name}/ovirt-borg.json").stdout)
        assert sidecar["path"] == "engine-transfer" and sidecar["checkpoint_id"] is None
    finally:
        lab.delete_vm(name)


def test_lying_bitmap_is_caught_by_the_sample(job, lab_vm):
    """A change the dirty bitmap did not record is found by re-reading clean blocks."""
    from ovirt_borg.lab import qemu

    vm = lab_vm["name"]
    job.backup(vm)
    info = job.lab.vm_info(vm)
    disk = info["disks"][0]
    # overwrite a whole data block, then clear the checkpoint bitmap: the change is unrecorded
    job.lab.write(vm, disk=1, offset=0, length=BLOCK)
    for bitmap in qemu.list_bitmaps(disk["path"]):
        qemu.remove_bitmap(disk["path"], bitmap.name)
        qemu.add_bitmap(disk["path"], bitmap.name)
    proc = job.run("backup", vm, "--json")
    result = json.loads(proc.stdout)["archives"][0]
    assert "dirty bitmap" in proc.stderr
    assert result["disks"][0]["mode"] == "full"
    job.assert_identical(result)


def test_cli_writer_makes_the_same_images(lab_clean, lab_vm, tmp_path):
    job = make_job(lab_clean, tmp_path / "cli")
    job.config.write_text(job.config.read_text().replace("lock_wait = 5", 'lock_wait = 5\nwriter = "cli"'))
    vm = lab_vm["name"]
    first = job.backup(vm)[vm]
    job.assert_identical(first)
    job.lab.write(vm, disk=1, offset=1 << 20, length=65536)
    second = job.backup(vm)[vm]
    job.assert_identical(second)
    assert second["disks"][0]["mode"] == "full"  # the cli writer cannot reuse blocks
    # Its archives record sha256 digests, not chunk ids: the internal writer reads in full once.
    job.config.write_text(job.config.read_text().replace('writer = "cli"', 'writer = "internal"'))
    proc = job.run("backup", vm, "--json")
    third = json.loads(proc.stdout)["archives"][0]
    assert {d["mode"] for d in third["disks"]} == {"full"}, third
    assert "sha256 block digests, not Borg chunk ids" in proc.stderr
    job.assert_identical(third)
    job.lab.write(vm, disk=1, offset=2 << 20, length=65536)
    fourth = job.backup(vm)[vm]
    assert {d["mode"] for d in fourth["disks"]} == {"incremental"}, fourth
    job.assert_identical(fourth)


def test_unknown_vm_is_a_clear_error(job):
    proc = job.run("backup", "no-such-vm", expect=11)
    assert "no VM named 'no-such-vm'" in proc.stderr


def test_list_shows_this_jobs_archives_with_mode_and_checkpoint(job, lab_vm, tmp_path):
    vm = lab_vm["name"]
    full = job.backup(vm)[vm]
    job.lab.write(vm, disk=1, offset=0, length=65536)
    incr = job.backup(vm)[vm]
    (tmp_path / "f").write_text("x")
    job.borg("create", f"{job.repo}::ovirt-notes", str(tmp_path / "f"))  # foreign, same prefix
    rows = json.loads(job.run("list", "--json").stdout)["archives"]
    assert [(r["name"], r["mode"], r["checkpoint"]) for r in rows] == [
        (full["archive"], "full", full["checkpoint"]), (incr["archive"], "incremental", incr["checkpoint"])]
    assert rows[1]["size"] == 16 << 20 and rows[1]["bytes_read"] > 0


