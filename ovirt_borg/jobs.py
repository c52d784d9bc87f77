"""What each command does with a job: the layer between the command line and the work.

``cli`` parses the arguments and prints; this module turns a job's configuration into the
settings the backup, restore and retention modules take, opens what a command needs (the
repository, the engine, the state directory, the job's lock) and owns a backup run's
lifecycle: the names asked for, the selection, the plugins' start and finish notices, the
archive names plugins give. Nothing here prints or exits; errors are the typed ones of
``ovirt_borg.errors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ovirt_borg import archive, backup, borgcli, credentials, logs, naming, plugins, restore, retention, selection
from ovirt_borg import sidecar as sc
from ovirt_borg.config import Config, parse_size
from ovirt_borg.engine import Engine, EngineSettings, VmInfo
from ovirt_borg.errors import (EXIT_ERROR, ConfigError, Interrupted, JobLocked, NotFound, OvirtBorgError,
                               nearest_hint)
from ovirt_borg.imageio import TransferSettings

log = logging.getLogger(__name__)


# -- what a job's configuration gives the modules below ---------------------------------------------


def repository(config: Config) -> archive.Repo:
    """The job's Borg repository with its environment (the passphrase masked in every log).

    Raises ConfigError when there is no repository or a secret cannot be read.
    """
    env = credentials.borg_env(config)
    if env.get("BORG_PASSPHRASE"):
        logs.add_secret(env["BORG_PASSPHRASE"])
    location = env.pop("BORG_REPO")
    return archive.Repo(location=location, env=env, lock_wait=config.repository.lock_wait,
                        compression=config.repository.compression)


def engine_settings(config: Config) -> EngineSettings:
    """How to reach the job's engine, its password read (and masked in every log).

    Raises ConfigError when the password cannot be had.
    """
    password = credentials.engine_password(config)
    logs.add_secret(password)
    e = config.engine
    return EngineSettings(url=e.url, user=e.user, password=password, ca_file=e.ca_file, insecure=e.insecure,
                          timeout=e.timeout, poll_interval=e.poll_interval, retries=e.retries)


def connect(config: Config) -> Engine:
    """An engine client for the job, not yet connected: use it as a context manager."""
    if config.engine.insecure:
        log.warning("engine.insecure is set: TLS certificates of the engine and imageio are NOT verified")
    return Engine(engine_settings(config))


def transfer_settings(config: Config) -> TransferSettings:
    """The imageio data path's settings; raises ConfigError for an unreadable host CA file."""
    t = config.transfer
    if t.host_ca_file and not os.access(t.host_ca_file, os.R_OK):
        raise ConfigError(f"{config.path}: 'transfer.host_ca_file' {t.host_ca_file} does not exist or cannot "
                          "be read; download the engine's internal CA there")
    return TransferSettings(
        readers=t.readers, connect_timeout=t.connect_timeout, read_timeout=t.read_timeout,
        extents_timeout=t.extents_timeout, retries=t.retries, force_proxy=t.use_proxy,
        ca_file=config.engine.ca_file or None, host_ca_file=t.host_ca_file or None,
        verify=not config.engine.insecure,
        bandwidth_limit=parse_size(t.bandwidth_limit) if t.bandwidth_limit else None)


def backup_settings(config: Config) -> backup.BackupSettings:
    """What a backup run takes from the configuration (the job's description comes later, with
    the repository's id)."""
    return backup.BackupSettings(
        block_size=config.repository.block_bytes, vm_block_sizes=config.repository.vm_block_bytes(),
        writer=config.repository.writer, rebuild_blocks=config.repository.rebuild_blocks,
        enable_incremental=config.backup.enable_incremental, verify_sample=config.backup.verify_sample,
        full_every_days=config.backup.full_every_days, cold_backup=config.backup.cold_backup,
        exclude_disks=tuple(config.selection.exclude_disks), checkpoints_keep=config.checkpoints.keep,
        checkpoints_other_jobs_days=config.checkpoints.other_jobs_days,
        foreign_stale_hours=config.backup.foreign_stale_hours, prepare_ahead=config.backup.prepare_ahead,
        inactivity_timeout=config.transfer.inactivity_timeout, transfer=transfer_settings(config))


@contextlib.contextmanager
def job_lock(config: Config) -> Iterator[None]:
    """Hold the job's lock so that two runs of the same job never overlap; raises JobLocked."""
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


def state_dir(config: Config, repository_id: str) -> sc.StateDir:
    """The job's sidecars of the repository ``repository_id``."""
    return sc.StateDir(Path(config.state.directory), repository_id)


@dataclass(frozen=True)
class RepositoryInfo:
    """The repository a command worked on, as Borg's ``--json`` names it."""

    id: str
    location: str

    def as_dict(self) -> dict:
        return {"id": self.id, "location": self.location}


def _require_vms(names: Sequence[str], vms: Sequence[VmInfo]) -> None:
    """Raise NotFound, with the nearest names, for each of ``names`` that no VM of ``vms`` has."""
    known = [vm.name for vm in vms]
    missing = [name for name in names if name not in known]
    if missing:
        raise NotFound("; ".join(f"no VM named {name!r} on the engine{nearest_hint(name, known)}"
                                 for name in missing))


def _no_archives_of(vm: str, archived: Sequence[str]) -> str:
    return f"no archives of VM {vm!r} in the repository{nearest_hint(vm, archived)}"


# -- backup ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupRequest:
    """What ``ovirt-borg backup`` was asked: VM names (or every selected VM), a full read, a dry run."""

    vms: tuple[str, ...] = ()
    all_vms: bool = False
    full: bool = False
    dry_run: bool = False


@dataclass
class BackupReport:
    """A backup run's outcome: each VM's result (or, for a dry run, its plan) and the exit code."""

    repository: RepositoryInfo | None
    results: list[backup.VmResult] = field(default_factory=list)
    plans: list[backup.VmPlan] = field(default_factory=list)
    dry_run: bool = False
    exit_code: int = 0
    seconds: float = 0.0

    def totals(self) -> dict[str, Any]:
        """The run's totals: VMs, their modes, failures and skips, bytes read and wall time."""
        if self.dry_run:
            planned = [p for p in self.plans if not p.skipped]
            return {"vms": len(self.plans), "full": sum(p.mode == "full" for p in planned),
                    "incremental": sum(p.mode == "incremental" for p in planned),
                    "skipped": sum(bool(p.skipped) for p in self.plans)}
        done = [r for r in self.results if r.ok]
        skipped = [r for r in self.results if not r.ok and r.error.startswith("skipped:")]
        return {"vms": len(self.results), "backed_up": len(done),
                "full": sum(r.mode == "full" for r in done), "incremental": sum(r.mode == "incremental" for r in done),
                "failed": len(self.results) - len(done) - len(skipped), "skipped": len(skipped),
                "bytes_read": sum(d.bytes_read for r in done for d in r.disks),
                "seconds": round(self.seconds, 3)}

    def as_dict(self) -> dict:
        """The ``backup --json`` document: Borg's shape (repository, archives), then the totals
        and the exit code."""
        doc: dict[str, Any] = {"repository": self.repository.as_dict() if self.repository else None}
        if self.dry_run:
            doc["dry_run"] = True
            doc["archives"] = [p.as_dict() for p in self.plans]
        else:
            doc["archives"] = [r.as_dict() for r in self.results]
        doc["totals"] = self.totals()
        doc["exit_code"] = self.exit_code
        return doc


def _archive_namer(pm, config: Config, timestamp: str):
    """``name_for(vm)``: the archive name plugins give (or the default), checked to be this job's."""
    prefix = config.repository.prefix

    def name_for(vm: VmInfo) -> str:
        name = pm.hook.ovirt_borg_archive_name(config=config, vm=vm, timestamp=timestamp)
        if naming.vm_of_archive(name, prefix) != vm.name:
            raise ConfigError(f"a plugin named the archive of VM {vm.name} {name!r}; it must be "
                              f"{prefix}{vm.name}-<UTC time>[.tag], or list, prune and restore would "
                              "not find it")
        return name

    return name_for


def _select(pm, config: Config, engine: Engine, request: BackupRequest) -> list[VmInfo]:
    """The VMs of the run: those named (each must exist), or the configured selection."""
    all_vms = engine.list_vms(with_tags=bool(config.selection.tags))
    _require_vms(request.vms, all_vms)
    vms = pm.hook.ovirt_borg_select_vms(config=config, vms=all_vms, requested=list(request.vms),
                                        all_vms=request.all_vms)
    rule = plugins.selection_rule(config)
    if not request.vms and rule.everything:
        excluded = sum(rule.excludes(vm) for vm in all_vms)
        log.info("[selection] names no VMs, tags or clusters: every VM of the engine is selected: %d of %d "
                 "(%d excluded)", len(vms), len(all_vms), excluded)
    elif request.all_vms:
        log.info("[selection] takes %d of the engine's %d VMs", len(vms), len(all_vms))
    return vms


def run_backup(config: Config, request: BackupRequest) -> BackupReport:
    """Run ``ovirt-borg backup``: the whole run's lifecycle; returns its report.

    Takes the job's lock (not for a dry run), connects, reads the repository once, selects
    the VMs and backs each up (``backup.run_backups``), or with ``dry_run`` only plans them
    (``backup.plan_backups``: nothing started on the engine, nothing written). Plugins hear
    of the run's start and end, also when it fails before any VM (a dry run tells them
    nothing). Raises typed errors for what stops the whole run; a VM's failure is in its result.
    """
    if not request.vms and not request.all_vms:
        raise ConfigError("name the VMs to back up, or use --all for the configured selection")
    t0 = time.monotonic()
    pm = plugins.build_manager(config.hooks, [Path(d) for d in config.plugins.directories])
    notify = not request.dry_run
    settings = backup_settings(config)
    repo = repository(config)
    report = BackupReport(None, dry_run=request.dry_run)
    vms: list[VmInfo] = []
    started = False
    try:
        lock = contextlib.nullcontext() if request.dry_run else job_lock(config)
        with lock, connect(config) as engine:
            # One look at the repository for the whole run: its id names the state directory,
            # its archive list tells each VM whether its previous archive is still there.
            view = archive.repository_view(repo)
            report.repository = RepositoryInfo(view.id, repo.location)
            state = state_dir(config, view.id)
            settings = dataclasses.replace(settings, description=backup.job_description(Path(config.path).stem,
                                                                                        view.id))
            vms = _select(pm, config, engine, request)
            if notify:
                plugins.notify(pm, "ovirt_borg_run_started", config=config, command="backup", vms=vms)
                started = True
            if not vms:
                log.warning("the selection matches no VM; nothing to back up")
                report.exit_code = 1
            else:
                name_for = _archive_namer(pm, config, naming.unused_timestamp(s.archive for s in state.all()))
                if request.dry_run:
                    report.plans = backup.plan_backups(engine, repo, state, settings, vms, name_for,
                                                       force_full=request.full, archives=view.archives)
                    report.exit_code = backup.run_exit_code((p.exit_code for p in report.plans),
                                                            any(p.skipped_disks for p in report.plans))
                else:
                    outcome = backup.run_backups(engine, repo, state, settings, vms, name_for,
                                                 plugins.RunHooks(pm, config), force_full=request.full,
                                                 archives=view.archives)
                    report.results, report.exit_code = outcome.results, outcome.exit_code
    except BaseException as e:
        if notify:
            code = (e.exit_code if isinstance(e, (OvirtBorgError, Interrupted))
                    else 128 + signal.SIGINT if isinstance(e, KeyboardInterrupt) else EXIT_ERROR)
            if not started:  # monitoring pairs every start with an end, even when the run never began
                plugins.notify(pm, "ovirt_borg_run_started", config=config, command="backup", vms=vms)
            plugins.notify(pm, "ovirt_borg_run_finished", config=config, command="backup", results=[],
                           exit_code=code)
        raise
    report.seconds = time.monotonic() - t0
    if notify:
        plugins.notify(pm, "ovirt_borg_run_finished", config=config, command="backup",
                       results=[r.as_dict() for r in report.results], exit_code=report.exit_code)
    return report


# -- list, verify, prune, checkpoints -------------------------------------------------------------


@dataclass
class Listing:
    """This job's archives (``list``): the repository and one row per archive, oldest first."""

    repository: RepositoryInfo
    archives: list[dict]

    def as_dict(self) -> dict:
        return {"repository": self.repository.as_dict(), "archives": self.archives}


def list_archives(config: Config, vms: Sequence[str] = ()) -> Listing:
    """This job's archives (of ``vms`` only, when given), with what their comments record.

    Each row: vm, name, id, start (ISO), mode, path, checkpoint, size, bytes_read,
    blocks_stored. Raises NotFound (naming the nearest VMs) for a VM without archives.
    """
    repo = repository(config)
    prefix = config.repository.prefix
    rows = []
    archived = set()
    described, archives = borgcli.list_repository(repo, f"{prefix}*")
    for a in archives:
        vm = naming.vm_of_archive(a["name"], prefix)
        if vm is not None:
            archived.add(vm)
        if vm is None or (vms and vm not in vms):
            continue  # not an archive of this job, or not a VM asked for
        fields = naming.parse_archive_comment(a.pop("comment", ""))
        rows.append({"vm": vm, "name": a["name"], "id": a["id"], "start": a["start"].isoformat(),
                     "mode": fields.get("mode", "?"), "path": fields.get("path", "?"),
                     "checkpoint": fields.get("checkpoint", "-"), "size": int(fields.get("size", 0)),
                     "bytes_read": int(fields.get("read", 0)),
                     "blocks_stored": int(fields.get("blocks_stored", 0))})
    unknown = [vm for vm in vms if vm not in archived]
    if unknown:
        raise NotFound("; ".join(_no_archives_of(vm, sorted(archived)) for vm in unknown))
    return Listing(RepositoryInfo(described["id"], repo.location), rows)


@dataclass
class VerifyReport:
    """``verify``'s outcome: per archive, ok and its disks, or the error; the first error."""

    repository: RepositoryInfo
    archives: list[dict] = field(default_factory=list)
    failed: OvirtBorgError | None = None

    def as_dict(self) -> dict:
        return {"repository": self.repository.as_dict(), "archives": self.archives}


def verify_targets(names: Sequence[str], archives: Sequence[str], by_vm: dict[str, list[str]], *,
                   last: int, every_vm: bool, prefix: str) -> list[str]:
    """The archives ``verify`` reads, in order (pure).

    Given the names asked for (an archive, or a VM whose newest ``last`` archives are taken),
    the repository's archive names, this job's archives by VM (oldest first) and ``--all``
    (the newest ``last`` of every VM). A name that is neither, but has the shape of this job's
    archive names, is taken as an archive (its reading says it does not exist). Raises
    NotFound for any other name, naming the nearest VMs and archives; ConfigError when nothing
    or too much is asked.
    """
    if every_vm and names:
        raise ConfigError("name archives or VMs, or use --all, not both")
    if every_vm:
        chosen = [name for vm in sorted(by_vm) for name in by_vm[vm][-last:]]
        if not chosen:
            raise NotFound(f"no archives of this job (prefix {prefix!r}) in the repository")
        return chosen
    if not names:
        raise ConfigError("name an ARCHIVE or a VM (its newest --last N archives), or use --all")
    known = set(archives)
    chosen, unknown = [], []
    for name in names:
        if name in known or (name not in by_vm and naming.vm_of_archive(name, prefix) is not None):
            chosen.append(name)
        elif name in by_vm:
            chosen += by_vm[name][-last:]
        else:
            unknown.append(name)
    if unknown:
        raise NotFound("; ".join(f"no archive or VM with archives named {name!r} in the repository"
                                 f"{nearest_hint(name, [*by_vm, *archives])}" for name in unknown))
    return list(dict.fromkeys(chosen))


def verify(config: Config, names: Sequence[str] = (), *, last: int = 1, every_vm: bool = False) -> VerifyReport:
    """Re-read archives (``verify_targets`` says which) and compare them with their digests.

    Every archive is read even after one fails; the report holds each outcome and the first
    error, which the caller raises.
    """
    repo = repository(config)
    prefix = config.repository.prefix
    described, archives = borgcli.list_repository(repo)
    ordered = [a["name"] for a in archives]
    targets = verify_targets(names, ordered, retention.archives_by_vm(ordered, prefix),
                             last=last, every_vm=every_vm, prefix=prefix)
    report = VerifyReport(RepositoryInfo(described["id"], repo.location))
    for name in targets:
        try:
            disks = restore.verify_archive(repo, name, prefix)
            report.archives.append({"name": name, "ok": True, "disks": [d.__dict__ for d in disks]})
        except OvirtBorgError as e:
            report.failed = report.failed or e
            report.archives.append({"name": name, "ok": False, "error": str(e)})
    return report


@dataclass
class PruneReport:
    """``prune``'s outcome: each archive of the VMs looked at, kept or pruned; VMs skipped."""

    repository: RepositoryInfo
    results: list[retention.PruneResult]
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        """1 when a VM was not pruned for a reason that needs attention, else 0."""
        return 1 if any(r.skipped and r.skipped != retention.NO_ARCHIVES for r in self.results) else 0

    def as_dict(self) -> dict:
        archives = [{"name": name, "vm": r.vm, "action": "prune"} for r in self.results for name in r.pruned]
        archives += [{"name": name, "vm": r.vm, "action": "keep"} for r in self.results for name in r.kept]
        return {"repository": self.repository.as_dict(), "dry_run": self.dry_run,
                "archives": sorted(archives, key=lambda a: (a["vm"], a["name"])),
                "skipped": [{"vm": r.vm, "reason": r.skipped} for r in self.results if r.skipped]}


def prune(config: Config, vms: Sequence[str] = (), *, dry_run: bool = False) -> PruneReport:
    """Prune this job's archives per VM with the ``[retention]`` rules, under the job's lock.

    Raises ConfigError when the rules keep nothing.
    """
    keep = retention.keep_rules(config.retention)
    if not keep:
        raise ConfigError(f"{config.path}: [retention] keeps nothing; set at least one keep_* rule")
    repo = repository(config)
    with job_lock(config):
        repository_id = archive.repository_id(repo)
        results = retention.prune(repo, state_dir(config, repository_id), config.repository.prefix, keep,
                                  vms=list(vms) or None, dry_run=dry_run)
    return PruneReport(RepositoryInfo(repository_id, repo.location), results, dry_run)


@dataclass
class CheckpointsReport:
    """``checkpoints``: per VM, the engine's checkpoints, the one in use, those deleted."""

    repository: RepositoryInfo
    vms: list[dict]

    def as_dict(self) -> dict:
        return {"repository": self.repository.as_dict(), "vms": self.vms}


def checkpoints(config: Config, vms: Sequence[str] = (), *, purge: bool = False) -> CheckpointsReport:
    """List the VMs' engine checkpoints (default: the VMs with a sidecar) and mark the one the
    next incremental starts from; with ``purge``, delete those no backup needs
    (``backup.purge_checkpoints``, the policy a backup applies)."""
    repo = repository(config)
    repository_id = archive.repository_id(repo)
    state = state_dir(config, repository_id)
    sidecars = {s.vm_name: s for s in state.all()}
    report = []
    with connect(config) as engine:
        if vms:
            _require_vms(vms, engine.list_vms())
        for name in list(vms) or sorted(sidecars):
            vm = engine.find_vm(name)
            in_use = sidecars[name].checkpoint_id if name in sidecars else None
            purged = []
            if purge and in_use:
                purged = backup.purge_checkpoints(engine, state, vm, in_use, keep=config.checkpoints.keep,
                                                  other_jobs_days=config.checkpoints.other_jobs_days)
            report.append({"vm": name, "in_use": in_use, "purged": purged,
                           "checkpoints": [{"id": c.id, "state": c.state, "in_use": c.id == in_use}
                                           for c in engine.checkpoints(vm.id)]})
    return CheckpointsReport(RepositoryInfo(repository_id, repo.location), report)


# -- restore -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreRequest:
    """Where ``restore`` puts an archive: a new VM, one disk into oVirt, or local files."""

    archive: str
    vm_name: str | None = None
    cluster: str = "Default"
    storage_domain: str | None = None
    disks: tuple[str, ...] = ()
    to_dir: Path | None = None
    format: str = "raw"
    force: bool = False
    start: bool = False
    sha256: bool = False


def run_restore(config: Config, request: RestoreRequest) -> restore.RestoreResult:
    """Restore as ``request`` says; raises ConfigError for a request that names no target or
    two, typed errors otherwise."""
    repo = repository(config)
    prefix = config.repository.prefix
    disks = list(request.disks) or None
    if request.force and not request.to_dir:
        raise ConfigError("--force replaces local files: it goes with --to-dir")
    if request.to_dir:
        if request.vm_name or request.storage_domain:
            raise ConfigError("--to-dir writes local files: it goes without --vm-name and --storage-domain")
        return restore.restore_to_dir(repo, request.archive, prefix, request.to_dir, fmt=request.format,
                                      disk_ids=disks, force=request.force, sha256=request.sha256)
    if request.vm_name and not request.storage_domain:
        raise ConfigError("--vm-name needs --storage-domain SD for the new disks")
    if not request.storage_domain:
        raise ConfigError("say where to restore: --vm-name NEW --storage-domain SD (the VM), --disk ID "
                          "--storage-domain SD (one disk), or --to-dir DIR (local files)")
    if not request.vm_name and (not disks or len(disks) != 1):
        raise ConfigError("without --vm-name, --storage-domain restores one disk: name it with --disk ID")
    settings = transfer_settings(config)
    inactivity_timeout = config.transfer.inactivity_timeout
    with connect(config) as engine:
        if request.vm_name:
            return restore.restore_vm(engine, repo, request.archive, prefix, vm_name=request.vm_name,
                                      cluster=request.cluster, storage_domain=request.storage_domain,
                                      settings=settings, inactivity_timeout=inactivity_timeout,
                                      disk_ids=disks, start=request.start, sha256=request.sha256)
        return restore.restore_disk(engine, repo, request.archive, prefix, disks[0], request.storage_domain,
                                    settings, inactivity_timeout=inactivity_timeout, sha256=request.sha256)


# -- config validate ---------------------------------------------------------------------------------


def validate(config: Config, *, connect_to: bool = False) -> list[str]:
    """Check a loaded configuration; with ``connect_to``, also log in to the engine, count the
    VMs it selects, and open the repository. Returns what was checked, a line each; raises
    the first error (ConfigError, AuthError, EngineError, RepositoryError ...)."""
    checked = [f"configuration {config.path}: valid"]
    repo = repository(config)
    settings = transfer_settings(config)
    plugins.build_manager(config.hooks, [Path(d) for d in config.plugins.directories])
    checked.append(f"secrets and files: readable (engine password, repository {repo.location}"
                   f"{', host CA ' + settings.host_ca_file if settings.host_ca_file else ''})")
    engine_settings(config)
    if not connect_to:
        return checked
    with connect(config) as engine:
        all_vms = engine.list_vms(with_tags=bool(config.selection.tags))
        chosen = selection.select(all_vms, plugins.selection_rule(config))
        checked.append(f"engine {config.engine.url}: logged in as {config.engine.user}; {len(all_vms)} VMs, "
                       f"{len(chosen)} selected by [selection]")
    view = archive.repository_view(repo)
    ours = sum(naming.vm_of_archive(name, config.repository.prefix) is not None for name in view.archives)
    checked.append(f"repository {repo.location}: opened (id {view.id}); {len(view.archives)} archives, "
                   f"{ours} of this job")
    return checked
