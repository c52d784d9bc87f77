"""The real borgmatic and ovirt-borg on a real Borg repository: borgmatic's prune beside ours,
and ovirt-borg taking its repository and passphrase from borgmatic's file or Borg's environment.
Reading borgmatic's files without a repository is in tests/unit/test_borgmatic_reading.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures_borg import BORG, archive_names, run_borg
from ovirt_borg import borgmatic
from ovirt_borg.borgcli import Repo

BORGMATIC = str(Path(sys.executable).parent / "borgmatic")
PREFIX = "ovirt-"


# --------------------------------------------------------------------------------------------
# The real borgmatic on a real repository


@pytest.fixture
def shared_repo(tmp_path, borg_env) -> tuple[Repo, Path]:
    """A repository holding two VM archives of ovirt-borg and a hand-made one; a files directory."""
    repo = Repo(location=str(tmp_path / "repo"), env=dict(borg_env), lock_wait=5)
    run_borg(repo, "init", "--encryption", "repokey-blake2", "{repo}")
    files = tmp_path / "files"
    files.mkdir()
    (files / "hosts").write_text("127.0.0.1 localhost\n")
    for name in (f"{PREFIX}web1-2026-11-24T03:00:00Z", f"{PREFIX}web1-2026-11-25T03:00:00Z", "manual-etc"):
        run_borg(repo, "create", f"{{repo}}::{name}", str(files))
    return repo, files


def run_borgmatic(tmp_path: Path, repo: Repo, files: Path, extra: str, *args: str) -> subprocess.CompletedProcess:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(repo.env["BORG_PASSPHRASE"] + "\n")
    config = tmp_path / "borgmatic.yaml"
    config.write_text(f"""
source_directories: [{files}]
repositories:
    - path: {repo.location}
encryption_passcommand: cat {passphrase}
borg_base_directory: {repo.env['BORG_BASE_DIR']}
user_runtime_directory: {tmp_path / 'bm-run'}
user_state_directory: {tmp_path / 'bm-state'}
local_path: {BORG}
archive_hostname: fileserver
keep_daily: 1
{extra}""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
    env["HOME"] = str(tmp_path / "home")
    proc = subprocess.run([BORGMATIC, "-c", str(config), *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_a_warned_borgmatic_config_really_prunes_vm_archives(tmp_path, shared_repo):
    repo, files = shared_repo
    extra = 'match_archives: "*"\n'
    run_borgmatic(tmp_path, repo, files, extra, "create")
    warnings = borgmatic.overlap_warnings(borgmatic.load(tmp_path / "borgmatic.yaml"), PREFIX)
    assert len(warnings) == 1 and "every archive" in warnings[0]
    proc = run_borgmatic(tmp_path, repo, files, extra, "--dry-run", "prune", "--list")
    would = [line for line in (proc.stdout + proc.stderr).splitlines() if "Would prune" in line]
    assert any(f"{PREFIX}web1-" in line for line in would), proc.stdout + proc.stderr
    assert any("manual-etc" in line for line in would)


def test_the_recommended_borgmatic_config_leaves_vm_archives_alone(tmp_path, shared_repo):
    repo, files = shared_repo
    extra = ('archive_name_format: "{hostname}-files-{now:%Y-%m-%dT%H:%M:%S.%f}"\n'
             'match_archives: "sh:{hostname}-files-*"\n')
    for _ in range(3):
        run_borgmatic(tmp_path, repo, files, extra, "create")
    shared = borgmatic.load(tmp_path / "borgmatic.yaml")
    assert borgmatic.overlap_warnings(shared, PREFIX) == []
    proc = run_borgmatic(tmp_path, repo, files, extra, "-v", "2", "prune", "compact")
    # the glob we predict is the one borgmatic hands to borg (Borg expands {hostname} itself)
    handed = re.search(r"borg prune .*--glob-archives (\S+)", proc.stdout + proc.stderr)
    assert handed and handed[1].replace("{hostname}", "fileserver") == borgmatic.archive_glob(shared)
    names = archive_names(repo)
    files_archives = [n for n in names if n.startswith("fileserver-files-")]
    assert len(files_archives) == 1, names
    assert [n for n in names if not n.startswith("fileserver-files-")] == [
        f"{PREFIX}web1-2026-11-24T03:00:00Z", f"{PREFIX}web1-2026-11-25T03:00:00Z", "manual-etc"]
    run_borg(repo, "check", "{repo}")


def test_cli_reads_repository_and_passphrase_from_borgmatic(tmp_path, shared_repo):
    repo, files = shared_repo
    run_borgmatic(tmp_path, repo, files, 'archive_name_format: "{hostname}-files-{now}"\n', "create")
    job = tmp_path / "job.toml"
    job.write_text(f"""
[engine]
url = "https://engine.example.com/ovirt-engine/api"
[repository]
borgmatic_config = "{tmp_path / 'borgmatic.yaml'}"
[state]
directory = "{tmp_path / 'state'}"
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
    proc = subprocess.run([str(Path(sys.executable).parent / "ovirt-borg"), "-c", str(job), "list", "--json"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert [row["name"] for row in json.loads(proc.stdout)["archives"]] == [
        f"{PREFIX}web1-2026-11-24T03:00:00Z", f"{PREFIX}web1-2026-11-25T03:00:00Z"]
    assert repo.env["BORG_PASSPHRASE"] not in proc.stderr
    assert "WARNING" not in proc.stderr


def test_cli_honours_borg_environment_variables_alone(tmp_path, ssh_repo):
    """Without location, passphrase or borgmatic settings, Borg's own variables reach Borg."""
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(ssh_repo.env["BORG_PASSPHRASE"] + "\n")
    files = tmp_path / "files"
    files.mkdir()
    (files / "a").write_text("a\n")
    run_borg(ssh_repo, "create", f"{{repo}}::{PREFIX}web1-2026-11-25T03:00:00Z", str(files))
    job = tmp_path / "job.toml"
    job.write_text(f'[engine]\nurl = "https://engine.example.com/ovirt-engine/api"\n'
                   f'[state]\ndirectory = "{tmp_path / "state"}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
    env.update(BORG_REPO=ssh_repo.location, BORG_PASSCOMMAND=f"cat {passphrase}",
               BORG_RSH=ssh_repo.env["BORG_RSH"], BORG_REMOTE_PATH=ssh_repo.env["BORG_REMOTE_PATH"],
               BORG_BASE_DIR=ssh_repo.env["BORG_BASE_DIR"])
    proc = subprocess.run([str(Path(sys.executable).parent / "ovirt-borg"), "-c", str(job), "list", "--json"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert [row["name"] for row in json.loads(proc.stdout)["archives"]] == [f"{PREFIX}web1-2026-11-25T03:00:00Z"]
    # and a wrong BORG_RSH is Borg's problem, reported as a repository error (exit 9)
    env["BORG_RSH"] = str(tmp_path / "no-such-ssh")
    proc = subprocess.run([str(Path(sys.executable).parent / "ovirt-borg"), "-c", str(job), "list"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 9, proc.stderr
