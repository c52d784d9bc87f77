"""Borg repository fixtures for tests: real repositories, local and reached over ``ssh://``.

tests/conftest.py lists ``"fixtures_borg"`` in ``pytest_plugins``, so the fixtures are available to
every test; the helpers are imported (``from fixtures_borg import run_borg, lock_holder``).

- ``borg_env``: the Borg environment of a test (passphrase, ``BORG_BASE_DIR`` below tmp_path,
  so caches, keys and security data never touch the user's home).
- ``local_repo``: a fresh repokey-blake2 repository in tmp_path, as a ``Repo``.
- ``ssh_repo``: a fresh repokey-blake2 repository reached as ``ssh://backup@borg.test:2222/...``
  through Borg's ``RemoteRepository`` and a real ``borg serve``: ``BORG_RSH`` is a small script
  that drops the ssh options and the host and runs the rest here, ``BORG_REMOTE_PATH`` is the
  venv's borg.
- ``run_borg(repo, *args)``: run the venv's borg on a repository, for checking what the code
  under test did with independent means.
- ``lock_holder(repo)``: a context manager in which another borg process (``borg with-lock``)
  holds the repository's exclusive lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import exclusive_lock_taken, holding_lock
from ovirt_borg.borgcli import Repo

PASSPHRASE = "test passphrase: correct horse battery staple"
BORG = str(Path(sys.executable).parent / "borg")

_FAKE_SSH = """#!/bin/sh
# Stands in for ssh: drop the options and the host, run the remote command here.
while [ $# -gt 0 ]; do
    case "$1" in
        -p|-o|-i|-l|-F|-E|-J|-b|-c|-e|-m|-O|-Q|-S|-W|-w) shift 2 ;;
        -*) shift ;;
        *) shift; break ;;
    esac
done
exec "$@"
"""


def run_borg(repo: Repo, *args: str, check: bool = True, cwd: str | os.PathLike | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the venv's ``borg <args>`` with the environment of ``repo``; return the result.

    ``{repo}`` in an argument is replaced by the repository location. With ``check`` a failure
    raises ``AssertionError`` carrying borg's stderr.
    """
    argv = [BORG, *(arg.replace("{repo}", repo.location) for arg in args)]
    full_env = {**os.environ, **repo.env, **(env or {})}
    result = subprocess.run(argv, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed with {result.returncode}: "
                             f"{result.stderr.decode(errors='replace')}")
    return result


def archive_names(repo: Repo) -> list[str]:
    """Return the names of all archives in ``repo`` (checkpoints included), via ``borg list``."""
    out = run_borg(repo, "list", "--json", "--consider-checkpoints", "{repo}").stdout
    return [entry["name"] for entry in json.loads(out)["archives"]]


@pytest.fixture
def borg_env(tmp_path: Path) -> dict[str, str]:
    """The Borg environment of one test: passphrase and a private BORG_BASE_DIR."""
    base = tmp_path / "borg-home"
    base.mkdir()
    return {"BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(base)}


@pytest.fixture
def local_repo(tmp_path: Path, borg_env: dict[str, str]) -> Repo:
    """A fresh local repokey-blake2 repository."""
    repo = Repo(location=str(tmp_path / "repo"), env=dict(borg_env), lock_wait=5)
    run_borg(repo, "init", "--encryption", "repokey-blake2", "{repo}")
    return repo


@pytest.fixture
def ssh_repo(tmp_path: Path, borg_env: dict[str, str]) -> Repo:
    """A fresh repokey-blake2 repository reached as ssh:// through a local borg serve."""
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text(_FAKE_SSH)
    fake_ssh.chmod(0o755)
    env = dict(borg_env, BORG_RSH=str(fake_ssh), BORG_REMOTE_PATH=BORG)
    repo = Repo(location=f"ssh://backup@borg.test:2222{tmp_path}/ssh-repo", env=env, lock_wait=5)
    run_borg(repo, "init", "--encryption", "repokey-blake2", "{repo}")
    return repo


@contextlib.contextmanager
def lock_holder(repo: Repo, timeout: float = 20) -> Iterator[subprocess.Popen]:
    """Hold the exclusive lock of the local ``repo`` with another borg process inside the block."""
    with holding_lock([BORG, "with-lock", repo.location, "sleep", "600"], {**os.environ, **repo.env},
                      exclusive_lock_taken(Path(repo.location)), what="borg with-lock", timeout=timeout) as proc:
        yield proc
