"""Backup of oVirt VMs into Borg archives, each disk a complete image (a synthetic full).

Policy lives here; the engine, imageio, archive and sidecar modules do the talking. For one VM:

1. list its disks, enable incremental backup on qcow2 disks that lack it;
2. decide full or incremental from the last committed sidecar (``decide_mode``);
3. finalize stale backups, lock the repository, start the backup (or, for a powered-off VM on
   an engine that refuses cold backups, use plain image transfers through the engine's proxy)
   and open the archive writer while the engine prepares it;
4. per disk: image transfer, extents, read plan, stream into the archive writer;
5. commit the archive while the engine finalizes its backup, store the sidecar, purge old
   checkpoints.

A failure anywhere leaves no archive, the previous sidecar untouched, and no backup or transfer
open on the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import logging
import math
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from ovirt_borg import archive, logs, naming, plan, selection, sidecar as sc
from ovirt_borg.archive import Holes, Reuse
from ovirt_borg.engine import (BackupBusy, BackupEnd, CheckpointRefused, ColdBackupRefused, DiskInfo, Engine,
                               StillFinalizing, TransferStopped, VmInfo, WaitStopped)
from ovirt_borg.errors import EXIT_ERROR, CheckpointError, Interrupted, NotFound, OvirtBorgError, TransferError
from ovirt_borg.imageio import ImageioClient, NoDirtyExtents, TransferSettings
from ovirt_borg.progress import Progress, human_size

log = logging.getLogger(__name__)

# Data blocks read but not yet hashed for their digest, at most.
_DIGESTS_AHEAD = 4
#: Longest request to imageio: data of consecutive blocks is read together up to this size.
READ_REQUEST = 4 << 20

#: Added to ovirt-borg's own longest pause between reads in the inactivity_timeout it gives the engine.
IDLE_SLACK = 60

PATH_BACKUP = "backup"
PATH_ENGINE_TRANSFER = "engine-transfer"


@dataclass(frozen=True)
class BackupSettings:
    """What a backup run needs from the configuration (no argparse, no Config below here)."""

    block_size: int = 1 << 20
    #: (glob pattern, block size) pairs: the first pattern matching a VM's name sets its block size.
    vm_block_sizes: tuple[tuple[str, int], ...] = ()
    writer: str = "internal"
    enable_incremental: bool = True
    verify_sample: int = 4
    full_every_days: int = 0
    cold_backup: bool = True
    exclude_disks: tuple[str, ...] = ()
    checkpoints_keep: int = 1
    #: A checkpoint another job's sidecar names is kept unless that sidecar is older (0: always).
    checkpoints_other_jobs_days: int = 14
    #: The description this job writes on its engine backups (``job_description``).
    description: str = ""
    #: Another's backup left open is finalized once this old with no active transfer (0: at once).
    foreign_stale_hours: float = 24.0
    inactivity_timeout: int = 120
    transfer: TransferSettings = field(default_factory=TransferSettings)

    def for_vm(self, name: str) -> BackupSettings:
        """These settings with the block size of the VM ``name`` (pure)."""
        size = next((size for pattern, size in self.vm_block_sizes if fnmatch.fnmatchcase(name, pattern)),
                    self.block_size)
        return self if size == self.block_size else dataclasses.replace(self, block_size=size)


def transfer_inactivity_timeout(settings: BackupSettings, lock_wait: int) -> int:
    """The ``inactivity_timeout`` given to the engine for a backup's image transfers (pure).

    The engine cancels a download whose imageio ticket idles longer than that, and imageio
    counts only running reads as activity (TransferDiskImageCommand.stopTransferIfNecessary,
    ovirt_imageio auth.Ticket.idle_time). Given the settings and the repository's
    ``lock_wait``, returns the configured value, raised to ``IDLE_SLACK`` seconds above the
    longest pause ovirt-borg itself may leave: an extents query (``extents_timeout``), the wait
    a bandwidth limit puts before a read of ``READ_REQUEST`` bytes, and with the ``cli`` writer
    a ``borg import-tar`` still waiting for the repository's lock. 0 (no timeout) stays 0.
    """
    if settings.inactivity_timeout == 0:
        return 0
    pauses = [settings.transfer.extents_timeout]
    if settings.transfer.bandwidth_limit:
        pauses.append(READ_REQUEST / settings.transfer.bandwidth_limit)
    if settings.writer == "cli":
        pauses.append(lock_wait)
    return max(settings.inactivity_timeout, math.ceil(max(pauses)) + IDLE_SLACK)


@dataclass(frozen=True)
class ModeDecision:
    mode: str  # "full" or "incremental"
    reason: str
    from_checkpoint: str | None = None


@dataclass
class DiskResult:
    id: str
    alias: str
    mode: str
    size: int
    blocks: int = 0
    holes: int = 0
    reused: int = 0
    stored: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class VmResult:
    vm: str
    vm_id: str
    ok: bool = False
    mode: str = ""
    reason: str = ""
    path: str = ""
    archive: str = ""
    checkpoint: str | None = None
    disks: list[DiskResult] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""
    exit_code: int = 0
    # Problems after the archive was committed (the backup stands; the run exits 1).
    warnings: list[str] = field(default_factory=list)
    # Disks the engine's backup leaves out: {"id", "alias", "reason"} each (the run exits 1).
    skipped_disks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["disks"] = [x.as_dict() for x in self.disks]
        d["warnings"] = list(self.warnings)
        d["skipped_disks"] = [dict(x) for x in self.skipped_disks]
        return d


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def image_path(vm_name: str, disk: DiskInfo) -> str:
    return f"{naming.safe_name(vm_name)}/disks/{naming.safe_name(disk.alias)}-{disk.id}.raw"


def decide_mode(previous: sc.Sidecar | None, *, force_full: bool, checkpoints: dict[str, str],
                archive_present: bool, full_every_days: int, now: datetime,
                block_size: int) -> ModeDecision:
    """Decide full or incremental for a VM.

    Given the last committed sidecar (or None), whether --full was asked, the engine's
    checkpoints of the VM (id -> state), whether the previous archive is still in the
    repository, the periodic full setting, the time and the configured block size, return the
    mode, the reason and the checkpoint to start from.
    """
    if previous is None:
        return ModeDecision("full", "no previous backup of this VM in this repository")
    if force_full:
        return ModeDecision("full", "a full backup was requested (--full)")
    if previous.path != PATH_BACKUP or not previous.checkpoint_id:
        return ModeDecision("full", "the previous archive has no engine checkpoint")
    if previous.block_size != block_size:
        return ModeDecision("full", f"the block size changed ({previous.block_size} -> {block_size})")
    state = checkpoints.get(previous.checkpoint_id)
    if state is None:
        return ModeDecision("full", f"checkpoint {previous.checkpoint_id} no longer exists on the engine")
    if state != "created":
        return ModeDecision("full", f"checkpoint {previous.checkpoint_id} is {state} on the engine")
    if not archive_present:
        return ModeDecision("full", f"the previous archive {previous.archive} is no longer in the repository")
    if full_every_days:
        last_full = naming.parse_timestamp(previous.last_full)
        if now - last_full >= timedelta(days=full_every_days):
            return ModeDecision("full", f"periodic full read (the last one is older than {full_every_days} days)")
    return ModeDecision("incremental", f"from checkpoint {previous.checkpoint_id} of {previous.archive}",
                        previous.checkpoint_id)


@dataclass(frozen=True)
class DiskChoice:
    """What a backup does with a VM's disks (``choose_disks``)."""

    backed_up: tuple[DiskInfo, ...]
    #: Disks the configuration's ``exclude_disks`` names.
    excluded: tuple[DiskInfo, ...] = ()
    #: Disks the engine's backup leaves out: {"id", "alias", "reason"} each (a warning).
    skipped: tuple[dict, ...] = ()
    #: qcow2 disks of ``backed_up`` whose incremental backup is turned on first.
    to_enable: tuple[DiskInfo, ...] = ()


def choose_disks(disks: Iterable[DiskInfo], exclude_disks: Sequence[str], enable_incremental: bool) -> DiskChoice:
    """Sort a VM's attached disks into those backed up, excluded and skipped (pure).

    Given the disks, the ``exclude_disks`` patterns (an alias glob or a disk id) and whether
    incremental backup is to be turned on where a qcow2 disk lacks it.
    """
    backed_up, excluded, skipped, to_enable = [], [], [], []
    for disk in disks:
        if any(fnmatch.fnmatchcase(disk.alias, p) or p == disk.id for p in exclude_disks):
            excluded.append(disk)
        elif reason := disk.not_backed_up:
            # Asking for it would fail the VM every night (a transfer that cannot start, or a
            # 409 for an unplugged disk): leave it out, and say so until excluded.
            skipped.append({"id": disk.id, "alias": disk.alias, "reason": reason})
        else:
            backed_up.append(disk)
            if disk.format == "cow" and disk.backup != "incremental" and enable_incremental:
                to_enable.append(disk)
    return DiskChoice(tuple(backed_up), tuple(excluded), tuple(skipped), tuple(to_enable))


def disk_full_reason(previous: sc.Sidecar | None, engine_mode: str, base_record: sc.DiskRecord | None,
                     path: str) -> str:
    """Why a disk of an incremental backup is read in full, or "" when it is not (pure).

    Given the previous sidecar (None for a full backup), the mode the engine backs the disk up
    in, the disk's record in the previous sidecar and the disk's image path now. What only the
    writer can tell (the previous image's chunk ids) is checked by the caller after this.
    """
    if previous is None:
        return "full backup"
    if engine_mode != "incremental":
        return f"the engine reads this disk in {engine_mode} mode"
    if base_record is None:
        return "the disk is not in the previous archive"
    if base_record.image != path:
        return "the disk was renamed since the previous archive"
    if base_record.blocks_kind != sc.BLOCKS_BORG_ID:
        return ("the previous archive records sha256 block digests, not Borg chunk ids (written by "
                "the 'cli' writer or an older ovirt-borg)")
    return ""


def uses_backup_api(vm_status: str, cold_backup: bool) -> bool:
    """Whether a VM is read through the engine's backup API (pure): a running VM always, a
    powered-off one when ``backup.cold_backup`` allows it (the engine may still refuse: then
    plain image transfers through its proxy, ``PATH_ENGINE_TRANSFER``)."""
    return vm_status != "down" or cold_backup


def engine_transfer_decision(cold_backup_refused: bool) -> ModeDecision:
    """The mode of a powered-off VM read through engine image transfers (pure): full, because
    the engine refused a cold backup, or because ``backup.cold_backup`` is false."""
    why = "the engine refused a cold backup" if cold_backup_refused else "backup.cold_backup is false"
    return ModeDecision("full", f"powered-off VM read through engine image transfers ({why})")


def job_description(job: str, repository_id: str) -> str:
    """The description a job writes on its engine backups: how it tells its own from others'.

    Given the job's name (its configuration file's name) and its repository's id. Engines from
    4.4.8 keep a backup's description (up to 1024 characters) and list it with the backup.
    """
    return f"ovirt-borg job={job} repository={repository_id}"


class VmBackup:
    """Backs up one VM; ``run()`` returns a VmResult or raises an OvirtBorgError."""

    def __init__(self, engine: Engine, repo: archive.Repo, state: sc.StateDir, settings: BackupSettings,
                 vm: VmInfo, archive_name: str, *, force_full: bool = False, rng: random.Random | None = None,
                 archives: frozenset[str] | None = None, position: tuple[int, int] = (1, 1)):
        """``archives``: the repository's archive names as the run found them (read from the
        repository when None). A base archive deleted since is found out by the writer, which
        then has the disk read in full. ``position``: this VM is the n-th of m in the run."""
        self.engine = engine
        self.repo = repo
        self.state = state
        self.settings = settings
        self.vm = vm
        self.archive_name = archive_name
        self.force_full = force_full
        self.rng = rng or random.Random()
        self.archives = archives
        self.position = position
        self.result = VmResult(vm=vm.name, vm_id=vm.id, archive=archive_name)
        self._writer: archive.ArchiveWriter | None = None

    # -- decisions ---------------------------------------------------------------------------

    def _choose_disks(self) -> DiskChoice:
        """The VM's disks as ``choose_disks`` sorts them; the skipped ones are warned about."""
        choice = choose_disks(self.engine.vm_disks(self.vm.id), self.settings.exclude_disks,
                              self.settings.enable_incremental)
        for disk in choice.excluded:
            log.info("VM %s: disk %s is excluded by the configuration", self.vm.name, disk.alias)
        for skipped in choice.skipped:
            self.result.skipped_disks.append(dict(skipped))
            self._warn(f"VM {self.vm.name}: disk {skipped['alias']} ({skipped['id']}) is not backed up: "
                       f"{skipped['reason']}; name it in selection.exclude_disks to leave it out without "
                       "this warning")
        return choice

    def _disks(self) -> list[DiskInfo]:
        """The disks to back up, incremental backup turned on where ``choose_disks`` says."""
        choice = self._choose_disks()
        disks = []
        for disk in choice.backed_up:
            if disk in choice.to_enable:
                log.info("VM %s: enabling incremental backup on disk %s", self.vm.name, disk.alias)
                disk = self.engine.enable_incremental(disk)
            disks.append(disk)
        return disks

    def plan(self) -> VmPlan:
        """What ``run()`` would do, found by the same decisions, changing nothing (``--dry-run``).

        Reads the VM, its disks and checkpoints from the engine and the sidecar from the state
        directory; starts no backup or transfer, enables nothing, writes nothing. Raises typed
        errors (NotFound for a VM deleted since the selection).
        """
        self._refresh_vm()
        choice = self._choose_disks()
        if not choice.backed_up:
            skipped = (("the engine backs up none of its disks", 1) if choice.skipped else
                       ("it has no disks to back up (all excluded or none attached)", EXIT_ERROR))
            return VmPlan(vm=self.vm.name, vm_id=self.vm.id, status=self.vm.status, skipped=skipped[0],
                          exit_code=skipped[1], skipped_disks=[dict(d) for d in choice.skipped],
                          excluded_disks=[d.alias for d in choice.excluded])
        previous = self.state.load(self.vm.id)
        decision = self._decide(previous, utc_now())
        if uses_backup_api(self.vm.status, self.settings.cold_backup):
            path = PATH_BACKUP
            if self.vm.status == "down":
                path_note = "cold backup (an engine that refuses it is read through image transfers, in full)"
            else:
                path_note = "live or snapshot-based backup, as the engine chooses"
        else:
            path = PATH_ENGINE_TRANSFER
            path_note = "engine image transfers of the powered-off VM (backup.cold_backup is false)"
            decision = engine_transfer_decision(cold_backup_refused=False)
        disks = []
        for disk in choice.backed_up:
            incremental_capable = disk.incremental_capable or disk in choice.to_enable
            engine_mode = "incremental" if decision.mode == "incremental" and disk.incremental_capable else "full"
            base_record = previous.disk(disk.id) if previous and decision.mode == "incremental" else None
            reason = disk_full_reason(previous if decision.mode == "incremental" else None, engine_mode,
                                      base_record, image_path(self.vm.name, disk))
            disks.append({"id": disk.id, "alias": disk.alias, "format": disk.format,
                          "provisioned_size": disk.provisioned_size,
                          "mode": "full" if reason else "incremental", "reason": reason,
                          "enable_incremental": disk in choice.to_enable,
                          "incremental_capable": incremental_capable})
        return VmPlan(vm=self.vm.name, vm_id=self.vm.id, status=self.vm.status, archive=self.archive_name,
                      mode=decision.mode, reason=decision.reason, path=path, path_note=path_note,
                      disks=disks, skipped_disks=[dict(d) for d in choice.skipped],
                      excluded_disks=[d.alias for d in choice.excluded])

    def _decide(self, previous: sc.Sidecar | None, now: datetime) -> ModeDecision:
        checkpoints = {}
        archive_present = False
        if previous is not None and not self.force_full:
            checkpoints = {c.id: c.state for c in self.engine.checkpoints(self.vm.id)}
            archives = self.archives if self.archives is not None else archive.repository_view(self.repo).archives
            archive_present = previous.archive in archives
        return decide_mode(previous, force_full=self.force_full, checkpoints=checkpoints,
                           archive_present=archive_present, full_every_days=self.settings.full_every_days,
                           now=now, block_size=self.settings.block_size)

    # -- the run -----------------------------------------------------------------------------

    def _refresh_vm(self) -> None:
        """Read the VM again at its turn: it may have been deleted or powered off since selection."""
        try:
            current = self.engine.get_vm(self.vm.id)
        except NotFound:
            raise NotFound(f"VM {self.vm.name} no longer exists on the engine (deleted since the run "
                           "started); nothing was backed up for it") from None
        if current.status != self.vm.status:
            log.info("VM %s is %s now (it was %s when the run started)", self.vm.name, current.status,
                     self.vm.status)
        self.vm = dataclasses.replace(self.vm, status=current.status)

    def run(self) -> VmResult:
        """Back up the VM; return its result or raise an OvirtBorgError (nothing committed).

        Problems after the archive was committed (finalizing the engine backup, purging old
        checkpoints) do not undo the backup: they are logged and listed in ``result.warnings``.
        An interrupt is raised once the VM's cleanup is done, after logging whether its archive
        was committed.
        """
        try:
            try:
                return self._run()
            except _IncrementalUnusable as e:
                # Hybrid and cold backups show a bad bitmap only here, with the checkpoint still
                # "created": without a full read now, every night would fail the same way.
                log.warning("VM %s: %s; its engine backup is finalized; starting a full backup", self.vm.name, e)
                self.result = VmResult(vm=self.vm.name, vm_id=self.vm.id, archive=self.archive_name)
                self._writer = None
                return self._run(full_reason=f"the incremental backup failed: {e}")
        except Interrupted:
            log.error("VM %s: %s", self.vm.name,
                      f"stopped after archive {self.archive_name} was committed" if self._committed() else
                      f"stopped before archive {self.archive_name} was committed: nothing of it is kept")
            raise

    def _committed(self) -> bool:
        """The archive of this run is in the repository."""
        return self._writer is not None and self._writer.committed

    def _run(self, full_reason: str | None = None) -> VmResult:  # noqa: PLR0915 (one VM's steps in order)
        """One attempt at the VM's backup; ``full_reason`` makes it a full one, saying why."""
        started = utc_now()
        t0 = time.monotonic()
        self._refresh_vm()
        disks = self._disks()
        if not disks and self.result.skipped_disks:
            self.result.error = "skipped: the engine backs up none of its disks"
            self.result.exit_code = 1
            return self.result
        if not disks:
            raise OvirtBorgError(f"VM {self.vm.name} has no disks to back up (all excluded or none attached)")
        previous = self.state.load(self.vm.id)
        decision = ModeDecision("full", full_reason) if full_reason else self._decide(previous, started)
        ovf = self.engine.vm_ovf(self.vm.id)
        stale = self.engine.finalize_stale_backups(self.vm.id, self.settings.description,
                                                   self.settings.foreign_stale_hours * 3600)
        for backup_id, end in stale.items():
            self._snapshot_warning(backup_id, end)

        base = previous.archive if decision.mode == "incremental" else None
        # Read before the writer locks the repository (a copy from the archive needs a reader).
        base_ids = self._base_ids(previous, disks) if base else {}
        writer = self._writer = archive.open_writer(
            self.repo, self.archive_name, block_size=self.settings.block_size, base_archive=base,
            kind=self.settings.writer)
        # The lock before the engine is asked: a repository another borg holds (a reader too:
        # borg mount, borg list) costs the engine nothing, no backup, no checkpoint.
        writer.lock()
        use_backup_api = uses_backup_api(self.vm.status, self.settings.cold_backup)
        backup_id = to_checkpoint = None
        path = PATH_BACKUP
        modes: dict[str, str] = {}
        finalizing: Future | None = None
        preparing: Future | None = None
        stop_preparing, stop_finalizing = threading.Event(), threading.Event()

        def engine_ready() -> None:
            """Take the outcome of ``preparing``; a wait interrupted here leaves it to ``finally``."""
            nonlocal preparing, to_checkpoint, modes
            try:
                to_checkpoint, modes = preparing.result()
            finally:
                if preparing.done():
                    preparing = None

        try:
            if use_backup_api:
                try:
                    backup_id, decision = self._start_backup(disks, decision)
                except ColdBackupRefused as e:
                    if self.vm.status != "down":
                        raise
                    log.warning("VM %s is powered off and the engine cannot back it up (%s); "
                                "reading its disks through engine image transfers instead", self.vm.name, e)
            if backup_id is None:
                path = PATH_ENGINE_TRANSFER
                decision = engine_transfer_decision(cold_backup_refused=use_backup_api)
            if decision.mode != "incremental":
                base, base_ids, writer.base_archive = None, {}, None
            self.result.mode, self.result.reason, self.result.path = decision.mode, decision.reason, path
            log.info("VM %s (%d of %d): %s backup into %s (%s)", self.vm.name, *self.position, decision.mode,
                     self.archive_name, decision.reason)
            if backup_id is not None:
                # The engine prepares its backup (on a real engine seconds: checkpoint, snapshot or
                # scratch disks, NBD exports) while the locked repository is opened (Borg's
                # manifest and cache sync). Nothing else uses the engine connection until it is ready.
                preparing = _in_thread("engine-backup-ready", self._backup_ready, backup_id, stop_preparing)
                if writer.comment_at_open:
                    engine_ready()
            writer.comment = naming.archive_comment(self.vm.name, decision.mode, path, to_checkpoint)
            with writer:
                if preparing is not None:
                    engine_ready()
                records, digests = [], {}
                for disk in disks:
                    record, disk_digests = self._disk(writer, disk, backup_id, modes.get(disk.id, "full"),
                                                      previous if base else None, base_ids.get(disk.id))
                    records.append(record)
                    digests[disk.id] = disk_digests
                if backup_id is not None:
                    # Every disk is read: the engine ends its backup while Borg commits. Nothing
                    # else uses the engine connection until _finalize has waited for it.
                    log.debug("VM %s: every disk is read; finalizing engine backup %s beside the commit",
                              self.vm.name, backup_id)
                    finalizing = _in_thread("engine-finalize", self.engine.finalize_backup, self.vm.id, backup_id,
                                            stop_finalizing)
                finished = utc_now()
                last_full = naming.timestamp(started)
                if decision.mode == "incremental" and previous is not None:
                    last_full = previous.last_full
                sidecar = sc.Sidecar(
                    vm_id=self.vm.id, vm_name=self.vm.name, archive=self.archive_name, mode=decision.mode,
                    reason=decision.reason, path=path, block_size=self.settings.block_size,
                    started=naming.timestamp(started), finished=naming.timestamp(finished), last_full=last_full, disks=tuple(records),
                    previous_archive=base, checkpoint_id=to_checkpoint,
                    from_checkpoint_id=decision.from_checkpoint, backup_id=backup_id)
                vm_dir = naming.safe_name(self.vm.name)
                writer.add_file(f"{vm_dir}/vm.ovf", ovf.encode())
                for record in records:
                    writer.add_file(record.blocks_file, digests[record.id])
                writer.add_file(f"{vm_dir}/{sc.SIDECAR_NAME}", sidecar.to_json())
                writer.comment = naming.archive_comment(self.vm.name, decision.mode, path, to_checkpoint, records)
                writer.commit()
            try:
                self.state.store(sidecar, digests)
            except OSError as e:
                raise OvirtBorgError(
                    f"VM {self.vm.name}: archive {self.archive_name} is committed, but its sidecar could not "
                    f"be saved in the state directory ({e}); the next backup of this VM starts from the "
                    "previous sidecar") from None
        finally:
            try:
                if preparing is not None:
                    self._stop_preparing(preparing, stop_preparing)
            finally:
                try:
                    if backup_id is not None:
                        self._finalize(backup_id, finalizing, stop_finalizing)
                finally:
                    writer.release()  # a lock taken for a writer never entered
        if to_checkpoint:
            try:
                purge_checkpoints(self.engine, self.state, self.vm, to_checkpoint,
                                  keep=self.settings.checkpoints_keep,
                                  other_jobs_days=self.settings.checkpoints_other_jobs_days)
            except BackupBusy as e:
                # A backup still finalizing (a hybrid one removing its snapshot): not a problem.
                log.info("VM %s: old checkpoints stay until the next run: %s", self.vm.name, e)
            except OvirtBorgError as e:
                self._warn(f"VM {self.vm.name}: could not purge old checkpoints: {e}; "
                           "the next run purges them")
        self.result.checkpoint = to_checkpoint
        self.result.seconds = round(time.monotonic() - t0, 3)
        self.result.ok = True
        return self.result

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.result.warnings.append(message)

    def _backup_ready(self, backup_id: str, stop: threading.Event) -> tuple[str | None, dict[str, str]]:
        """Wait for the engine's backup to be ready; return its checkpoint and each disk's mode."""
        to_checkpoint = self.engine.wait_backup_ready(self.vm.id, backup_id, stop)
        return to_checkpoint, self.engine.backup_disk_modes(self.vm.id, backup_id)

    def _stop_preparing(self, preparing: Future, stop: threading.Event) -> None:
        """End a wait for the engine's backup that an error left untaken (in ``finally:``).

        It ends before the engine is used again; that error is the one raised, the engine's
        own is logged.
        """
        stop.set()
        _settle(preparing, stop)
        try:
            preparing.result()
        except WaitStopped:
            pass
        except Exception as e:
            log.error("VM %s: %s", self.vm.name, e)

    def _finalize(self, backup_id: str, finalizing: Future | None, stop: threading.Event) -> None:
        """Finalize the engine backup (in ``finally:``); an error here never hides another one.

        ``finalizing`` is the finalize already started beside the commit: it is waited for (an
        interrupt sets ``stop``, which ends its wait for the engine, and is raised once it ended).
        Once the archive is committed the backup stands: a failure to finalize is a warning
        (the next run finalizes the backup it finds open). Before that it is logged, and the
        error that stopped the backup is the one raised.
        """
        try:
            if finalizing is None:
                end = self.engine.finalize_backup(self.vm.id, backup_id)
            else:
                _settle(finalizing, stop)
                end = finalizing.result()
        except StillFinalizing as e:
            # The engine accepted the finalize and goes on (a hybrid backup's snapshot removal
            # can outlast engine.timeout); the next run waits for it and reports a leftover.
            log.info("VM %s: %s; the next run waits for it", self.vm.name, e)
        except OvirtBorgError as e:
            if self._committed():
                self._warn(f"VM {self.vm.name}: archive {self.archive_name} is committed, but finalizing "
                           f"engine backup {backup_id} failed: {e}; the next run finalizes it")
            else:
                log.error("VM %s: could not finalize engine backup %s: %s; the next run finalizes it",
                          self.vm.name, backup_id, e)
        else:
            self._snapshot_warning(backup_id, end)

    def _snapshot_warning(self, backup_id: str, end: BackupEnd) -> None:
        """Warn about the snapshot a finished hybrid backup left on the VM (a failed merge)."""
        if end.snapshot_left:
            self._warn(f"VM {self.vm.name}: engine backup {backup_id} {end.phase}, but its snapshot "
                       f"{end.snapshot_left} is still on the VM (the engine could not remove it); delete "
                       "the snapshot in the engine, it holds the VM's writes since the backup")

    def _start_backup(self, disks: list[DiskInfo], decision: ModeDecision) -> tuple[str, ModeDecision]:
        disk_ids = [d.id for d in disks]
        description = self.settings.description
        try:
            return self.engine.start_backup(self.vm.id, disk_ids, decision.from_checkpoint, description), decision
        except CheckpointRefused as e:
            log.warning("VM %s: %s; falling back to a full backup", self.vm.name, e)
            decision = ModeDecision("full", str(e))
            try:
                return self.engine.start_backup(self.vm.id, disk_ids, None, description), decision
            except CheckpointRefused as e2:
                raise CheckpointError(f"VM {self.vm.name}: the engine refused a full backup: {e2}") from None

    # -- one disk ----------------------------------------------------------------------------

    def _disk(self, writer: archive.ArchiveWriter, disk: DiskInfo, backup_id: str | None,
              engine_mode: str, previous: sc.Sidecar | None, base_ids: bytes | None) -> tuple[sc.DiskRecord, bytes]:
        t0 = time.monotonic()
        path = image_path(self.vm.name, disk)
        size = disk.provisioned_size
        block_size = self.settings.block_size
        base_record = previous.disk(disk.id) if previous else None
        reason = disk_full_reason(previous, engine_mode, base_record, path)
        if not reason and base_ids is None:
            reason = "the chunk ids of the previous image are not available"
        elif not reason and not writer.base_image(base_record.image, base_record.provisioned_size, base_ids):
            reason = "the blocks of the previous image cannot be reused"
        incremental = not reason
        if not incremental and previous is not None:
            log.info("VM %s disk %s: reading in full (%s)", self.vm.name, disk.alias, reason)

        settings = self.settings.transfer
        if backup_id is None:
            settings = dataclasses.replace(settings, force_proxy=True)
        with contextlib.ExitStack() as stack:
            try:
                transfer = stack.enter_context(self.engine.transfer(
                    disk.id, direction="download", backup_id=backup_id,
                    inactivity_timeout=transfer_inactivity_timeout(self.settings, self.repo.lock_wait)))
            except TransferStopped as e:
                if engine_mode != "incremental":
                    raise
                raise _IncrementalUnusable(f"disk {disk.alias}: {e} (a missing or broken dirty bitmap on a "
                                           "hybrid or cold backup)") from None
            client = stack.enter_context(ImageioClient(transfer.transfer_url, transfer.proxy_url, settings))

            def zero_extents() -> list[plan.Extent]:
                """The whole disk to read: every extent dirty, its holes known."""
                return client.extents("zero")

            if incremental:
                try:
                    extents = client.extents("dirty")
                except NoDirtyExtents as e:
                    self._warn(f"VM {self.vm.name} disk {disk.alias}: {e}; reading the whole disk")
                    incremental = False
            if not incremental:
                extents = zero_extents()
            blocks = _plan_disk(disk, size, block_size, extents,
                                base_size=base_record.provisioned_size if incremental else None)
            if incremental and self.settings.verify_sample and not self._check_sample(
                    client, writer, base_record.image, blocks, disk):
                incremental = False
                blocks = _plan_disk(disk, size, block_size, zero_extents())
            summary = plan.summarize(blocks)
            checked = client.bytes_read  # the clean blocks re-read to check the dirty bitmap
            log.debug("VM %s disk %s: %d blocks: %d holes, %d reused, %d to read (%d bytes)%s", self.vm.name,
                      disk.alias, summary.blocks, summary.holes, summary.reused, summary.read,
                      summary.bytes_to_read,
                      f", after {checked} bytes read to check the dirty bitmap" if checked else "")
            progress = Progress(f"VM {self.position[0]} of {self.position[1]}, {self.vm.name}/{disk.alias}", size)
            sha256s = None if writer.gives_chunk_ids else bytearray()
            stats = writer.add_image(path, size, self._stream(client, blocks, sha256s, progress))
            progress.finish()
            bytes_read = client.bytes_read
            seconds = time.monotonic() - t0
            log.debug("VM %s disk %s: %s read in %.1f s (%s/s), the bitmap check's included", self.vm.name,
                      disk.alias, human_size(bytes_read), seconds, human_size(bytes_read / seconds if seconds else 0))
            if client.fallback_reason:  # logged by the client; a setting to fix: the run exits 1
                self.result.warnings.append(f"VM {self.vm.name} disk {disk.alias}: {client.fallback_reason}")
        if sha256s is None:
            digest_bytes, kind = stats.chunk_ids, sc.BLOCKS_BORG_ID
        else:
            digest_bytes, kind = bytes(sha256s), sc.BLOCKS_SHA256
        mode = "incremental" if incremental else "full"
        result = DiskResult(disk.id, disk.alias, mode, size, stats.blocks, stats.holes, stats.reused,
                            stats.stored, bytes_read, round(time.monotonic() - t0, 3))
        self.result.disks.append(result)
        record = sc.DiskRecord(
            id=disk.id, alias=disk.alias, format=disk.format, provisioned_size=size, backup_mode=mode,
            image=path, blocks_file=path[:-len(".raw")] + ".blocks", blocks_sha256=sc.digests_sha256(digest_bytes),
            blocks_kind=kind,
            bytes_read=bytes_read, holes=stats.holes, reused=stats.reused, stored=stats.stored,
            blocks=stats.blocks, interface=disk.interface, bootable=disk.bootable)
        return record, digest_bytes

    def _base_ids(self, previous: sc.Sidecar, disks: list[DiskInfo]) -> dict[str, bytes]:
        """The chunk ids of the disks' blocks in the previous archive, by disk id, where recorded.

        Read from the state directory, or from the archive when the local copy is missing or
        damaged; a disk whose ids cannot be had is left out (it is read in full).
        """
        found = {}
        for disk in disks:
            record = previous.disk(disk.id)
            if record is None or record.blocks_kind != sc.BLOCKS_BORG_ID:
                continue
            data = self.state.load_digests(previous.vm_id, record)
            if data is None:
                try:
                    data = archive.read_file(self.repo, previous.archive, record.blocks_file)
                except OvirtBorgError as e:
                    log.warning("cannot read the chunk ids of %s from %s: %s", record.alias, previous.archive, e)
                    continue
                if sc.digests_sha256(data) != record.blocks_sha256:
                    log.warning("the chunk ids of %s in %s do not match the sidecar", record.alias, previous.archive)
                    continue
            found[disk.id] = data  # their count is checked by writer.base_image
        return found

    def _check_sample(self, client: ImageioClient, writer: archive.ArchiveWriter, path: str,
                      blocks: list[plan.Block], disk: DiskInfo) -> bool:
        """Re-read a few clean blocks whole and compare them with the base archive.

        Returns True when they match, False when the dirty bitmap missed a change.
        """
        sample = plan.choose_sample(blocks, self.settings.verify_sample, self.rng)
        for block, data in zip(sample, _assemble(client, sample, self.settings.block_size), strict=True):
            if not writer.is_base_block(path, block.index, data):
                log.error("VM %s disk %s: block %d changed although the dirty bitmap says it did not; "
                          "the bitmap cannot be trusted: reading the whole disk",
                          self.vm.name, disk.alias, block.index)
                return False
        log.debug("VM %s disk %s: %d sampled clean blocks match", self.vm.name, disk.alias, len(sample))
        return True

    def _stream(self, client: ImageioClient, blocks: Sequence[plan.Block], sha256s: bytearray | None,
                progress: Progress) -> Iterator[Holes | Reuse | bytes]:
        """Yield the writer's blocks in order, reading the data blocks from imageio.

        With ``sha256s`` (for a writer that gives no chunk ids, which never reuses blocks), it
        holds each block's sha256 once all are taken. Data blocks are hashed in a thread of
        their own (hashlib releases the GIL), so this thread, which feeds the writer, never
        waits for a digest.
        """
        reads = [b for b in blocks if b.action is plan.Action.READ]
        data_iter = _assemble(client, reads, self.settings.block_size)
        parts: list[bytes | Future[bytes]] = []
        hashing: deque[Future[bytes]] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-digest") as hasher:
            for block in blocks:
                if block.action is plan.Action.HOLE:
                    if sha256s is not None:
                        parts.append(sc.zero_digest(block.length) * block.count)
                    progress.update(block.length * block.count, 0)
                    yield Holes(block.count)
                elif block.action is plan.Action.REUSE:
                    if sha256s is not None:
                        raise ValueError("blocks reused by a writer that gives no chunk ids")
                    progress.update(block.length * block.count, 0)
                    yield Reuse(block.index, block.count)
                else:
                    data = next(data_iter)
                    if sha256s is not None:
                        hashing.append(hasher.submit(_sha256, data))
                        parts.append(hashing[-1])
                        # Bound the blocks kept alive only for their digest.
                        while len(hashing) > _DIGESTS_AHEAD or (hashing and hashing[0].done()):
                            hashing.popleft().result()
                    progress.update(block.length, block.bytes_to_read)
                    yield data
            if sha256s is not None:
                for part in parts:
                    sha256s += part if isinstance(part, bytes) else part.result()


class _IncrementalUnusable(TransferError):
    """The engine stopped an incremental disk's transfer before it started: its bitmap is bad."""


def _plan_disk(disk: DiskInfo, size: int, block_size: int, extents: list[plan.Extent],
               base_size: int | None = None) -> list[plan.Block]:
    """``plan.plan_blocks``; extents that do not cover the disk fail it as a transfer error."""
    try:
        return plan.plan_blocks(size, block_size, extents, base_size=base_size)
    except ValueError as e:
        raise TransferError(f"disk {disk.alias}: imageio's extents do not cover the disk ({e}); was it "
                            "resized during the backup? The next run reads it again") from None


def _settle(future: Future, stop: threading.Event) -> None:
    """Wait until the thread of ``future`` (from ``_in_thread``) is done, through interrupts.

    An interrupt sets ``stop`` (the thread's wait for the engine ends at its next poll) and is
    raised again once the thread is done, so that nothing else uses the engine connection
    while the thread still does. The outcome stays in ``future``.
    """
    interrupted: Interrupted | None = None
    while True:
        try:
            future.exception()  # waits; the outcome itself is taken later
            break
        except Interrupted as e:
            interrupted = interrupted or e
            stop.set()
    if interrupted is not None:
        raise interrupted


def _in_thread(name: str, call: Callable[..., Any], *args: Any) -> Future:
    """Run ``call(*args)`` in a thread of its own; return the future of its outcome.

    The thread is not a daemon: a process that is stopped still lets it finish.
    """
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(call(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=name).start()
    return future


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _assemble(client: ImageioClient, blocks: Sequence[plan.Block], block_size: int) -> Iterator[bytes]:
    """Read the data segments of READ blocks and yield each whole block (zeros filled in).

    Data running across consecutive blocks is read in requests of up to ``READ_REQUEST``
    bytes, which the client cuts at block boundaries: a block read whole is given on as the
    client returned it, without a copy.
    """
    pieces = client.read_ranges(plan.read_ranges(blocks, READ_REQUEST), piece_size=block_size)
    piece = memoryview(b"")  # the part of the last piece received not yet given to a block
    piece_offset = 0
    for block in blocks:
        whole = block.segments == ((block.offset, block.length),)
        if not piece:
            piece_offset, data = next(pieces)
            if whole and len(data) == block.length and piece_offset == block.offset:
                yield data  # a piece of exactly this block: no copy
                continue
            piece = memoryview(data)
        buffer = bytearray(block.length)
        for start, length in block.segments:
            while length:
                if not piece:
                    piece_offset, data = next(pieces)
                    piece = memoryview(data)
                if piece_offset != start:
                    raise AssertionError(f"read {piece_offset} where block {block.index} needs {start}")
                taken = min(length, len(piece))
                buffer[start - block.offset:start - block.offset + taken] = piece[:taken]
                piece, piece_offset = piece[taken:], piece_offset + taken
                start += taken
                length -= taken
        yield bytes(buffer)
    if piece:
        raise AssertionError(f"{len(piece)} bytes read at {piece_offset} belong to no block")


@dataclass(frozen=True)
class RunOutcome:
    results: list[VmResult]
    exit_code: int


@dataclass
class VmPlan:
    """What a backup of one VM would do (``VmBackup.plan``, ``backup --dry-run``)."""

    vm: str
    vm_id: str
    status: str = ""
    archive: str = ""
    mode: str = ""
    reason: str = ""
    path: str = ""
    path_note: str = ""
    #: Each disk backed up: id, alias, format, provisioned_size, mode, reason (why full),
    #: enable_incremental (turned on first), incremental_capable.
    disks: list[dict] = field(default_factory=list)
    skipped_disks: list[dict] = field(default_factory=list)
    excluded_disks: list[str] = field(default_factory=list)
    #: Why the VM is not backed up at all (a skip, a veto, an error), "" when it is.
    skipped: str = ""
    exit_code: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class VmHooks(Protocol):
    """What a run tells its plugins about each VM (the job layer calls the plugin manager)."""

    def before_vm(self, vm: VmInfo) -> list[str]:
        """The reasons plugins give to skip ``vm`` (a veto); none to back it up."""

    def vm_finished(self, vm: VmInfo, result: VmResult) -> None:
        """``vm`` was backed up (``result.ok``); never raises."""

    def backup_failed(self, vm: VmInfo, error: str, exit_code: int) -> None:
        """The backup of ``vm`` failed with ``error``; never raises."""


class NoHooks:
    """A run without plugins: nothing vetoes, nobody is told."""

    def before_vm(self, vm: VmInfo) -> list[str]:
        return []

    def vm_finished(self, vm: VmInfo, result: VmResult) -> None:
        pass

    def backup_failed(self, vm: VmInfo, error: str, exit_code: int) -> None:
        pass


NO_HOOKS = NoHooks()


def checkpoints_of_other_jobs(state: sc.StateDir, vm: VmInfo, other_jobs_days: int, now: datetime) -> list[str]:
    """The checkpoints of ``vm`` that other jobs sharing the state directory (jobs writing to
    other repositories) start their next incrementals from.

    A job whose last backup of the VM finished more than ``other_jobs_days`` days before
    ``now`` holds none (0: no limit): an abandoned job must not pile checkpoints up on the
    engine.
    """
    held = []
    for other in state.other_jobs(vm.id):
        if not other.checkpoint_id:
            continue
        try:
            finished = naming.parse_timestamp(other.finished)
        except ValueError:
            continue
        if other_jobs_days and now - finished > timedelta(days=other_jobs_days):
            log.info("VM %s: checkpoint %s of archive %s of another job is older than "
                     "checkpoints.other_jobs_days; it is not kept for that job", vm.name,
                     other.checkpoint_id, other.archive)
            continue
        held.append(other.checkpoint_id)
    return held


def purge_checkpoints(engine: Engine, state: sc.StateDir, vm: VmInfo, in_use: str, *, keep: int,
                      other_jobs_days: int) -> list[str]:
    """Delete the VM's engine checkpoints no backup needs any more; return their ids.

    Kept: the checkpoint ``in_use`` (the next incremental starts from it), the ``keep - 1``
    before it, and those other jobs sharing the state directory start from
    (``checkpoints_of_other_jobs``). Raises typed errors (BackupBusy while a backup of the VM
    is open).
    """
    also_keep = checkpoints_of_other_jobs(state, vm, other_jobs_days, utc_now())
    return engine.purge_checkpoints(vm.id, in_use, keep, also_keep=also_keep)


def _skipped(vm: VmInfo, hooks: VmHooks) -> str | None:
    """Why ``vm`` is not backed up although selected (the hosted engine, a plugin's veto), or None."""
    reason = selection.skip_reason(vm)
    if reason:
        return reason
    vetoes = [r for r in hooks.before_vm(vm) if r]
    return "; ".join(vetoes) if vetoes else None


def _backup_vm(engine: Engine, repo: archive.Repo, state: sc.StateDir, settings: BackupSettings, vm: VmInfo,
               name_for: Callable[[VmInfo], str], hooks: VmHooks, *, force_full: bool,
               archives: frozenset[str] | None, position: tuple[int, int]) -> VmResult:
    """Back up one VM of a run and tell the plugins; return its result, failed or not.

    Any error of the VM, also an unexpected one (a bug: its trace is logged at debug level), is
    that VM's failure (exit 2 for an unexpected one); an interrupt is raised.
    """
    job = None
    try:
        # Inside the try: a plugin that raises in before_vm (a bug, an unreachable service it
        # asks) fails this VM, never the run.
        skipped = _skipped(vm, hooks)
        if skipped:
            log.warning("VM %s skipped: %s", vm.name, skipped)
            return VmResult(vm=vm.name, vm_id=vm.id, error=f"skipped: {skipped}", exit_code=1)
        archive_name = name_for(vm)
        logs.set_context(archive=archive_name)
        job = VmBackup(engine, repo, state, settings.for_vm(vm.name), vm, archive_name, force_full=force_full,
                       archives=archives, position=position)
        result = job.run()  # an Interrupted is no Exception: it stops the run, not just this VM
    except Exception as e:
        if isinstance(e, OvirtBorgError):
            message, exit_code = str(e), e.exit_code
        else:
            log.debug("VM %s: unexpected error", vm.name, exc_info=True)
            message, exit_code = f"unexpected error (please report it; -v shows its trace): {e!r}", EXIT_ERROR
        log.error("VM %s: backup failed: %s", vm.name, message)
        failed = job.result if job else VmResult(vm=vm.name, vm_id=vm.id)
        failed.error, failed.exit_code = message, exit_code
        hooks.backup_failed(vm, message, exit_code)
        return failed
    hooks.vm_finished(vm, result)
    return result


def run_exit_code(codes: Iterable[int], warned: bool) -> int:
    """A run's exit code from its VMs' (pure): 0, 1 for warnings or skips only, the failed VMs'
    code, or 2 when they failed with different codes."""
    codes = {code for code in codes if code} | ({1} if warned else set())
    failures = codes - {1}
    if failures:
        return failures.pop() if len(failures) == 1 else EXIT_ERROR
    return 1 if codes else 0


def run_backups(engine: Engine, repo: archive.Repo, state: sc.StateDir, settings: BackupSettings,
                vms: Sequence[VmInfo], name_for: Callable[[VmInfo], str], hooks: VmHooks = NO_HOOKS, *,
                force_full: bool = False, archives: frozenset[str] | None = None) -> RunOutcome:
    """Back up each VM in turn; one VM's failure does not stop the others.

    ``name_for(vm)`` gives the archive name; ``hooks`` tells the plugins (and may veto a VM);
    ``archives`` the repository's archive names read at the start of the run (see
    ``VmBackup``). Returns every VM's result and the run's exit code (``run_exit_code``).
    Interrupts propagate at once.
    """
    results: list[VmResult] = []
    for number, vm in enumerate(vms, 1):
        with logs.context(vm=vm.name):
            results.append(_backup_vm(engine, repo, state, settings, vm, name_for, hooks, force_full=force_full,
                                      archives=archives, position=(number, len(vms))))
    return RunOutcome(results, run_exit_code((r.exit_code for r in results), any(r.warnings for r in results)))


def plan_backups(engine: Engine, repo: archive.Repo, state: sc.StateDir, settings: BackupSettings,
                 vms: Sequence[VmInfo], name_for: Callable[[VmInfo], str], hooks: VmHooks = NO_HOOKS, *,
                 force_full: bool = False, archives: frozenset[str] | None = None) -> list[VmPlan]:
    """What ``run_backups`` would do with the same arguments, changing nothing (``VmBackup.plan``).

    A VM that would be skipped (the hosted engine, a plugin's veto) or whose plan fails (it
    was deleted) says why in its plan. Interrupts propagate.
    """
    plans = []
    for number, vm in enumerate(vms, 1):
        try:
            skipped = _skipped(vm, hooks)
            if skipped:
                plans.append(VmPlan(vm=vm.name, vm_id=vm.id, status=vm.status, skipped=skipped, exit_code=1))
                continue
            job = VmBackup(engine, repo, state, settings.for_vm(vm.name), vm, name_for(vm), force_full=force_full,
                           archives=archives, position=(number, len(vms)))
            plans.append(job.plan())
        except OvirtBorgError as e:
            plans.append(VmPlan(vm=vm.name, vm_id=vm.id, status=vm.status, skipped=str(e), exit_code=e.exit_code))
    return plans
