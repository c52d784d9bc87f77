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

from conftest import Job, make_job
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
        for mode in ("full", "incremental", "incremental"):
            proc = job.run("backup", vm, "--json", expect=1)
            result = json.loads(proc.stdout)["archives"][0]
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
        result = json.loads(proc.stdout)["archives"][0]
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
        results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
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


# -- other tools' backups, and two ovirt-borg jobs on one VM -----------------------------------


def _other_tools_backup(lab, vm: str, description: str):
    """Start a backup of ``vm`` as another tool would (ready, with its own description)."""
    import ovirtsdk4.types as types

    connection = lab.connection()
    info = lab.vm_info(vm)
    service = connection.system_service().vms_service().vm_service(info["id"]).backups_service()
    backup = service.add(types.Backup(disks=[types.Disk(id=d["id"]) for d in info["disks"]],
                                      description=description))
    backup_service = service.backup_service(backup.id)
    for _ in range(100):
        if backup_service.get().phase == types.BackupPhase.READY:
            break
    return connection, backup.id, backup_service


def _open_backup_ids(lab, vm: str) -> list[str]:
    return [b["id"] for b in lab.stats()["open_backups"] if b["vm"] == vm]


def test_another_tools_backup_is_left_alone_until_abandoned(job: Job, lab_clean):
    """A backup another tool has open is never finalized by ovirt-borg while it is young or
    has an active image transfer: that VM fails for the night (exit 4, the backup named), the
    other tool's backup goes on. Once it ended, the next run is incremental. An abandoned one
    (older than backup.foreign_stale_hours, no active transfer) is finalized."""
    import ovirtsdk4.types as types

    lab = lab_clean
    vm = _name("veeam")
    with _vms(lab, (vm, {"disks": 1, "size": "16M"})):
        job.backup(vm)
        lab.write(vm, disk=1, percent=2)
        connection, other, other_service = _other_tools_backup(lab, vm, "Veeam Backup & Replication")
        try:
            proc = job.run("backup", vm, "--json", expect=4)
            result = json.loads(proc.stdout)["archives"][0]
            assert other in result["error"] and "Veeam Backup & Replication" in result["error"]
            assert _open_backup_ids(lab, vm) == [other], "the other tool's backup must stay open"
            # older than the limit, but an image transfer of it is active: still alive
            configure(job, backup={"foreign_stale_hours": 1e-9})
            transfers = connection.system_service().image_transfers_service()
            transfer = transfers.add(types.ImageTransfer(
                disk=types.Disk(id=lab.vm_info(vm)["disks"][0]["id"]), backup=types.Backup(id=other),
                direction=types.ImageTransferDirection.DOWNLOAD, format=types.DiskFormat.RAW))
            transfer_service = transfers.image_transfer_service(transfer.id)
            transfer_service.get()
            job.run("backup", vm, expect=4)
            assert _open_backup_ids(lab, vm) == [other]
            transfer_service.finalize()
            while not transfer_service.get().phase.value.startswith("finished"):
                pass
            other_service.finalize()
            # a snapshot-based backup removes its snapshot first (StopVmBackupCommand): poll it out
            while other_service.get().phase.value not in ("succeeded", "failed"):
                pass
        finally:
            connection.close()
        assert _open_backup_ids(lab, vm) == []
        result = job.backup(vm)[vm]
        assert result["mode"] == "incremental", result["reason"]
        job.assert_identical(result)

        # abandoned: no transfer, older than foreign_stale_hours (here: a nanosecond)
        lab.write(vm, disk=1, percent=2)
        connection, other, _ = _other_tools_backup(lab, vm, "vProtect")
        connection.close()
        proc = job.run("backup", vm, "--json")
        assert re.search(rf"WARNING .*backup {other} .*'vProtect'.* finalizing it as abandoned", proc.stderr)
        result = json.loads(proc.stdout)["archives"][0]
        assert result["mode"] == "incremental", result["reason"]
        job.assert_identical(result)
        assert open_on_engine(lab, vm) == ([], [])


def test_own_backup_left_by_a_killed_run_is_finalized_at_once(job: Job, lab_clean):
    """This job's backup (its description names the job and the repository) is finalized at
    once, whatever foreign_stale_hours says; the other tool's marker is not this job's."""
    lab = lab_clean
    vm = _name("own")
    with _vms(lab, (vm, {"disks": 1, "size": "16M"})):
        job.backup(vm)
        repo_id = next(p.name for p in (job.dir / "state").iterdir() if p.is_dir())
        own = f"ovirt-borg job={job.config.stem} repository={repo_id}"
        lab.write(vm, disk=1, percent=2)
        connection, stale, _ = _other_tools_backup(lab, vm, own)
        connection.close()
        proc = job.run("backup", vm, "--json")
        assert f"finalizing a stale backup {stale}" in proc.stderr
        result = json.loads(proc.stdout)["archives"][0]
        assert result["mode"] == "incremental"
        job.assert_identical(result)
        assert [b["description"] for b in lab.stats()["open_backups"] if b["vm"] == vm] == []


def _checkpoints(lab, vm: str) -> list[str]:
    return [c["id"] for c in lab.stats()["checkpoints"].get(vm, [])]


def test_two_jobs_on_one_vm_both_stay_incremental(lab_clean, tmp_path):
    """An on-site and an off-site job (two repositories, one state directory) back up the same
    VM alternately, night after night: each purge keeps the checkpoint the other job's next
    incremental starts from, so both stay incremental with identical images, and the engine
    keeps two checkpoints. A job gone quiet for checkpoints.other_jobs_days no longer holds one."""
    lab = lab_clean
    vm = _name("twojobs")
    onsite = make_job(lab, tmp_path / "onsite")
    offsite = make_job(lab, tmp_path / "offsite")
    configure(offsite, state={"directory": str(onsite.dir / "state")})
    with _vms(lab, (vm, {"disks": 2, "size": "16M"})):
        assert onsite.backup(vm)[vm]["mode"] == "full"
        assert offsite.backup(vm)[vm]["mode"] == "full"
        for night in range(3):
            for job in (onsite, offsite):
                lab.write(vm, disk=1 + night % 2, percent=3)
                result = job.backup(vm)[vm]
                assert result["mode"] == "incremental", (night, job.dir.name, result["reason"])
                job.assert_identical(result)
            assert len(_checkpoints(lab, vm)) == 2, _checkpoints(lab, vm)
        # the off-site job falls silent: its sidecar ages past checkpoints.other_jobs_days
        sidecar_path = next((onsite.dir / "state").glob(f"*/{lab.vm_info(vm)['id']}.json"))
        for path in (onsite.dir / "state").glob(f"*/{lab.vm_info(vm)['id']}.json"):
            doc = json.loads(path.read_text())
            if doc["archive"] in offsite.archives():
                sidecar_path = path
        doc = json.loads(sidecar_path.read_text())
        doc["finished"] = "2020-01-01T00:00:00Z"
        sidecar_path.write_text(json.dumps(doc))
        held = doc["checkpoint_id"]
        lab.write(vm, disk=1, percent=1)
        onsite.backup(vm)
        assert held not in _checkpoints(lab, vm) and len(_checkpoints(lab, vm)) == 1
        result = offsite.backup(vm)[vm]
        assert result["mode"] == "full" and "no longer exists" in result["reason"]
        offsite.assert_identical(result)
        assert open_on_engine(lab, vm) == ([], [])


# -- two certificate authorities -----------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ca_lab(tmp_path_factory):
    """A lab whose engine web certificate (HTTPS, imageio proxy) has a CA of its own, as after
    an admin installed a commercial one; the host imageio keeps the engine's internal CA."""
    from ovirt_borg.lab.control import Lab

    instance = Lab.up(tmp_path_factory.mktemp("two-ca-lab"), vms=1, disk_size="16M", separate_web_ca=True)
    try:
        yield instance
    finally:
        instance.down()


def _bytes(lab) -> tuple[int, int]:
    stats = lab.stats()
    return stats["imageio.host.bytes"], stats["imageio.proxy.bytes"]


def test_a_replaced_web_certificate_needs_the_internal_ca_for_the_hosts(two_ca_lab, tmp_path):
    """engine.ca_file verifies the engine and its imageio proxy, transfer.host_ca_file the
    hosts' imageio. Without it the host's certificate is not trusted: the disk is read through
    the proxy (verified all the way), with a warning naming the setting and where to download
    the internal CA (exit 1); never an unverified connection."""
    lab = two_ca_lab
    job = make_job(lab, tmp_path / "job")
    vm = "vm1"
    # both CAs given: the data comes straight from the host
    configure(job, transfer={"host_ca_file": str(lab.host_ca_file)})
    host, proxy = _bytes(lab)
    result = job.backup(vm)[vm]
    assert result["warnings"] == []
    assert _bytes(lab)[0] > host and _bytes(lab)[1] == proxy, "read from the host, not the proxy"
    job.assert_identical(result)

    # only the engine's (web) CA: the host is not trusted, the proxy path is taken and said
    configure(job, transfer={"host_ca_file": ""})
    lab.write(vm, disk=2, percent=5)
    host, proxy = _bytes(lab)
    proc = job.run("backup", vm, "--json", expect=1)
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] and result["mode"] == "incremental", result
    assert _bytes(lab)[1] > proxy, "read through the proxy"
    assert len(result["warnings"]) == len(result["disks"])
    for text in [*result["warnings"], *_warnings(proc.stderr)]:
        assert "transfer.host_ca_file" in text and \
            "/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA" in text, text
    assert check_log_lines(proc.stderr) == []
    job.assert_identical(result)
    assert open_on_engine(lab, vm) == ([], [])

    # the internal CA given for the engine: its web certificate is not trusted, nothing is sent
    configure(job, engine={"ca_file": str(lab.host_ca_file)})
    logins = lab.stats()["calls"].get("sso.token", 0)
    proc = job.run("backup", vm, expect=4)
    assert "TLS certificate is not trusted" in proc.stderr
    assert lab.stats()["calls"].get("sso.token", 0) == logins, "the password was sent"

    # an unreadable host CA file is a configuration error naming the key
    configure(job, engine={"ca_file": str(lab.ca_file)}, transfer={"host_ca_file": str(tmp_path / "none.pem")})
    proc = job.run("backup", vm, expect=2)
    assert "transfer.host_ca_file" in proc.stderr
    assert open_on_engine(lab, vm) == ([], [])
