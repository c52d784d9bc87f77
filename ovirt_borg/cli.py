"""The ``ovirt-borg`` command line: the one place that parses arguments, prints and exits."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import signal
import stat
import sys
from pathlib import Path

from ovirt_borg import __version__, config as config_mod, jobs, logs, memory
from ovirt_borg.errors import EXIT_ERROR, EXIT_OK, ConfigError, Interrupted, OvirtBorgError
from ovirt_borg.progress import human_size

log = logging.getLogger("ovirt_borg")

EPILOG = """\
exit codes:
  0   success
  1   warning: finished, but something needs attention (a VM skipped by a plugin, nothing
      selected, or an archive committed while the engine backup could not be finalized or old
      checkpoints not purged: the next run does it); a failing monitoring plugin is only logged
  2   error, including a configuration error or a bad argument
  4   engine error: the oVirt engine refused or failed a request
  5   authentication error: engine credentials or Borg passphrase
  6   repository busy: another borg holds the repository lock
  7   checkpoint problem a full backup could not work around
  8   image transfer / imageio error
  9   Borg repository error: missing, damaged or full
  10  verify found a mismatch
  11  the VM, disk or archive does not exist
  12  another run of this job is in progress
  128+n  stopped by signal n (129 SIGHUP, 130 SIGINT, 143 SIGTERM); the VM in progress is rolled
         back (no archive, engine backup and transfer closed) unless its archive was committed

files:
  /etc/ovirt-borg/NAME.toml       a job's configuration (ovirt-borg config generate)
  /var/lib/ovirt-borg/            sidecars: where each VM's next incremental starts
environment:
  BORG_REPO, BORG_PASSCOMMAND, BORG_PASSPHRASE, BORG_RSH, BORG_REMOTE_PATH are honoured as Borg
  honours them; CREDENTIALS_DIRECTORY (systemd LoadCredential=) may hold 'engine-password' and
  'borg-passphrase'. Secrets are never taken from the command line.
"""


def _at_least_one(text: str) -> int:
    """An argparse type: an integer of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


class _Deprecated(argparse.Action):
    """An old spelling of an option: stores its value as before and notes a warning that
    ``main`` logs, naming the spelling to use instead (hidden from --help)."""

    def __init__(self, option_strings, dest, instead: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.instead = instead

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        notes = list(getattr(namespace, "deprecations", None) or [])
        notes.append(f"{option_string} is deprecated and will be removed: use {self.instead}")
        namespace.deprecations = notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ovirt-borg",
        description="Back up oVirt / RHV virtual machines into Borg repositories. Every archive "
                    "holds each disk as one complete, sparse raw image (a synthetic full), while "
                    "nightly incrementals read and store only the blocks that changed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ovirt-borg {__version__}")
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="job configuration (TOML); default /etc/ovirt-borg/default.toml")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more detail in the log (-vv: also the libraries' debug output)")
    parser.add_argument("--log-json", action="store_true", help="log as JSON lines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("backup", help="back up VMs (full or incremental, one archive per VM)",
                       description="Back up the named VMs, or with --all every VM the configuration "
                                   "selects. Each VM gets one archive, PREFIX<vm>-<UTC time>. The run "
                                   "is incremental where the last committed archive's checkpoint is "
                                   "still valid on the engine, full otherwise (the reason is logged).")
    p.add_argument("vms", nargs="*", metavar="VM", help="VM names (default with --all: the selection)")
    p.add_argument("--all", action="store_true", help="every VM selected by the configuration")
    p.add_argument("--full", action="store_true", help="read every disk in full (still deduplicated)")
    p.add_argument("--dry-run", action="store_true",
                   help="show the VMs selected and, per VM, full or incremental and why, the disks and "
                        "the path; start nothing on the engine, write nothing")
    p.add_argument("--json", action="store_true",
                   help="print JSON: the repository, one entry per VM (its archive, mode, disks, bytes "
                        "read or error), the run's totals and exit code")

    p = sub.add_parser("list", help="list this job's archives per VM",
                       description="List the archives this job wrote (matching its prefix), per VM.")
    p.add_argument("vms", nargs="*", metavar="VM", help="only these VMs")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "restore", help="restore a VM, one disk, or disks to local files",
        description="Restore from ARCHIVE. With --vm-name: recreate the VM from its saved configuration "
                    "under a new name with new ids, its disks uploaded to --storage-domain. With --disk and "
                    "--storage-domain alone: one disk into oVirt, attached to no VM. With --to-dir: the disks "
                    "as local sparse files (no engine needed). Holes are never read nor sent.")
    p.add_argument("archive", metavar="ARCHIVE", help="archive name (see 'ovirt-borg list')")
    p.add_argument("--vm-name", metavar="NEW", help="name of the recreated VM")
    p.add_argument("--cluster", default="Default", help="cluster of the recreated VM (default: Default)")
    p.add_argument("--storage-domain", metavar="SD",
                   help="storage domain of the new disks (without --vm-name: the one --disk, attached to no VM)")
    p.add_argument("--disk", action="append", metavar="ID", help="only this disk (id or alias); repeatable")
    p.add_argument("--to-storage-domain", action=_Deprecated, instead="--storage-domain", metavar="SD")
    p.add_argument("--to-dir", metavar="DIR", type=Path,
                   help="write the disks as sparse files into DIR, with the VM's vm.ovf (all mode 0600)")
    p.add_argument("--format", choices=("raw", "qcow2"), default="raw", help="file format with --to-dir")
    p.add_argument("--force", action="store_true",
                   help="with --to-dir: replace files of the same names (refused otherwise)")
    p.add_argument("--start", action="store_true", help="start the recreated VM")
    p.add_argument("--sha256", action="store_true",
                   help="compute each restored image's sha256 on the way (holes hashed too: slow "
                        "for large sparse disks)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary: the VM, each disk with its ids, bytes sent, sha256 "
                        "(with --sha256), time")

    p = sub.add_parser("verify", help="re-read archives and compare with the hashes taken at backup time",
                       description="Re-read every disk image of each ARCHIVE (or of the newest N archives of a VM, "
                                   "or of every VM of this job) from the repository (Borg checks each chunk's "
                                   "MAC and id as it reads) and compare each block with the digest recorded at "
                                   "backup time: its Borg chunk id, or its sha256 for archives of the 'cli' "
                                   "writer. Exit 10 on a mismatch. Borg's shared lock is held while an archive "
                                   "is read: a backup of the same repository waits for it (lock_wait).")
    p.add_argument("targets", nargs="*", metavar="ARCHIVE|VM",
                   help="an archive to verify, or a VM: its newest --last N archives")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--vm", action=_Deprecated, instead="the VM's name as an argument (verify VM)")
    which.add_argument("--all", action="store_true",
                       help="verify the newest archives of every VM with archives of this job (the weekly "
                            "ovirt-borg-verify@.timer runs this)")
    p.add_argument("--last", type=_at_least_one, default=1, metavar="N",
                   help="for a VM, or with --all: how many of each VM's newest (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "mount", help="mount an archive and its disks' file systems read-only",
        description="borg mount ARCHIVE at MOUNTPOINT/.archive and mount every file system found "
                    "on its disks read-only at MOUNTPOINT/<disk alias>/<partition> (pN, or "
                    "whole-disk for a disk without partitions). Every file system is mounted "
                    "ro,nosuid,nodev,noexec: a guest is not trusted. MOUNTPOINT, when new, and "
                    "every directory made below it are mode 0700 (root alone can read the guests' "
                    "files). Needs root. Borg holds the repository's shared lock while the archive "
                    "is mounted: backups and prunes of the repository wait for 'umount' (up to "
                    "repository.lock_wait) and then fail.")
    p.add_argument("archive", metavar="ARCHIVE", help="the archive to mount (see 'ovirt-borg list')")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path,
                   help="a new directory, or an empty one of root's that no one else may write to")
    p.add_argument("--json", action="store_true", help="print what was mounted where as JSON")
    p = sub.add_parser(
        "umount", help="undo 'ovirt-borg mount' (needs no -c)",
        description="Unmount what 'ovirt-borg mount' made at MOUNTPOINT, as recorded in "
                    "MOUNTPOINT/.ovirt-borg-mount.json while it was made: the file systems, the loop "
                    "devices, the archive, then the directories. Also after a mount that was "
                    "stopped or crashed midway. It refuses, touching nothing, when anything else "
                    "is mounted below MOUNTPOINT.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="the directory given to 'mount'")

    p = sub.add_parser(
        "files", help="restore files or directories from a VM's file systems, or browse them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Restore files or directories from the file systems of the VM in ARCHIVE into DIR, or list
them, without mounting anything by hand: the archive and the volumes named are mounted
privately (as 'mount' does, read-only, in a new 0700 directory), copied from, and unmounted,
also after an error or Ctrl-C.

PATH is DISK/VOLUME[/PATH/IN/THE/GUEST], with DISK and VOLUME as 'mount' names them:
the disk's alias, then pN (a partition), whole-disk (a disk without partitions) or VG-LV
(an LVM logical volume, '-' doubled inside a name, as in /dev/mapper). 'files ARCHIVE --list'
shows them. Symlinks in PATH are followed inside the guest's file system only (an absolute
target starts at that volume's root); the last part of PATH is never followed.

Each PATH is copied to DIR/<its last name>: a directory with everything below it. Owner,
group, permission bits and times are kept where DIR's file system allows (not the times of a
vfat volume read by fusefat, which shows them wrong); setuid and setgid bits never are. Symlinks are copied as symlinks (never followed), device nodes, FIFOs and
sockets are skipped (and listed). Nothing is ever overwritten: if DIR/<name> exists, nothing
is copied. Extended attributes and ACLs are not copied.""",
        epilog="""\
examples:
  ovirt-borg files ARCHIVE --list                        the disks and volumes, and why any is unreadable
  ovirt-borg files ARCHIVE --list rhel/rhel-root/etc     a directory of an LVM guest's root
  ovirt-borg files ARCHIVE rhel/rhel-root/etc/hostname rhel/rhel-home/alice --to /srv/restore
  ovirt-borg files ARCHIVE 'windows/p2/Users/Administrator/Documents' --to /srv/restore

exit codes:
  0   everything asked for was restored (skipped device nodes are listed, not errors)
  1   restored, but some entries could not be read or written (listed)
  2   nothing restored: a bad PATH, a name that exists in DIR, a volume that cannot be read
      (encrypted, swap, no file system: the reason is given)
  9   the repository is missing or damaged; 6 it is busy; 5 wrong passphrase
  11  the archive, disk, volume or path does not exist
  128+n  stopped by signal n; the private mount is undone""")
    p.add_argument("archive", metavar="ARCHIVE", help="the archive (see 'ovirt-borg list')")
    p.add_argument("paths", nargs="*", metavar="PATH", help="what to restore: DISK/VOLUME[/PATH]")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", metavar="DIR", type=Path, help="restore into DIR (made 0700 when missing)")
    what.add_argument("--list", nargs="?", const="", metavar="PATH",
                      help="list the volumes, or the directory (or file) PATH, instead")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("prune", help="apply the retention rules per VM, then compact",
                       description="Prune this job's archives per VM with the [retention] keep rules "
                                   "(borg prune --glob-archives per VM, so no other archive is ever "
                                   "touched), then borg compact. The archive the next incremental starts "
                                   "from is never removed unless a newer one exists.")
    p.add_argument("vms", nargs="*", metavar="VM", help="only these VMs (default: every VM with archives)")
    p.add_argument("--dry-run", action="store_true", help="say what would be pruned, change nothing")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("checkpoints", help="list engine checkpoints; purge the ones no backup needs",
                       description="List each VM's checkpoints on the engine and mark the one the next "
                                   "incremental starts from. With --purge, delete the older ones.")
    p.add_argument("vms", nargs="*", metavar="VM", help="only these VMs (default: VMs with a sidecar)")
    p.add_argument("--purge", action="store_true", help="delete checkpoints older than the one in use")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("config", help="check a configuration, or write the documented sample",
                       description="'config validate' checks the configuration given with -c: its keys and "
                                   "values, the secret and CA files it names, its plugins; with --connect also "
                                   "the engine (login, the VMs [selection] takes) and the repository (it "
                                   "opens). 'config generate' writes the documented sample.")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True,
                                  help="validate (the -c FILE) or generate (the sample)")
    c = config_sub.add_parser("validate", help="check the configuration (-c FILE)",
                              description="Check the configuration given with -c FILE; exit 0 when it is "
                                          "valid, else the error's exit code (2 for the configuration).")
    c.add_argument("--connect", action="store_true",
                   help="also log in to the engine and open the repository")
    c = config_sub.add_parser("generate", help="write the documented sample configuration",
                              description="Write a documented configuration with every option, its default "
                                          "and an example, to FILE (mode 0600) or standard output.")
    c.add_argument("--destination", metavar="FILE", type=Path,
                   help="write it to FILE (mode 0600) instead of printing it")
    c.add_argument("--force", action="store_true", help="replace FILE when it exists (refused otherwise)")

    sub.add_parser("generate-config", help="print a sample configuration with every option",
                   description="Print a documented configuration with every option, its default and "
                               "an example (as 'config generate'). Save it as /etc/ovirt-borg/NAME.toml "
                               "and edit it.")
    return parser


# -- helpers -------------------------------------------------------------------------------------


def _load_config(path: str | None) -> config_mod.Config:
    return config_mod.load(path or config_mod.DEFAULT_CONFIG_DIR / "default.toml")


def _print_json(document) -> None:
    print(json.dumps(document, indent=2))


def _rate(size: int, seconds: float) -> str:
    """Bytes over seconds as MiB/s (or the unit ``human_size`` picks)."""
    return f"{human_size(size / seconds)}/s" if seconds > 0 else "-"


# -- commands ------------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace, config: config_mod.Config) -> int:
    report = jobs.run_backup(config, jobs.BackupRequest(vms=tuple(args.vms), all_vms=args.all, full=args.full,
                                                        dry_run=args.dry_run))
    if args.json:
        _print_json(report.as_dict())
    elif report.dry_run:
        _print_plans(report)
    else:
        _print_results(report)
    return report.exit_code


def _print_results(report: jobs.BackupReport) -> None:
    """One line per VM (mode, bytes read, time, archive), then the run's totals."""
    for r in report.results:
        if r.ok:
            read = sum(d.bytes_read for d in r.disks)
            warned = f"; {len(r.warnings)} warning(s), see the log" if r.warnings else ""
            print(f"{r.vm}: {r.mode}, read {human_size(read)} in {r.seconds:.1f} s ({_rate(read, r.seconds)}), "
                  f"archive {r.archive}{warned}")
        elif r.error.startswith("skipped:"):
            print(f"{r.vm}: {r.error}")
        else:
            print(f"{r.vm}: FAILED (exit {r.exit_code}): {r.error}")
    t = report.totals()
    print(f"{t['backed_up']} of {t['vms']} VMs backed up ({t['full']} full, {t['incremental']} incremental), "
          f"{t['failed']} failed, {t['skipped']} skipped; read {human_size(t['bytes_read'])} in "
          f"{t['seconds']:.1f} s; exit {report.exit_code}")


def _print_plans(report: jobs.BackupReport) -> None:
    """Per VM: the mode it would get and why, the path, each disk; then the totals."""
    for p in report.plans:
        if p.skipped:
            print(f"{p.vm}: would be skipped: {p.skipped}")
        else:
            print(f"{p.vm} ({p.status}): {p.mode} ({p.reason}), into {p.archive}; {p.path_note}")
            for disk in p.disks:
                enable = ", incremental backup turned on first" if disk["enable_incremental"] else ""
                why = f" ({disk['reason']})" if p.mode == "incremental" and disk["reason"] else ""
                print(f"  {disk['alias']} ({disk['format']}, {human_size(disk['provisioned_size'])}): "
                      f"{disk['mode']}{why}{enable}")
        for disk in p.skipped_disks:
            print(f"  {disk['alias']}: not backed up: {disk['reason']}")
        for alias in p.excluded_disks:
            print(f"  {alias}: excluded by selection.exclude_disks")
    t = report.totals()
    print(f"dry run: {t['vms']} VMs selected: {t['full']} full, {t['incremental']} incremental, "
          f"{t['skipped']} skipped; nothing was started on the engine or written")


def cmd_list(args: argparse.Namespace, config: config_mod.Config) -> int:
    listing = jobs.list_archives(config, args.vms)
    if args.json:
        _print_json(listing.as_dict())
        return EXIT_OK
    print(f"{'VM':<20} {'ARCHIVE':<44} {'MODE':<12} {'SIZE':>10} {'READ':>10}  CHECKPOINT")
    for row in listing.archives:
        print(f"{row['vm']:<20} {row['name']:<44} {row['mode']:<12} {human_size(row['size']):>10} "
              f"{human_size(row['bytes_read']):>10}  {row['checkpoint']}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace, config: config_mod.Config) -> int:
    result = jobs.run_restore(config, jobs.RestoreRequest(
        archive=args.archive, vm_name=args.vm_name, cluster=args.cluster,
        storage_domain=args.storage_domain or args.to_storage_domain, disks=tuple(args.disk or ()),
        to_dir=args.to_dir, format=args.format, force=args.force, start=args.start, sha256=args.sha256))
    if args.json:
        _print_json(result.as_dict())
        return EXIT_OK
    for disk in result.disks:
        where = disk.path or f"new disk {disk.new_id} on {result.storage_domain}"
        digest = f", sha256 {disk.sha256}" if disk.sha256 else ""
        print(f"{disk.alias}: restored to {where}, {human_size(disk.bytes_sent)} of data in "
              f"{disk.seconds:.1f} s ({_rate(disk.bytes_sent, disk.seconds)}){digest}")
    if result.ovf:
        print(f"VM configuration: {result.ovf}")
    if result.vm_id:
        print(f"VM {result.vm_name} created ({result.vm_id})")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, config: config_mod.Config) -> int:
    targets = [*args.targets, *([args.vm] if args.vm else [])]
    report = jobs.verify(config, targets, last=args.last, every_vm=args.all)
    if args.json:
        _print_json(report.as_dict())
    else:
        for item in report.archives:
            if item["ok"]:
                print(f"{item['name']}: OK (" + ", ".join(
                    f"{d['alias']} {d['blocks']} blocks" for d in item["disks"]) + ")")
            else:
                print(f"{item['name']}: FAILED: {item['error']}")
    if report.failed:
        raise report.failed
    return EXIT_OK


def cmd_mount(args: argparse.Namespace, config: config_mod.Config) -> int:
    from ovirt_borg import mount

    result = mount.mount_archive(jobs.repository(config), args.archive, args.mountpoint.absolute())
    if args.json:
        _print_json(result.as_dict())
        return EXIT_OK
    print(f"archive {result.archive} of VM {mount.printable(result.vm)} mounted at {result.mountpoint}")
    for disk in result.disks:
        print(f"{disk.name}/  disk {mount.printable(disk.alias)} ({mount.printable(disk.id)})")
        for volume in disk.volumes:
            if volume.path:
                print(f"  {volume.name}: {volume.fstype} mounted read-only at {volume.path}")
            else:
                print(f"  {volume.name}: {'' if volume.holds_volumes else 'not mounted: '}{volume.reason}")
    print(f"the same in {result.mountpoint / mount.README_NAME}; when done: ovirt-borg umount {result.mountpoint}")
    return EXIT_OK


def cmd_files(args: argparse.Namespace, config: config_mod.Config) -> int:
    from datetime import datetime

    from ovirt_borg import files, mount

    repo = jobs.repository(config)
    if args.list is not None:
        if args.paths:
            raise ConfigError("--list takes one PATH (files ARCHIVE --list PATH); give no other PATH")
        listing = files.list_files(repo, args.archive, args.list or None)
        if args.json:
            _print_json(listing)
        elif "entries" not in listing:
            for disk in listing["disks"]:
                print(f"{disk['name']}/  disk {mount.printable(disk['alias'])}")
                for volume in disk["volumes"]:
                    readable = volume["reason"] is None or volume["mounted"]
                    state = volume["fstype"] if readable else volume["reason"]
                    print(f"  {disk['name']}/{volume['name']}  {volume['what']}: {state}")
        else:
            for entry in listing["entries"]:
                when = datetime.fromtimestamp(entry["mtime"]).strftime("%Y-%m-%d %H:%M")
                kind = {"directory": "d", "symlink": "l", "file": "-"}.get(entry["type"], "?")
                line = (f"{kind}{stat.filemode(entry['mode'])[1:]} {entry['uid']:>5} {entry['gid']:>5} "
                        f"{entry['size']:>12} {when} {mount.printable(entry['name'])}")
                if "target" in entry:
                    line += f" -> {mount.printable(entry['target'])}"
                print(line)
        return EXIT_OK
    results = files.restore_files(repo, args.archive, args.paths, args.to)
    if args.json:
        _print_json([r.as_dict() for r in results])
    else:
        for result in results:
            print(f"{result.path} -> {result.to}: {result.files} files ({result.bytes} bytes), "
                  f"{result.directories} directories, {result.symlinks} symlinks")
            for line in result.skipped:
                print(f"  skipped {line}")
            for line in result.failed:
                print(f"  FAILED {line}")
            if not result.metadata_kept:
                print(f"  owners, modes or times could not all be kept on {result.to}'s file system")
            if not result.times:
                print("  times not restored: fusefat shows this vfat volume's times wrong")
    return 1 if any(r.failed for r in results) else EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    from ovirt_borg import mount

    mount.umount_archive(args.mountpoint)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace, config: config_mod.Config) -> int:
    report = jobs.prune(config, args.vms, dry_run=args.dry_run)
    if args.json:
        _print_json(report.as_dict())
        return report.exit_code
    verb = "would prune" if args.dry_run else "pruned"
    for r in report.results:
        if r.skipped:
            print(f"{r.vm}: skipped: {r.skipped}")
        else:
            print(f"{r.vm}: {verb} {len(r.pruned)}, kept {len(r.kept)}")
            for name in r.pruned:
                print(f"  {verb} {name}")
    return report.exit_code


def cmd_checkpoints(args: argparse.Namespace, config: config_mod.Config) -> int:
    report = jobs.checkpoints(config, args.vms, purge=args.purge)
    if args.json:
        _print_json(report.as_dict())
        return EXIT_OK
    for item in report.vms:
        print(f"{item['vm']}:")
        for c in item["checkpoints"]:
            mark = "  <- next incremental starts here" if c["in_use"] else ""
            print(f"  {c['id']} {c['state']}{mark}")
        for c in item["purged"]:
            print(f"  deleted {c}")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "generate":
        if args.force and not args.destination:
            raise ConfigError("--force replaces a file: it goes with --destination FILE")
        if args.destination:
            config_mod.write_sample(args.destination, force=args.force)
            print(f"sample configuration written to {args.destination} (mode 0600); edit it, then check it "
                  f"with: ovirt-borg -c {args.destination} config validate --connect")
        else:
            print(config_mod.sample_config())
        return EXIT_OK
    for line in jobs.validate(_load_config(args.config), connect_to=args.connect):
        print(line)
    return EXIT_OK


def cmd_generate_config(args: argparse.Namespace) -> int:
    print(config_mod.sample_config())
    return EXIT_OK


COMMANDS = {"backup": cmd_backup, "list": cmd_list, "restore": cmd_restore, "verify": cmd_verify,
            "mount": cmd_mount, "files": cmd_files, "prune": cmd_prune, "checkpoints": cmd_checkpoints}
#: Commands that need no configuration (or, 'config validate', load the one -c names themselves).
WITHOUT_CONFIG = {"generate-config": cmd_generate_config, "umount": cmd_umount, "config": cmd_config}


#: Signals that stop a run cleanly (Ctrl-C, systemctl stop, a closed terminal or ssh session).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run one command, map errors to exit codes. The only exit point."""
    # Everything ovirt-borg creates is its user's alone: repository segments and indexes written
    # in-process, state, restored images, mountpoints (the systemd unit sets UMask=0077 too).
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.verbose, args.log_json)
    for note in getattr(args, "deprecations", None) or ():
        log.warning("%s", note)
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup, a background job: left ignored
            signal.signal(signum, _raise_interrupted)
    memory.tune_allocator()
    try:
        if args.command in WITHOUT_CONFIG:
            code = WITHOUT_CONFIG[args.command](args)
        else:
            config = _load_config(args.config)
            code = COMMANDS[args.command](args, config)
    except Interrupted as e:
        log.error("%s", e)
        code = e.exit_code
    except KeyboardInterrupt:  # before the handlers above were installed
        log.error("interrupted by SIGINT")
        code = 128 + signal.SIGINT
    except OvirtBorgError as e:
        log.error("%s", e)
        code = e.exit_code
    except Exception:
        log.exception("unexpected error (please report it with this trace)")
        code = EXIT_ERROR
    sys.stdout.flush()
    return code


def console() -> int:
    """The ``ovirt-borg`` program: main() in a process that ends when it returns.

    Every object the run made lives until the process exits anyway; frozen, they are spared the
    interpreter's last garbage collection over all of them and the modules', a visible share of
    a short run such as a small incremental (docs/BENCHMARKS.md).
    """
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console())
