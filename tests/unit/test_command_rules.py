"""Pure rules of the commands: which archives verify reads, how a VM's disks are sorted and
read, a run's exit code, the rate a progress line shows."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from ovirt_borg import config as config_mod, sidecar as sc
from ovirt_borg.backup import choose_disks, disk_full_reason, run_exit_code, uses_backup_api
from ovirt_borg.engine import DiskInfo
from ovirt_borg.errors import ConfigError, NotFound
from ovirt_borg.jobs import RestoreRequest, run_restore, verify_targets
from ovirt_borg.progress import Progress

A1, A2, A3 = (f"ovirt-web-2026-11-2{day}T03:00:00Z" for day in (4, 5, 6))
B1 = "ovirt-db-2026-11-25T03:00:00Z"
ARCHIVES = [A1, B1, A2, A3, "host-etc-2026-11-26"]
BY_VM = {"web": [A1, A2, A3], "db": [B1]}


def targets(*names, last=1, every_vm=False):
    return verify_targets(names, ARCHIVES, BY_VM, last=last, every_vm=every_vm, prefix="ovirt-")


def test_verify_takes_archives_and_vms_as_arguments():
    assert targets(A1) == [A1]
    assert targets("web") == [A3]
    assert targets("web", last=2) == [A2, A3]
    assert targets("web", B1, A3, last=2) == [A2, A3, B1], "each archive once, in the order asked"
    assert targets("host-etc-2026-11-26") == ["host-etc-2026-11-26"], "any archive of the repository"
    assert targets(last=5, every_vm=True) == [B1, A1, A2, A3]


def test_verify_of_a_name_that_is_nothing_names_the_nearest():
    with pytest.raises(NotFound, match=r"no archive or VM with archives named 'webb'.*did you mean 'web'"):
        targets("webb")
    # the shape of this job's archive name: taken as an archive, whose reading says it is missing
    assert targets("ovirt-web-2020-01-01T00:00:00Z") == ["ovirt-web-2020-01-01T00:00:00Z"]
    with pytest.raises(ConfigError):
        targets()
    with pytest.raises(ConfigError):
        targets("web", every_vm=True)
    with pytest.raises(NotFound, match="no archives of this job"):
        verify_targets([], [], {}, last=1, every_vm=True, prefix="ovirt-")


def disk(alias, **kw):
    return DiskInfo(id=f"id-{alias}", alias=alias, format=kw.pop("format", "cow"), provisioned_size=1 << 20,
                    backup=kw.pop("backup", "incremental"), **kw)


def test_choose_disks_sorts_excluded_skipped_and_to_enable():
    disks = [disk("root"), disk("swap-1"), disk("lun", storage_type="lun"), disk("new", backup="none"),
             disk("raw", format="raw", backup="none"), disk("off", active=False)]
    choice = choose_disks(disks, ["swap-*", "id-nothing"], enable_incremental=True)
    assert [d.alias for d in choice.backed_up] == ["root", "new", "raw"]
    assert [d.alias for d in choice.excluded] == ["swap-1"]
    assert [d["alias"] for d in choice.skipped] == ["lun", "off"]
    assert all(d["reason"] for d in choice.skipped)
    assert [d.alias for d in choice.to_enable] == ["new"]
    assert choose_disks(disks, [], enable_incremental=False).to_enable == ()
    assert [d.alias for d in choose_disks(disks, ["id-root"], True).excluded] == ["root"]


def record(image="web/disks/root-id.raw", kind=sc.BLOCKS_BORG_ID):
    return sc.DiskRecord(id="id", alias="root", format="cow", provisioned_size=1 << 20, backup_mode="full",
                         image=image, blocks_file="b", blocks_sha256="0" * 64, blocks_kind=kind)


def test_why_a_disk_of_an_incremental_is_read_in_full():
    previous = object()  # only its presence matters here
    path = "web/disks/root-id.raw"
    assert disk_full_reason(None, "incremental", None, path) == "full backup"
    assert "full mode" in disk_full_reason(previous, "full", record(), path)
    assert "not in the previous archive" in disk_full_reason(previous, "incremental", None, path)
    assert "renamed" in disk_full_reason(previous, "incremental", record(image="web/disks/x-id.raw"), path)
    assert "sha256" in disk_full_reason(previous, "incremental", record(kind=sc.BLOCKS_SHA256), path)
    assert disk_full_reason(previous, "incremental", record(), path) == ""


def test_the_backup_api_is_used_unless_a_powered_off_vm_may_not():
    assert uses_backup_api("up", cold_backup=False) and uses_backup_api("down", cold_backup=True)
    assert not uses_backup_api("down", cold_backup=False)


@pytest.mark.parametrize("codes, warned, expected", [
    ([0, 0], False, 0), ([0, 1], False, 1), ([0, 0], True, 1), ([8, 0, 1], True, 8), ([8, 4], False, 2),
    ([], False, 0),
])
def test_a_runs_exit_code(codes, warned, expected):
    assert run_exit_code(codes, warned) == expected


def test_the_progress_rate_counts_bytes_moved_not_holes():
    progress = Progress("VM 2 of 3, web/root", 8 << 20, stream=io.StringIO(), moved_as="read")
    progress.update(6 << 20, 1 << 20)  # 5 MiB of holes or reused blocks, 1 MiB read
    line = progress._line(progress.started + 2.0)
    assert line.startswith("VM 2 of 3, web/root:  75.0% of 8.0 MiB, read 1.0 MiB at 512.0 KiB/s, ETA 0m00s")


@pytest.mark.parametrize("request_, message", [
    (dict(), "say where to restore"),
    (dict(vm_name="new"), "--vm-name needs --storage-domain"),
    (dict(storage_domain="data1"), "restores one disk: name it with --disk ID"),
    (dict(storage_domain="data1", disks=("a", "b")), "restores one disk"),
    (dict(force=True, storage_domain="data1"), "--force replaces local files"),
    (dict(to_dir=Path("/tmp/out"), storage_domain="data1"), "--to-dir writes local files"),
])
def test_a_restore_names_one_target(tmp_path, monkeypatch, request_, message):
    """Refused before the repository or the engine is touched."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # no engine password anywhere
    config = config_mod.from_dict({"engine": {"url": "https://engine.example.com/ovirt-engine/api"},
                                   "repository": {"location": str(tmp_path / "none")}}, "job.toml")
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_restore(config, RestoreRequest(archive="a", **request_))
