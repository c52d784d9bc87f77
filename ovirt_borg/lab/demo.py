"""`make demo`: ovirt-borg end to end against the lab, proven with real bytes.

Starts a fresh lab, runs a full backup of its VMs into a new Borg repository, lets the guest
write to a disk, runs an incremental backup, restores the newest archive's disks to local files
and compares them with the lab's disks (sha256), prints a summary and stops the lab.
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
        full = _ovirt_borg(config, "backup", "--all", "--json")
        full_seconds = time.monotonic() - t0
        _step("the guest of vm1 writes 1% of its second disk")
        lab.write("vm1", disk=2, percent=1)
        before = lab.stats()["imageio.host.bytes"]
        _step("incremental backup of all lab VMs")
        t0 = time.monotonic()
        incr = _ovirt_borg(config, "backup", "--all", "--json")
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
        _step("summary")
        print(f"full backup:        {full_seconds:6.1f} s, read "
              f"{sum(d['bytes_read'] for r in full for d in r['disks']) / 2**20:8.1f} MiB")
        print(f"incremental backup: {incr_seconds:6.1f} s, read {incr_bytes / 2**20:8.1f} MiB from imageio")
        for vm, alias, mode, same in summary:
            print(f"  {vm}/{alias}: {mode:<11} restored image identical to the lab disk: {'yes' if same else 'NO'}")
    finally:
        _step("stopping the lab")
        lab.down()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ovirt_borg.lab.demo", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("lab"), help="lab directory (recreated)")
    parser.add_argument("--disk-size", default="256M", help="size of the lab's disks")
    args = parser.parse_args(argv)
    return run(args.dir.resolve(), args.disk_size)


if __name__ == "__main__":
    sys.exit(main())
