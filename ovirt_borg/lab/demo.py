"""`make demo`: ovirt-borg end to end against the lab, proven with real bytes.

Starts a fresh lab, runs a full backup of its VMs into a new Borg repository, lets the guest
write to a disk, runs an incremental backup, restores the newest archive's disks to local files
and compares them with the lab's disks (sha256), recovers single files with 'ovirt-borg files'
(from vm1's ext4 disk, then from the lab's guest VM: an LVM guest's XFS root and a Windows
guest's NTFS volume) and compares them with the guests' (sha256), prints a summary and stops
the lab.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ovirt_borg.lab.control import Lab


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            h.update(chunk)
    return h.hexdigest()


def _ovirt_borg(config: Path, *args: str) -> dict | list:
    cmd = [str(Path(sys.executable).parent / "ovirt-borg"), "-c", str(config), *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"demo: '{' '.join(cmd[1:])}' failed with exit code {proc.returncode}")
    return json.loads(proc.stdout) if "--json" in args else {}


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def run(directory: Path, disk_size: str) -> int:
    if directory.exists():
        if (directory / "lab.json").exists():
            Lab.open(directory).down()
        shutil.rmtree(directory)
    _step(f"starting the lab in {directory}")
    lab = Lab.up(directory, vms=2, disk_size=disk_size)
    summary = []
    try:
        config = lab.config_path
        _step("full backup of all lab VMs")
        t0 = time.monotonic()
        full = _ovirt_borg(config, "backup", "--all", "--json")["archives"]
        full_seconds = time.monotonic() - t0
        _step("the guest of vm1 writes 1% of its second disk")
        lab.write("vm1", disk=2, percent=1)
        before = lab.stats()["imageio.host.bytes"]
        _step("incremental backup of all lab VMs")
        t0 = time.monotonic()
        incr = _ovirt_borg(config, "backup", "--all", "--json")["archives"]
        incr_seconds = time.monotonic() - t0
        incr_bytes = lab.stats()["imageio.host.bytes"] - before
        _step("restoring the newest archive of each VM to local files and comparing with the lab's disks")
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            for result in incr:
                out = Path(scratch) / result["vm"]
                _ovirt_borg(config, "restore", result["archive"], "--to-dir", str(out))
                for index, disk in enumerate(result["disks"], start=1):
                    restored = next(out.glob(f"*-{disk['id']}.raw"))
                    source = Path(scratch) / f"{result['vm']}-{index}.source.raw"
                    lab.image(result["vm"], disk=index, out=source)
                    same = _sha256(restored) == _sha256(source)
                    summary.append((result["vm"], disk["alias"], disk["mode"], same))
                    if not same:
                        raise SystemExit(f"demo: restored disk {disk['alias']} of {result['vm']} differs!")
        recovered = _recover_files(lab, config, incr, directory)
        _step("summary")
        print(f"full backup:        {full_seconds:6.1f} s, read "
              f"{sum(d['bytes_read'] for r in full for d in r['disks']) / 2**20:8.1f} MiB")
        print(f"incremental backup: {incr_seconds:6.1f} s, read {incr_bytes / 2**20:8.1f} MiB from imageio")
        for vm, alias, mode, same in summary:
            print(f"  {vm}/{alias}: {mode:<11} restored image identical to the lab disk: {'yes' if same else 'NO'}")
        print(f"file-level recovery ({recovered['seconds']:.1f} s for the LVM and Windows guest's files):")
        for path, same in recovered["files"]:
            print(f"  {path}: recovered file identical to the guest's: {'yes' if same else 'NO'}")
    finally:
        _step("stopping the lab")
        lab.down()
    return 0


def _recover_files(lab: Lab, config: Path, incr: list[dict], directory: Path) -> dict:
    """Recover single files with 'ovirt-borg files', nothing mounted by hand: vm1's
    /hello.txt from its newest archive, then files of the lab's guest VM (an LVM guest's XFS
    root, a Windows guest's NTFS volume) after a backup of it."""
    out = Path(tempfile.mkdtemp(dir=directory, prefix="recovered-"))
    vm1 = next(r for r in incr if r["vm"] == "vm1")
    _step(f"listing the volumes of {vm1['archive']} and recovering /hello.txt of vm1's ext4 disk")
    subprocess.run([str(Path(sys.executable).parent / "ovirt-borg"), "-c", str(config), "files",
                    vm1["archive"], "--list"], check=True)
    alias = vm1["disks"][0]["alias"]
    _ovirt_borg(config, "files", vm1["archive"], f"{alias}/whole-disk/hello.txt", "--to", str(out / "vm1"))
    sample = lab.sample
    found = [(f"vm1: {alias}/whole-disk/hello.txt", _sha256(out / "vm1" / "hello.txt")
              == sample["vms"]["vm1"]["disks"]["1"]["files"]["/hello.txt"]["sha256"])]
    print((out / "vm1" / "hello.txt").read_text().strip())
    _step("adding the lab's guest VM (an LVM RHEL layout, Windows NTFS, vfat, btrfs, LUKS...) and backing it up")
    info = lab.add_guests()
    guests = _ovirt_borg(config, "backup", "guests", "--json")["archives"][0]
    wanted = {"rhel/rhel-root/etc/hostname": ("rhel", "rhel-root", "/etc/hostname"),
              "windows/p2/hosts": ("windows", "p2", "/hosts")}
    _step("recovering " + " and ".join(wanted) + " with 'ovirt-borg files' (mounted privately, unmounted after)")
    t0 = time.monotonic()
    _ovirt_borg(config, "files", guests["archive"], *wanted, "--to", str(out / "guests"))
    seconds = time.monotonic() - t0
    for path, (alias, volume, name) in wanted.items():
        disk = next(d for d in info["disks"].values() if d["alias"] == alias)
        restored = out / "guests" / Path(name).name
        found.append((f"guests: {path}", _sha256(restored) == disk["volumes"][volume]["files"][name]["sha256"]))
    print((out / "guests" / "hostname").read_text().strip())
    if not all(same for _, same in found):
        raise SystemExit("demo: a recovered file differs from the guest's!")
    return {"seconds": seconds, "files": found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovirt_borg.lab.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("lab"), help="lab directory (recreated)")
    parser.add_argument("--disk-size", default="256M", help="size of the lab's disks")
    args = parser.parse_args(argv)
    return run(args.dir.resolve(), args.disk_size)


if __name__ == "__main__":
    sys.exit(main())
