"""Guest disks for file-level recovery: a VM whose disks hold what real guests hold.

``add_guest_vm`` adds a VM (default name ``guests``) to a running lab engine, with disks built
from images the lab writes itself, never by mounting anything on the host:

- ``../hostile`` (an alias with a slash and a leading dot, as a hostile engine user could
  choose): a partitionless ext4 file system holding a setuid-root copy of ``id``
  (``/suid-id``), a block device node 7,0 (``/loop0``, the host's first loop device) and a
  known text file, written with ``debugfs``.

The disks are qcow2 with incremental backup enabled, like the sample disks. What each holds
(per volume: its file system type, or why it cannot be read, and its known files with their
sha256) is added to ``sample.json`` under ``vms.<name>``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ovirt_borg.lab import LabError
from ovirt_borg.lab.model import Attachment, Disk, Engine, LabLayout, new_id, timestamp

log = logging.getLogger(__name__)

MIB = 1 << 20
HOSTILE_ALIAS = "../hostile"
HOSTILE_TEXT = b"This guest file system is hostile.\n"
#: The partitionless disk's volume name in the mount tree.
WHOLE_DISK = "whole-disk"


def add_guest_vm(engine: Engine, name: str = "guests") -> dict[str, Any]:
    """Create the VM ``name`` with the guest disks; return its ``sample.json`` entry.

    Given the running lab engine (the caller holds its lock). Raises ``LabError`` when a tool
    fails and ``ApiFault`` 409 when the name is taken.
    """
    layout = LabLayout(engine.state_file.parent)
    vm = engine.add_vm(name=name, cluster={"id": engine.inv.clusters[0].id}, ovf=None,
                       description="lab VM with the guest disks of file-level recovery")
    vm.status = "up"
    sd = engine.inv.storage_domains[0]
    info: dict[str, Any] = {"id": vm.id, "status": vm.status, "disks": {}}
    builders = [(HOSTILE_ALIAS, _hostile_disk)]
    with tempfile.TemporaryDirectory(dir=sd.path, prefix=".guests-") as tmp:
        for index, (alias, build) in enumerate(builders, start=1):
            work = Path(tmp) / str(index)
            work.mkdir()
            raw, volumes = build(work)
            disk_id = new_id()
            path = Path(sd.path) / f"{disk_id}.qcow2"
            _tool("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
            disk = Disk(id=disk_id, image_id=new_id(), name=alias, format="cow",
                        provisioned_size=raw.stat().st_size, path=str(path),
                        storage_domain_id=sd.id, backup="incremental", created=timestamp())
            engine.inv.disks.append(disk)
            vm.attachments.append(Attachment(disk_id=disk_id, bootable=index == 1))
            info["disks"][str(index)] = {"id": disk_id, "alias": alias, "volumes": volumes}
            shutil.rmtree(work)
    engine.save()
    sample = json.loads(layout.sample.read_text())
    sample["vms"][name] = info
    layout.sample.write_text(json.dumps(sample, indent=1))
    log.info("added guest VM %s with %d disks", name, len(builders))
    return info


def _hostile_disk(work: Path) -> tuple[Path, dict[str, Any]]:
    """A partitionless ext4 disk with a setuid-root binary and a block device node."""
    raw = work / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(16 * MIB)
    _tool("mkfs.ext4", "-q", "-F", "-L", "hostile", "-E", "root_owner=0:0", str(raw))
    text = work / "readme.txt"
    text.write_bytes(HOSTILE_TEXT)
    suid = Path(shutil.which("id") or "/usr/bin/id")
    commands = work / "debugfs.cmd"
    # 0104755: a regular file, setuid, rwxr-xr-x; 060666: a block device anyone may open.
    commands.write_text(f"write {text} readme.txt\n"
                        f"write {suid} suid-id\nsif suid-id mode 0104755\n"
                        "sif suid-id uid 0\nsif suid-id gid 0\n"
                        "mknod loop0 b 7 0\nsif loop0 mode 060666\n")
    _tool("debugfs", "-w", "-f", str(commands), str(raw))
    files = {"/readme.txt": _known(HOSTILE_TEXT), "/suid-id": _known(suid.read_bytes())}
    return raw, {WHOLE_DISK: {"fstype": "ext4", "files": files,
                              "setuid": "/suid-id", "device": "/loop0"}}


def _known(content: bytes) -> dict[str, Any]:
    return {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def _tool(*cmd: str) -> str:
    """Run a tool that builds an image; return its stdout; raises ``LabError``."""
    try:
        proc = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise LabError(f"{cmd[0]} is not installed (see the Makefile's APT_PACKAGES)") from e
    except subprocess.CalledProcessError as e:
        raise LabError(f"{' '.join(cmd[:2])} failed: {(e.stderr or e.stdout).strip()}") from e
    return proc.stdout
