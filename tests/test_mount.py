"""File-level recovery: ``ovirt-borg mount``/``umount`` on the lab's guest disks.

The guest VM (``ovirt_borg.lab.guests``) is added to the session lab once for this module and
backed up once; each test mounts that archive with the real CLI (borg mount, loop devices,
the kernel's file systems) and checks real bytes and the kernel's own mount table.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_job
from ovirt_borg.mount import host_name, mounts_below, parse_mountinfo, unique_name

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture(scope="module")
def guests(lab, tmp_path_factory):
    """(job, archive name, sample entry) of the guest VM, backed up once."""
    name = f"guests-{os.getpid()}"
    info = lab.add_guests(name)
    job = make_job(lab, tmp_path_factory.mktemp("guests-job"))
    try:
        result = job.backup(name)[name]
        yield job, result["archive"], info
    finally:
        lab.delete_vm(name)


def _volume_dir(mountpoint: Path, info: dict, disk: str, volume: str) -> Path:
    return mountpoint / host_name(info["disks"][disk]["alias"]) / volume


def _no_mounts_left(mountpoint: Path) -> None:
    assert not mounts_below(mountpoint.resolve()), mounts_below(mountpoint.resolve())
    backing = [p.read_text() for p in Path("/sys/block").glob("loop*/loop/backing_file")]
    assert not any(str(mountpoint.resolve()) in b for b in backing), backing


def test_hostile_guest_gives_nothing_on_the_host(guests, tmp_path):
    """A setuid-root binary and a device node in a guest give an unprivileged user nothing."""
    job, archive_name, info = guests
    mountpoint = tmp_path / "mnt"
    job.run("mount", archive_name, str(mountpoint))
    try:
        assert stat.S_IMODE(mountpoint.stat().st_mode) == 0o700
        disk_dir = mountpoint / host_name(info["disks"]["1"]["alias"])
        assert disk_dir.parent == mountpoint and stat.S_IMODE(disk_dir.stat().st_mode) == 0o700
        below = mounts_below(mountpoint.resolve())
        assert len(below) >= 2, below  # the archive and the hostile file system
        for entry in below:
            assert {"nosuid", "nodev"} <= entry.options, entry
        volume = disk_dir / "whole-disk"
        assert volume in [Path(e.mount_point) for e in below]
        expected = info["disks"]["1"]["volumes"]["whole-disk"]
        setuid = volume / expected["setuid"].lstrip("/")
        assert setuid.stat().st_mode & stat.S_ISUID and setuid.stat().st_uid == 0
        # Open the way to the binary for nobody, as a careless admin might.
        for directory in (mountpoint, disk_dir):
            directory.chmod(0o711)
        sanity = subprocess.run([*NOBODY, "/usr/bin/id", "-u"], capture_output=True, text=True)
        assert sanity.returncode == 0 and sanity.stdout.strip() not in ("", "0"), sanity
        proc = subprocess.run([*NOBODY, str(setuid), "-u"], capture_output=True, text=True)
        assert proc.returncode != 0 or proc.stdout.strip() != "0", \
            f"the guest's setuid binary ran as root: {proc.stdout!r} {proc.stderr!r}"
        device = volume / expected["device"].lstrip("/")
        assert stat.S_ISBLK(device.lstat().st_mode)
        with pytest.raises(PermissionError):
            open(device, "rb").close()
    finally:
        subprocess.run([OVIRT_BORG, "umount", str(mountpoint)], capture_output=True)
    _no_mounts_left(mountpoint)
    assert not mountpoint.exists()


def test_umount_refuses_a_mount_it_did_not_make(guests, tmp_path):
    """umount with a foreign tmpfs below the mountpoint refuses and leaves everything as is."""
    job, archive_name, info = guests
    mountpoint = tmp_path / "mnt"
    job.run("mount", archive_name, str(mountpoint))
    foreign = mountpoint / "foreign"
    foreign.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(foreign)], check=True)
    try:
        (foreign / "precious").write_text("keep me")
        before = mounts_below(mountpoint.resolve())
        proc = subprocess.run([OVIRT_BORG, "umount", str(mountpoint)], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert f"{foreign} (tmpfs" in proc.stderr and "Nothing was unmounted" in proc.stderr, proc.stderr
        assert mounts_below(mountpoint.resolve()) == before
        assert (foreign / "precious").read_text() == "keep me"
    finally:
        subprocess.run(["umount", str(foreign)], check=True)
    foreign.rmdir()
    proc = subprocess.run([OVIRT_BORG, "umount", str(mountpoint)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _no_mounts_left(mountpoint)
    assert not mountpoint.exists()


def test_umount_of_a_directory_never_mounted_refuses(tmp_path):
    proc = subprocess.run([OVIRT_BORG, "umount", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "was not mounted by 'ovirt-borg mount'" in proc.stderr, proc.stderr
    assert tmp_path.is_dir()


@pytest.mark.parametrize("name, expected", [
    ("disk1", "disk1"),
    ("..", "%2E."),
    (".", "%2E"),
    (".hidden", "%2Ehidden"),
    ("../../etc", "%2E.%2F..%2Fetc"),
    ("a/b", "a%2Fb"),
    ("100%", "100%25"),
    ("line\nbreak\x7f", "line%0Abreak%7F"),
    ("rtl\u202eoverride", "rtl%E2%80%AEoverride"),
    ("", "%"),
    ("bad\udcffbyte", "bad%FFbyte"),
    ("Données ü", "Données ü"),
])
def test_host_name_makes_one_harmless_component(name, expected):
    assert host_name(name) == expected


def test_host_name_cuts_long_names_and_keeps_them_apart():
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    assert len(host_name(long_a).encode()) <= 255
    assert host_name(long_a) != host_name(long_b)
    assert len(host_name("é" * 200).encode()) <= 255
    taken: set[str] = {"README"}
    assert [unique_name(n, taken) for n in ("README", "disk", "disk")] == ["README~2", "disk", "disk~2"]


def test_parse_mountinfo_unescapes_paths():
    text = ("36 35 98:0 / /mnt/with\\040space rw,nosuid,nodev shared:1 - ext4 /dev/loop0 ro,noload\n"
            "37 36 0:45 / /mnt/with\\040space/x rw,relatime - tmpfs tmp\\134fs rw\n")
    first, second = parse_mountinfo(text)
    assert (first.mount_id, first.parent_id, first.mount_point, first.fstype, first.source) == \
        (36, 35, "/mnt/with space", "ext4", "/dev/loop0")
    assert first.options == {"rw", "nosuid", "nodev"}
    assert second.mount_point == "/mnt/with space/x" and second.source == "tmp\\fs"
