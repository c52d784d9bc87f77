"""The ``ovirt-borg`` command line: the one place that parses arguments, prints and exits."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import json
import logging
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Iterator

from ovirt_borg import __version__, archive, borgcli, config as config_mod, credentials, logs, memory, sidecar as sc
from ovirt_borg.errors import EXIT_ERROR, EXIT_OK, ConfigError, Interrupted, JobLocked, OvirtBorgError

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
  /etc/ovirt-borg/NAME.toml       a job's configuration (ovirt-borg generate-config)
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
    p.add_argument("--json", action="store_true", help="print a JSON summary per VM on stdout")

    p = sub.add_parser("list", help="list this job's archives per VM",
                       description="List the archives this job wrote (matching its prefix), per VM.")
    p.add_argument("vms", nargs="*", metavar="VM", help="only these VMs")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser(
        "restore", help="restore a VM, one disk, or disks to local files",
        description="Restore from ARCHIVE. With --vm-name: recreate the VM from its saved configuration "
                    "under a new name with new ids, its disks uploaded to --storage-domain. With --disk and "
                    "--to-storage-domain: one disk into oVirt, attached to no VM. With --to-dir: the disks "
                    "as local sparse files (no engine needed). Holes are never read nor sent.")
    p.add_argument("archive", metavar="ARCHIVE", help="archive name (see 'ovirt-borg list')")
    p.add_argument("--vm-name", metavar="NEW", help="name of the recreated VM")
    p.add_argument("--cluster", default="Default", help="cluster of the recreated VM (default: Default)")
    p.add_argument("--storage-domain", metavar="SD", help="storage domain of the new disks")
    p.add_argument("--disk", action="append", metavar="ID", help="only this disk (id or alias); repeatable")
    p.add_argument("--to-storage-domain", metavar="SD", help="restore the --disk into SD, attached to no VM")
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
                       description="Re-read every disk image of ARCHIVE (or of the newest N archives of a VM, "
                                   "or of every VM of this job) from the repository (Borg checks each chunk's "
                                   "MAC and id as it reads) and compare each block with the digest recorded at "
                                   "backup time: its Borg chunk id, or its sha256 for archives of the 'cli' "
                                   "writer. Exit 10 on a mismatch. Borg's shared lock is held while an archive "
                                   "is read: a backup of the same repository waits for it (lock_wait).")
    p.add_argument("archive", nargs="?", metavar="ARCHIVE", help="the archive to verify")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--vm", help="verify this VM's newest archives")
    which.add_argument("--all", action="store_true",
                       help="verify the newest archives of every VM with archives of this job (the weekly "
                            "ovirt-borg-verify@.timer runs this)")
    p.add_argument("--last", type=_at_least_one, default=1, metavar="N",
                   help="with --vm or --all: how many of each VM's newest (default 1)")
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

    sub.add_parser("generate-config", help="print a sample configuration with every option",
                   description="Print a documented configuration with every option, its default and "
                               "an example. Save it as /etc/ovirt-borg/NAME.toml and edit it.")
    return parser


# -- helpers -------------------------------------------------------------------------------------


def _load_config(path: str | None) -> config_mod.Config:
    return config_mod.load(path or config_mod.DEFAULT_CONFIG_DIR / "default.toml")


def _repo(config: config_mod.Config) -> archive.Repo:
    env = credentials.borg_env(config)
    if env.get("BORG_PASSPHRASE"):
        logs.add_secret(env["BORG_PASSPHRASE"])
    location = env.pop("BORG_REPO")
    return archive.Repo(location=location, env=env, lock_wait=config.repository.lock_wait,
                        compression=config.repository.compression)


def _engine(config: config_mod.Config):
    from ovirt_borg.engine import Engine, EngineSettings

    password = credentials.engine_password(config)
    logs.add_secret(password)
    if config.engine.insecure:
        log.warning("engine.insecure is set: TLS certificates of the engine and imageio are NOT verified")
    return Engine(EngineSettings(url=config.engine.url, user=config.engine.user, password=password,
                                 ca_file=config.engine.ca_file, insecure=config.engine.insecure,
                                 timeout=config.engine.timeout, poll_interval=config.engine.poll_interval,
                                 retries=config.engine.retries))


@contextlib.contextmanager
def _job_lock(config: config_mod.Config) -> Iterator[None]:
    """Hold the job's lock so that two runs of the same job never overlap."""
    state = Path(config.state.directory)
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    name = hashlib.sha256(os.path.abspath(config.path).encode()).hexdigest()[:16]
    path = state / f"job-{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobLocked(f"another run of the job {config.path} is in progress (lock {path}); "
                            "this run did nothing") from None
        yield
    finally:
        os.close(fd)


def _state_dir(config: config_mod.Config, repository_id: str) -> sc.StateDir:
    return sc.StateDir(Path(config.state.directory), repository_id)


# -- commands ------------------------------------------------------------------------------------


def cmd_backup(args: argparse.Namespace, config: config_mod.Config) -> int:
    from ovirt_borg import backup, plugins

    if not args.vms and not args.all:
        raise ConfigError("name the VMs to back up, or use --all for the configured selection")
    pm = plugins.build_manager(config.hooks, [Path(d) for d in config.plugins.directories])
    t = config.transfer
    settings = backup.BackupSettings(
        block_size=config.repository.block_bytes, vm_block_sizes=config.repository.vm_block_bytes(),
        writer=config.repository.writer,
        enable_incremental=config.backup.enable_incremental, verify_sample=config.backup.verify_sample,
        full_every_days=config.backup.full_every_days, cold_backup=config.backup.cold_backup,
        exclude_disks=tuple(config.selection.exclude_disks), checkpoints_keep=config.checkpoints.keep,
        checkpoints_other_jobs_days=config.checkpoints.other_jobs_days,
        foreign_stale_hours=config.backup.foreign_stale_hours,
        inactivity_timeout=t.inactivity_timeout, transfer=_transfer_settings(config))
    repo = _repo(config)
    prefix = config.repository.prefix

    def archive_name(vm, timestamp: str) -> str:
        from ovirt_borg.retention import vm_of_archive

        name = pm.hook.ovirt_borg_archive_name(config=config, vm=vm, timestamp=timestamp)
        if vm_of_archive(name, prefix) != vm.name:
            raise ConfigError(f"a plugin named the archive of VM {vm.name} {name!r}; it must be "
                              f"{prefix}{vm.name}-<UTC time>[.tag], or list, prune and restore would "
                              "not find it")
        return name

    vms: list = []
    started = False
    try:
        with _job_lock(config), _engine(config) as engine:
            # One look at the repository for the whole run: its id names the state directory,
            # its archive list tells each VM whether its previous archive is still there.
            view = archive.repository_view(repo)
            state = _state_dir(config, view.id)
            settings = dataclasses.replace(settings, description=backup.job_description(
                Path(config.path).stem, view.id))
            all_vms = engine.list_vms(with_tags=bool(config.selection.tags))
            if args.vms:
                known = {vm.name for vm in all_vms}
                missing = [n for n in args.vms if n not in known]
                if missing:
                    from ovirt_borg.errors import NotFound

                    raise NotFound("no VM named " + ", ".join(repr(n) for n in missing) + " on the engine")
            vms = pm.hook.ovirt_borg_select_vms(config=config, vms=all_vms, requested=list(args.vms),
                                                all_vms=args.all)
            plugins.notify(pm, "ovirt_borg_run_started", config=config, command="backup", vms=vms)
            started = True
            if not vms:
                log.warning("the selection matches no VM; nothing to back up")
                outcome = backup.RunOutcome([], 1)
            else:
                timestamp = backup.unused_timestamp(sidecar.archive for sidecar in state.all())
                outcome = backup.run_backups(engine, repo, state, settings, vms,
                                             lambda vm: archive_name(vm, timestamp), pm, config,
                                             force_full=args.full, archives=view.archives)
    except BaseException as e:
        code = (e.exit_code if isinstance(e, (OvirtBorgError, Interrupted))
                else 128 + signal.SIGINT if isinstance(e, KeyboardInterrupt) else EXIT_ERROR)
        if not started:  # monitoring pairs every start with an end, even when the run never began
            plugins.notify(pm, "ovirt_borg_run_started", config=config, command="backup", vms=vms)
        plugins.notify(pm, "ovirt_borg_run_finished", config=config, command="backup",
                       results=[], exit_code=code)
        raise
    plugins.notify(pm, "ovirt_borg_run_finished", config=config, command="backup",
                   results=[r.as_dict() for r in outcome.results], exit_code=outcome.exit_code)
    if args.json:
        print(json.dumps([r.as_dict() for r in outcome.results], indent=2))
    else:
        for r in outcome.results:
            if r.ok:
                read = sum(d.bytes_read for d in r.disks)
                from ovirt_borg.progress import human_size

                warned = f" ({len(r.warnings)} warning(s), see the log)" if r.warnings else ""
                print(f"{r.vm}: {r.mode} backup in {r.seconds:.1f} s, read {human_size(read)}, "
                      f"archive {r.archive}{warned}")
            else:
                print(f"{r.vm}: FAILED: {r.error}")
    return outcome.exit_code


def cmd_list(args: argparse.Namespace, config: config_mod.Config) -> int:
    from ovirt_borg.backup import parse_archive_comment
    from ovirt_borg.progress import human_size
    from ovirt_borg.retention import vm_of_archive

    repo = _repo(config)
    prefix = config.repository.prefix
    rows = []
    archived = set()
    for a in borgcli.list_archives(repo, f"{prefix}*"):
        vm = vm_of_archive(a["name"], prefix)
        if vm is not None:
            archived.add(vm)
        if vm is None or (args.vms and vm not in args.vms):
            continue  # not an archive of this job, or not a VM asked for
        fields = parse_archive_comment(a.pop("comment", ""))
        rows.append({"vm": vm, "name": a["name"], "id": a["id"], "start": a["start"].isoformat(),
                     "mode": fields.get("mode", "?"), "path": fields.get("path", "?"),
                     "checkpoint": fields.get("checkpoint", "-"), "size": int(fields.get("size", 0)),
                     "bytes_read": int(fields.get("read", 0)),
                     "blocks_stored": int(fields.get("blocks_stored", 0))})
    unknown = [vm for vm in args.vms if vm not in archived]
    if unknown:
        from ovirt_borg.errors import NotFound, nearest_hint

        raise NotFound("; ".join(f"no archives of VM {vm!r} in the repository{nearest_hint(vm, archived)}"
                                 for vm in unknown))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'VM':<20} {'ARCHIVE':<44} {'MODE':<12} {'SIZE':>10} {'READ':>10}  CHECKPOINT")
        for row in rows:
            print(f"{row['vm']:<20} {row['name']:<44} {row['mode']:<12} {human_size(row['size']):>10} "
                  f"{human_size(row['bytes_read']):>10}  {row['checkpoint']}")
    return EXIT_OK


def _transfer_settings(config: config_mod.Config):
    from ovirt_borg.imageio import TransferSettings

    t = config.transfer
    if t.host_ca_file and not os.access(t.host_ca_file, os.R_OK):
        raise ConfigError(f"{config.path}: 'transfer.host_ca_file' {t.host_ca_file} does not exist or cannot "
                          "be read; download the engine's internal CA there")
    return TransferSettings(
        readers=t.readers, connect_timeout=t.connect_timeout, read_timeout=t.read_timeout,
        extents_timeout=t.extents_timeout, retries=t.retries, force_proxy=t.use_proxy,
        ca_file=config.engine.ca_file or None, host_ca_file=t.host_ca_file or None,
        verify=not config.engine.insecure,
        bandwidth_limit=config_mod.parse_size(t.bandwidth_limit) if t.bandwidth_limit else None)


def cmd_restore(args: argparse.Namespace, config: config_mod.Config) -> int:
    from ovirt_borg import restore

    from ovirt_borg.progress import human_size

    repo = _repo(config)
    prefix = config.repository.prefix
    if args.force and not args.to_dir:
        raise ConfigError("--force replaces local files: it goes with --to-dir")
    if args.to_dir:
        result = restore.restore_to_dir(repo, args.archive, prefix, args.to_dir, fmt=args.format,
                                        disk_ids=args.disk, force=args.force, sha256=args.sha256)
    elif args.to_storage_domain:
        if not args.disk or len(args.disk) != 1:
            raise ConfigError("--to-storage-domain restores one disk: name it with --disk ID")
        with _engine(config) as engine:
            result = restore.restore_disk(engine, repo, args.archive, prefix, args.disk[0],
                                          args.to_storage_domain, _transfer_settings(config),
                                          inactivity_timeout=config.transfer.inactivity_timeout,
                                          sha256=args.sha256)
    elif args.vm_name:
        if not args.storage_domain:
            raise ConfigError("--vm-name needs --storage-domain SD for the new disks")
        with _engine(config) as engine:
            result = restore.restore_vm(engine, repo, args.archive, prefix, vm_name=args.vm_name,
                                        cluster=args.cluster, storage_domain=args.storage_domain,
                                        settings=_transfer_settings(config),
                                        inactivity_timeout=config.transfer.inactivity_timeout,
                                        disk_ids=args.disk, start=args.start, sha256=args.sha256)
    else:
        raise ConfigError("say where to restore: --vm-name NEW, --disk ID --to-storage-domain SD, or --to-dir DIR")
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for disk in result.disks:
            where = disk.path or f"new disk {disk.new_id} on {result.storage_domain}"
            digest = f", sha256 {disk.sha256}" if disk.sha256 else ""
            print(f"{disk.alias}: restored to {where}, {human_size(disk.bytes_sent)} of data in "
                  f"{disk.seconds:.1f} s{digest}")
        if result.ovf:
            print(f"VM configuration: {result.ovf}")
        if result.vm_id:
            print(f"VM {result.vm_name} created ({result.vm_id})")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace, config: config_mod.Config) -> int:
    from ovirt_borg import restore
    from ovirt_borg.backup import vm_archive_glob
    from ovirt_borg.errors import NotFound
    from ovirt_borg.retention import archives_by_vm

    repo = _repo(config)
    prefix = config.repository.prefix
    if args.archive and (args.vm or args.all):
        raise ConfigError("name an ARCHIVE, or use --vm or --all, not both")
    if args.archive:
        names = [args.archive]
    elif args.vm:
        names = [a["name"] for a in borgcli.list_archives(repo, vm_archive_glob(prefix, args.vm))][-args.last:]
        if not names:
            from ovirt_borg.errors import nearest_hint

            by_vm = archives_by_vm((a["name"] for a in borgcli.list_archives(repo, f"{prefix}*")), prefix)
            raise NotFound(f"no archives of VM {args.vm!r} in the repository" + nearest_hint(args.vm, by_vm))
    elif args.all:
        by_vm = archives_by_vm((a["name"] for a in borgcli.list_archives(repo, f"{prefix}*")), prefix)
        names = [name for vm in sorted(by_vm) for name in by_vm[vm][-args.last:]]
        if not names:
            raise NotFound(f"no archives of this job (prefix {prefix!r}) in the repository")
    else:
        raise ConfigError("name an ARCHIVE, or --vm VM [--last N], or --all [--last N]")
    report = []
    failed = None
    for name in names:
        try:
            disks = restore.verify_archive(repo, name, prefix)
            report.append({"archive": name, "ok": True, "disks": [d.__dict__ for d in disks]})
        except OvirtBorgError as e:
            failed = failed or e
            report.append({"archive": name, "ok": False, "error": str(e)})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in report:
            if item["ok"]:
                print(f"{item['archive']}: OK (" + ", ".join(
                    f"{d['alias']} {d['blocks']} blocks" for d in item["disks"]) + ")")
            else:
                print(f"{item['archive']}: FAILED: {item['error']}")
    if failed:
        raise failed
    return EXIT_OK


def cmd_mount(args: argparse.Namespace, config: config_mod.Config) -> int:
    from ovirt_borg import mount

    result = mount.mount_archive(_repo(config), args.archive, args.mountpoint.absolute())
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
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

    repo = _repo(config)
    if args.list is not None:
        if args.paths:
            raise ConfigError("--list takes one PATH (files ARCHIVE --list PATH); give no other PATH")
        listing = files.list_files(repo, args.archive, args.list or None)
        if args.json:
            print(json.dumps(listing, indent=2))
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
        print(json.dumps([r.as_dict() for r in results], indent=2))
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
    from ovirt_borg import retention

    keep = retention.keep_rules(config.retention)
    if not keep:
        raise ConfigError(f"{config.path}: [retention] keeps nothing; set at least one keep_* rule")
    repo = _repo(config)
    with _job_lock(config):
        state = _state_dir(config, archive.repository_id(repo))
        results = retention.prune(repo, state, config.repository.prefix, keep,
                                  vms=list(args.vms) or None, dry_run=args.dry_run)
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        verb = "would prune" if args.dry_run else "pruned"
        for r in results:
            if r.skipped:
                print(f"{r.vm}: skipped: {r.skipped}")
            else:
                print(f"{r.vm}: {verb} {len(r.pruned)}, kept {len(r.kept)}")
                for name in r.pruned:
                    print(f"  {verb} {name}")
    return 1 if any(r.skipped and r.skipped != "no archives of this VM" for r in results) else EXIT_OK


def cmd_checkpoints(args: argparse.Namespace, config: config_mod.Config) -> int:
    repo = _repo(config)
    state = _state_dir(config, archive.repository_id(repo))
    sidecars = {s.vm_name: s for s in state.all()}
    report = []
    with _engine(config) as engine:
        names = list(args.vms) or sorted(sidecars)
        for name in names:
            vm = engine.find_vm(name)
            in_use = sidecars[name].checkpoint_id if name in sidecars else None
            purged = []
            if args.purge and in_use:
                purged = engine.purge_checkpoints(vm.id, in_use, config.checkpoints.keep)
            checkpoints = engine.checkpoints(vm.id)
            report.append({"vm": name, "in_use": in_use, "purged": purged,
                           "checkpoints": [{"id": c.id, "state": c.state, "in_use": c.id == in_use}
                                           for c in checkpoints]})
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for item in report:
            print(f"{item['vm']}:")
            for c in item["checkpoints"]:
                mark = "  <- next incremental starts here" if c["in_use"] else ""
                print(f"  {c['id']} {c['state']}{mark}")
            for c in item["purged"]:
                print(f"  deleted {c}")
    return EXIT_OK


def cmd_generate_config(args: argparse.Namespace) -> int:
    print(config_mod.sample_config())
    return EXIT_OK


COMMANDS = {"backup": cmd_backup, "list": cmd_list, "restore": cmd_restore, "verify": cmd_verify,
            "mount": cmd_mount, "files": cmd_files, "prune": cmd_prune, "checkpoints": cmd_checkpoints}
#: Commands that need no configuration: they are given everything on the command line.
WITHOUT_CONFIG = {"generate-config": cmd_generate_config, "umount": cmd_umount}


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
    interpreter's last garbage collection over all of them and the modules' (0.1 s of the 0.8 s
    a small incremental took).
    """
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(console())
