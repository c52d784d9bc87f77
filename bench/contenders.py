"""The baselines' own programs: what people run today without ovirt-borg.

Run as ``python -m bench.contenders COMMAND ...`` so that each is measured as a process of
its own, like ovirt-borg:

``download``
    The first step of the two-step way, as in the oVirt SDK's ``backup_vm.py`` example:
    start a (full or incremental) backup of the VM, open an image transfer per disk, and
    ``ovirt_imageio.client.download`` each disk to a local qcow2 file (``incremental=True``
    downloads only the dirty extents), then finalize. The checkpoint to continue from is kept
    in a small state file. The second step is ``borg create`` of the file.
``upload``
    Create a qcow2 disk and ``ovirt_imageio.client.upload`` a local raw image into it, as in
    the SDK's ``upload_disk.py`` example (zero extents become zero requests).
``remove-disk``
    Remove a disk (clean-up between runs).

The control plane is plain ovirtsdk4 and polls every 50 ms, as the ovirt-borg job of the
benchmark does, so the two differ only in their data paths. Prints a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

_POLL = 0.05
_TIMEOUT = 600


def connect(args: argparse.Namespace):
    """An ovirtsdk4 connection from the common options (``--url``, ``--user``, ...)."""
    import ovirtsdk4

    return ovirtsdk4.Connection(url=args.url, username=args.user,
                                password=Path(args.password_file).read_text().strip(),
                                ca_file=args.ca_file)


def wait(get: Callable[[], Any], done: Callable[[Any], bool], what: str,
          failed: Callable[[Any], bool] = lambda _: False) -> Any:
    """Call ``get`` every 50 ms until ``done``; raise RuntimeError on ``failed`` or timeout."""
    deadline = time.monotonic() + _TIMEOUT
    while True:
        value = get()
        if done(value):
            return value
        if failed(value) or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not succeed (last state: {value})")
        time.sleep(_POLL)


def phase(obj) -> str:
    """The ``phase`` of a backup or image transfer as a string."""
    phase = getattr(obj, "phase", None)
    return phase.value if phase is not None else ""


def open_transfer(connection, disk_id: str, direction: str, backup_id: str | None):
    """Create an image transfer and wait until it is transferring; return (service, transfer)."""
    from ovirtsdk4 import types

    transfers = connection.system_service().image_transfers_service()
    created = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk_id), backup=types.Backup(id=backup_id) if backup_id else None,
        direction=types.ImageTransferDirection(direction), format=types.DiskFormat.RAW,
        inactivity_timeout=120))
    service = transfers.image_transfer_service(created.id)
    transfer = wait(service.get, lambda t: phase(t) == "transferring", f"transfer of disk {disk_id}",
                    failed=lambda t: phase(t).startswith(("finished", "cancelled", "paused")))
    return service, transfer


def finalize_transfer(service) -> None:
    """Finalize an image transfer and wait until it has finished."""
    service.finalize()
    wait(lambda: phase(service.get()), lambda p: p.startswith("finished"), "transfer finalize")


def cmd_download(args: argparse.Namespace) -> dict:
    from ovirt_imageio import client
    from ovirtsdk4 import types

    state_path = Path(args.state)
    from_checkpoint = None
    if args.incremental:
        from_checkpoint = json.loads(state_path.read_text())["checkpoint"]
    connection = connect(args)
    try:
        vms = connection.system_service().vms_service()
        vm = vms.list(search=f"name={args.vm}")[0]
        vm_service = vms.vm_service(vm.id)
        disk_ids = [a.disk.id for a in vm_service.disk_attachments_service().list()]
        backups = vm_service.backups_service()
        backup = backups.add(types.Backup(disks=[types.Disk(id=d) for d in disk_ids],
                                          from_checkpoint_id=from_checkpoint))
        backup_service = backups.backup_service(backup.id)
        ready = wait(backup_service.get, lambda b: phase(b) == "ready", "backup",
                     failed=lambda b: phase(b) in ("failed", "succeeded"))
        files = []
        try:
            for index, disk_id in enumerate(disk_ids):
                out = Path(args.out if len(disk_ids) == 1 else f"{args.out}.{index}")
                out.unlink(missing_ok=True)
                service, transfer = open_transfer(connection, disk_id, "download", backup.id)
                try:
                    client.download(transfer.transfer_url, str(out), args.ca_file, fmt="qcow2",
                                    incremental=args.incremental, proxy_url=transfer.proxy_url)
                except BaseException:
                    service.cancel()
                    raise
                finalize_transfer(service)
                files.append(str(out))
        finally:
            backup_service.finalize()
            wait(lambda: phase(backup_service.get()), lambda p: p in ("succeeded", "failed"),
                 "backup finalize")
        checkpoint = ready.to_checkpoint_id
        # Keep only the checkpoint the next incremental starts from, as a nightly script would.
        checkpoints = vm_service.checkpoints_service()
        for old in checkpoints.list():
            if old.id != checkpoint:
                checkpoints.checkpoint_service(old.id).remove()
        state_path.write_text(json.dumps({"checkpoint": checkpoint}))
    finally:
        connection.close()
    return {"files": files, "checkpoint": checkpoint, "incremental": args.incremental}


def cmd_upload(args: argparse.Namespace) -> dict:
    from ovirt_imageio import client
    from ovirtsdk4 import types

    size = client.info(args.image)["virtual-size"]
    connection = connect(args)
    try:
        disks = connection.system_service().disks_service()
        disk = disks.add(types.Disk(
            name=args.name, format=types.DiskFormat.COW, sparse=True, provisioned_size=size,
            backup=types.DiskBackup.INCREMENTAL, content_type=types.DiskContentType.DATA,
            storage_domains=[types.StorageDomain(name=args.storage_domain)]))
        disk_service = disks.disk_service(disk.id)
        wait(disk_service.get, lambda d: d.status == types.DiskStatus.OK, "new disk")
        service, transfer = open_transfer(connection, disk.id, "upload", None)
        try:
            client.upload(args.image, transfer.transfer_url, args.ca_file, proxy_url=transfer.proxy_url)
        except BaseException:
            service.cancel()
            raise
        finalize_transfer(service)
        wait(disk_service.get, lambda d: d.status == types.DiskStatus.OK, "uploaded disk")
    finally:
        connection.close()
    return {"disk": disk.id, "size": size}


def cmd_remove_disk(args: argparse.Namespace) -> dict:
    connection = connect(args)
    try:
        connection.system_service().disks_service().disk_service(args.disk).remove()
    finally:
        connection.close()
    return {"removed": args.disk}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.contenders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--password-file", required=True)
    parser.add_argument("--ca-file", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download")
    p.add_argument("--vm", required=True)
    p.add_argument("--out", required=True, help="the local qcow2 file")
    p.add_argument("--state", required=True, help="file keeping the checkpoint between runs")
    p.add_argument("--incremental", action="store_true")
    p = sub.add_parser("upload")
    p.add_argument("--image", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--storage-domain", required=True)
    p = sub.add_parser("remove-disk")
    p.add_argument("--disk", required=True)
    args = parser.parse_args(argv)
    command = {"download": cmd_download, "upload": cmd_upload, "remove-disk": cmd_remove_disk}[args.command]
    print(json.dumps(command(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
