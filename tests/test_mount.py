"""File-level recovery: ``ovirt-borg mount``/``umount`` on the lab's guest disks.

The guest VM (``ovirt_borg.lab.guests``) is added to the session lab once for this module and
backed up once; each test mounts that archive with the real CLI (borg mount, loop devices,
the kernel's file systems) and checks real bytes and the kernel's own mount table.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Job, make_job
from helpers import file_sha256
from ovirt_borg.lab.guests import HOSTILE_ALIAS
from ovirt_borg.mount import host_name, mounts_below
from ovirt_borg.mountrecord import mounts

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@dataclass
class Guests:
    job: Job
    vm: str
    archive: str  # its first archive
    info: dict  # its sample.json entry


@pytest.fixture(scope="module")
def guests(lab, tmp_path_factory):
    """The guest VM, backed up once into a repository of its own."""
    name = f"guests-{os.getpid()}"
    info = lab.add_guests(name)
    job = make_job(lab, tmp_path_factory.mktemp("guests-job"))
    try:
        yield Guests(job, name, job.backup(name)[name]["archive"], info)
    finally:
        lab.delete_vm(name)


def _disk(info: dict, alias: str) -> dict:
    return next(d for d in info["disks"].values() if d["alias"] == alias)


def _no_mounts_left(mountpoint: Path) -> None:
    assert not mounts_below(mountpoint.resolve()), mounts_below(mountpoint.resolve())
    backing = [p.read_text() for p in Path("/sys/block").glob("loop*/loop/backing_file")]
    assert not any(str(mountpoint.resolve()) in b for b in backing), backing


def _mount_json(job, archive_name: str, mountpoint: Path) -> tuple[dict, str]:
    proc = job.run("mount", archive_name, str(mountpoint), "--json")
    return json.loads(proc.stdout), proc.stderr


def _tree(result: dict) -> dict[tuple[str, str], dict]:
    """{(disk directory, volume directory): volume} of ``mount --json``."""
    return {(disk["name"], volume["name"]): volume for disk in result["disks"] for volume in disk["volumes"]}


def check_known_files(root: Path, files: dict, *, metadata: bool = True) -> None:
    """Every known file below ``root`` has its size and sha256 (and mode, owner, mtime, when
    ``metadata``); every known symlink its target."""
    for name, known in files.items():
        path = root / name.lstrip("/")
        if "symlink" in known:
            assert os.readlink(path) == known["symlink"], path
            continue
        info = path.lstat()
        assert stat.S_ISREG(info.st_mode) and info.st_size == known["size"], path
        assert file_sha256(path) == known["sha256"], f"{path} differs from sample.json"
        if metadata:
            assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == \
                (known["mode"], known["uid"], known["gid"]), path
            if "mtime" in known:
                assert int(info.st_mtime) == known["mtime"], path


def check_tree(result: dict, info: dict) -> None:
    """The mount tree matches the guest disks of sample.json: every readable volume mounted
    with its known files byte-identical, every other one listed with its reason."""
    tree = _tree(result)
    for disk in info["disks"].values():
        disk_name = host_name(disk["alias"])
        for volume_name, expected in disk["volumes"].items():
            volume = tree[(disk_name, volume_name)]
            if "files" in expected:
                assert volume["mounted"], volume
                assert volume["fstype"] == expected["fstype"], volume
                # NTFS and vfat have no Unix owners and modes: ntfs-3g and fusefat give root's.
                check_known_files(Path(volume["path"]), expected["files"],
                                  metadata=expected["fstype"] not in ("ntfs", "vfat"))
            elif "pv_of" in expected:
                assert not volume["mounted"] and f"of VG {expected['pv_of']}" in volume["reason"], volume
            else:
                assert not volume["mounted"] and expected["reason"] in volume["reason"], volume


def test_every_known_file_of_every_guest_disk_reads_back(guests, tmp_path):
    """LVM (two segments, two disks), NTFS, GPT, MBR with logical partitions, partitionless,
    XFS, ext2/4, vfat, btrfs: every known file byte-identical; LUKS, swap, BIOS boot and
    damaged LVM metadata listed with their reason, in the README and on stderr too."""
    job, archive_name, info = guests.job, guests.archive, guests.info
    mountpoint = tmp_path / "mnt"
    result, stderr = _mount_json(job, archive_name, mountpoint)
    try:
        check_tree(result, info)
        for entry in mounts_below(mountpoint.resolve()):
            assert {"ro", "nosuid", "nodev"} <= entry.options, entry
        readme = (mountpoint / "README").read_text()
        assert "encrypted (LUKS2)" in readme and "swap space" in readme and "wrong checksum" in readme
        assert "rhel/rhel-root/" in readme
        for unreadable in ("misc/p1", "rhel/rhel-swap", "misc/p8"):
            assert f"{unreadable} (" in stderr, stderr
    finally:
        subprocess.run([OVIRT_BORG, "umount", str(mountpoint)], check=True)
    _no_mounts_left(mountpoint)


def test_a_second_night_mounts_beside_the_first(guests, tmp_path):
    """Two archives of the same VM at once: their XFS (same UUID) and btrfs (same fsid) file
    systems both mount."""
    job, first, info = guests.job, guests.archive, guests.info
    second = job.backup(guests.vm)[guests.vm]["archive"]
    one, two = tmp_path / "one", tmp_path / "two"
    try:
        first_result, _ = _mount_json(job, first, one)
        second_result, _ = _mount_json(job, second, two)
        for result in (first_result, second_result):
            tree = _tree(result)
            for key in (("rhel", "rhel-root"), ("misc", "p6")):
                assert tree[key]["mounted"], tree[key]
            check_known_files(Path(tree[("rhel", "rhel-root")]["path"]),
                              _disk(info, "rhel")["volumes"]["rhel-root"]["files"])
    finally:
        for mountpoint in (two, one):
            subprocess.run([OVIRT_BORG, "umount", str(mountpoint)], capture_output=True)
    _no_mounts_left(one)
    _no_mounts_left(two)


def _stopped_midway(job, args: list[str], records: Path, signum: int, step: str = "mount",
                    env: dict | None = None) -> int:
    """Run ``ovirt-borg ARGS`` and send it ``signum`` once a mount record matching the glob
    ``records`` holds a ``step`` (``borg``: borg mount starting; ``volumes``: the volume file
    system starting; ``mount``: a guest file system being mounted); return its exit code."""
    cmd = [OVIRT_BORG, "-c", str(job.config), *args]
    process = subprocess.Popen(cmd, env=env or job.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            steps = []
            for record in Path(records.anchor).glob(str(records.relative_to(records.anchor))):
                with contextlib.suppress(OSError, ValueError):
                    steps += json.loads(record.read_text())["steps"]
            if any(taken["kind"] == step for taken in steps):
                process.send_signal(signum)
                break
            time.sleep(0.005)
        else:
            pytest.fail(f"ovirt-borg {args[0]} ended before it could be stopped: {process.returncode}")
        process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode


def _mount_stopped_midway(job, archive_name: str, mountpoint: Path, signum: int, step: str = "mount") -> int:
    return _stopped_midway(job, ["mount", archive_name, str(mountpoint)],
                           mountpoint / ".ovirt-borg-mount.json", signum, step)


def _volume_servers(mountpoint: Path) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"ovirt_borg.volumefs" in cmdline.read_bytes() and str(mountpoint).encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.parametrize("signum, step", [(signal.SIGTERM, "borg"), (signal.SIGINT, "volumes"),
                                          (signal.SIGHUP, "loop"), (signal.SIGTERM, "mount")])
def test_a_signal_midway_undoes_the_whole_mount(guests, tmp_path, signum, step):
    mountpoint = tmp_path / "mnt"
    code = _mount_stopped_midway(guests.job, guests.archive, mountpoint, signum, step)
    assert code == 128 + signum
    _no_mounts_left(tmp_path)
    assert not mountpoint.exists() and not _volume_servers(mountpoint)


def test_umount_cleans_up_after_a_crashed_mount(guests, tmp_path):
    """A mount killed midway (SIGKILL: no rollback) leaves its record; umount undoes it all."""
    mountpoint = tmp_path / "mnt"
    assert _mount_stopped_midway(guests.job, guests.archive, mountpoint, signal.SIGKILL) == -signal.SIGKILL
    assert mounts_below(mountpoint.resolve()), "the killed mount left nothing to clean up"
    proc = subprocess.run([OVIRT_BORG, "umount", str(mountpoint)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _no_mounts_left(tmp_path)
    assert not mountpoint.exists() and not _volume_servers(mountpoint)


def test_hostile_guest_gives_nothing_on_the_host(guests, tmp_path):
    """A setuid-root binary and a device node in a guest give an unprivileged user nothing."""
    job, archive_name, info = guests.job, guests.archive, guests.info
    mountpoint = tmp_path / "mnt"
    job.run("mount", archive_name, str(mountpoint))
    try:
        assert stat.S_IMODE(mountpoint.stat().st_mode) == 0o700
        hostile = _disk(info, HOSTILE_ALIAS)
        disk_dir = mountpoint / host_name(HOSTILE_ALIAS)
        assert disk_dir.parent == mountpoint and stat.S_IMODE(disk_dir.stat().st_mode) == 0o700
        below = mounts_below(mountpoint.resolve())
        assert len(below) >= 2, below  # the archive and the hostile file system
        for entry in below:
            assert {"nosuid", "nodev"} <= entry.options, entry
        volume = disk_dir / "whole-disk"
        assert volume in [Path(e.mount_point) for e in below]
        expected = hostile["volumes"]["whole-disk"]
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
    job, archive_name = guests.job, guests.archive
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


# -- ovirt-borg files ----------------------------------------------------------------------------


def _private_mounts() -> list:
    """What the private mounts of 'files' left mounted (nothing, once each command ended)."""
    return [m for m in mounts() if "/ovirt-borg-files-" in m.mount_point]


def _restored(known: dict) -> dict:
    """What ``files`` restores of a known file: the same, without setuid and setgid bits."""
    return {**known, "mode": known["mode"] & 0o1777} if "mode" in known else known


def test_files_restores_every_known_file_of_every_guest_disk(guests, tmp_path):
    """Through files, without mounting: byte-identical, owner, mode (no setuid), mtime kept;
    symlinks as symlinks; the device node of the hostile disk skipped."""
    job, archive_name, info = guests.job, guests.archive, guests.info
    for disk in info["disks"].values():
        readable = {name: v for name, v in disk["volumes"].items() if "files" in v}
        if not readable:
            continue
        disk_name = host_name(disk["alias"])
        target = tmp_path / "out" / disk_name
        proc = job.run("files", archive_name, *(f"{disk_name}/{name}" for name in readable),
                       "--to", str(target), "--json")
        results = {Path(r["to"]).name: r for r in json.loads(proc.stdout)}
        for name, volume in readable.items():
            check_known_files(target / name, {k: _restored(v) for k, v in volume["files"].items()},
                              metadata=volume["fstype"] not in ("ntfs", "vfat"))
            assert not results[name]["failed"], results[name]
            if "device" in volume:
                assert results[name]["skipped"] == [
                    f"{disk_name}/{name}/{volume['device'].lstrip('/')} (block device: not restored)"]
                assert not os.path.lexists(target / name / volume["device"].lstrip("/"))
    assert not _private_mounts()


def test_files_follows_symlinks_inside_the_guest_only(guests, tmp_path):
    """Paths through the guest's symlinks resolve in the guest's tree (never the host's
    /usr/share/zoneinfo or /etc/hostname); a symlink named last is copied as a symlink."""
    job, archive_name = guests.job, guests.archive
    root_files = _disk(guests.info, "rhel")["volumes"]["rhel-root"]["files"]
    target = tmp_path / "out"
    job.run("files", archive_name, "rhel/rhel-root/etc/zoneinfo/UTC", "rhel/rhel-root/etc/up/etc/hostname",
            "rhel/rhel-root/etc/shadow-link", "--to", str(target))
    assert file_sha256(target / "UTC") == root_files["/usr/share/zoneinfo/UTC"]["sha256"]
    assert file_sha256(target / "hostname") == root_files["/etc/hostname"]["sha256"]
    assert os.readlink(target / "shadow-link") == "/etc/shadow"


def test_files_never_overwrites_and_says_why(guests, tmp_path):
    job, archive_name = guests.job, guests.archive
    target = tmp_path / "out"
    target.mkdir()
    (target / "hostname").write_text("mine")
    proc = job.run("files", archive_name, "rhel/rhel-root/etc/os-release", "rhel/rhel-root/etc/hostname",
                   "--to", str(target), expect=2)
    assert f"{target / 'hostname'} exists already; nothing was copied" in proc.stderr
    assert (target / "hostname").read_text() == "mine" and not (target / "os-release").exists()
    proc = job.run("files", archive_name, "misc/p1/secret", "--to", str(target), expect=2)
    assert "misc/p1 (partition 1 (MBR, Linux)) cannot be read: encrypted (LUKS2)" in proc.stderr
    proc = job.run("files", archive_name, "rhel/rhel-root/etc/nothing", "--to", str(target), expect=11)
    assert "etc/nothing does not exist in the guest" in proc.stderr
    proc = job.run("files", archive_name, "rhel/no-such-volume", "--to", str(target), expect=11)
    assert "disk rhel has no volume 'no-such-volume'; it has: p1, p2, p3, rhel-root" in proc.stderr
    job.run("files", archive_name, "rhel", "--to", str(target), expect=2)
    assert sorted(p.name for p in target.iterdir()) == ["hostname"]
    assert not _private_mounts()


def test_files_lists_volumes_and_directories(guests):
    job, archive_name = guests.job, guests.archive
    top = json.loads(job.run("files", archive_name, "--list", "--json").stdout)
    volumes = {(d["name"], v["name"]): v for d in top["disks"] for v in d["volumes"]}
    assert volumes[("rhel", "rhel-root")]["fstype"] == "xfs"
    assert "encrypted (LUKS2)" in volumes[("misc", "p1")]["reason"]
    listing = json.loads(job.run("files", archive_name, "--list", "rhel/rhel-root/etc", "--json").stdout)
    entries = {e["name"]: e for e in listing["entries"]}
    assert entries["hostname"]["type"] == "file" and entries["hostname"]["size"] == 18
    assert entries["zoneinfo"] == {**entries["zoneinfo"], "type": "symlink", "target": "/usr/share/zoneinfo"}
    text = job.run("files", archive_name, "--list", "rhel/rhel-home/alice").stdout
    assert "-rw-r-----  1000  1000      3145728 " in text and text.rstrip().endswith("photo.raw")
    assert not _private_mounts()


def test_a_signal_stops_files_and_undoes_its_private_mount(guests, tmp_path):
    private = tmp_path / "tmp"
    private.mkdir()
    env = {**guests.job.env, "TMPDIR": str(private)}
    args = ["files", guests.archive, "rhel/rhel-root/var", "rhel/rhel-home/alice", "--to", str(tmp_path / "out")]
    code = _stopped_midway(guests.job, args, private / "ovirt-borg-files-*" / "mnt" / ".ovirt-borg-mount.json",
                           signal.SIGTERM, env=env)
    assert code == 128 + signal.SIGTERM
    assert not _private_mounts() and not list(private.iterdir())


def test_a_vg_whose_second_disk_was_not_backed_up(guests, tmp_path):
    """The disk holding a PV of VG rhel excluded from the backup: the LVs wholly on the other
    PV mount, the one with extents on the missing PV is listed with the reason."""
    job = make_job(guests.job.lab, tmp_path / "job", '[selection]\nexclude_disks = ["rhel-data"]\n')
    archive_name = job.backup(guests.vm)[guests.vm]["archive"]
    result, stderr = _mount_json(job, archive_name, tmp_path / "mnt")
    try:
        tree = _tree(result)
        assert ("rhel-data", "whole-disk") not in tree
        check_known_files(Path(tree[("rhel", "rhel-root")]["path"]),
                          _disk(guests.info, "rhel")["volumes"]["rhel-root"]["files"])
        home = tree[("rhel", "rhel-home")]
        assert not home["mounted"] and "its PV pv1" in home["reason"] and "is on no disk of this VM" in home["reason"]
        assert "rhel/rhel-home (logical volume rhel/home) is not mounted" in stderr
    finally:
        subprocess.run([OVIRT_BORG, "umount", str(tmp_path / "mnt")], check=True)


def test_a_failed_mount_leaves_nothing(guests, tmp_path):
    mountpoint = tmp_path / "mnt"
    proc = guests.job.run("mount", guests.archive + "-none", str(mountpoint), expect=11)
    assert "does not exist" in proc.stderr
    assert not mountpoint.exists()
    mountpoint.mkdir()
    (mountpoint / "something").write_text("")
    proc = guests.job.run("mount", guests.archive, str(mountpoint), expect=2)
    assert "is not empty" in proc.stderr and sorted(os.listdir(mountpoint)) == ["something"]
