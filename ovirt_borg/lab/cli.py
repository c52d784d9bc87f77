"""``ovirt-borg-lab``: bring a lab up or down and drive it from a shell.

Every subcommand takes ``--dir DIR`` (default ``$OVIRT_BORG_LAB_DIR`` or ``./lab``). Results
are printed as JSON on stdout; errors go to stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from ovirt_borg.lab import LabError
from ovirt_borg.lab.control import Lab
from ovirt_borg.lab.latency import PHASES, LatencyError, parse_latency
from ovirt_borg.lab.sample import parse_size

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def latency_spec(text: str) -> str:
    """An argparse type: ``text`` if it is a valid ``--latency`` value (as ``parse_latency``
    takes it), else ArgumentTypeError with the reason."""
    try:
        parse_latency(text)
    except LatencyError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _scale(text: str) -> float:
    try:
        factor = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= factor < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number, 0 or more")
    return factor


def _add_latency_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latency", type=latency_spec, default="none", metavar="SPEC",
                   help="how long the engine's slow phases last: none (default), real (a real "
                        "oVirt 4.5 engine's figures), or PHASE=SECONDS,... overriding those "
                        f"(after 'none', starting from zero); phases: {', '.join(PHASES)}")
    p.add_argument("--latency-scale", type=_scale, default=1.0, metavar="F",
                   help="multiply every latency by F (default 1)")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of ``ovirt-borg-lab``."""
    parser = argparse.ArgumentParser(
        prog="ovirt-borg-lab",
        description="A simulated oVirt engine with real imageio daemons, qemu-nbd exports and "
                    "qcow2 dirty bitmaps, for tests, the demo and benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_dir = os.environ.get("OVIRT_BORG_LAB_DIR", "lab")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--dir", type=Path, default=Path(default_dir),
                       help=f"lab directory (default: {default_dir})")
        return p

    def vm_command(name: str, help: str) -> argparse.ArgumentParser:
        p = command(name, help)
        p.add_argument("vm", metavar="VM", help="VM name")
        return p

    p = command("up", "create the lab (once) and start its engine; prints lab.json")
    p.add_argument("--vms", type=int, default=2, help="number of sample VMs (default 2)")
    p.add_argument("--disk-size", type=_size, default="64M",
                   help="size of each sample disk: 64M, 1G, 1T (default 64M)")
    p.add_argument("--plain-http", action="store_true", help="serve http:// instead of https://")
    p.add_argument("--guests", action="store_true",
                   help="also add the VM 'guests' (LVM, NTFS, vfat, btrfs, LUKS... disks for file-level recovery)")
    p.add_argument("--separate-web-ca", action="store_true",
                   help="the engine's web certificate (HTTPS, imageio proxy) from a CA of its own, as "
                        "after an admin installed a commercial one; host imageio keeps the internal CA")
    _add_latency_arguments(p)

    command("down", "stop the engine, its imageio daemons and exports")
    command("status", "print lab.json and whether the engine answers")

    p = command("serve", "run the engine in the foreground (what 'up' starts)")
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    _add_latency_arguments(p)

    p = vm_command("write", "write to a VM disk as its guest; prints the written ranges")
    p.add_argument("--disk", default="1", help="disk number (1-based) or id (default 1)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--percent", type=float, help="write this percent of the disk, scattered")
    what.add_argument("--offset", type=_size, help="start of the range (with --length)")
    p.add_argument("--length", type=_size, help="length of the range (with --offset)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--zero", action="store_true", help="write zeroes instead of random data")
    kind.add_argument("--discard", action="store_true", help="discard instead of writing data")
    p.add_argument("--seed", type=int, help="seed for the random offsets and data")

    p = vm_command("image", "write a VM disk's current content as a raw file")
    p.add_argument("--disk", default="1", help="disk number (1-based) or id (default 1)")
    p.add_argument("--out", type=Path, required=True, help="raw file to write")

    command("stats", "print imageio bytes, open backups and transfers, checkpoints, calls")

    p = command("fault", "turn a fault switch on or off, or list them")
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="fault name, e.g. transfer_fail or engine_500:backups.add")
    p.add_argument("--off", action="store_true", help="turn the fault off")
    p.add_argument("--vm", help="VM for checkpoint and stale-backup faults (default: all / vm1)")
    p.add_argument("--times", type=int, help="how many events the fault lasts")
    p.add_argument("--list", action="store_true", help="list active and known faults")
    p.add_argument("--clear", action="store_true", help="turn every fault off")

    p = vm_command("add-disk", "create a disk and attach it to a VM")
    p.add_argument("--size", type=_size, default="64M", help="disk size (default 64M)")
    p.add_argument("--format", choices=("cow", "raw"), default="cow")
    p.add_argument("--storage-type", choices=("image", "lun", "managed_block_storage", "cinder"),
                   default="image", help="a LUN or managed-block disk is left out of backups")
    p.add_argument("--shareable", action="store_true", help="a shareable disk (left out of backups)")
    p.add_argument("--unplugged", action="store_true", help="attach the disk unplugged (active=false)")

    p = vm_command("add-vm", "create a VM with data disks (random data in two regions each)")
    p.add_argument("--disks", type=int, default=1, help="number of disks (default 1)")
    p.add_argument("--size", type=_size, default="64M", help="size of each disk (default 64M)")
    p.add_argument("--format", choices=("cow", "raw"), default="cow")
    p.add_argument("--status", choices=("up", "down"), default="up")
    p.add_argument("--tag", action="append", default=[], help="tag the VM (repeatable)")
    p.add_argument("--origin", default="ovirt",
                   help="the VM's origin; managed_hosted_engine makes the hosted engine's VM")
    p.add_argument("--cluster", help="the VM's cluster (default: the first; see the cluster command)")

    p = command("cluster", "create a cluster or set its compatibility level (4.7+: snapshot-based backups)")
    p.add_argument("name", metavar="NAME", help="cluster name")
    p.add_argument("level", metavar="LEVEL", help="compatibility level, 4.2 .. 4.8")

    p = command("add-guests", "add a VM whose disks hold what real guests hold (LVM, NTFS, vfat, btrfs, "
                              "LUKS, swap, a hostile ext4); prints its sample.json entry")
    p.add_argument("--vm", default="guests", help="VM name (default guests)")

    p = vm_command("detach-disk", "detach a disk from a VM (it stays as a floating disk)")
    p.add_argument("--disk", default="1", help="disk number (1-based) or id (default 1)")

    vm_command("delete-vm", "delete a VM and its disks at once")
    vm_command("start-vm", "set a VM's status to up")
    vm_command("stop-vm", "set a VM's status to down")
    return parser


def _disk_arg(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def _run(args: argparse.Namespace) -> Any:  # noqa: PLR0911 (one return per command)
    if args.command == "serve":
        from ovirt_borg.lab.server import serve
        serve(args.dir, plain_http=args.plain_http, port=args.port,
              latency=parse_latency(args.latency, args.latency_scale))
        return None
    if args.command == "up":
        lab = Lab.up(args.dir, vms=args.vms, disk_size=args.disk_size,
                     plain_http=args.plain_http, separate_web_ca=args.separate_web_ca,
                     latency=args.latency, latency_scale=args.latency_scale)
        if args.guests and not any(vm["name"] == "guests" for vm in lab.describe()["vms"]):
            lab.add_guests()
        return lab.info
    lab = Lab.open(args.dir)
    if args.command == "down":
        lab.down()
        return {"dir": str(lab.dir), "running": False}
    if args.command == "status":
        return {**lab.info, "running": lab.running}
    if args.command == "write":
        if args.percent is None and (args.offset is None or args.length is None):
            raise LabError("write needs --percent, or --offset and --length")
        ranges = lab.write(args.vm, _disk_arg(args.disk), percent=args.percent,
                           offset=args.offset, length=args.length, zero=args.zero,
                           discard=args.discard, seed=args.seed)
        return {"vm": args.vm, "disk": args.disk, "ranges": ranges,
                "bytes": sum(r["length"] for r in ranges)}
    if args.command == "image":
        out = lab.image(args.vm, _disk_arg(args.disk), out=args.out)
        return {"vm": args.vm, "disk": args.disk, "out": str(out)}
    if args.command == "stats":
        return lab.stats()
    if args.command == "fault":
        if args.list:
            return lab.faults()
        if args.clear:
            lab.clear_faults()
            return {"active": {}}
        if not args.name:
            raise LabError("fault needs a NAME, --list or --clear")
        return lab.fault(args.name, on=not args.off, vm=args.vm, times=args.times)
    if args.command == "add-guests":
        return lab.add_guests(args.vm)
    if args.command == "add-disk":
        return lab.add_disk(args.vm, size=args.size, format=args.format,
                            storage_type=args.storage_type, shareable=args.shareable,
                            active=not args.unplugged)
    if args.command == "add-vm":
        return lab.add_vm(args.vm, disks=args.disks, size=args.size, format=args.format,
                          status=args.status, tags=tuple(args.tag), origin=args.origin, cluster=args.cluster)
    if args.command == "cluster":
        return lab.cluster(args.name, args.level)
    if args.command == "detach-disk":
        return lab.detach_disk(args.vm, _disk_arg(args.disk))
    if args.command == "delete-vm":
        return lab.delete_vm(args.vm)
    if args.command == "start-vm":
        return lab.start_vm(args.vm)
    if args.command == "stop-vm":
        return lab.stop_vm(args.vm)
    raise LabError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ovirt-borg-lab``; return the exit code (0 ok, 2 error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if args.command == "serve":
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    else:
        logging.basicConfig(level=level if args.verbose else logging.WARNING,
                            format="%(levelname)s: %(message)s")
    try:
        result = _run(args)
    except LabError as e:
        print(f"ovirt-borg-lab {args.command}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if result is not None:
        print(json.dumps(result, indent=1))
    return EXIT_OK
