"""VMs backed up overlapped (``[backup] prepare_ahead``), through the real program and the lab.

While one VM streams into the repository the next VMs' engine backups are prepared (their first
disk's image transfer opened) and the VMs before are finished (their transfers awaited until
ended, then their engine backups finalized). The promises: images identical to the disks,
results and log lines in the VMs' order, one VM's failure its own, an interruption that leaves
nothing open on the engine and nothing half written, and ``prepare_ahead = 0`` as one VM after
another.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import signal

import pytest

from conftest import make_job
from helpers import lab_engine_settings, temporary_vms
from ovirt_borg.lab.control import Lab
from test_faults import (before, checkpoint_ids, configure, finished, host_bytes, open_on_engine, running,
                         signalled_while_reading, state_files, vm_disk_ids, wait_for)

pytestmark = pytest.mark.faults

_names = itertools.count(1)


@pytest.fixture
def vms(lab_clean):
    """Three fresh up VMs with two 8 MiB disks each (several disks: transfers opened ahead)."""
    base = f"ov{next(_names)}-{os.getpid()}"
    with temporary_vms(lab_clean, [f"{base}-{letter}" for letter in "abc"], ignore_delete_errors=True,
                       disks=2, size="8M") as names:
        yield names


def log_records(stderr: str) -> list[dict]:
    """The --log-json lines of a run."""
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def assert_in_vm_order(records: list[dict], names: list[str]) -> None:
    """Each VM's log lines come together, the VMs in their order (lines about no VM anywhere)."""
    seen = [r["vm"] for r in records if "vm" in r]
    runs = [vm for vm, _ in itertools.groupby(seen)]
    assert runs == [n for n in names if n in seen], runs
    for record in records:
        if "vm" in record and re.match(r"VM (?!\d+ of )", record["message"]):
            # a line about a VM, logged with that VM's context
            named = re.match(r"VM (\S+?)[: ]", record["message"])
            assert named and named.group(1) == record["vm"], record


def record_hooks(job, tmp_path) -> "os.PathLike":
    """Command hooks writing 'before_vm VM' and 'after_vm VM' lines into a file; returns it."""
    out = tmp_path / "hooks.log"
    quoted = shlex.quote(str(out))
    configure(job, hooks={"command": {"before_vm": f"echo before_vm {{vm}} >> {quoted}",
                                      "after_vm": f"echo after_vm {{vm}} >> {quoted}"}})
    return out


def assert_nothing_open(lab, names: list[str]) -> None:
    for name in names:
        assert open_on_engine(lab, name) == ([], []), name
    stats = lab.stats()
    assert stats["open_backups"] == [], stats["open_backups"]
    assert stats["open_transfers"] == [], stats["open_transfers"]


@pytest.mark.parametrize("ahead", [1, 2])
def test_overlapped_vms_give_identical_images_in_order(job, vms, ahead, tmp_path):
    lab = job.lab
    configure(job, backup={"prepare_ahead": ahead})
    hooks_log = record_hooks(job, tmp_path)
    proc = job.run("--log-json", "backup", *vms, "--json")
    results = json.loads(proc.stdout)["archives"]
    assert [r["vm"] for r in results] == vms
    for result in results:
        assert result["ok"] and result["mode"] == "full" and result["warnings"] == [], result
        job.assert_identical(result)
    assert_in_vm_order(log_records(proc.stderr), vms)
    assert_nothing_open(lab, vms)
    # the plugins hear of each VM in its order; the next VMs are asked about before the first
    # is finished, because their engine backups are started while it streams
    lines = hooks_log.read_text().splitlines()
    for name in vms:
        assert lines.index(f"before_vm {name}") < lines.index(f"after_vm {name}")
    assert [line for line in lines if line.startswith("after_vm")] == [f"after_vm {n}" for n in vms]
    assert lines.index(f"before_vm {vms[ahead]}") < lines.index(f"after_vm {vms[0]}"), lines

    # an incremental night with guest writes: the chains hold, the checkpoints are purged
    for name in vms:
        lab.write(name, disk=2, percent=5)
    hooks_log.unlink()
    proc = job.run("--log-json", "backup", *vms, "--json")
    again = json.loads(proc.stdout)["archives"]
    assert [r["vm"] for r in again] == vms
    for result in again:
        assert result["ok"] and result["mode"] == "incremental", result
        job.assert_identical(result)
        assert checkpoint_ids(lab, result["vm"]) == [result["checkpoint"]]
    assert_in_vm_order(log_records(proc.stderr), vms)
    assert_nothing_open(lab, vms)


def test_one_vms_engine_failure_fails_it_alone(job, vms):
    lab = job.lab
    configure(job, backup={"prepare_ahead": 1})
    lab.fault("engine_500:backups.add", times=1)  # whichever VM's backup starts first
    proc = job.run("--log-json", "backup", *vms, "--json", expect=4)
    assert lab.faults()["active"] == {}, "the fault was hit"
    results = json.loads(proc.stdout)["archives"]
    assert [r["vm"] for r in results] == vms
    failed = [r for r in results if not r["ok"]]
    assert len(failed) == 1 and failed[0]["exit_code"] == 4 and "HTTP 500" in failed[0]["error"], results
    for result in results:
        if result["ok"]:
            job.assert_identical(result)
    assert [a for a in job.archives() if failed[0]["vm"] in a] == []
    assert_in_vm_order(log_records(proc.stderr), vms)
    assert_nothing_open(lab, vms)

    # a failure in the finish thread (the finalize beside the commit) is a warning of its VM
    lab.fault("engine_500:backup.finalize", times=2)  # retries = 3: one VM's finalize is repeated
    proc = job.run("backup", *vms, "--json")
    results = json.loads(proc.stdout)["archives"]
    assert [r["vm"] for r in results] == vms and all(r["ok"] for r in results), results
    assert_nothing_open(lab, vms)


@pytest.fixture
def slow_pair(job, lab_clean):
    """Two VMs backed up once, then with new data and a bandwidth limit: a slow first VM."""
    base = f"ovs{next(_names)}-{os.getpid()}"
    names = [f"{base}-a", f"{base}-b"]
    lab_clean.add_vm(names[0], disks=2, size="32M")
    lab_clean.add_vm(names[1], disks=1, size="8M")
    try:
        first = job.backup(*names)
        for name in names:
            assert first[name]["mode"] == "full"
        lab_clean.write(names[0], disk=1, percent=40)
        lab_clean.write(names[0], disk=2, percent=40)
        lab_clean.write(names[1], disk=1, percent=10)
        configure(job, transfer={"bandwidth_limit": "4M"})
        yield names
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                lab_clean.delete_vm(name)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_interrupt_while_one_streams_and_the_next_is_prepared(job, slow_pair, signum):
    """Stopped while the first VM streams and the second one's engine backup waits, ready:
    both are rolled back (nothing open on the engine, no archive, no sidecar changed) and the
    next run backs both up incrementally."""
    lab = job.lab
    a, b = slow_pair
    configure(job, backup={"prepare_ahead": 1})
    was = {name: before(job, name) for name in slow_pair}
    start_bytes = host_bytes(lab)

    def ready(name: str) -> bool:
        return any(x["vm"] == name and x["phase"] == "ready" for x in lab.stats()["open_backups"])

    with running(job, "backup", a, b) as proc:
        wait_for(lambda: host_bytes(lab) > start_bytes and ready(b), what="VM a streaming, VM b ready")
        assert proc.poll() is None, "the run must still be reading"
        assert ready(a), "VM a's backup is open while it streams"
        os.kill(proc.pid, signum)
        done = finished(proc)
    name = signal.Signals(signum).name
    assert done.returncode == 128 + signum, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert re.search(rf"interrupted by {name}", errors[-1]), done.stderr
    assert re.search(rf"ERROR .*{a}: stopped before archive .* was committed", done.stderr), done.stderr
    assert re.search(rf"INFO .*{b}: engine backup .* started ahead of its turn, is finalized", done.stderr), \
        done.stderr
    assert "Traceback" not in done.stderr
    assert job.archives() == was[a].archives, "no archive, not even a Borg checkpoint"
    assert state_files(job) == was[a].state, "no sidecar advanced"
    assert_nothing_open(lab, slow_pair)
    for vm in slow_pair:
        assert was[vm].checkpoint in checkpoint_ids(lab, vm), "the checkpoint in use is still there"
    job.borg("check", str(job.repo))

    configure(job, transfer={"bandwidth_limit": ""})
    results = job.backup(a, b)
    for vm in slow_pair:
        assert results[vm]["mode"] == "incremental", results[vm]["reason"]
        job.assert_identical(results[vm])
    assert_nothing_open(lab, slow_pair)


def test_prepare_ahead_0_is_one_vm_after_another(job, slow_pair, tmp_path):
    """With prepare_ahead = 0 nothing of the next VM starts before the one before is done:
    its plugins are asked after, and an interruption finds no backup of it started."""
    lab = job.lab
    a, b = slow_pair
    configure(job, backup={"prepare_ahead": 0}, transfer={"bandwidth_limit": ""})
    hooks_log = record_hooks(job, tmp_path)
    proc = job.run("--log-json", "backup", a, b, "--json")
    results = json.loads(proc.stdout)["archives"]
    assert [r["vm"] for r in results] == [a, b]
    for result in results:
        assert result["ok"] and result["mode"] == "incremental", result
        job.assert_identical(result)
    assert hooks_log.read_text().splitlines() == [f"before_vm {a}", f"after_vm {a}", f"before_vm {b}",
                                                  f"after_vm {b}"]
    assert_in_vm_order(log_records(proc.stderr), [a, b])
    assert_nothing_open(lab, slow_pair)

    lab.write(a, disk=1, percent=40)
    configure(job, transfer={"bandwidth_limit": "4M"})
    was = before(job, a)
    backups_added = lab.stats()["calls"].get("backups.add", 0)
    done = signalled_while_reading(job, signal.SIGTERM, "backup", a, b)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert lab.stats()["calls"]["backups.add"] == backups_added + 1, "the next VM must not start"
    assert job.archives() == was.archives and state_files(job) == was.state
    assert_nothing_open(lab, slow_pair)


def test_a_transfer_opened_ahead_is_kept_alive_until_taken(lab_clean):
    """The engine cancels a download whose ticket idles past its inactivity_timeout; one opened
    ahead (``_TransferAhead``) idles while the disk before it streams, and is touched meanwhile.
    Beside it, a transfer of the same backup left alone is cancelled."""
    from ovirt_borg.backup import _TransferAhead
    from ovirt_borg.engine import Engine
    from ovirt_borg.imageio import ImageioClient, TransferSettings

    lab = lab_clean
    vm = f"ova{next(_names)}-{os.getpid()}"
    lab.add_vm(vm, disks=2, size="8M")
    try:
        settings = lab_engine_settings(lab)
        data_path = TransferSettings(ca_file=str(lab.ca_file))
        info = lab.vm_info(vm)
        kept_disk, idle_disk = (d["id"] for d in info["disks"])
        with Engine(settings) as engine, Engine(settings) as opener:
            backup_id = engine.start_backup(info["id"], [kept_disk, idle_disk], None)
            engine.wait_backup_ready(info["id"], backup_id)
            try:
                ahead = _TransferAhead(lambda: opener.start_transfer(kept_disk, direction="download",
                                                                     backup_id=backup_id, inactivity_timeout=1),
                                       data_path, 1, f"{vm} disk 1")
                try:
                    idle = engine.start_transfer(idle_disk, direction="download", backup_id=backup_id,
                                                 inactivity_timeout=1)
                    wait_for(lambda: all(t["id"] != idle.id for t in lab.stats()["open_transfers"]),
                             what="the idle transfer cancelled by the engine")
                    transfer = ahead.take()
                except BaseException:
                    ahead.close(engine)
                    raise
                phases = {t["id"]: t["phase"] for t in lab.stats()["open_transfers"]}
                assert phases.get(transfer.id) == "transferring", phases
                with ImageioClient(transfer.transfer_url, transfer.proxy_url, data_path) as client:
                    assert sum(e.length for e in client.extents("zero")) == 8 << 20
                engine.finalize_transfer(transfer.id)
            finally:
                engine.finalize_backup(info["id"], backup_id)
        assert_nothing_open(lab, [vm])
    finally:
        lab.delete_vm(vm)


def test_a_refused_transfer_finalize_fails_its_vm_alone(job, vms):
    """The engine does not take a disk's transfer finalize (500 through every retry): as with
    prepare_ahead = 0, the disk fails its VM before anything of it is committed, the transfer
    is ended; the other VMs, whose transfers end in their finish phase, are backed up."""
    lab = job.lab
    configure(job, backup={"prepare_ahead": 2})
    lab.fault("engine_500:transfer.finalize", times=4)  # retries = 3: the first finalize, every attempt
    proc = job.run("--log-json", "backup", *vms, "--json", expect=4)
    assert lab.faults()["active"] == {}, "the fault was hit"
    results = json.loads(proc.stdout)["archives"]
    assert [r["vm"] for r in results] == vms
    assert not results[0]["ok"] and results[0]["exit_code"] == 4, results[0]
    assert re.search(r"finalizing image transfer .*HTTP 500", results[0]["error"]), results[0]
    for result in results[1:]:
        assert result["ok"] and result["warnings"] == [], result
        job.assert_identical(result)
    assert [a for a in job.archives() if vms[0] in a] == []
    assert_in_vm_order(log_records(proc.stderr), vms)
    assert_nothing_open(lab, vms)

    results = job.backup(*vms)
    for name in vms:
        assert results[name]["ok"], results[name]
        job.assert_identical(results[name])
    assert_nothing_open(lab, vms)


# Engine latency as a real engine's, scaled down, with a transfer's finalize long enough that a
# transfer is seen finalizing while the next disk streams.
SLOW_LATENCY = "real,transfer_finalize=30"
SLOW_SCALE = 0.05


@pytest.fixture(scope="module")
def slow_lab(tmp_path_factory):
    lab = Lab.up(tmp_path_factory.mktemp("overlap-slow-lab"), vms=1, disk_size="8M",
                 latency=SLOW_LATENCY, latency_scale=SLOW_SCALE)
    try:
        yield lab
    finally:
        lab.down()


@pytest.fixture
def slow_job(slow_lab, tmp_path):
    slow_lab.clear_faults()
    try:
        yield make_job(slow_lab, tmp_path / "job")
    finally:
        slow_lab.clear_faults()


def transfers_of(lab, vm: str, phase: str) -> list[dict]:
    """The VM's image transfers open on the engine in ``phase``."""
    disks = vm_disk_ids(lab, vm)
    return [t for t in lab.stats()["open_transfers"] if t["disk"] in disks and t["phase"] == phase]


def test_transfers_end_in_the_finish_phase_under_latency(slow_job):
    """Under an engine's latency, with prepare_ahead = 2: each VM's first transfer opened
    while it is prepared, each disk's transfer ended in the finish phase, images identical,
    nothing left open; an incremental night the same."""
    lab = slow_job.lab
    base = f"ovl{next(_names)}-{os.getpid()}"
    names = [f"{base}-{letter}" for letter in "abc"]
    for name in names:
        lab.add_vm(name, disks=2, size="8M")
    try:
        configure(slow_job, backup={"prepare_ahead": 2})
        for night in range(2):
            proc = slow_job.run("--log-json", "backup", *names, "--json")
            results = json.loads(proc.stdout)["archives"]
            assert [r["vm"] for r in results] == names
            for result in results:
                assert result["ok"] and result["warnings"] == [], result
                assert result["mode"] == ("full" if night == 0 else "incremental"), result
                slow_job.assert_identical(result)
            assert_in_vm_order(log_records(proc.stderr), names)
            assert_nothing_open(lab, names)
            for name in names:
                lab.write(name, disk=2, percent=5)
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                lab.delete_vm(name)


def test_interrupt_while_transfers_end_in_the_background(slow_job):
    """Stopped while the first VM's first disk's transfer is finalizing (its end awaited off
    the streaming path) as its second disk streams, and the next VM, prepared ahead, holds its
    first disk's transfer open: everything is ended and finalized, nothing committed, and the
    next run backs both up."""
    lab = slow_job.lab
    base = f"ovi{next(_names)}-{os.getpid()}"
    a, b = names = [f"{base}-a", f"{base}-b"]
    lab.add_vm(a, disks=2, size="32M")
    lab.add_vm(b, disks=1, size="8M")
    try:
        first = slow_job.backup(a, b)
        lab.write(a, disk=1, percent=40)
        lab.write(a, disk=2, percent=40)
        lab.write(b, disk=1, percent=10)
        configure(slow_job, backup={"prepare_ahead": 2}, transfer={"bandwidth_limit": "4M"})
        was = {name: before(slow_job, name) for name in names}

        with running(slow_job, "backup", a, b) as proc:
            wait_for(lambda: transfers_of(lab, a, "finalizing_success") and transfers_of(lab, a, "transferring")
                     and transfers_of(lab, b, "transferring"), timeout=60,
                     what="VM a's first transfer finalizing, its second disk and VM b's first disk open")
            assert proc.poll() is None, "the run must still be reading"
            os.kill(proc.pid, signal.SIGTERM)
            done = finished(proc)
        assert done.returncode == 128 + signal.SIGTERM, done.stderr
        assert re.search(rf"ERROR .*{a}: stopped before archive .* was committed", done.stderr), done.stderr
        assert "Traceback" not in done.stderr
        assert slow_job.archives() == was[a].archives, "no archive, not even a Borg checkpoint"
        assert state_files(slow_job) == was[a].state, "no sidecar advanced"
        assert_nothing_open(lab, names)
        for name in names:
            assert was[name].checkpoint in checkpoint_ids(lab, name), "the checkpoint in use is still there"

        configure(slow_job, transfer={"bandwidth_limit": ""})
        results = slow_job.backup(a, b)
        for name in names:
            assert results[name]["mode"] == "incremental", results[name]["reason"]
            assert results[name]["warnings"] == [], results[name]
            slow_job.assert_identical(results[name])
            assert results[name]["checkpoint"] != first[name]["checkpoint"]
        assert_nothing_open(lab, names)
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                lab.delete_vm(name)
