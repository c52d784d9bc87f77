"""The borg command-line wrapper against real Borg repositories."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shlex
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers import file_sha256
from fixtures_borg import (PASSPHRASE, archive_names, cli_check, cli_extract_to, cli_init, cli_open_stream,
                           cli_read_file, lock_holder, run_borg)
from ovirt_borg import archive, borgcli
from ovirt_borg.borgcli import Repo
from ovirt_borg.errors import AuthError, ConfigError, NotFound, RepositoryBusy, RepositoryError

DISK = "vm1/disks/root-0001.raw"


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A directory with a VM's files: a sparse disk image (data, hole, data) and an OVF."""
    root = tmp_path / "source"
    disk = root / DISK
    disk.parent.mkdir(parents=True)
    rnd = random.Random(7)
    with open(disk, "wb") as f:
        f.write(rnd.randbytes(1 << 20))
        f.seek(3 << 20)
        f.write(rnd.randbytes(1 << 20))
    (root / "vm1" / "vm.ovf").write_bytes(b"<ovf>vm1</ovf>")
    return root


def create(repo: Repo, name: str, source: Path, timestamp: str | None = None) -> None:
    args = ["create", "--chunker-params", "fixed,1048576"]
    if timestamp:
        args += ["--timestamp", timestamp]
    run_borg(repo, *args, f"{{repo}}::{name}", "vm1", cwd=source)


# --------------------------------------------------------------------------------------------


def test_init_creates_a_usable_repository(tmp_path, borg_env):
    repo = Repo(str(tmp_path / "new"), borg_env, lock_wait=2)
    cli_init(repo)
    info = json.loads(run_borg(repo, "info", "--json", "{repo}").stdout)
    assert info["encryption"]["mode"] == "repokey-blake2"
    assert archive.repository_view(repo).id == info["repository"]["id"]
    # The id alone needs no passphrase.
    no_secret = Repo(repo.location, {k: v for k, v in borg_env.items() if k != "BORG_PASSPHRASE"})
    assert archive.repository_id(no_secret) == info["repository"]["id"]
    assert borgcli.list_archives(repo) == []
    with pytest.raises(RepositoryError, match="already exists"):
        cli_init(repo)


def test_init_refuses_an_encrypted_repository_without_passphrase(tmp_path, borg_env, monkeypatch):
    for name in borgcli.PASSPHRASE_SOURCES:
        monkeypatch.delenv(name, raising=False)
    env = {k: v for k, v in borg_env.items() if k != "BORG_PASSPHRASE"}
    with pytest.raises(AuthError, match="no passphrase"):
        cli_init(Repo(str(tmp_path / "new"), env))
    assert not (tmp_path / "new").exists()


def test_list_archives_and_exists(local_repo, source):
    create(local_repo, "vm1-2026-01-01", source, "2026-01-01T03:00:00")
    create(local_repo, "vm1-2026-01-02", source, "2026-01-02T03:00:00")
    create(local_repo, "other-2026-01-02", source, "2026-01-02T04:00:00")
    archives = borgcli.list_archives(local_repo)
    assert [a["name"] for a in archives] == ["vm1-2026-01-01", "vm1-2026-01-02", "other-2026-01-02"]
    first = archives[0]
    assert len(first["id"]) == 64
    assert first["start"].tzinfo is not None
    # borg create --timestamp takes UTC.
    assert first["start"] == datetime(2026, 1, 1, 3, 0, tzinfo=timezone.utc)
    assert [a["name"] for a in borgcli.list_archives(local_repo, "vm1-*")] == ["vm1-2026-01-01", "vm1-2026-01-02"]
    names = archive.repository_view(local_repo).archives
    assert "vm1-2026-01-02" in names and "vm1-2026" not in names
    listed = json.loads(run_borg(local_repo, "list", "--json", "{repo}").stdout)["archives"]
    assert {a["id"] for a in archives} == {a["id"] for a in listed}


def test_read_extract_and_stream(local_repo, source, tmp_path):
    create(local_repo, "a", source)
    assert cli_read_file(local_repo, "a", "vm1/vm.ovf") == b"<ovf>vm1</ovf>"

    dest = tmp_path / "restore"
    dest.mkdir()
    extracted = cli_extract_to(local_repo, "a", DISK, dest)
    assert extracted == dest / DISK
    assert file_sha256(extracted) == file_sha256(source / DISK)
    # 2 of 4 MiB are a hole in the source: the sparse extract keeps it a hole.
    assert extracted.stat().st_blocks * 512 <= (2 << 20) + 65536
    dense = tmp_path / "dense"
    dense.mkdir()
    assert cli_extract_to(local_repo, "a", DISK, dense, sparse=False).stat().st_blocks * 512 >= 4 << 20

    digest = hashlib.sha256()
    with cli_open_stream(local_repo, "a", DISK) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == file_sha256(source / DISK)

    # A reader may stop early: borg is stopped, nothing is raised, the lock is free again.
    with cli_open_stream(local_repo, "a", DISK) as stream:
        assert len(stream.read(4096)) == 4096
    assert cli_read_file(Repo(local_repo.location, local_repo.env, lock_wait=0), "a", "vm1/vm.ovf")


def test_missing_things_are_not_found(local_repo, source, tmp_path):
    create(local_repo, "a", source)
    with pytest.raises(NotFound, match="vm1/nothere"):
        cli_read_file(local_repo, "a", "vm1/nothere")
    with pytest.raises(NotFound, match="archive b does not exist"):
        cli_read_file(local_repo, "b", "vm1/vm.ovf")
    with pytest.raises(NotFound):
        with cli_open_stream(local_repo, "a", "vm1/nothere"):
            pass
    with pytest.raises(NotFound):
        cli_extract_to(local_repo, "a", "vm1/nothere", tmp_path)
    with pytest.raises(NotFound):
        borgcli.delete_archive(local_repo, "b")
    # A prefix of a path is not the path.
    with pytest.raises(NotFound):
        cli_read_file(local_repo, "a", "vm1/vm.ov")


def test_prune_dry_run_and_real(local_repo, source, tmp_path):
    for day in (1, 2, 3, 4):
        create(local_repo, f"vm1-2026-01-0{day}", source, f"2026-01-0{day}T03:00:00")
    create(local_repo, "other-2026-01-01", source, "2026-01-01T03:00:00")

    would = borgcli.prune(local_repo, "vm1-*", {"daily": 2}, dry_run=True)
    assert sorted(would) == ["vm1-2026-01-01", "vm1-2026-01-02"]
    assert len(archive_names(local_repo)) == 5

    pruned = borgcli.prune(local_repo, "vm1-*", {"keep_daily": 2})
    assert sorted(pruned) == ["vm1-2026-01-01", "vm1-2026-01-02"]
    assert sorted(archive_names(local_repo)) == ["other-2026-01-01", "vm1-2026-01-03", "vm1-2026-01-04"]
    assert borgcli.prune(local_repo, "vm1-*", {"within": "36500d"}) == []

    borgcli.compact(local_repo)
    cli_check(local_repo, verify_data=True)
    dest = tmp_path / "r"
    dest.mkdir()
    assert file_sha256(cli_extract_to(local_repo, "vm1-2026-01-04", DISK, dest)) == file_sha256(source / DISK)

    with pytest.raises(ConfigError):
        borgcli.prune(local_repo, "vm1-*", {})
    with pytest.raises(ConfigError):
        borgcli.prune(local_repo, "", {"daily": 1})
    with pytest.raises(ConfigError):
        borgcli.prune(local_repo, "vm1-*", {"daily; rm": 1})


def test_delete_and_compact_free_space(local_repo, source):
    create(local_repo, "a", source)
    size_before = sum(f.stat().st_size for f in Path(local_repo.location, "data").rglob("*") if f.is_file())
    borgcli.delete_archive(local_repo, "a")
    assert archive_names(local_repo) == []
    borgcli.compact(local_repo)
    size_after = sum(f.stat().st_size for f in Path(local_repo.location, "data").rglob("*") if f.is_file())
    assert size_after < size_before - (1 << 20)


def test_check_finds_damage(local_repo, source):
    create(local_repo, "a", source)
    cli_check(local_repo)
    segments = sorted((f for f in Path(local_repo.location, "data").rglob("*") if f.name.isdigit()),
                      key=lambda f: f.stat().st_size)
    biggest = segments[-1]
    data = bytearray(biggest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    biggest.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match="borg check found problems"):
        cli_check(local_repo, verify_data=True)


def test_the_jobs_passphrase_source_wins_over_an_inherited_passphrase(local_repo, monkeypatch, tmp_path):
    """A BORG_PASSPHRASE inherited from the environment (for another repository) is not used
    when the job names its own source: Borg would try it first."""
    (tmp_path / "f").write_bytes(b"data")
    run_borg(local_repo, "create", "{repo}::a", "f", cwd=tmp_path)
    monkeypatch.setenv("BORG_PASSPHRASE", "the passphrase of another repository")
    env = {k: v for k, v in local_repo.env.items() if k != "BORG_PASSPHRASE"}
    env["BORG_PASSCOMMAND"] = f"printf %s {shlex.quote(PASSPHRASE)}"
    repo = Repo(local_repo.location, env, lock_wait=5)
    assert [a["name"] for a in borgcli.list_archives(repo)] == ["a"]  # a borg process
    assert archive.repository_view(repo).archives == frozenset({"a"})  # Borg's internals
    assert archive.read_file(repo, "a", "f") == b"data"


def test_errors_are_typed(local_repo, tmp_path, borg_env):
    wrong = Repo(local_repo.location, {**local_repo.env, "BORG_PASSPHRASE": "wrong"})
    with pytest.raises(AuthError, match="passphrase"):
        borgcli.list_archives(wrong)
    failing_command = Repo(local_repo.location, {**borg_env, "BORG_PASSCOMMAND": "false"})
    failing_command = Repo(local_repo.location,
                           {k: v for k, v in failing_command.env.items() if k != "BORG_PASSPHRASE"})
    with pytest.raises(AuthError, match="PASSCOMMAND"):
        borgcli.list_archives(failing_command)
    with pytest.raises(RepositoryError, match="does not exist"):
        borgcli.list_archives(Repo(str(tmp_path / "nothere"), borg_env))
    busy = Repo(local_repo.location, local_repo.env, lock_wait=1)
    with lock_holder(local_repo) as holder:
        with pytest.raises(RepositoryBusy, match=r"waited 1 s \(repository.lock_wait\); try again later or raise lock_wait"):
            borgcli.delete_archive(busy, "a")
        assert holder.poll() is None, "the delete gave up while the lock was still held"


def test_passphrase_never_on_the_command_line_or_in_the_log(local_repo, source, caplog):
    caplog.set_level(logging.DEBUG, logger="ovirt_borg")
    create(local_repo, "a", source)
    borgcli.list_archives(local_repo)
    cli_read_file(local_repo, "a", "vm1/vm.ovf")
    with cli_open_stream(local_repo, "a", "vm1/vm.ovf") as stream:
        stream.read()
    assert "running " in caplog.text and "starting " in caplog.text
    assert PASSPHRASE not in caplog.text
    assert PASSPHRASE not in " ".join(borgcli.borg_command(local_repo, "list", local_repo.location))


def test_ssh_repository(ssh_repo, source, tmp_path):
    create(ssh_repo, "a", source)
    assert [a["name"] for a in borgcli.list_archives(ssh_repo)] == ["a"]
    assert cli_read_file(ssh_repo, "a", "vm1/vm.ovf") == b"<ovf>vm1</ovf>"
    assert len(archive.repository_view(ssh_repo).id) == 64
    borgcli.delete_archive(ssh_repo, "a")
    borgcli.compact(ssh_repo)
    cli_check(ssh_repo)
    assert borgcli.list_archives(ssh_repo) == []
