"""The fault suite: bad nights against the lab, with real imageio, qemu-nbd and Borg.

Each case breaks one thing (the data path, an engine call, a signal, the repository, the
input), runs the real ``ovirt-borg`` command line and checks the same promises:

- one clear error line and the documented exit code (no traceback);
- no archive, not even a Borg checkpoint, and ``borg check`` clean;
- the state directory byte for byte as before, the engine checkpoint it names still there;
- no backup and no image transfer of the VM left open on the engine;
- the next run succeeds (incremental where the chain allows it) with byte-identical images.

Run them alone with ``pytest -m faults``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

from ovirt_borg.config import toml_value

from conftest import Job, make_job
from fixtures_borg import lock_holder
from helpers import holding_lock, lab_engine_settings, tcp_peer_ports, temporary_vm, wait_for, with_peak_rss
from ovirt_borg import config as config_mod
from ovirt_borg.borgcli import Repo

pytestmark = pytest.mark.faults

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")
LAB_CLI = str(Path(sys.executable).parent / "ovirt-borg-lab")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
MiB = 1 << 20
_names = itertools.count(1)


# -- helpers -------------------------------------------------------------------------------------


def dump_toml(data: dict) -> str:
    """Render a config dict (sections of scalars, lists and inline tables, [hooks.NAME] tables) as TOML."""
    lines = []
    for section, table in data.items():
        if section == "hooks":
            for name, options in table.items():
                lines.append(f"[hooks.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in options.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def configure(job: Job, **sections: dict) -> None:
    """Set options of the job's configuration, e.g. ``configure(job, engine={"timeout": 2})``."""
    data = tomllib.loads(job.config.read_text())
    for section, values in sections.items():
        if section == "hooks":
            data.setdefault("hooks", {}).update(values)
        else:
            data.setdefault(section, {}).update(values)
    job.config.write_text(dump_toml(data))


def job_repo(job: Job) -> Repo:
    """The job's repository as a ``Repo`` for the Borg fixtures' helpers."""
    env = {k: v for k, v in job.env.items() if k.startswith("BORG_")}
    return Repo(location=str(job.repo), env=env, lock_wait=5)


@dataclass
class Before:
    """What must not change when a run fails."""

    archives: list[str]
    state: dict[str, bytes]
    checkpoint: str | None


def state_files(job: Job) -> dict[str, bytes]:
    """The state directory's sidecars and block digests (the job lock file is not state)."""
    root = job.dir / "state"
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith("job-")}


def before(job: Job, vm: str) -> Before:
    files = state_files(job)
    checkpoint = None
    for name, data in files.items():
        if name.endswith(".json"):
            doc = json.loads(data)
            if doc["vm"]["name"] == vm:
                checkpoint = doc["checkpoint_id"]
    return Before(job.archives(), files, checkpoint)


def vm_disk_ids(lab, vm: str) -> set[str]:
    try:
        return {d["id"] for d in lab.vm_info(vm)["disks"]}
    except Exception:
        return set()


def open_on_engine(lab, vm: str, finalizing_ok: bool = False) -> tuple[list, list]:
    """The VM's backups and image transfers the engine still has open.

    With ``finalizing_ok`` a backup whose finalize was accepted does not count: a real engine
    finishes it on its own, the lab only when it is polled.
    """
    stats = lab.stats()
    disks = vm_disk_ids(lab, vm)
    backups = [b for b in stats["open_backups"] if b["vm"] == vm
               and not (finalizing_ok and b["phase"] == "finalizing")]
    transfers = [t for t in stats["open_transfers"] if t["disk"] in disks]
    return backups, transfers


def check_log_lines(stderr: str) -> list[str]:
    """Every stderr line is one log record (no traceback, no multi-line message); return the errors."""
    lines = stderr.splitlines()
    stray = [line for line in lines if line.split(" ", 1)[0] not in LEVELS]
    assert not stray, f"lines that are not log records:\n{stderr}"
    return [line for line in lines if line.startswith(("ERROR", "CRITICAL"))]


def assert_failed_cleanly(job: Job, vm: str, proc, code: int, was: Before, message: str, *,
                          finalizing_ok: bool = False, check_repository: bool = True) -> None:
    """The run failed with ``code`` and one error line matching ``message``, and left nothing."""
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\n{proc.stdout}\n{proc.stderr}"
    errors = check_log_lines(proc.stderr)
    assert errors and re.search(message, errors[-1]), f"no error line matching {message!r}:\n{proc.stderr}"
    assert job.archives() == was.archives, "a failed run must leave no archive (nor a Borg checkpoint)"
    assert state_files(job) == was.state, "a failed run must not touch the state directory"
    backups, transfers = open_on_engine(job.lab, vm, finalizing_ok)
    assert backups == [] and transfers == [], (backups, transfers)
    if was.checkpoint:
        assert was.checkpoint in checkpoint_ids(job.lab, vm), "the checkpoint in use was removed"
    if check_repository:
        job.borg("check", str(job.repo))


def checkpoint_ids(lab, vm: str) -> list[str]:
    return [c["id"] for c in lab.stats()["checkpoints"].get(vm, [])]


def recover(job: Job, vm: str, mode: str = "incremental") -> dict:
    """The next run succeeds in ``mode`` with images identical to the lab's disks."""
    result = job.backup(vm)[vm]
    assert result["mode"] == mode, result["reason"]
    job.assert_identical(result)
    return result


_runs = itertools.count(1)


class Run(subprocess.Popen):
    """A background ovirt-borg run whose stderr goes to a file, so that a test can read the log
    while the run goes on (``logged``) without a reader thread."""

    def __init__(self, args: list[str], *, stderr_file: Path, **options):
        self.stderr_file = stderr_file
        with open(stderr_file, "wb") as stderr:
            super().__init__(args, stderr=stderr, **options)

    def logged(self, pattern: str) -> bool:
        """True once a line of the run's log so far matches ``pattern``."""
        return re.search(pattern, self.stderr_file.read_text(errors="replace"), re.M) is not None


def start(job: Job, *args: str, ignoring: tuple[int, ...] = ()) -> Run:
    """Start ``ovirt-borg -c CONFIG ARGS`` in the background (its own process group), with the
    signals ``ignoring`` ignored from the start (as ``nohup`` does)."""
    def ignore() -> None:
        for signum in ignoring:
            signal.signal(signum, signal.SIG_IGN)

    return Run([OVIRT_BORG, "-c", str(job.config), *args], stderr_file=job.dir / f"run-{next(_runs)}.stderr",
               env=job.env, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
               start_new_session=True, preexec_fn=ignore if ignoring else None)


@contextlib.contextmanager
def running(job: Job, *args: str, ignoring: tuple[int, ...] = ()):
    """A background ovirt-borg run, killed (with its children) if the test leaves early."""
    proc = start(job, *args, ignoring=ignoring)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


# What a -v run logs when a read timed out and is retried, and once a disk's reads ended
# (imageio.ImageioClient.read_ranges: every reader finished, whether the reads failed or not).
TIMED_OUT_AND_RETRIED = r"^WARNING .*failed \(attempt \d+ of \d+\): .*timed out.*; retrying in "
READS_ENDED = r"^DEBUG .*: read \d+ ranges, \d+ bytes in "


def host_bytes(lab) -> int:
    return lab.stats()["imageio.host.bytes"]


def assert_resumed(stderr: str, result: dict) -> None:
    """Failed ranges were resumed, not read again: the bytes received are the bytes planned."""
    planned = [int(n) for n in re.findall(r"to read \((\d+) bytes[,)]", stderr)]
    assert planned and sum(planned) == sum(d["bytes_read"] for d in result["disks"]), (planned, result)


def signalled_while_reading(job: Job, signum: int, *args: str,
                            ignoring: tuple[int, ...] = ()) -> subprocess.CompletedProcess:
    """Run ovirt-borg with ``args`` in the background, send it ``signum`` once it has read its
    first bytes from imageio (still running), and return the finished run."""
    start_bytes = host_bytes(job.lab)
    with running(job, *args, ignoring=ignoring) as proc:
        wait_for(lambda: host_bytes(job.lab) > start_bytes, what="the first bytes read")
        assert proc.poll() is None, "the run must still be reading"
        os.kill(proc.pid, signum)
        return finished(proc)


def finished(proc: Run, timeout: float = 120) -> subprocess.CompletedProcess:
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out,
                                       proc.stderr_file.read_text(errors="replace"))


@contextlib.contextmanager
def stopped(pid: int):
    """SIGSTOP a lab process (a hung daemon) inside the block; SIGCONT it whatever happens."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture
def vm(lab_clean):
    """A fresh running VM with one 32 MiB disk (data in two regions); deleted afterwards."""
    with temporary_vm(lab_clean, "f", ignore_delete_errors=True, disks=1, size="32M") as name:
        yield name


@pytest.fixture
def backed_up(job, vm):
    """``vm`` with one full backup in the job's repository and new guest writes since."""
    recover(job, vm, mode="full")
    job.lab.write(vm, disk=1, percent=3)
    return vm


# -- the data path -------------------------------------------------------------------------------


def test_imageio_restart_mid_transfer_is_ridden_out(job, lab_clean):
    """The host's imageio restarts while a disk is read: the failed ranges resume, the run succeeds."""
    lab = lab_clean
    name = f"big{next(_names)}-{os.getpid()}"
    lab.add_vm(name, disks=1, size="64M")
    try:
        lab.write(name, disk=1, percent=40)
        # about 1 s of reading: the restart (armed at the first byte served) lands mid-read
        configure(job, transfer={"bandwidth_limit": "32M"})
        restarts = lab.stats()["imageio.host.restarts"]
        lab.fault("imageio_restart")
        proc = job.run("-v", "backup", name, "--json")  # -v: each disk's planned reads
        result = json.loads(proc.stdout)["archives"][0]
        assert lab.stats()["imageio.host.restarts"] == restarts + 1, "the restart must land mid-transfer"
        assert "retrying" in proc.stderr
        assert_resumed(proc.stderr, result)
        job.assert_identical(result)
        assert open_on_engine(lab, name) == ([], [])
    finally:
        lab.delete_vm(name)


def test_imageio_restart_beyond_the_retry_budget_fails_cleanly(job, backed_up):
    vm = backed_up
    job.lab.write(vm, disk=1, percent=40)
    configure(job, transfer={"retries": 0, "bandwidth_limit": "16M"})
    was = before(job, vm)
    restarts = job.lab.stats()["imageio.host.restarts"]
    job.lab.fault("imageio_restart")
    calls = job.lab.stats()["calls"]
    # a restart costs the ranges in flight: with no retries the transfer is lost
    proc = job.run("backup", vm, expect=None)
    assert job.lab.stats()["imageio.host.restarts"] == restarts + 1
    assert_failed_cleanly(job, vm, proc, 8, was, r"imageio .*failed")
    # the download failed on our side: finalized (a download can always be), never cancelled
    after = job.lab.stats()["calls"]
    assert after.get("transfer.finalize", 0) == calls.get("transfer.finalize", 0) + 1, (calls, after)
    assert after.get("transfer.cancel", 0) == calls.get("transfer.cancel", 0)
    configure(job, transfer={"retries": 5, "bandwidth_limit": ""})
    recover(job, vm)


def test_hung_imageio_read_times_out_and_resumes(job, lab_clean):
    """imageio stops answering mid-read (SIGSTOP) for longer than read_timeout: retried, resumed."""
    lab = lab_clean
    name = f"hung{next(_names)}-{os.getpid()}"
    lab.add_vm(name, disks=1, size="64M")
    try:
        lab.write(name, disk=1, percent=40)
        # a hung daemon stalls new connections too (the TLS handshake), hence connect_timeout
        configure(job, transfer={"read_timeout": 0.5, "connect_timeout": 0.5, "retries": 6,
                                 "bandwidth_limit": "16M"})
        start_bytes = host_bytes(lab)
        with running(job, "-v", "backup", name, "--json") as proc:  # -v: each disk's planned reads
            wait_for(lambda: host_bytes(lab) > start_bytes, what="the first bytes read")
            with stopped(lab.stats()["imageio.host.pid"]):
                # resumed once a read has timed out and waits for its retry
                wait_for(lambda: proc.logged(TIMED_OUT_AND_RETRIED), what="a read timing out")
            done = finished(proc)
        assert done.returncode == 0, done.stderr
        assert re.search(r"timed out|TimeoutError", done.stderr), done.stderr
        result = json.loads(done.stdout)["archives"][0]
        assert_resumed(done.stderr, result)
        job.assert_identical(result)
    finally:
        lab.delete_vm(name)


def test_hung_imageio_beyond_the_retry_budget_fails_cleanly(job, lab_clean):
    lab = lab_clean
    name = f"hung{next(_names)}-{os.getpid()}"
    lab.add_vm(name, disks=1, size="32M")
    try:
        recover(job, name, mode="full")
        lab.write(name, disk=1, percent=40)
        was = before(job, name)
        configure(job, transfer={"read_timeout": 0.3, "connect_timeout": 0.3, "retries": 1,
                                 "bandwidth_limit": "16M"},
                  backup={"verify_sample": 0})  # no check of the dirty bitmap: the disk's reads are one
        start_bytes = host_bytes(lab)
        with running(job, "-v", "backup", name) as proc:  # -v: the end of the reads is logged
            wait_for(lambda: host_bytes(lab) > start_bytes, what="the first bytes read")
            with stopped(lab.stats()["imageio.host.pid"]):
                # Resumed once the run has given up reading (a range used its two attempts), not
                # before: a daemon resumed earlier could serve the second attempt. The engine cannot
                # be asked meanwhile: it waits for the stopped daemon too.
                wait_for(lambda: proc.logged(READS_ENDED), what="the reads given up")
            done = finished(proc)
        assert_failed_cleanly(job, name, done, 8, was, r"after 2 attempts.*(timed out|Timeout)")
        configure(job, transfer={"retries": 5, "bandwidth_limit": ""})
        recover(job, name)
    finally:
        lab.delete_vm(name)


# -- the engine ----------------------------------------------------------------------------------


# Engine calls made before the archive is committed; a persistent 500 on any of them fails the
# VM's backup (after the retries of the idempotent ones) and must leave nothing behind.
CALLS_BEFORE_COMMIT = {
    "vms.list": 4, "vm.get": 4, "diskattachments.list": 4, "disk.get": 4, "checkpoints.list": 4,
    "backups.list": 4, "backups.add": 4, "backup.get": 4, "backup.disks": 4, "imagetransfers.add": 4,
    "transfer.get": 8,
}


def test_engine_500_before_commit_fails_cleanly(job, backed_up):
    vm = backed_up
    was = before(job, vm)
    configure(job, engine={"retries": 1})  # the retries themselves are the next test's subject
    for call, code in CALLS_BEFORE_COMMIT.items():
        job.lab.fault(f"engine_500:{call}")
        try:
            proc = job.run("backup", vm, expect=None)
        finally:
            job.lab.fault(f"engine_500:{call}", on=False)
        try:
            # a failed backup.get also stops the wait for the finalize that was accepted
            assert_failed_cleanly(job, vm, proc, code, was, r"HTTP 500", finalizing_ok=call == "backup.get",
                                  check_repository=False)
        except AssertionError as e:
            raise AssertionError(f"engine_500:{call}: {e}") from None
    job.borg("check", str(job.repo))
    recover(job, vm)


def test_single_engine_500s_are_retried(job, backed_up):
    """One failure of each idempotent call (a proxy hiccup, a busy engine) does not fail the run."""
    vm = backed_up
    calls = ["vms.list", "vm.get", "disk.get", "checkpoints.list", "backups.list", "backup.get",
             "backup.disks", "transfer.get", "transfer.finalize", "backup.finalize", "checkpoints.delete"]
    for call in calls:
        job.lab.fault(f"engine_500:{call}", times=1)
    proc = job.run("backup", vm, "--json")
    assert job.lab.faults()["active"] == {}, "every fault was hit"
    assert len(re.findall(r"WARNING .*response code is 500.*retrying", proc.stderr)) == len(calls), proc.stderr
    result = json.loads(proc.stdout)["archives"][0]
    assert result["mode"] == "incremental" and result["warnings"] == []
    job.assert_identical(result)
    assert open_on_engine(job.lab, vm) == ([], [])
    assert checkpoint_ids(job.lab, vm) == [result["checkpoint"]]


def test_engine_500_on_transfer_finalize_cancels_the_transfer(job, backed_up):
    vm = backed_up
    was = before(job, vm)
    job.lab.fault("engine_500:transfer.finalize")
    proc = job.run("backup", vm, expect=None)
    job.lab.fault("engine_500:transfer.finalize", on=False)
    assert_failed_cleanly(job, vm, proc, 4, was, r"finalizing image transfer .*HTTP 500")
    recover(job, vm)


def test_repository_error_after_the_disks_are_read_fails_cleanly(job, backed_up):
    """The engine backup is being finalized beside the commit when the repository refuses more.

    Nothing changed in the guest, so the first object written is the VM's OVF, after every disk
    was read: the run must still end with no archive and the engine backup finalized.
    """
    vm = backed_up
    job.lab.write(vm, disk=1, percent=50)
    recover(job, vm)  # the repository now holds more than Borg's smallest quota (10 MB)
    was = before(job, vm)
    job.borg("config", str(job.repo), "storage_quota", "10M")
    try:
        proc = job.run("-vv", "backup", vm, expect=None)
    finally:
        job.borg("config", str(job.repo), "storage_quota", "0")
    assert_failed_cleanly(job, vm, proc, 9, was, r"quota")
    finalize_started = proc.stderr.index("finalizing engine backup")
    assert finalize_started < proc.stderr.index("quota"), proc.stderr
    recover(job, vm)


def test_engine_500_on_backup_finalize_beside_the_commit_is_a_warning(job, backed_up):
    """The archive is committed and complete; the engine backup left open is finalized next run."""
    vm = backed_up
    job.lab.fault("engine_500:backup.finalize")
    proc = job.run("backup", vm, "--json", expect=1)
    job.lab.fault("engine_500:backup.finalize", on=False)
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] and result["mode"] == "incremental"
    assert re.search(r"WARNING .*finaliz.*HTTP 500", proc.stderr), proc.stderr
    job.assert_identical(result)
    job.borg("check", str(job.repo))
    assert len(open_on_engine(job.lab, vm)[0]) == 1, "the backup stays open until the next run"
    proc = job.run("backup", vm, "--json")
    assert "stale backup" in proc.stderr
    again = json.loads(proc.stdout)["archives"][0]
    assert again["mode"] == "incremental", again["reason"]
    job.assert_identical(again)
    assert open_on_engine(job.lab, vm) == ([], [])


def test_engine_500_on_checkpoint_purge_is_a_warning(job, backed_up):
    vm = backed_up
    old = checkpoint_ids(job.lab, vm)
    job.lab.fault("engine_500:checkpoints.delete")
    proc = job.run("backup", vm, "--json", expect=1)
    job.lab.fault("engine_500:checkpoints.delete", on=False)
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] and re.search(r"WARNING .*purge old checkpoints", proc.stderr), proc.stderr
    assert checkpoint_ids(job.lab, vm) == old + [result["checkpoint"]]
    job.assert_identical(result)
    again = recover(job, vm)
    assert checkpoint_ids(job.lab, vm) == [again["checkpoint"]], "the next run purges them"


def test_engine_refuses_the_connection(job, backed_up, other_pki, tmp_path):
    """Unreachable, wrong password, untrusted certificate (another CA, or the system CAs): the
    run stops before anything starts; for TLS there is no fallback and the password is not sent."""
    vm = backed_up
    was = before(job, vm)
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    cases = [
        ({"url": "https://127.0.0.1:9/ovirt-engine/api"}, 4, r"cannot connect to the engine at 127\.0\.0\.1:9"),
        ({"password_file": str(wrong)}, 5, r"refused the credentials"),
        ({"ca_file": str(other_pki.ca_file)}, 4, r"TLS certificate is not trusted"),
        ({"ca_file": ""}, 4, r"TLS certificate is not trusted"),
    ]
    good = tomllib.loads(job.config.read_text())["engine"]
    for options, code, message in cases:
        configure(job, engine={**good, **options})
        logins = job.lab.stats()["calls"].get("sso.token", 0)
        proc = job.run("backup", vm, expect=None)
        try:
            assert_failed_cleanly(job, vm, proc, code, was, message, check_repository=False)
            assert "not the password" not in proc.stderr
            if "ca_file" in options:
                assert job.lab.stats()["calls"].get("sso.token", 0) == logins, "the password was sent"
        except AssertionError as e:
            raise AssertionError(f"{options}: {e}") from None
    configure(job, engine=good)
    job.borg("check", str(job.repo))
    recover(job, vm)


@pytest.mark.parametrize("ahead", [0, 1])
def test_expired_token_mid_run_logs_in_again(job, lab_clean, ahead):
    """The SSO token expires between two VMs: the SDK logs in again and the run goes on."""
    lab = lab_clean
    first, second = (f"tok{next(_names)}-{os.getpid()}" for _ in range(2))
    for name in (first, second):
        lab.add_vm(name, disks=1, size="16M")
    try:
        expire = f"{LAB_CLI} fault --dir {lab.dir} expired_tokens >/dev/null"
        configure(job, backup={"prepare_ahead": ahead},
                  hooks={"command": {"before_vm": f"case {{vm}} in {second}) {expire};; esac"}})
        logins = lab.stats()["calls"].get("sso.token", 0)
        results = job.backup(first, second)
        logins_now = lab.stats()["calls"]["sso.token"]
        if ahead:
            # up to four connections (main, prepare, finish, transfers), each at most once again
            assert logins + 2 <= logins_now <= logins + 8
        else:
            assert logins_now == logins + 2, "one login, one after the expiry"
        for name in (first, second):
            job.assert_identical(results[name])
    finally:
        for name in (first, second):
            lab.delete_vm(name)


# -- checkpoints, backups and transfers on the engine ----------------------------------------------


@pytest.mark.parametrize("fault, reason", [
    ("invalid_checkpoint", "invalid"),
    ("missing_checkpoint", "no longer exists"),
    # hybrid (cluster level 4.7): the backup starts, the disk's transfer is stopped by the engine
    ("broken_bitmap", "the incremental backup failed: .*cancelled_system"),
])
def test_checkpoint_problem_falls_back_to_full_and_purges(job, backed_up, fault, reason):
    vm = backed_up
    job.lab.fault(fault, vm=vm)
    backups_added = job.lab.stats()["calls"].get("backups.add", 0)
    result = recover(job, vm, mode="full")
    assert re.search(reason, result["reason"]), result["reason"]
    assert checkpoint_ids(job.lab, vm) == [result["checkpoint"]], "the unusable checkpoint is purged"
    assert open_on_engine(job.lab, vm) == ([], [])
    if fault == "broken_bitmap":  # the failed incremental, then the full in the same run
        assert job.lab.stats()["calls"]["backups.add"] == backups_added + 2
    job.lab.write(vm, disk=1, percent=1)
    recover(job, vm)


@pytest.mark.parametrize("level, status, reason", [
    # live (StartVmBackupCommand): the failed redefinition removes every checkpoint, 400 "[]"
    ("4.6", "up", r"could not redefine checkpoint .* \(a missing or broken bitmap\)"),
    # cold: as hybrid, the transfer of the incremental disk is stopped (cancelled_system)
    ("4.6", "down", r"the incremental backup failed: .*cancelled_system"),
])
def test_broken_bitmap_on_live_and_cold_backups_reads_in_full(job, lab_clean, level, status, reason):
    """A broken bitmap never fails the same incremental night after night: whatever shape the
    engine gives it, the run reads the VM in full and the next one is incremental again."""
    lab = lab_clean
    lab.cluster(f"level-{level}", level)
    vm = f"bb{next(_names)}-{os.getpid()}"
    lab.add_vm(vm, disks=1, size="16M", status=status, cluster=f"level-{level}")
    try:
        recover(job, vm, mode="full")
        if status == "up":
            lab.write(vm, disk=1, percent=3)
        lab.fault("broken_bitmap", vm=vm)
        proc = job.run("backup", vm, "--json")
        result = json.loads(proc.stdout)["archives"][0]
        assert result["mode"] == "full" and re.search(reason, result["reason"]), result["reason"]
        job.assert_identical(result)
        assert checkpoint_ids(lab, vm) == [result["checkpoint"]]
        assert open_on_engine(lab, vm) == ([], [])
        if status == "up":
            lab.write(vm, disk=1, percent=1)
        recover(job, vm)
    finally:
        lab.delete_vm(vm)


def test_stale_backup_in_ready_is_finalized(job, backed_up):
    vm = backed_up
    configure(job, backup={"foreign_stale_hours": 0})  # the fault's backup has no description
    job.lab.fault("stale_backup", vm=vm)
    proc = job.run("backup", vm, "--json")
    assert "stale backup" in proc.stderr
    result = json.loads(proc.stdout)["archives"][0]
    assert result["mode"] == "incremental", result["reason"]
    job.assert_identical(result)
    assert open_on_engine(job.lab, vm) == ([], [])


def test_transfer_that_never_starts_fails_cleanly(job, backed_up):
    """transfer_fail (finished_failure) and transfer_stuck (never transferring, engine timeout)."""
    vm = backed_up
    was = before(job, vm)
    configure(job, engine={"timeout": 0.5})
    # transfer_fail twice: the incremental's and the full's the run falls back to (the engine
    # stopping an incremental disk's transfer is how a hybrid or cold backup shows a bad bitmap)
    for fault, times, message in (("transfer_fail", 2, r"did not start.*cancelled_system"),
                                  ("transfer_stuck", 1, r"did not start.*timed out")):
        job.lab.fault(fault, times=times)
        proc = job.run("backup", vm, expect=None)
        try:
            assert_failed_cleanly(job, vm, proc, 8, was, message, check_repository=False)
        except AssertionError as e:
            raise AssertionError(f"{fault}: {e}") from None
    job.borg("check", str(job.repo))
    configure(job, engine={"timeout": 30})
    recover(job, vm)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_while_a_transfer_starts_cancels_it(job, backed_up, signum):
    """Stopped while the engine prepares the image transfer (transfer_stuck: it stays
    initializing): the transfer is cancelled and the engine backup finalized before the exit."""
    vm = backed_up
    was = before(job, vm)
    job.lab.fault("transfer_stuck")
    with running(job, "backup", vm) as proc:
        wait_for(lambda: open_on_engine(job.lab, vm)[1], what="the image transfer started")
        polls = job.lab.stats()["calls"].get("transfer.get", 0)
        wait_for(lambda: job.lab.stats()["calls"].get("transfer.get", 0) >= polls + 3,
                 what="a few polls of the transfer's phase")
        assert proc.poll() is None, "the run must still wait for the transfer"
        os.kill(proc.pid, signum)
        done = finished(proc)
    name = signal.Signals(signum).name
    assert_failed_cleanly(job, vm, done, 128 + signum, was, rf"interrupted by {name}")
    assert re.search(rf"ERROR .*{vm}: stopped before archive .* was committed", done.stderr), done.stderr
    recover(job, vm)


def test_no_dirty_extents_reads_the_disk_in_full(job, backed_up):
    """imageio answers 404 to dirty extents in an incremental (a ticket without them): that disk
    is read in full in the same run, with a warning (exit 1), instead of failing every night."""
    vm = backed_up
    job.lab.fault("no_dirty_extents")  # the first disk's transfer
    proc = job.run("backup", vm, "--json", expect=1)
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] and result["mode"] == "incremental", result
    assert re.search(r"WARNING .*no dirty extents.*reading the whole disk", proc.stderr), proc.stderr
    first, *others = result["disks"]
    assert first["mode"] == "full" and first["reused"] == 0
    assert all(d["mode"] == "incremental" for d in others)
    job.assert_identical(result)
    job.lab.write(vm, disk=1, percent=1)
    recover(job, vm)


def test_backup_stuck_in_finalizing(job, backed_up):
    """Finalizing outlasts [engine] timeout (a hybrid backup removing its snapshot takes long):
    the archive stands with no warning, the checkpoint purge the engine refuses meanwhile (409)
    waits for the next run, which waits the finalize out and purges."""
    vm = backed_up
    old = checkpoint_ids(job.lab, vm)
    # polls at 0, 0.1, 0.25, 0.45, 0.65 s: the fifth, still finalizing, is past the timeout
    configure(job, engine={"timeout": 0.5, "poll_interval": 0.2})
    job.lab.fault("finalize_stuck")
    proc = job.run("backup", vm, "--json")
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] and result["warnings"] == [], result
    assert re.search(r"INFO .*still finalizing.*next run waits for it", proc.stderr), proc.stderr
    assert re.search(r"INFO .*old checkpoints stay until the next run.*during a backup", proc.stderr), proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    job.assert_identical(result)
    assert [b["phase"] for b in open_on_engine(job.lab, vm)[0]] == ["finalizing"]
    assert checkpoint_ids(job.lab, vm) == old + [result["checkpoint"]]
    configure(job, engine={"timeout": 30, "poll_interval": 0.05})
    proc = job.run("backup", vm, "--json")
    assert "finish finalizing" in proc.stderr
    again = json.loads(proc.stdout)["archives"][0]
    assert checkpoint_ids(job.lab, vm) == [again["checkpoint"]]
    assert again["mode"] == "incremental", again["reason"]
    job.assert_identical(again)
    assert open_on_engine(job.lab, vm) == ([], [])


def test_snapshot_left_by_a_hybrid_backup_is_a_warning_naming_it(job, backed_up):
    """The engine's snapshot merge fails: the backup still ends succeeded (HybridBackupCommand),
    the archive stands, and the run warns with the snapshot named (exit 1)."""
    vm = backed_up
    job.lab.fault("snapshot_left")
    proc = job.run("backup", vm, "--json", expect=1)
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] and result["mode"] == "incremental", result
    left = [b for b in _backups(job.lab, vm) if b.snapshot is not None]
    snapshot_id = left[-1].snapshot.id
    assert len(result["warnings"]) == 1 and snapshot_id in result["warnings"][0], result["warnings"]
    assert "Auto-generated for Backup VM" in result["warnings"][0]
    assert re.search(rf"WARNING .*{snapshot_id}", proc.stderr), proc.stderr
    job.assert_identical(result)
    assert open_on_engine(job.lab, vm) == ([], [])


def _backups(lab, vm: str):
    """The VM's backups as the engine lists them (through the SDK)."""
    with lab.connection() as connection:
        vms = connection.system_service().vms_service()
        found = vms.list(search=f"name={vm}")[0]
        return vms.vm_service(found.id).backups_service().list()


@pytest.mark.parametrize("call", ["backup.finalize", "transfer.finalize"])
def test_a_lost_finalize_reply_is_taken_as_done(job, backed_up, call):
    """The engine carried out a finalize but its reply was lost: the repeated finalize answers
    400 "already ..." (a backup) or is accepted again (a transfer); the run goes on, no warning."""
    vm = backed_up
    job.lab.fault(f"reply_lost:{call}")
    calls = job.lab.stats()["calls"].get(call, 0)
    proc = job.run("backup", vm, "--json")
    assert job.lab.faults()["active"] == {}, "the fault was hit"
    assert job.lab.stats()["calls"][call] >= calls + 2, "the finalize was repeated"
    result = json.loads(proc.stdout)["archives"][0]
    assert result["mode"] == "incremental" and result["warnings"] == [], result
    job.assert_identical(result)
    assert open_on_engine(job.lab, vm) == ([], [])
    job.lab.write(vm, disk=1, percent=1)
    recover(job, vm)


def test_backup_finalize_waits_for_a_transfer_still_ending(lab_clean):
    """StopVmBackupCommand refuses (409) while a transfer of the backup is not finished_*; a
    cancel takes the engine several steps: the finalize is repeated until the engine took them."""
    from ovirt_borg.engine import Engine

    import ovirtsdk4.types as types

    lab = lab_clean
    vm = f"end{next(_names)}-{os.getpid()}"
    lab.add_vm(vm, disks=1, size="8M")
    try:
        settings = lab_engine_settings(lab)
        with Engine(settings) as engine, lab.connection() as connection:
            info = lab.vm_info(vm)
            backup_id = engine.start_backup(info["id"], [info["disks"][0]["id"]], None)
            engine.wait_backup_ready(info["id"], backup_id)
            transfers = connection.system_service().image_transfers_service()
            transfer = transfers.add(types.ImageTransfer(
                disk=types.Disk(id=info["disks"][0]["id"]), backup=types.Backup(id=backup_id),
                direction=types.ImageTransferDirection.DOWNLOAD, format=types.DiskFormat.RAW))
            service = transfers.image_transfer_service(transfer.id)
            wait_for(lambda: service.get().phase == types.ImageTransferPhase.TRANSFERRING, what="transferring")
            service.cancel()  # nobody polls it now: the engine takes its steps on its own
            finalizes = lab.stats()["calls"].get("backup.finalize", 0)
            end = engine.finalize_backup(info["id"], backup_id)
            assert end.phase == "succeeded" and end.snapshot_left is None
            assert lab.stats()["calls"]["backup.finalize"] > finalizes + 1, "the 409 was repeated"
            assert service.get().phase == types.ImageTransferPhase.FINISHED_FAILURE
        assert open_on_engine(lab, vm) == ([], [])
    finally:
        lab.delete_vm(vm)


def test_idle_transfers_outlast_ovirt_borg_own_pauses(job, lab_clean):
    """The engine cancels a download whose ticket idles past inactivity_timeout (imageio: no read
    running or completed). ovirt-borg's own pauses between reads (here a bandwidth limit spacing
    1 MiB reads 4 s apart) must not cost the transfer: it gives the engine a timeout above them."""
    lab = lab_clean
    vm = f"idle{next(_names)}-{os.getpid()}"
    lab.add_vm(vm, disks=1, size="16M")
    try:
        configure(job, transfer={"inactivity_timeout": 1, "extents_timeout": 1.0, "bandwidth_limit": "256K"})
        proc = job.run("backup", vm, "--json")
        result = json.loads(proc.stdout)["archives"][0]
        assert result["mode"] == "full" and result["warnings"] == []
        job.assert_identical(result)
        assert open_on_engine(lab, vm) == ([], [])
    finally:
        lab.delete_vm(vm)


@pytest.mark.parametrize("status", ["down", "up"])
def test_cluster_level_4_4(job, lab_clean, status):
    """Below cluster level 4.5 the engine makes no checkpoints and refuses a cold backup with 400
    "Incremental backup is not supported.": a powered-off VM is read through engine image
    transfers, a running one in full each night; nothing is left open."""
    lab = lab_clean
    lab.cluster("level-4.4", "4.4")
    vm = f"old{next(_names)}-{os.getpid()}"
    lab.add_vm(vm, disks=1, size="16M", status=status, cluster="level-4.4")
    try:
        for run in range(2):
            proc = job.run("backup", vm, "--json")
            result = json.loads(proc.stdout)["archives"][0]
            assert result["mode"] == "full" and result["checkpoint"] is None, result
            if status == "down":
                assert result["path"] == "engine-transfer"
                assert re.search(r"WARNING .*Incremental backup is not supported", proc.stderr), proc.stderr
            else:
                assert result["path"] == "backup"
                if run:
                    assert "no engine checkpoint" in result["reason"], result["reason"]
            job.assert_identical(result)
            assert open_on_engine(lab, vm) == ([], [])
            assert checkpoint_ids(lab, vm) == []
    finally:
        lab.delete_vm(vm)


# -- signals -------------------------------------------------------------------------------------


@pytest.fixture
def slow_vm(job, lab_clean):
    """A VM backed up once, then with 13 MiB of new data and a bandwidth limit: a slow run."""
    name = f"sig{next(_names)}-{os.getpid()}"
    lab_clean.add_vm(name, disks=1, size="32M")
    try:
        recover(job, name, mode="full")
        lab_clean.write(name, disk=1, percent=40)
        configure(job, transfer={"bandwidth_limit": "8M"})
        yield name
    finally:
        with contextlib.suppress(Exception):
            lab_clean.delete_vm(name)


@pytest.mark.parametrize("signum, writer", [(signal.SIGTERM, "internal"), (signal.SIGINT, "internal"),
                                            (signal.SIGTERM, "cli")])
def test_signal_during_transfer_aborts_cleanly(job, slow_vm, signum, writer):
    """Stopped while reading the first of two VMs: clean abort; the second VM's engine backup,
    started ahead ([backup] prepare_ahead, 4 by default), is finalized, and nothing else of it
    starts (test_overlap has prepare_ahead = 0, where it does not start at all).

    With the ``cli`` writer the image streams into a ``borg import-tar`` child, which must roll
    back too.
    """
    vm = slow_vm
    lab = job.lab
    configure(job, repository={"writer": writer})
    other = f"{vm}-next"
    lab.add_vm(other, disks=1, size="16M")
    try:
        was = before(job, vm)
        backups_added = lab.stats()["calls"].get("backups.add", 0)
        done = signalled_while_reading(job, signum, "backup", vm, other)
        name = signal.Signals(signum).name
        assert_failed_cleanly(job, vm, done, 128 + signum, was, rf"interrupted by {name}")
        assert lab.stats()["calls"]["backups.add"] <= backups_added + 2, "at most the next VM is prepared"
        assert open_on_engine(lab, other) == ([], []), "the next VM's backup prepared ahead is finalized"
        assert not [a for a in job.archives() if other in a]
        configure(job, transfer={"bandwidth_limit": ""})
        recover(job, vm)
    finally:
        lab.delete_vm(other)


def test_a_signal_ignored_at_start_stays_ignored(job, slow_vm):
    """Under ``nohup`` (SIGHUP ignored when ovirt-borg starts) a closed session does not stop the run."""
    vm = slow_vm
    done = signalled_while_reading(job, signal.SIGHUP, "backup", vm, "--json", ignoring=(signal.SIGHUP,))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["archives"][0]
    assert result["mode"] == "incremental"
    configure(job, transfer={"bandwidth_limit": ""})
    job.assert_identical(result)


def test_sigkill_is_recovered_by_the_next_run(job, slow_vm):
    """Killed mid-transfer: the next run breaks Borg's stale lock and closes the engine's backup."""
    vm = slow_vm
    lab = job.lab
    was = before(job, vm)
    start_bytes = host_bytes(lab)
    with running(job, "backup", vm) as proc:
        wait_for(lambda: host_bytes(lab) > start_bytes, what="the first bytes read")
        os.killpg(proc.pid, signal.SIGKILL)
        finished(proc)
    lock = job.repo / "lock.exclusive"
    assert lock.exists(), "a killed writer leaves its Borg lock"
    backups, transfers = open_on_engine(lab, vm)
    assert backups and transfers, "a killed run leaves its backup and transfer open"
    assert job.archives() == was.archives
    assert state_files(job) == was.state
    configure(job, transfer={"bandwidth_limit": ""})
    proc = job.run("backup", vm, "--json")
    assert "stale backup" in proc.stderr
    result = json.loads(proc.stdout)["archives"][0]
    assert result["mode"] == "incremental", result["reason"]
    job.assert_identical(result)
    assert open_on_engine(lab, vm) == ([], [])
    assert not lock.exists()
    job.borg("check", str(job.repo))


# -- the repository ------------------------------------------------------------------------------


def test_repository_locked_or_wrong_passphrase(job, backed_up, tmp_path):
    """Another borg holds the lock (exit 6 after lock_wait), or the passphrase is wrong (exit 5)."""
    vm = backed_up
    was = before(job, vm)
    configure(job, repository={"lock_wait": 2})
    checkpoints = checkpoint_ids(job.lab, vm)
    for writer, holder in itertools.product(("internal", "cli"), (lock_holder, shared_lock_holder)):
        configure(job, repository={"writer": writer})
        backups_added = job.lab.stats()["calls"].get("backups.add", 0)
        with holder(job_repo(job)) as holding:
            proc = job.run("backup", vm, expect=None)
            # exit 6 comes from waiting lock_wait, not from the holder's end: it holds the lock still
            still_held = holding.poll() is None
        try:
            assert still_held, "the lock holder ended before the run gave up"
            assert re.search(r"INFO .*locked by another borg process.*; waiting up to 2 s for its lock",
                             proc.stderr), proc.stderr
            assert_failed_cleanly(job, vm, proc, 6, was, r"busy: another borg process holds its lock",
                                  check_repository=False)
            # the lock is taken before the engine is asked: no backup, no new checkpoint
            assert job.lab.stats()["calls"].get("backups.add", 0) == backups_added
            assert checkpoint_ids(job.lab, vm) == checkpoints
        except AssertionError as e:
            raise AssertionError(f"{writer} writer, {holder.__name__}: {e}") from None
    configure(job, repository={"writer": "internal"})

    wrong = tmp_path / "wrong-passphrase"
    wrong.write_text("not the passphrase\n")
    good = tomllib.loads(job.config.read_text())["repository"]["passcommand"]
    configure(job, repository={"passcommand": f"cat {wrong}"})
    env = dict(job.env)
    del job.env["BORG_PASSCOMMAND"]  # the configured one must be the one used
    try:
        proc = job.run("backup", vm, expect=None)
        # restore and verify say it as it is too (not "is it an ovirt-borg archive?")
        for args in (["restore", was.archives[-1], "--to-dir", str(tmp_path / "out")], ["verify", was.archives[-1]]):
            refused = job.run(*args, expect=5)
            assert re.search(r"ERROR .*passphrase .*wrong", refused.stderr), refused.stderr
            assert "ovirt-borg archive?" not in refused.stderr
    finally:
        job.env = env
    assert_failed_cleanly(job, vm, proc, 5, was, r"passphrase .*wrong")
    assert "not the passphrase" not in proc.stderr
    configure(job, repository={"passcommand": good})
    recover(job, vm)


@contextlib.contextmanager
def shared_lock_holder(repo: Repo, timeout: float = 20):
    """Hold a shared lock of the local ``repo`` (as ``borg mount`` or ``borg list`` do) inside the block."""
    marker = Path(repo.location).parent / f".shared-lock-{os.getpid()}"
    marker.unlink(missing_ok=True)
    code = ("import pathlib, sys, time; from borg.repository import Repository\n"
            "with Repository(sys.argv[1], exclusive=False, lock_wait=1):\n"
            "    pathlib.Path(sys.argv[2]).touch(); time.sleep(600)\n")
    try:
        with holding_lock([sys.executable, "-c", code, repo.location, str(marker)], {**os.environ, **repo.env},
                          marker.exists, what="a shared lock holder", timeout=timeout) as proc:
            yield proc
    finally:
        marker.unlink(missing_ok=True)


def test_repository_refused_while_the_engine_prepares_its_backup(job, backed_up):
    """The writer opens the repository while the engine prepares its backup. When Borg refuses
    it there (its security directory has seen a newer manifest: a replayed or swapped
    repository), the started engine backup is finalized and nothing else changes."""
    vm = backed_up
    was = before(job, vm)
    info = json.loads(job.borg("info", "--json", str(job.repo)).stdout)
    security = job.dir / "borg-home" / ".config" / "borg" / "security" / info["repository"]["id"]
    timestamp = security / "manifest-timestamp"
    saved = timestamp.read_text()
    calls = job.lab.stats()["calls"]
    timestamp.write_text("2099-01-01T00:00:00.000000")
    try:
        proc = job.run("backup", vm, expect=None)
    finally:
        timestamp.write_text(saved)
    assert_failed_cleanly(job, vm, proc, 9, was, r"Borg cache .* does not match the repository")
    after = job.lab.stats()["calls"]
    for call in ("backups.add", "backup.finalize"):
        assert after.get(call, 0) == calls.get(call, 0) + 1, (call, calls, after)
    recover(job, vm)


@pytest.fixture
def small_fs(tmp_path):
    """A 48 MiB tmpfs; unmounted afterwards."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_repository_disk_full(lab_clean, small_fs, tmp_path):
    lab = lab_clean
    job = make_job(lab, tmp_path / "job")
    job.borg("init", "--encryption=repokey-blake2", str(small_fs / "repo"))
    configure(job, repository={"location": str(small_fs / "repo")})
    job.repo = small_fs / "repo"
    name = f"full{next(_names)}-{os.getpid()}"
    lab.add_vm(name, disks=1, size="64M")
    try:
        recover(job, name, mode="full")
        lab.write(name, disk=1, percent=40)
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        filler = small_fs / "filler"
        with open(filler, "wb") as f:
            f.write(b"\xff" * (free - 4 * MiB))
        was = before(job, name)
        proc = job.run("backup", name, expect=None)
        assert_failed_cleanly(job, name, proc, 9, was, r"is full; prune and compact")
        filler.unlink()
        recover(job, name)
    finally:
        lab.delete_vm(name)


# -- the inventory changes under the run -------------------------------------------------------------


def test_vm_deleted_before_its_turn(job, lab_clean):
    lab = lab_clean
    first, second = (f"del{next(_names)}-{os.getpid()}" for _ in range(2))
    for name in (first, second):
        lab.add_vm(name, disks=1, size="16M")
    try:
        delete = f"{LAB_CLI} delete-vm --dir {lab.dir} {second} >/dev/null"
        configure(job, hooks={"command": {"before_vm": f"case {{vm}} in {second}) {delete};; esac"}})
        proc = job.run("backup", first, second, "--json", expect=11)
        results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
        assert results[first]["ok"] and not results[second]["ok"]
        errors = check_log_lines(proc.stderr)
        assert re.search(rf"{second}.*no longer exists", errors[-1]), proc.stderr
        job.assert_identical(results[first])
        assert [a for a in job.archives() if second in a] == []
        configure(job, hooks={"command": {"before_vm": "true"}})
        lab.write(first, disk=1, percent=2)
        recover(job, first)
    finally:
        lab.delete_vm(first)
        with contextlib.suppress(Exception):
            lab.delete_vm(second)


def test_disk_detached_before_its_turn(job, lab_clean):
    lab = lab_clean
    name = f"det{next(_names)}-{os.getpid()}"
    lab.add_vm(name, disks=2, size="16M")
    try:
        recover(job, name, mode="full")
        detach = f"{LAB_CLI} detach-disk --dir {lab.dir} --disk 2 {name} >/dev/null"
        configure(job, hooks={"command": {"before_vm": detach}})
        result = recover(job, name)
        assert len(result["disks"]) == 1
    finally:
        lab.delete_vm(name)


# -- restore -------------------------------------------------------------------------------------


def test_restore_into_a_missing_storage_domain(job, backed_up):
    vm = backed_up
    [archive] = job.archives()
    disks = sorted(os.listdir(job.lab.dir / "storage"))
    calls = job.lab.stats()["calls"]
    proc = job.run("restore", archive, "--vm-name", f"{vm}-r", "--storage-domain", "nope", expect=11)
    assert re.search(r"storage domain 'nope' does not exist", check_log_lines(proc.stderr)[-1])
    proc = job.run("restore", archive, "--disk", job.lab.vm_info(vm)["disks"][0]["id"],
                   "--storage-domain", "nope", expect=11)
    assert re.search(r"storage domain 'nope' does not exist", check_log_lines(proc.stderr)[-1])
    assert sorted(os.listdir(job.lab.dir / "storage")) == disks
    after = job.lab.stats()["calls"]
    assert [after.get(c, 0) - calls.get(c, 0) for c in ("disks.add", "vms.add", "imagetransfers.add")] == [0, 0, 0]


def test_upload_failing_midway_removes_the_new_disks(job, lab_clean):
    lab = lab_clean
    name = f"up{next(_names)}-{os.getpid()}"
    lab.add_vm(name, disks=2, size="32M")
    try:
        lab.write(name, disk=2, percent=60)
        result = recover(job, name, mode="full")
        disks = sorted(os.listdir(lab.dir / "storage"))
        configure(job, transfer={"read_timeout": 0.5, "connect_timeout": 0.5, "retries": 0,
                                 "bandwidth_limit": "8M"})
        written = lab.stats()["imageio.host.bytes_written"]
        with running(job, "restore", result["archive"], "--vm-name", f"{name}-r",
                     "--storage-domain", "data1") as proc:
            # the second disk's upload is under way: the first one is complete
            wait_for(lambda: lab.stats()["imageio.host.bytes_written"] > written + 3 * MiB,
                     what="the second disk's upload")
            port = urllib.parse.urlsplit(lab.stats()["imageio.host.url"]).port
            with stopped(lab.stats()["imageio.host.pid"]):
                # Resumed once the run has given up the upload: with no retries a timed-out write
                # ends it, and its connections to the daemon are closed before the transfer is
                # ended (which waits for the stopped daemon on the engine's side).
                wait_for(lambda: port not in tcp_peer_ports(proc.pid), what="the upload given up")
            done = finished(proc)
        assert done.returncode == 8, done.stderr
        assert re.search(r"imageio .*failed", check_log_lines(done.stderr)[-1]), done.stderr
        assert sorted(os.listdir(lab.dir / "storage")) == disks, "the new disks must be removed"
        assert f"{name}-r" not in [v["name"] for v in lab.describe()["vms"]]
        assert lab.stats()["open_transfers"] == []
    finally:
        lab.delete_vm(name)
        with contextlib.suppress(Exception):
            lab.delete_vm(f"{name}-r")


# -- bad input -----------------------------------------------------------------------------------


# Values of the wrong type for each option type (a bool is not a number, a number not a string).
_WRONG = {str: [12, True, ["x"]], int: ["twelve", True, 1.5], float: ["twelve", True],
          bool: ["yes", 1], list[str]: ["x", [1], [True]], dict[str, str]: ["256K", ["x"], {"db-*": 1}]}


def _config_fields():
    """(section, key, type) of every option of every section of the configuration."""
    sections = typing.get_type_hints(config_mod.Config)
    for section in dataclasses.fields(config_mod.Config):
        if section.name in ("hooks", "path"):
            continue
        hints = typing.get_type_hints(sections[section.name])
        for option in dataclasses.fields(sections[section.name]):
            yield section.name, option.name, hints[option.name]


def test_every_config_field_with_a_wrong_type_is_refused(job):
    base = tomllib.loads(job.config.read_text())
    checked = 0
    for section, key, tp in _config_fields():
        for wrong in _WRONG[tp]:
            data = json.loads(json.dumps(base))
            data.setdefault(section, {})[key] = wrong
            with pytest.raises(config_mod.ConfigError, match=rf"'{section}\.{key}' must be"):
                config_mod.from_dict(tomllib.loads(dump_toml(data)), "job.toml")
            checked += 1
    assert checked > 80
    # and through the command line: exit 2, one line naming the key
    configure(job, transfer={"readers": "four"})
    proc = job.run("backup", "vm1", expect=2)
    assert re.search(r"'transfer\.readers' must be an integer, got 'four'", check_log_lines(proc.stderr)[-1])


@pytest.mark.parametrize("section, values, message", [
    ("engine", {"urll": "x"}, r"unknown key 'engine\.urll'"),
    ("nonsense", {"a": 1}, r"unknown section \[nonsense\]"),
    ("engine", {"url": "http://127.0.0.1:1/ovirt-engine/api"}, r"plain http://"),
    ("engine", {"password_file": "/nonexistent/password"}, r"cannot read the engine password"),
    ("engine", {"password_file": "/"}, r"cannot read the engine password"),
    ("engine", {"ca_file": "/nonexistent/ca.pem"}, r"ca_file"),
])
def test_bad_input_is_a_clear_config_error(job, section, values, message):
    configure(job, **{section: values})
    proc = job.run("backup", "vm1", expect=2)
    assert re.search(message, check_log_lines(proc.stderr)[-1]), proc.stderr
    assert job.archives() == []


def test_archive_that_does_not_exist(job, tmp_path):
    for args in (["restore", "ovirt-nope-2020-01-01T00:00:00Z", "--to-dir", str(tmp_path / "out")],
                 ["verify", "ovirt-nope-2020-01-01T00:00:00Z"],
                 ["verify", "nope"]):
        proc = job.run(*args, expect=11)
        assert re.search(r"no archive", check_log_lines(proc.stderr)[-1]), proc.stderr


def test_tampered_sidecar_means_a_full_backup(job, backed_up):
    vm = backed_up
    [path] = (job.dir / "state").rglob("*.json")
    doc = json.loads(path.read_text())
    doc["checkpoint_id"] = 42
    path.write_text(json.dumps(doc))
    proc = job.run("backup", vm, "--json")
    assert re.search(r"ERROR .*ignoring the local sidecar .*checkpoint_id", proc.stderr), proc.stderr
    result = json.loads(proc.stdout)["archives"][0]
    assert result["mode"] == "full"
    job.assert_identical(result)
    assert json.loads(path.read_text())["archive"] == result["archive"], "a valid sidecar replaces it"
    job.lab.write(vm, disk=1, percent=1)
    recover(job, vm)


# -- security ------------------------------------------------------------------------------------


def test_state_permissions_and_no_secrets_in_logs(job, backed_up):
    vm = backed_up
    daemon_log = job.lab.dir / "run" / "imageio" / "host" / "daemon.log"
    known = len(daemon_log.read_text().splitlines())
    plain = job.run("-v", "backup", vm)
    job.lab.write(vm, disk=1, percent=1)
    as_json = job.run("--log-json", "-vv", "backup", vm)
    tickets = set(re.findall(r"'uuid': '([0-9a-f-]{36})'", "\n".join(daemon_log.read_text().splitlines()[known:])))
    assert len(tickets) >= 2, "each run used a ticket"
    secrets = {"engine password": job.lab.password,
               "Borg passphrase": "job passphrase for tests"} | {f"ticket {t}": t for t in tickets}
    for proc in (plain, as_json):
        for what, secret in secrets.items():
            assert secret not in proc.stderr and secret not in proc.stdout, f"{what} in the output"
    for line in as_json.stderr.splitlines():
        json.loads(line)
    state = job.dir / "state"
    for path in [state, *state.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {mode:o}"


def test_tls_verification_is_on_by_default(job, vm):
    """Verification of the engine and imageio is on unless engine.insecure says otherwise (loudly)."""
    from ovirt_borg.jobs import transfer_settings

    config = config_mod.load(job.config)
    settings = transfer_settings(config)
    assert settings.verify and settings.ca_file == str(job.lab.ca_file)
    data = tomllib.loads(job.config.read_text())
    del data["engine"]["ca_file"]
    defaults = config_mod.from_dict(data, "job.toml")
    assert not defaults.engine.insecure
    assert transfer_settings(defaults).verify and transfer_settings(defaults).ca_file is None
    # without a CA file the lab's certificates are refused (test_engine_refuses_the_connection);
    # only the explicit opt-out connects, and says so
    configure(job, engine={"ca_file": "", "insecure": True})
    proc = job.run("backup", vm, "--json")
    assert re.search(r"WARNING .*insecure is set: TLS certificates .* NOT verified", proc.stderr)
    job.assert_identical(json.loads(proc.stdout)["archives"][0])


# -- load ----------------------------------------------------------------------------------------


def test_eight_vms_in_one_run_with_bounded_memory(job, lab_clean):
    lab = lab_clean
    names = [f"load{i}-{os.getpid()}" for i in range(8)]
    for index, name in enumerate(names):
        lab.add_vm(name, disks=2 + index % 2, size="8M")
    try:
        peak_file = job.dir / "peak-rss"
        proc = subprocess.run(with_peak_rss([OVIRT_BORG, "-c", str(job.config), "backup", *names, "--json"],
                                            peak_file), env=job.env, text=True, capture_output=True, timeout=600)
        output = {"out": proc.stdout, "err": proc.stderr}
        assert proc.returncode == 0, output["err"]
        peak_mib = int(peak_file.read_text()) / 1024
        assert peak_mib < 400, f"peak RSS {peak_mib:.0f} MiB"
        results = {r["vm"]: r for r in json.loads(output["out"])["archives"]}
        assert sorted(results) == sorted(names) and all(r["mode"] == "full" for r in results.values())
        for name in names:
            assert open_on_engine(lab, name) == ([], [])
        # verify takes a shared lock: three at a time
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            verified = list(pool.map(lambda name: job.run("verify", name, expect=None), names))
        for name, proc in zip(names, verified):
            assert proc.returncode == 0 and re.match(r"\S+: OK \(", proc.stdout), (name, proc.stdout, proc.stderr)
        job.assert_identical(results[names[-1]])
    finally:
        for name in names:
            lab.delete_vm(name)
