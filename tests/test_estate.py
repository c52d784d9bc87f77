"""ovirt-borg against a lab as strict as a real oVirt 4.5 estate.

The real command line, SDK, imageio daemons, qemu-nbd and Borg: disks and VMs the engine will
not back up, backups of other tools and of a second ovirt-borg job, and the two certificate
authorities of an engine whose web certificate was replaced. Every archived image is compared
with the lab's disk by sha256, and nothing is left open on the engine.

Run them with the fault suite: ``pytest -m faults``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re

import pytest

from conftest import Job
from test_faults import check_log_lines, configure, open_on_engine

pytestmark = pytest.mark.faults

_names = itertools.count(1)


def _name(stem: str) -> str:
    return f"{stem}{next(_names)}-{os.getpid()}"


@contextlib.contextmanager
def _vms(lab, *specs: tuple[str, dict]):
    """Fresh VMs ``(name, add_vm options)``, deleted afterwards."""
    made = []
    try:
        for name, options in specs:
            lab.add_vm(name, **options)
            made.append(name)
        yield
    finally:
        for name in made:
            with contextlib.suppress(Exception):
                lab.delete_vm(name)


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("WARNING")]


# -- disks and VMs the engine will not back up -------------------------------------------------


def test_disks_the_engine_leaves_out_are_skipped_with_a_warning(job: Job, lab_clean):
    """A LUN, a managed-block, a shareable and an unplugged disk beside an image disk: the image
    disk is backed up night after night (full, then incremental); the others are named in a
    warning and in --json (exit 1) until the configuration excludes them."""
    lab = lab_clean
    vm = _name("skip")
    with _vms(lab, (vm, {"disks": 1, "size": "16M"})):
        left_out = {
            lab.add_disk(vm, size="8M", storage_type="lun")["id"]: "direct LUN",
            lab.add_disk(vm, size="8M", storage_type="managed_block_storage")["id"]: "managed block storage",
            lab.add_disk(vm, size="8M", shareable=True)["id"]: "shareable",
            lab.add_disk(vm, size="8M", active=False)["id"]: "unplugged",
        }
        aliases = {d["id"]: d["name"] for d in lab.vm_info(vm)["disks"]}
        for night, mode in enumerate(("full", "incremental", "incremental")):
            proc = job.run("backup", vm, "--json", expect=1)
            result = json.loads(proc.stdout)[0]
            assert result["ok"] and result["mode"] == mode, result
            assert [d["id"] for d in result["disks"]] == [lab.vm_info(vm)["disks"][0]["id"]]
            skipped = {d["id"]: d["reason"] for d in result["skipped_disks"]}
            assert skipped.keys() == left_out.keys()
            for disk_id, kind in left_out.items():
                assert kind in skipped[disk_id]
                assert any(aliases[disk_id] in line and kind in line for line in _warnings(proc.stderr)), \
                    (kind, proc.stderr)
            assert check_log_lines(proc.stderr) == []
            job.assert_identical(result)
            assert open_on_engine(lab, vm) == ([], [])
            lab.write(vm, disk=1, percent=2)
        configure(job, selection={"exclude_disks": [aliases[d] for d in left_out]})
        result = job.backup(vm)[vm]
        assert result["mode"] == "incremental" and result["skipped_disks"] == [] and result["warnings"] == []
        job.assert_identical(result)


def test_a_vm_with_no_disk_the_engine_backs_up_is_skipped(job: Job, lab_clean):
    """Only a LUN and an unplugged disk: nothing is asked of the engine, exit 1, not an error."""
    lab = lab_clean
    vm = _name("lunonly")
    with _vms(lab, (vm, {"disks": 1, "size": "8M"})):
        lab.add_disk(vm, size="8M", storage_type="lun")
        lab.detach_disk(vm, 1)
        lab.add_disk(vm, size="8M", active=False)
        added = lab.stats()["calls"].get("backups.add", 0)
        proc = job.run("backup", vm, "--json", expect=1)
        result = json.loads(proc.stdout)[0]
        assert not result["ok"] and result["error"].startswith("skipped") and len(result["skipped_disks"]) == 2
        assert check_log_lines(proc.stderr) == []
        assert lab.stats()["calls"].get("backups.add", 0) == added
        assert job.archives() == []


def test_hosted_engine_vm_is_skipped_and_the_others_backed_up(job: Job, lab_clean):
    """The hosted engine's VM (origin managed_hosted_engine) is not asked for a backup (the
    engine refuses it, 409): a warning until selection.exclude names it; the run goes on."""
    lab = lab_clean
    engine_vm, other = _name("HostedEngine"), _name("web")
    with _vms(lab, (engine_vm, {"disks": 1, "size": "8M", "origin": "managed_hosted_engine"}),
              (other, {"disks": 1, "size": "8M"})):
        added = lab.stats()["calls"].get("backups.add", 0)
        proc = job.run("backup", engine_vm, other, "--json", expect=1)
        results = {r["vm"]: r for r in json.loads(proc.stdout)}
        assert not results[engine_vm]["ok"] and "hosted engine" in results[engine_vm]["error"]
        assert re.search(rf"WARNING .*VM {engine_vm} skipped: .*hosted engine", proc.stderr), proc.stderr
        assert check_log_lines(proc.stderr) == []
        assert results[other]["ok"]
        job.assert_identical(results[other])
        assert lab.stats()["calls"]["backups.add"] == added + 1, "no backup was asked for the engine's VM"
        configure(job, selection={"names": [engine_vm, other], "exclude": [engine_vm]})
        results = job.backup("--all")
        assert list(results) == [other] and results[other]["mode"] == "incremental"
        for name in (engine_vm, other):
            assert open_on_engine(lab, name) == ([], [])
