"""One Borg repository shared by the real borgmatic and ovirt-borg, against the lab.

The borgmatic and ovirt-borg configurations are the ones of docs/BORGMATIC.md (recipe 1), with
only the paths, the keep rules and test-only settings changed: borgmatic runs ovirt-borg from
its command hooks, creates and prunes its own file archives, while ovirt-borg backs up and
prunes lab VMs in the same ``ssh://`` repository. ovirt-borg takes the repository, passphrase
command, ssh command, remote borg and Borg base directory from borgmatic's file. Afterwards
each side's newest archives and the foreign ones are there, borg check is clean and the VM
images restore byte-identically. The lock tests let borgmatic hold the repository lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from conftest import Job
from fixtures_borg import BORG, PASSPHRASE, archive_names, run_borg
from helpers import file_sha256, holding_lock, wait_for
from ovirt_borg.borgcli import Repo

DOC = Path(__file__).resolve().parent.parent / "docs" / "BORGMATIC.md"
BIN = Path(sys.executable).parent
TAG = "backup-nightly"


def doc_blocks(language: str) -> list[str]:
    """The fenced ``language`` blocks of recipe 1 in docs/BORGMATIC.md."""
    text = DOC.read_text()
    recipe = text[text.index("## Recipe 1"):text.index("## Recipe 2")]
    return re.findall(rf"```{language}\n(.*?)```", recipe, flags=re.S)


def replace(text: str, old: str, new: str) -> str:
    assert old in text, f"docs/BORGMATIC.md no longer holds {old!r}: update this test with it"
    return text.replace(old, new)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


class Shared:
    """A repository reached over ssh://, a borgmatic configuration for it, and an ovirt-borg job."""

    def __init__(self, lab, repo: Repo, directory: Path, *, vms: list[str], lock_wait: int = 3600,
                 keep_daily: int = 1, hooks: bool = True):
        self.lab, self.repo, self.dir = lab, repo, directory
        directory.mkdir(parents=True, exist_ok=True)
        self.files = directory / "files"
        self.files.mkdir()
        (self.files / "hosts").write_text("127.0.0.1 localhost\n")
        (self.files / "motd").write_text("shared repository\n" * 100)
        passphrase = directory / "borgmatic.passphrase"
        passphrase.write_text(PASSPHRASE + "\n")
        passphrase.chmod(0o600)
        self.borgmatic_config = directory / "borgmatic.yaml"
        self.job_config = directory / "vms.toml"

        yaml_text, toml_text = doc_blocks("yaml")[0], doc_blocks("toml")[0]
        yaml_text = replace(yaml_text, "ssh://backup@borg.example.com/./shared", repo.location)
        yaml_text = replace(yaml_text, "cat /etc/borgmatic/passphrase", f"cat {passphrase}")
        yaml_text = replace(yaml_text, "    - /etc\n    - /home\n", f"    - {self.files}\n")
        yaml_text = replace(yaml_text, "keep_daily: 7\nkeep_weekly: 4\nkeep_monthly: 6\n", f"keep_daily: {keep_daily}\n")
        yaml_text = replace(yaml_text, "lock_wait: 3600", f"lock_wait: {lock_wait}")
        yaml_text = replace(yaml_text, "/etc/ovirt-borg/vms.toml", str(self.job_config))
        if not hooks:
            yaml_text = yaml_text[:yaml_text.index("commands:")]
        # Test-only settings: the fake ssh, this venv's borg, private directories, a fixed host name.
        yaml_text += f"""
ssh_command: {repo.env['BORG_RSH']}
remote_path: {repo.env['BORG_REMOTE_PATH']}
borg_base_directory: {repo.env['BORG_BASE_DIR']}
local_path: {BORG}
user_runtime_directory: {directory / 'borgmatic-run'}
user_state_directory: {directory / 'borgmatic-state'}
archive_hostname: fileserver
"""
        self.borgmatic_config.write_text(yaml_text)

        job = tomllib.loads(toml_text)
        assert job["selection"] == {"tags": [TAG]}
        job["engine"] = {"url": lab.url, "user": lab.user, "password_file": str(lab.password_file),
                         "ca_file": str(lab.ca_file), "poll_interval": 0.05}
        job["repository"]["borgmatic_config"] = str(self.borgmatic_config)
        job["repository"]["lock_wait"] = lock_wait
        job["retention"] = {"keep_daily": keep_daily, "keep_weekly": 0, "keep_monthly": 0}
        job["selection"] = {"tags": [TAG], "names": vms}
        job["state"] = {"directory": str(directory / "state")}
        self.job_config.write_text("".join(
            f"[{section}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in options.items())
            for section, options in job.items()))

        # Neither tool inherits a Borg setting: everything comes from borgmatic's file.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
        self.env["HOME"] = str(directory / "home")
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.job = Job(lab, directory, self.job_config, Path(repo.location), self.env)

    def borgmatic(self, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "borgmatic"), "-c", str(self.borgmatic_config), *args],
                              capture_output=True, text=True, env=self.env, stdin=subprocess.DEVNULL)
        assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    @contextlib.contextmanager
    def borgmatic_holds_lock(self, seconds: int):
        """borgmatic (its ``borg`` action: ``borg with-lock``) holds the repository lock in the block."""
        local = Path(self.repo.location.split(":2222", 1)[1])
        with holding_lock([str(BIN / "borgmatic"), "-c", str(self.borgmatic_config), "borg", "with-lock",
                           self.repo.location, "sleep", str(seconds)], self.env,
                          lambda: (local / "lock.exclusive").is_dir(), what="borgmatic borg with-lock") as proc:
            yield proc

    def restored_sha(self, archive: str) -> str:
        out = self.dir / "restore" / archive
        proc = self.job.run("restore", archive, "--to-dir", str(out), "--json")
        disks = json.loads(proc.stdout)["disks"]
        assert len(disks) == 1
        return file_sha256(Path(disks[0]["path"]))


@pytest.fixture
def tagged_vms(lab_clean):
    """Two new up VMs carrying the tag the documented configuration selects; deleted afterwards."""
    names = [f"shared{i}-{os.getpid()}" for i in (1, 2)]
    try:
        for name in names:
            lab_clean.add_vm(name, disks=1, size="8M", tags=(TAG,))
        yield names
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                lab_clean.delete_vm(name)


def newest(names: list[str], start: str) -> list[str]:
    return sorted(n for n in names if n.startswith(start))


def wait_for_the_next_second() -> None:
    """Archive names carry the time to the second: return once the clock has left the current one."""
    now = int(time.time())
    wait_for(lambda: int(time.time()) > now, what="the next second")


def test_borgmatic_runs_ovirt_borg_from_its_hooks_in_one_repository(lab_clean, tagged_vms, ssh_repo, tmp_path):
    shared = Shared(lab_clean, ssh_repo, tmp_path / "shared", vms=tagged_vms)
    # foreign archives borgmatic and ovirt-borg must both leave alone
    run_borg(ssh_repo, "create", "{repo}::manual-etc-2026-11-20", str(shared.files))
    run_borg(ssh_repo, "create", f"{{repo}}::other-{tagged_vms[0]}-2026-11-26T01:00:00Z", str(shared.files))

    first = shared.borgmatic("-v", "1")
    assert first.stdout.count(": full, read ") == 2, first.stdout
    after_first = archive_names(ssh_repo)
    assert len(newest(after_first, "fileserver-files-")) == 1
    first_vm_archives = {vm: newest(after_first, f"ovirt-{vm}-") for vm in tagged_vms}
    assert all(len(names) == 1 for names in first_vm_archives.values()), after_first

    for vm in tagged_vms:
        lab_clean.write(vm, disk=1, offset=1 << 20, length=256 << 10)
    wait_for_the_next_second()  # borgmatic's next archive must not take the name of its first
    second = shared.borgmatic("-v", "1")
    assert second.stdout.count(": incremental, read ") == 2, second.stdout

    remaining = archive_names(ssh_repo)
    files = newest(remaining, "fileserver-files-")
    assert len(files) == 1 and files[0] not in after_first, "borgmatic pruned its older archive"
    for vm in tagged_vms:
        kept = newest(remaining, f"ovirt-{vm}-")
        assert len(kept) == 1 and kept != first_vm_archives[vm], f"ovirt-borg pruned {vm}'s older archive"
    assert "manual-etc-2026-11-20" in remaining
    assert f"other-{tagged_vms[0]}-2026-11-26T01:00:00Z" in remaining
    assert len(remaining) == 2 + 1 + len(tagged_vms), remaining

    run_borg(ssh_repo, "check", "--verify-data", "{repo}")
    for vm in tagged_vms:
        archive = newest(remaining, f"ovirt-{vm}-")[0]
        assert shared.restored_sha(archive) == shared.job.lab_image_sha(vm, 0), f"{vm} restores differently"
    # what the documentation warns about: a bare prune would take the VM archives away
    bare = run_borg(ssh_repo, "prune", "--dry-run", "--list", "--keep-daily", "1", "{repo}")
    would = [line for line in bare.stderr.decode().splitlines() if line.startswith("Would prune")]
    assert sum(f"ovirt-{vm}-" in line for line in would for vm in tagged_vms) >= len(tagged_vms) - 1
    assert any("manual-etc" in line for line in would)


def test_ovirt_borg_waits_for_borgmatic_then_goes_on(lab_clean, tagged_vms, ssh_repo, tmp_path):
    shared = Shared(lab_clean, ssh_repo, tmp_path / "shared", vms=tagged_vms[:1], lock_wait=60, hooks=False)
    vm = tagged_vms[0]
    with shared.borgmatic_holds_lock(3) as holder:
        proc = shared.job.run("backup", vm, "--json")
        # borgmatic's borg kept its lock to the end of its command (no one broke it), and
        # ovirt-borg, refused at first, took the lock after it
        assert holder.wait(timeout=60) == 0
    assert "locked by another borg process; waiting up to 60 s for its lock" in proc.stderr
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] and result["archive"] in archive_names(ssh_repo)
    assert shared.restored_sha(result["archive"]) == shared.job.lab_image_sha(vm, 0)


def test_repository_busy_after_lock_wait_and_the_chain_goes_on(lab_clean, tagged_vms, ssh_repo, tmp_path):
    shared = Shared(lab_clean, ssh_repo, tmp_path / "shared", vms=tagged_vms[:1], lock_wait=2, hooks=False)
    vm = tagged_vms[0]
    full = shared.job.backup(vm)[vm]
    assert full["mode"] == "full"
    lab_clean.write(vm, disk=1, offset=2 << 20, length=128 << 10)
    with shared.borgmatic_holds_lock(600) as holder:
        proc = shared.job.run("backup", vm, expect=6)
        assert holder.poll() is None, "ovirt-borg gave up after lock_wait, while the lock was still held"
    assert "waiting up to 2 s for its lock" in proc.stderr
    assert "is busy: another borg process holds its lock" in proc.stderr and "raise lock_wait" in proc.stderr
    assert PASSPHRASE not in proc.stderr
    assert not [b for b in lab_clean.stats()["open_backups"] if b["vm"] == vm]
    wait_for_the_next_second()
    after = shared.job.backup(vm)[vm]
    assert after["mode"] == "incremental", after["reason"]
    assert shared.restored_sha(after["archive"]) == shared.job.lab_image_sha(vm, 0)


def test_borgmatic_and_ovirt_borg_at_the_same_time_take_turns(lab_clean, tagged_vms, ssh_repo, tmp_path):
    shared = Shared(lab_clean, ssh_repo, tmp_path / "shared", vms=tagged_vms, lock_wait=120, hooks=False)
    # a few MiB of files, so that borgmatic's create holds the lock for a moment
    (shared.files / "data").write_bytes(os.urandom(8 << 20))
    backup = subprocess.Popen([str(BIN / "ovirt-borg"), "-c", str(shared.job_config), "backup", "--all", "--json"],
                              env=shared.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL)
    try:
        files = shared.borgmatic("create", "--stats")
        out, err = backup.communicate(timeout=300)
    finally:
        if backup.poll() is None:
            backup.kill()
            backup.communicate()
    assert backup.returncode == 0, err
    assert "Repository: " + ssh_repo.location in files.stdout, "borgmatic's --stats of its archive"
    results = json.loads(out)["archives"]
    assert sorted(r["vm"] for r in results) == sorted(tagged_vms)
    names = archive_names(ssh_repo)
    assert len(newest(names, "fileserver-files-")) == 1
    for result in results:
        assert result["archive"] in names
    run_borg(ssh_repo, "check", "{repo}")
    data = run_borg(ssh_repo, "extract", "--stdout", f"{{repo}}::{newest(names, 'fileserver-files-')[0]}",
                    str(shared.files / "data").lstrip("/")).stdout
    assert hashlib.sha256(data).hexdigest() == file_sha256(shared.files / "data")
