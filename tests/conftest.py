"""Shared fixtures: the lab (fixtures_lab), real Borg repositories (fixtures_borg), the data
plane (fixtures_dataplane), ``job``: an ovirt-borg job against the session lab with a
repository and state directory of its own, and ``endpoint``: an HTTP server on 127.0.0.1 that
records what the plugins send."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import file_sha256, temporary_vms
from hook_helpers import Endpoint

pytest_plugins = ["fixtures_lab", "fixtures_borg", "fixtures_dataplane"]

BORG = str(Path(sys.executable).parent / "borg")


@dataclass
class Job:
    """An ovirt-borg job (config, repository, state) against a lab; runs the real CLI."""

    lab: object
    dir: Path
    config: Path
    repo: Path
    env: dict

    def run(self, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
        """Run ``ovirt-borg -c CONFIG ARGS`` as a user would; check the exit code."""
        cmd = [str(Path(sys.executable).parent / "ovirt-borg"), "-c", str(self.config), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, stdin=subprocess.DEVNULL)
        if expect is not None:
            assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def backup(self, *vms: str, extra: tuple[str, ...] = (), expect: int = 0) -> dict[str, dict]:
        """Back up VMs with --json; return {vm name: result}."""
        proc = self.run("backup", *vms, "--json", *extra, expect=expect)
        return {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}

    def borg(self, *args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([BORG, *args], capture_output=True, env=self.env, cwd=cwd)
        if check:
            assert proc.returncode == 0, proc.stderr.decode()
        return proc

    def archives(self) -> list[str]:
        out = self.borg("list", "--json", "--consider-checkpoints", str(self.repo)).stdout
        return [a["name"] for a in json.loads(out)["archives"]]

    def archive_image_sha(self, result: dict, disk_index: int) -> str:
        disk = result["disks"][disk_index]
        path = f"{result['vm']}/disks/{disk['alias']}-{disk['id']}.raw"
        data = self.borg("extract", "--stdout", f"{self.repo}::{result['archive']}", path).stdout
        assert len(data) == disk["size"]
        return hashlib.sha256(data).hexdigest()

    def lab_image_sha(self, vm: str, disk_index: int) -> str:
        out = self.dir / f"lab-{vm}-{disk_index}.raw"
        self.lab.image(vm, disk=disk_index + 1, out=out)
        try:
            return file_sha256(out)
        finally:
            out.unlink()

    def assert_identical(self, result: dict) -> None:
        for i, _ in enumerate(result["disks"]):
            assert self.archive_image_sha(result, i) == self.lab_image_sha(result["vm"], i), \
                f"{result['vm']} disk {i + 1} differs from the lab"


def make_job(lab, directory: Path, extra_toml: str = "") -> Job:
    directory.mkdir(parents=True, exist_ok=True)
    repo = directory / "repo"
    passphrase = directory / "passphrase"
    passphrase.write_text("job passphrase for tests\n")
    passphrase.chmod(0o600)
    env = {**os.environ, "BORG_BASE_DIR": str(directory / "borg-home"),
           "BORG_PASSCOMMAND": f"cat {passphrase}"}
    subprocess.run([BORG, "init", "--encryption=repokey-blake2", str(repo)], env=env, check=True,
                   capture_output=True)
    config = directory / "job.toml"
    config.write_text(f"""
[engine]
url = "{lab.url}"
user = "{lab.user}"
password_file = "{lab.password_file}"
ca_file = "{lab.ca_file}"
poll_interval = 0.05
[repository]
location = "{repo}"
passcommand = "cat {passphrase}"
lock_wait = 5
[state]
directory = "{directory / 'state'}"
{extra_toml}
""")
    return Job(lab, directory, config, repo, env)


@pytest.fixture(autouse=True)
def _forget_log_secrets():
    """Secrets registered for masking in one test must not garble another test's log lines."""
    from ovirt_borg import logs

    saved = set(logs._secrets)
    yield
    logs._secrets.clear()
    logs._secrets.update(saved)


_two_vms_numbers = itertools.count(1)


@pytest.fixture
def two_vms(lab_clean):
    """Two fresh up VMs (one 8 MiB disk each), 'P-a' and 'P-b'; deleted afterwards."""
    base = f"p{next(_two_vms_numbers)}-{os.getpid()}"
    with temporary_vms(lab_clean, [f"{base}-a", f"{base}-b"], disks=1, size="8M") as names:
        yield names


@pytest.fixture
def job(lab_clean, tmp_path) -> Job:
    """A job against the session lab with its own repository and state directory."""
    return make_job(lab_clean, tmp_path / "job")


@pytest.fixture
def endpoint() -> Endpoint:
    """An HTTP server on 127.0.0.1 recording every request (``hook_helpers.Endpoint``); closed afterwards."""
    server = Endpoint()
    try:
        yield server
    finally:
        server.close()
