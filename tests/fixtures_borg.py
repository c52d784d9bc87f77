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
- ``cli_init``, ``cli_read_file``, ``cli_extract_to``, ``cli_open_stream``, ``cli_check``: borg
  commands run through ovirt-borg's command-line wrapper (``borgcli``), so that they raise its
  typed errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from helpers import exclusive_lock_taken, holding_lock
from ovirt_borg import borgcli
from ovirt_borg.borgcli import Repo
from ovirt_borg.errors import AuthError, NotFound, RepositoryError

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------
# Repository operations on the command line through ovirt-borg's wrapper (borgcli._run: its
# environment, its --log-json error translation). The product reads archives in-process
# (ovirt_borg.archive.reader); these check borgcli's error handling against real borg runs and
# give tests independent ways to create, read and check repositories.


def cli_init(repo: Repo, encryption: str = "repokey-blake2") -> None:
    """Create a new Borg repository at ``repo.location``.

    Given the repository and the encryption mode (``borg init --encryption``). Raises
    ``AuthError`` when an encrypting mode is asked for without a passphrase source in
    ``repo.env`` (Borg would otherwise create a repository with an empty passphrase), and
    ``RepositoryError`` if it exists already or cannot be created.
    """
    if encryption not in ("none", "authenticated", "authenticated-blake2") \
            and not any(name in repo.env for name in borgcli.PASSPHRASE_SOURCES):
        raise AuthError(f"refusing to create repository {repo.location} with encryption {encryption} "
                        f"and no passphrase: give it BORG_PASSPHRASE or BORG_PASSCOMMAND")
    borgcli._run(repo, "init", "--encryption", encryption, repo.location)
    log.info("created Borg repository %s (%s)", repo.location, encryption)


def _require_item(repo: Repo, archive: str, pattern: str, path: str) -> None:
    # borg extract of a path that is not in the archive succeeds silently; look first.
    out, _ = borgcli._run(repo, "list", "--json-lines", borgcli.archive_location(repo, archive), pattern,
                          archive=archive)
    if not out.strip():
        raise NotFound(f"{path} is not in archive {archive} of repository {repo.location}")


def cli_read_file(repo: Repo, archive: str, path: str) -> bytes:
    """Return the content of the file ``path`` in ``archive`` (for small files: OVF, sidecar).

    Raises ``NotFound`` if the archive or the path does not exist, other typed errors on failure.
    """
    _require_item(repo, archive, f"pf:{path}", path)
    out, _ = borgcli._run(repo, "extract", "--stdout", borgcli.archive_location(repo, archive), f"pf:{path}",
                          archive=archive)
    return out


def cli_extract_to(repo: Repo, archive: str, path: str, dest_dir: str | os.PathLike, sparse: bool = True) -> Path:
    """Extract ``path`` (a file or a directory) of ``archive`` below ``dest_dir``.

    With ``sparse`` all-zero chunks become holes (``borg extract --sparse``). Returns the path
    of the extracted copy (``dest_dir / path``). Raises ``NotFound`` if the archive or path does
    not exist, other typed errors on failure.
    """
    _require_item(repo, archive, f"pp:{path}", path)
    args = ["extract"] + (["--sparse"] if sparse else []) + [borgcli.archive_location(repo, archive), f"pp:{path}"]
    borgcli._run(repo, *args, archive=archive, cwd=dest_dir)
    return Path(dest_dir) / path


@contextlib.contextmanager
def cli_open_stream(repo: Repo, archive: str, path: str) -> Iterator[IO[bytes]]:
    """Stream the file ``path`` of ``archive`` (``borg extract --stdout``).

    A context manager giving a binary file object to read from. Leaving the block before the
    end stops borg; reaching the end checks borg's exit status. Raises ``NotFound`` if the
    archive or path does not exist, other typed errors if borg fails.
    """
    _require_item(repo, archive, f"pf:{path}", path)
    process = borgcli.BorgProcess(repo, "extract", "--stdout", borgcli.archive_location(repo, archive), f"pf:{path}",
                          archive=archive)
    try:
        yield process.proc.stdout
    except BaseException:
        process.terminate()
        raise
    if process.proc.stdout.closed or process.proc.stdout.read(1):
        # The reader stopped early: that is its choice, not a failure of borg.
        log.debug("stream of %s from archive %s closed before its end", path, archive)
        process.terminate()
        return
    process.proc.stdout.close()
    process.check()


def cli_check(repo: Repo, verify_data: bool = False) -> None:
    """Check the consistency of ``repo`` (``borg check``; ``--verify-data`` reads every chunk).

    Returns when the repository is clean. Raises ``RepositoryError`` when Borg finds problems,
    other typed errors when it cannot run.
    """
    args = ["check"] + (["--verify-data"] if verify_data else []) + [repo.location]
    try:
        borgcli._run(repo, *args, allow_warning=False)
    except RepositoryError as exc:
        raise RepositoryError(f"borg check found problems in repository {repo.location}; see the log "
                              f"and consider borg check --repair ({exc})") from exc
