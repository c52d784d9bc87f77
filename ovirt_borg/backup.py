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

A run overlaps its VMs (``_Pipeline``, ``backup.prepare_ahead``): a VM's lifecycle is split into
phases (``VmBackup``: inspect and start its engine backup, stream its archive, finish), and
while one VM streams (one writer, one archive at a time) the next VMs are prepared (their first
disk's image transfer opened) and the ones before finished in threads of their own, each disk's
image transfer opened while the disk before it streams and its end awaited by the VM's finish.
Results, log lines and plugin calls stay per VM, in the VMs' order.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import hashlib
import logging
import math
import random
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from ovirt_borg import archive, logs, naming, plan, selection, sidecar as sc
from ovirt_borg.archive import Holes, Reuse
from ovirt_borg.engine import (BackupBusy, BackupEnd, CheckpointRefused, ColdBackupRefused, DiskInfo, Engine,
                               StillFinalizing, Transfer, TransferStopped, VmInfo, WaitStopped)
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
    #: VMs prepared (engine backup started and ready) while one streams; 0: one after another.
    prepare_ahead: int = 4
    #: Blocks changed in part rebuilt from their dirty bytes and the base archive's chunk:
    #: "auto" (``rebuild_blocks``), "always" or "never" (read whole).
    rebuild_blocks: str = "auto"

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


REBUILD_CHOICES = ("auto", "always", "never")


def rebuilds_blocks(setting: str, remote: bool) -> bool:
    """Whether an incremental rebuilds its blocks changed in part (pure).

    Given the ``rebuild_blocks`` setting and whether the repository is remote: a rebuilt block
    costs a read of the base archive's chunk for the block from the repository, and its
    decryption, instead of reading the block's clean bytes from imageio. ``auto`` rebuilds for
    a local repository only: from a remote one each such chunk (its get sent ahead with the
    next ones', not a round trip each) moves about as many bytes over the repository's link,
    usually the slower one, as imageio would have sent, and ``borg serve`` reads it too.
    """
    if setting not in REBUILD_CHOICES:
        raise ValueError(f"rebuild_blocks must be one of {', '.join(REBUILD_CHOICES)}, not {setting!r}")
    return setting == "always" or (setting == "auto" and not remote)


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
    #: Of the ``stored`` blocks, those changed in part whose clean bytes came from the base archive.
    rebuilt: int = 0

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
        # What the phases hand on to each other.
        self._started = utc_now()
        self._seconds = 0.0
        self._timing = False
        self._disks_chosen: list[DiskInfo] = []
        self._previous: sc.Sidecar | None = None
        self._decision = ModeDecision("full", "")
        self._ovf = ""
        self._engine_started = False  # the engine backup was asked for (or found refused)
        self._backup_id: str | None = None  # the engine backup held open, until finalized
        self._path = PATH_BACKUP
        self._to_checkpoint: str | None = None
        self._modes: dict[str, str] = {}
        self._finalizing: Future | None = None  # the finalize started beside the commit
        # The first disk's image transfer, opened by start_ahead and kept alive until the turn.
        self._first_transfer: _TransferAhead | None = None
        # Transfers whose every byte was read and whose finalize was asked for, not yet seen ended
        # (``_end_transfers``), and what went wrong ending them (reported by ``finish``).
        self._ending: list[_Ending] = []
        self._transfer_problems: list[str] = []
        self._stop_finalizing = threading.Event()
        self._stored = False  # the archive is committed and its sidecar stored: the backup stands

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
        """Back up the VM, its phases one after another; return its result or raise an
        OvirtBorgError (nothing committed, the engine backup finalized).

        Problems after the archive was committed (finalizing the engine backup, purging old
        checkpoints) do not undo the backup: they are logged and listed in ``result.warnings``.
        An interrupt is raised once the VM's cleanup is done.
        """
        try:
            if self.inspect(self.engine):
                self.stream(self.engine)
        finally:
            self.finish(self.engine, threading.Event())
        return self.result

    # The phases. Each is given the engine connection of the thread it runs in; one VM's phases
    # run one after another (prepare, start ahead, stream, finish), never two at once.

    def inspect(self, engine: Engine, full_reason: str | None = None) -> bool:
        """Phase 1: read the VM at its turn, choose its disks, decide full or incremental, read
        its OVF and finalize stale backups left open on it; starts nothing.

        ``full_reason`` makes it a full backup, saying why. Returns False when the engine backs
        up none of its disks (``result`` says so: a skip); raises typed errors.
        """
        self.engine = engine
        with self._busy():
            self._started = utc_now()
            self._refresh_vm()
            disks = self._disks()
            if not disks and self.result.skipped_disks:
                self.result.error = "skipped: the engine backs up none of its disks"
                self.result.exit_code = 1
                return False
            if not disks:
                raise OvirtBorgError(f"VM {self.vm.name} has no disks to back up (all excluded or none attached)")
            self._disks_chosen = disks
            self._previous = self.state.load(self.vm.id)
            self._decision = (ModeDecision("full", full_reason) if full_reason
                              else self._decide(self._previous, self._started))
            self._ovf = engine.vm_ovf(self.vm.id)
            stale = engine.finalize_stale_backups(self.vm.id, self.settings.description,
                                                  self.settings.foreign_stale_hours * 3600)
            for backup_id, end in stale.items():
                self._snapshot_warning(backup_id, end)
            return True

    def start_ahead(self, engine: Engine, stop: threading.Event) -> None:
        """Phase 2 ahead of the VM's turn: start its engine backup, wait until it is ready and
        open its first disk's image transfer, kept alive until the VM streams (``_TransferAhead``;
        an error opening it is raised when the VM streams, where an incremental disk's is
        handled).

        ``stop`` ends the wait (WaitStopped). A backup started and a transfer opened are ended
        by ``finish``, whatever happens here. Raises typed errors.
        """
        self.engine = engine
        with self._busy():
            self._start_engine_backup()
            if self._backup_id is not None:
                self._to_checkpoint, self._modes = self._backup_ready(self._backup_id, stop)
                if not stop.is_set():
                    self._first_transfer = self._transfer_ahead(lambda: engine, self._disks_chosen[0])
                    # The engine connection is this thread's: free once the transfer is open.
                    self._first_transfer.wait_opened()

    def stream(self, engine: Engine, *,
               finalize_with: Callable[[Callable[[Engine, threading.Event], BackupEnd]], Future] | None = None,
               transfers: Callable[[], Engine] | None = None) -> None:
        """Phase 3: write the VM's archive (its engine backup started now, after the
        repository's lock was taken, unless ``start_ahead`` did it), commit it, store the sidecar.

        Once every disk is read, the engine backup's finalize starts beside the commit:
        ``finalize_with(call)`` runs ``call(engine, stop)`` in a thread with an engine connection
        and a stop event of its own and returns its future, which ``finish`` takes (default: a
        thread of its own on ``engine``, which nothing else uses meanwhile). With
        ``transfers``, a connection of its own for that, each disk's image transfer is opened
        while the disk before it streams, and a disk read through is only asked to finalize:
        the wait for its transfer's end is left to that call (``_end_transfers``). Raises an
        OvirtBorgError when nothing was committed; an interrupt after logging whether the
        archive was committed. ``finish`` must follow, whatever happens.
        """
        self.engine = engine
        try:
            with self._busy():
                try:
                    self._write_archive(finalize_with, transfers)
                except _IncrementalUnusable as e:
                    # Hybrid and cold backups show a bad bitmap only here, with the checkpoint still
                    # "created": without a full read now, every night would fail the same way.
                    log.warning("VM %s: %s; its engine backup is finalized; starting a full backup", self.vm.name, e)
                    self._end_engine_backup(threading.Event())
                    self.result = VmResult(vm=self.vm.name, vm_id=self.vm.id, archive=self.archive_name)
                    self._writer = None
                    if not self.inspect(engine, full_reason=f"the incremental backup failed: {e}"):
                        return
                    self._write_archive(finalize_with, transfers)
        except Interrupted:
            log.error("VM %s: %s", self.vm.name,
                      f"stopped after archive {self.archive_name} was committed" if self._committed() else
                      f"stopped before archive {self.archive_name} was committed: nothing of it is kept")
            raise

    def finish(self, engine: Engine, stop: threading.Event) -> None:
        """Phase 4, after ``stream`` (or instead of it, when the VM is not streamed): wait for
        the VM's image transfers to end and finalize the engine backup, then, when the archive
        stands, purge old checkpoints and complete ``result``.

        ``stop`` ends a wait for the engine's finalize (the next run finishes it). Problems
        here never undo a committed backup: they are warnings (``result.warnings``), and before
        the commit they are logged, the VM's own error being the one reported. Never raises an
        OvirtBorgError.
        """
        self.engine = engine
        with self._busy():
            if self._backup_id is not None:
                backup_id, self._backup_id = self._backup_id, None
                self._finalize(backup_id, self._finalizing, stop)
            self._end_transfers(engine, stop)  # a VM read through engine image transfers: no backup
            self._report_transfer_problems()
            if not self._stored:
                return
            if self._to_checkpoint:
                try:
                    purge_checkpoints(engine, self.state, self.vm, self._to_checkpoint,
                                      keep=self.settings.checkpoints_keep,
                                      other_jobs_days=self.settings.checkpoints_other_jobs_days)
                except BackupBusy as e:
                    # A backup still finalizing (a hybrid one removing its snapshot): not a problem.
                    log.info("VM %s: old checkpoints stay until the next run: %s", self.vm.name, e)
                except OvirtBorgError as e:
                    self._warn(f"VM {self.vm.name}: could not purge old checkpoints: {e}; "
                               "the next run purges them")
            self.result.checkpoint = self._to_checkpoint
            self.result.ok = True
        self.result.seconds = round(self._seconds, 3)

    @property
    def engine_backup(self) -> str | None:
        """The id of the engine backup this VM holds open (started, not yet finalized), or None."""
        return self._backup_id

    @property
    def holds_transfers(self) -> bool:
        """Whether image transfers of this VM may still be open on the engine (``finish`` ends them)."""
        return self._first_transfer is not None or bool(self._ending)

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Count the time inside the block as the VM's (``result.seconds``: its phases' time,
        not the time it waited for its turn)."""
        if self._timing:  # a phase inside another (an incremental given up for a full read)
            yield
            return
        self._timing = True
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._seconds += time.monotonic() - t0
            self._timing = False

    def _committed(self) -> bool:
        """The archive of this run is in the repository."""
        return self._writer is not None and self._writer.committed

    def _start_engine_backup(self) -> None:
        """Start the engine backup (or find that a powered-off VM is read through engine image
        transfers); fix the mode, path and their log line."""
        decision = self._decision
        use_backup_api = uses_backup_api(self.vm.status, self.settings.cold_backup)
        path = PATH_BACKUP
        if use_backup_api:
            try:
                self._backup_id, decision = self._start_backup(self._disks_chosen, decision)
            except ColdBackupRefused as e:
                if self.vm.status != "down":
                    raise
                log.warning("VM %s is powered off and the engine cannot back it up (%s); "
                            "reading its disks through engine image transfers instead", self.vm.name, e)
        if self._backup_id is None:
            path = PATH_ENGINE_TRANSFER
            decision = engine_transfer_decision(cold_backup_refused=use_backup_api)
        self._decision, self._path, self._engine_started = decision, path, True
        self.result.mode, self.result.reason, self.result.path = decision.mode, decision.reason, path
        log.info("VM %s (%d of %d): %s backup into %s (%s)", self.vm.name, *self.position, decision.mode,
                 self.archive_name, decision.reason)

    def _end_engine_backup(self, stop: threading.Event) -> None:
        """Finalize the engine backup now (an incremental given up for a full read)."""
        if self._backup_id is not None:
            backup_id, self._backup_id = self._backup_id, None
            self._finalize(backup_id, None, stop)
        self._engine_started = False
        self._to_checkpoint, self._modes, self._path = None, {}, PATH_BACKUP

    def _write_archive(self, finalize_with: Callable[[str], Future] | None,
                       transfers: Callable[[], Engine] | None) -> None:
        """One attempt at writing the archive (``stream``)."""
        disks, previous = self._disks_chosen, self._previous
        base = previous.archive if self._decision.mode == "incremental" else None
        # Read before the writer locks the repository (a copy from the archive needs a reader).
        base_ids = self._base_ids(previous, disks) if base else {}
        writer = self._writer = archive.open_writer(
            self.repo, self.archive_name, block_size=self.settings.block_size, base_archive=base,
            kind=self.settings.writer)
        # The lock before the engine is asked: a repository another borg holds (a reader too:
        # borg mount, borg list) costs the engine nothing, no backup, no checkpoint. A backup
        # started ahead was asked for while the VM before held the lock.
        writer.lock()
        preparing: Future | None = None
        stop_preparing = threading.Event()

        def engine_ready() -> None:
            """Take the outcome of ``preparing``; a wait interrupted here leaves it to ``finally``."""
            nonlocal preparing
            try:
                self._to_checkpoint, self._modes = preparing.result()
            finally:
                if preparing.done():
                    preparing = None

        try:
            if not self._engine_started:
                self._start_engine_backup()
                if self._backup_id is not None:
                    # The engine prepares its backup (on a real engine seconds: checkpoint, snapshot
                    # or scratch disks, NBD exports) while the locked repository is opened (Borg's
                    # manifest and cache sync). Nothing else uses the engine connection until it is ready.
                    preparing = _in_thread("engine-backup-ready", self._backup_ready, self._backup_id,
                                           stop_preparing)
                    if writer.comment_at_open:
                        engine_ready()
            decision, path, backup_id = self._decision, self._path, self._backup_id
            if decision.mode != "incremental":
                base, base_ids, writer.base_archive = None, {}, None
            writer.comment = naming.archive_comment(self.vm.name, decision.mode, path, self._to_checkpoint)
            with writer:
                if preparing is not None:
                    engine_ready()
                records, digests = self._disks_into(writer, disks, previous if base else None, base_ids, transfers)
                if backup_id is not None:
                    # Every disk is read: the engine ends its backup while Borg commits.
                    log.debug("VM %s: every disk is read; finalizing engine backup %s beside the commit",
                              self.vm.name, backup_id)
                    if finalize_with is not None:
                        self._finalizing = finalize_with(
                            lambda engine, stop: self._end_and_finalize(engine, backup_id, stop))
                    else:
                        # Nothing else uses the engine connection until finish has waited for it.
                        self._finalizing = _in_thread("engine-finalize", self._end_and_finalize, self.engine,
                                                      backup_id, self._stop_finalizing)
                finished = utc_now()
                last_full = naming.timestamp(self._started)
                if decision.mode == "incremental" and previous is not None:
                    last_full = previous.last_full
                sidecar = sc.Sidecar(
                    vm_id=self.vm.id, vm_name=self.vm.name, archive=self.archive_name, mode=decision.mode,
                    reason=decision.reason, path=path, block_size=self.settings.block_size,
                    started=naming.timestamp(self._started), finished=naming.timestamp(finished), last_full=last_full,
                    disks=tuple(records),
                    previous_archive=base, checkpoint_id=self._to_checkpoint,
                    from_checkpoint_id=decision.from_checkpoint, backup_id=backup_id)
                vm_dir = naming.safe_name(self.vm.name)
                writer.add_file(f"{vm_dir}/vm.ovf", self._ovf.encode())
                for record in records:
                    writer.add_file(record.blocks_file, digests[record.id])
                writer.add_file(f"{vm_dir}/{sc.SIDECAR_NAME}", sidecar.to_json())
                writer.comment = naming.archive_comment(self.vm.name, decision.mode, path, self._to_checkpoint, records)
                writer.commit()
            try:
                self.state.store(sidecar, digests)
            except OSError as e:
                raise OvirtBorgError(
                    f"VM {self.vm.name}: archive {self.archive_name} is committed, but its sidecar could not "
                    f"be saved in the state directory ({e}); the next backup of this VM starts from the "
                    "previous sidecar") from None
            self._stored = True
        finally:
            try:
                if preparing is not None:
                    self._stop_preparing(preparing, stop_preparing)
            finally:
                writer.release()  # a lock taken for a writer never entered

    def _disks_into(self, writer: archive.ArchiveWriter, disks: list[DiskInfo], previous: sc.Sidecar | None,
                    base_ids: dict[str, bytes], transfers: Callable[[], Engine] | None
                    ) -> tuple[list[sc.DiskRecord], dict[str, bytes]]:
        """Stream each disk into ``writer``; return their records and block digests.

        With ``transfers`` (a connection for it), the next disk's image transfer is opened
        while a disk streams (``_TransferAhead``; the first disk's may have been opened by
        ``start_ahead``), and a transfer read through is only asked to finalize
        (``_reading``); one opened and not used is ended.
        """
        records, digests = [], {}
        ahead, self._first_transfer = self._first_transfer, None
        try:
            for index, disk in enumerate(disks):
                mode = self._modes.get(disk.id, "full")
                if ahead is not None:
                    transfer = ahead.take()  # its error, or an interrupt meanwhile: closed below
                    ahead = None
                else:
                    transfer = self._open_transfer(self.engine, disk, mode)
                with self._reading(transfer, disk, background=transfers is not None):
                    if transfers is not None and index + 1 < len(disks):
                        ahead = self._transfer_ahead(transfers, disks[index + 1])
                    record, disk_digests = self._disk(writer, disk, transfer, mode, previous, base_ids.get(disk.id))
                records.append(record)
                digests[disk.id] = disk_digests
        finally:
            if ahead is not None:
                ahead.close(self.engine)
        return records, digests

    def _transfer_ahead(self, engine: Callable[[], Engine], disk: DiskInfo) -> _TransferAhead:
        """The image transfer of ``disk`` opened in a thread of its own on ``engine()`` and kept
        alive until taken (``_TransferAhead``)."""
        return _TransferAhead(lambda: self._open_transfer(engine(), disk, self._modes.get(disk.id, "full")),
                              self._transfer_settings(), self._inactivity_timeout(),
                              f"{self.vm.name} disk {disk.alias}")

    @contextlib.contextmanager
    def _reading(self, transfer: Transfer, disk: DiskInfo, *, background: bool) -> Iterator[None]:
        """Around reading ``disk`` through its open download ``transfer``: once every byte is
        read, the transfer is finalized and waited for here (``_finalized``) or, ``background``,
        only asked to finalize, its end waited for by ``_end_transfers`` in the finish phase,
        off the streaming thread.

        An error, or a finalize the engine does not take (the disk fails, as with
        ``_finalized``: nothing is committed yet), ends the transfer here (``abandon_transfer``).
        """
        if not background:
            with _finalized(self.engine, transfer):
                yield
            return
        try:
            yield
            self.engine.request_transfer_finalize(transfer.id)
        except BaseException:
            # A transfer left active would block finalizing the backup (and lock the disk).
            self.engine.abandon_transfer(transfer.id, "download")
            raise
        self._ending.append(_Ending(transfer.id, disk.alias))

    def _end_transfers(self, engine: Engine, stop: threading.Event) -> None:
        """Wait until every image transfer of the VM has ended, on ``engine`` (the finish
        phase's); never raises an OvirtBorgError.

        Before its engine backup is finalized: the engine refuses to stop a backup while one of
        its transfers is not finished (StopVmBackupCommand.validate,
        ImageTransferPhase.isFinished; ``finalize_backup`` would repeat the refused finalize
        until ``timeout``). A first disk's transfer opened ahead and never taken is ended, as
        is one that does not end (``abandon_transfer``).
        ``stop`` ends the wait (the next run ends what is left: ``finalize_stale_backups``).

        Every byte of a transfer waited for here was read before its finalize was asked for:
        each read of imageio was complete or failed the disk, before anything was committed.
        How the transfer then ends says nothing of that data. The engine checks an image on
        finalize only for an upload; for a download it only ends the imageio session (its
        tickets) and tears the image down (TransferDiskImageCommand.handleFinalizingSuccess),
        and a download can always be finalized (the SDK's helpers/imagetransfer.py). So an end
        other than ``finished_success`` does not undo the archive: it is a problem to report
        (``_report_transfer_problems``), the engine having left something to look at.
        """
        if self._first_transfer is not None:
            first, self._first_transfer = self._first_transfer, None
            first.close(engine)
        while self._ending:
            ending = self._ending[0]
            what = f"VM {self.vm.name} disk {ending.alias}: image transfer {ending.transfer_id}"
            try:
                phase = engine.wait_transfer_end(ending.transfer_id, stop)
            except WaitStopped:
                log.info("%s: no longer waiting for it to end; the next run ends it", what)
                return
            except OvirtBorgError as e:
                self._transfer_problems.append(f"{what} did not end after every byte was read ({e}); "
                                               "it was ended")
                engine.abandon_transfer(ending.transfer_id, "download")  # logs, never raises
            else:
                if phase != "finished_success":
                    self._transfer_problems.append(f"{what} ended in phase {phase} after every byte was read "
                                                   "(see the engine's events)")
            self._ending.pop(0)

    def _end_and_finalize(self, engine: Engine, backup_id: str, stop: threading.Event) -> BackupEnd:
        """The VM's image transfers ended (``_end_transfers``), then its engine backup finalized."""
        self._end_transfers(engine, stop)
        return engine.finalize_backup(self.vm.id, backup_id, stop)

    def _report_transfer_problems(self) -> None:
        """Report what went wrong ending the VM's transfers: a warning once the archive is
        committed (it holds every byte read, ``_end_transfers``), else logged."""
        problems, self._transfer_problems = self._transfer_problems, []
        for problem in problems:
            if self._committed():
                self._warn(f"{problem}; archive {self.archive_name} holds every byte of the disk (the "
                           "engine's finalize of a download does not touch its data)")
            else:
                log.warning("%s", problem)

    def _inactivity_timeout(self) -> int:
        return transfer_inactivity_timeout(self.settings, self.repo.lock_wait)

    def _transfer_settings(self) -> TransferSettings:
        """The data path's settings for this VM's transfers (a powered-off VM read through engine
        image transfers goes through the engine's proxy)."""
        if self._backup_id is None:
            return dataclasses.replace(self.settings.transfer, force_proxy=True)
        return self.settings.transfer

    def _open_transfer(self, engine: Engine, disk: DiskInfo, engine_mode: str) -> Transfer:
        """Start the download of ``disk`` and wait until it is transferring; raises typed errors
        (``_IncrementalUnusable`` for an incremental disk whose transfer the engine stopped)."""
        try:
            return engine.start_transfer(disk.id, direction="download", backup_id=self._backup_id,
                                         inactivity_timeout=self._inactivity_timeout())
        except TransferStopped as e:
            if engine_mode != "incremental":
                raise
            raise _IncrementalUnusable(f"disk {disk.alias}: {e} (a missing or broken dirty bitmap on a "
                                       "hybrid or cold backup)") from None

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
                self._end_transfers(self.engine, stop)
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

    def _disk(self, writer: archive.ArchiveWriter, disk: DiskInfo, transfer: Transfer,
              engine_mode: str, previous: sc.Sidecar | None, base_ids: bytes | None) -> tuple[sc.DiskRecord, bytes]:
        """Stream ``disk`` through its open image ``transfer`` into ``writer``; return its record
        and block digests (the caller finalizes the transfer)."""
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

        with ImageioClient(transfer.transfer_url, transfer.proxy_url, self._transfer_settings()) as client:
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
            rebuild = incremental and rebuilds_blocks(self.settings.rebuild_blocks, self.repo.remote)
            blocks = _plan_disk(disk, size, block_size, extents,
                                base_size=base_record.provisioned_size if incremental else None, rebuild=rebuild)
            if incremental and self.settings.verify_sample and not self._check_sample(
                    client, writer, base_record.image, blocks, disk):
                incremental = rebuild = False
                blocks = _plan_disk(disk, size, block_size, zero_extents())
            summary = plan.summarize(blocks)
            checked = client.bytes_read  # the clean blocks re-read to check the dirty bitmap
            log.debug("VM %s disk %s: %d blocks: %d holes, %d reused, %d to read (%d bytes, %d of them rebuilt "
                      "on their base blocks)%s", self.vm.name, disk.alias, summary.blocks, summary.holes,
                      summary.reused, summary.read, summary.bytes_to_read, summary.rebuilt,
                      f", after {checked} bytes read to check the dirty bitmap" if checked else "")
            progress = Progress(f"VM {self.position[0]} of {self.position[1]}, {self.vm.name}/{disk.alias}", size)
            sha256s = None if writer.gives_chunk_ids else bytearray()
            rebuilt = [block.index for block in blocks if block.action is plan.Action.REBUILD]
            # The base blocks are read ahead (threads of the writer) while imageio's reads of the
            # dirty parts and the writer's work go on; leaving stops and awaits the reads.
            with (writer.base_blocks(path, rebuilt) if rebuilt else contextlib.nullcontext()) as base_blocks:
                stats = writer.add_image(path, size, self._stream(client, blocks, sha256s, progress, base_blocks))
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
                            stats.stored, bytes_read, round(time.monotonic() - t0, 3), summary.rebuilt)
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
                progress: Progress, base_blocks: Iterator[tuple[int, bytes]] | None = None
                ) -> Iterator[Holes | Reuse | bytes]:
        """Yield the writer's blocks in order, reading the data blocks from imageio.

        ``base_blocks`` gives the REBUILD blocks' data in the base archive, in order, as
        ``(index, data)`` (the writer's ``base_blocks``).

        With ``sha256s`` (for a writer that gives no chunk ids, which never reuses blocks), it
        holds each block's sha256 once all are taken. Data blocks are hashed in a thread of
        their own (hashlib releases the GIL), so this thread, which feeds the writer, never
        waits for a digest.
        """
        reads = [b for b in blocks if b.action is plan.Action.READ or b.action is plan.Action.REBUILD]
        data_iter = _assemble(client, reads, self.settings.block_size, base_blocks)
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


@dataclass(frozen=True)
class _Ending:
    """A disk's image transfer read through and asked to finalize, until ``_end_transfers``
    sees it ended."""

    transfer_id: str
    alias: str


def _plan_disk(disk: DiskInfo, size: int, block_size: int, extents: list[plan.Extent],
               base_size: int | None = None, rebuild: bool = False) -> list[plan.Block]:
    """``plan.plan_blocks``; extents that do not cover the disk fail it as a transfer error."""
    try:
        return plan.plan_blocks(size, block_size, extents, base_size=base_size, rebuild=rebuild)
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

    The thread runs in a copy of the caller's context, so its log lines name the caller's VM.
    It is not a daemon: a process that is stopped still lets it finish.
    """
    future: Future = Future()
    context = contextvars.copy_context()

    def run() -> None:
        try:
            future.set_result(context.run(call, *args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=name).start()
    return future


@contextlib.contextmanager
def _finalized(engine: Engine, transfer: Transfer) -> Iterator[Transfer]:
    """An open download ``transfer``, finalized on success and ended (``abandon_transfer``) on
    error, as ``Engine.transfer`` does with one it starts itself."""
    try:
        yield transfer
    except BaseException:
        engine.abandon_transfer(transfer.id, "download")
        raise
    try:
        engine.finalize_transfer(transfer.id)
    except BaseException:
        # A transfer left active would block finalizing the backup (and lock the disk).
        engine.abandon_transfer(transfer.id, "download")
        raise


class _TransferAhead:
    """The next disk's image transfer, opened in a thread of its own while a disk streams (or a
    VM's first disk's, opened while the VM is prepared ahead of its turn).

    The engine spends seconds on a transfer (initializing: the host's NBD export, imageio's
    tickets) before it is transferring. Opened ahead, its ticket idles until the disk before
    it is read, and the engine would cancel a download idle longer than its
    ``inactivity_timeout``: until taken, the thread touches it (imageio counts an OPTIONS
    request as activity) at a third of that interval.
    """

    def __init__(self, open_transfer: Callable[[], Transfer], settings: TransferSettings,
                 inactivity_timeout: int, what: str):
        self._settings = settings
        self._interval = inactivity_timeout / 3 if inactivity_timeout else None
        self._what = what
        self._taken = threading.Event()
        self._opened: Future = Future()
        self._thread = _in_thread("image-transfer-ahead", self._run, open_transfer)

    def _run(self, open_transfer: Callable[[], Transfer]) -> None:
        try:
            transfer = open_transfer()
        except BaseException as e:
            self._opened.set_exception(e)
            return
        self._opened.set_result(transfer)
        while not self._taken.wait(self._interval):
            try:
                with ImageioClient(transfer.transfer_url, transfer.proxy_url, self._settings) as client:
                    client.options()
            except OvirtBorgError as e:  # its reads will say what is wrong, if anything is
                log.debug("image transfer of %s, opened ahead: keeping it alive failed: %s", self._what, e)

    def wait_opened(self) -> None:
        """Wait until the transfer is open or opening it failed (``take`` gives the outcome)."""
        self._opened.exception()

    def take(self) -> Transfer:
        """The open transfer (waiting for it), or the error that opening it raised."""
        try:
            _settle(self._opened, self._taken)
            return self._opened.result()
        finally:
            self._taken.set()

    def close(self, engine: Engine) -> None:
        """End a transfer opened and not taken (in ``finally:``), waiting for the thread through
        interrupts: it uses the engine until the transfer started or failed."""
        self._taken.set()
        _settle(self._thread, self._taken)
        if self._opened.exception() is None:
            engine.abandon_transfer(self._opened.result().id, "download")


# -- a run: the VMs' phases overlapped ---------------------------------------------------------------

#: The position in the run of the VM a log record is about (``_LogOrder``), None outside a VM.
_LOG_SLOT: contextvars.ContextVar[int | None] = contextvars.ContextVar("ovirt_borg_backup_slot", default=None)


class _LogOrder:
    """Keeps a run's log in the VMs' order while their phases overlap.

    A record about a VM (``_LOG_SLOT``) after the first VM not yet done is held back, with
    the context it was logged in (``logs.context``: --log-json names its VM), and given to its
    handler once every VM before it is done; records about no VM pass at once. Installed on
    the root logger's handlers for the run (``installed``).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._head = 0  # the first VM not done
        self._done: set[int] = set()
        self._held: dict[int, list[tuple[logging.Handler, logging.LogRecord, contextvars.Context]]] = {}
        self._releasing = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Within the block, hold back records as the class says; release all at its end."""
        gates = [(handler, _Gate(self, handler)) for handler in logging.getLogger().handlers]
        for handler, gate in gates:
            handler.addFilter(gate)
        try:
            yield
        finally:
            with self._lock:
                self._release(max(self._held, default=-1))
            for handler, gate in gates:
                handler.removeFilter(gate)

    def admit(self, handler: logging.Handler, record: logging.LogRecord) -> bool:
        """Whether ``record`` goes to ``handler`` now; False when it is held back."""
        slot = _LOG_SLOT.get()
        with self._lock:
            if self._releasing or slot is None or slot <= self._head:
                return True
            self._held.setdefault(slot, []).append((handler, record, contextvars.copy_context()))
            return False

    def done(self, slot: int) -> None:
        """The VM at ``slot`` is done: the held records of the VMs after it, up to the next one
        not done, go out."""
        with self._lock:
            self._done.add(slot)
            while self._head in self._done:
                self._head += 1
            self._release(self._head)

    def _release(self, upto: int) -> None:
        """Hand on the held records of the VMs up to ``upto``, in order (the lock held)."""
        self._releasing = True
        try:
            for slot in sorted(s for s in self._held if s <= upto):
                for handler, record, context in self._held.pop(slot):
                    context.run(handler.handle, record)
        finally:
            self._releasing = False


class _Gate(logging.Filter):
    """``_LogOrder``'s filter on one handler."""

    def __init__(self, order: _LogOrder, handler: logging.Handler):
        super().__init__()
        self._order = order
        self._handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        return self._order.admit(self._handler, record)


class _SerialHooks:
    """A run's hooks called one at a time: the plugins hear of VMs from the main thread
    (``before_vm``, archive names) and from the thread that finishes them."""

    def __init__(self, hooks: VmHooks):
        self._hooks = hooks
        self.lock = threading.RLock()

    def before_vm(self, vm: VmInfo) -> list[str]:
        with self.lock:
            return self._hooks.before_vm(vm)

    def vm_finished(self, vm: VmInfo, result: VmResult) -> None:
        with self.lock:
            self._hooks.vm_finished(vm, result)

    def backup_failed(self, vm: VmInfo, error: str, exit_code: int) -> None:
        with self.lock:
            self._hooks.backup_failed(vm, error, exit_code)


@dataclass
class _Slot:
    """One VM of a run and how far it got."""

    index: int
    vm: VmInfo
    asked: bool = False  # before_vm was asked (and the archive named)
    job: VmBackup | None = None
    archive: str = ""
    error: Exception | None = None
    result: VmResult | None = None  # set when the VM is done, or skipped before any phase
    preparing: Future | None = None  # its prepare ahead, in the prepare thread
    finishing: Future | None = None  # its finish, in the finish thread
    streamed: bool = False  # its turn came (streamed, or failed before)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Log lines inside are about this VM (``logs.context``, ``_LogOrder``)."""
        fields = {"vm": self.vm.name, **({"archive": self.archive} if self.archive else {})}
        token = _LOG_SLOT.set(self.index)
        try:
            with logs.context(**fields):
                yield
        finally:
            _LOG_SLOT.reset(token)


class _Pipeline:
    """Runs the VMs' phases (``VmBackup``) overlapped: while one VM streams into the
    repository (one writer, one archive at a time, in the main thread), the next
    ``settings.prepare_ahead`` VMs are inspected, their engine backups started and awaited
    until ready and their first disk's image transfer opened (the prepare thread), and the VMs
    before are finished: image transfers awaited until ended, engine backup finalized,
    checkpoints purged, plugins told (the finish thread). Each thread has an
    engine connection of its own. With ``prepare_ahead`` 0 every phase runs in the main
    thread, one VM and one disk after another.

    One VM's failure is its own; whatever stops the run (an interrupt) first ends what is in
    flight: prepares are stopped, every engine backup started is finalized, finishes are
    waited for.
    """

    def __init__(self, engine: Engine, repo: archive.Repo, state: sc.StateDir, settings: BackupSettings,
                 vms: Sequence[VmInfo], name_for: Callable[[VmInfo], str], hooks: VmHooks, *,
                 force_full: bool, archives: frozenset[str] | None):
        self.engine = engine
        self.repo = repo
        self.state = state
        self.settings = settings
        self.name_for = name_for
        self.hooks = _SerialHooks(hooks)
        self.force_full = force_full
        self.archives = archives
        self.ahead = settings.prepare_ahead
        self.slots = [_Slot(index, vm) for index, vm in enumerate(vms)]
        self._order = _LogOrder()
        self._stop_preparing = threading.Event()
        self._stop_finishing = threading.Event()
        self._prepare_pool: ThreadPoolExecutor | None = None
        self._finish_pool: ThreadPoolExecutor | None = None
        self._connections: dict[str, Engine] = {}
        self._connections_lock = threading.Lock()

    def run(self) -> list[VmResult]:
        """Back up every VM; return their results in the VMs' order. Interrupts propagate once
        everything in flight is ended."""
        if not self.ahead:
            return self._run()
        if self.archives is None:  # read now: the repository is locked while VMs are prepared
            self.archives = archive.repository_view(self.repo).archives
        # The engine's waits (a backup until ready, a finalize until the snapshot is removed)
        # are seconds to a minute each on a real engine and use no CPU here: the VMs prepared
        # ahead wait for them side by side, as do the VMs being finished.
        self._prepare_pool = ThreadPoolExecutor(max_workers=self.ahead, thread_name_prefix="vm-prepare")
        self._finish_pool = ThreadPoolExecutor(max_workers=self.ahead + 1, thread_name_prefix="vm-finish")
        try:
            with self._order.installed():
                return self._run()
        finally:
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)
            self._finish_pool.shutdown(wait=False, cancel_futures=True)
            for connection in self._connections.values():
                connection.close()

    def _run(self) -> list[VmResult]:
        try:
            for slot in self.slots:
                self._ask(slot)
                for following in self.slots[slot.index + 1:slot.index + 1 + self.ahead]:
                    self._ask(following)
                    self._prepare_ahead(following)
                self._turn(slot)
                self._finish(slot)
            for slot in self.slots:
                if slot.finishing is not None:
                    _settle(slot.finishing, self._stop_finishing)
        except BaseException:
            self._end_in_flight()
            raise
        return [slot.result for slot in self.slots]

    # -- the phases ------------------------------------------------------------------------

    def _ask(self, slot: _Slot) -> None:
        """Ask the plugins whether to back the VM up (before anything is started for it), name
        its archive and set its job up; a veto or an error is the VM's result."""
        if slot.asked:
            return
        slot.asked = True
        with slot.context():
            try:
                # A plugin that raises in before_vm (a bug, an unreachable service it asks) fails
                # this VM, never the run.
                skipped = _skipped(slot.vm, self.hooks)
                if skipped:
                    log.warning("VM %s skipped: %s", slot.vm.name, skipped)
                    slot.result = VmResult(vm=slot.vm.name, vm_id=slot.vm.id, error=f"skipped: {skipped}",
                                           exit_code=1)
                    return
                with self.hooks.lock:
                    slot.archive = self.name_for(slot.vm)
                slot.job = VmBackup(self.engine, self.repo, self.state, self.settings.for_vm(slot.vm.name),
                                    slot.vm, slot.archive, force_full=self.force_full, archives=self.archives,
                                    position=(slot.index + 1, len(self.slots)))
            except Exception as e:
                slot.error = e

    def _prepare_ahead(self, slot: _Slot) -> None:
        """Start the VM's prepare (inspect, engine backup until ready, first image transfer) in the prepare thread."""
        if slot.job is None or slot.error is not None or slot.preparing is not None:
            return
        slot.preparing = self._prepare_pool.submit(self._in_slot, slot, self._prepare, slot)

    def _prepare(self, slot: _Slot) -> bool:
        """In the prepare thread: inspect the VM, start its engine backup and open its first
        disk's image transfer; False when there is nothing to back up."""
        engine = self._connection("prepare")
        if not slot.job.inspect(engine) or self._stop_preparing.is_set():
            return False
        slot.job.start_ahead(engine, self._stop_preparing)
        return True

    def _turn(self, slot: _Slot) -> None:
        """The VM's turn, in the main thread: take its prepare (or inspect it now) and stream it."""
        slot.streamed = True
        if slot.job is None or slot.error is not None:
            return
        with slot.context():
            try:
                if slot.preparing is not None:
                    _settle(slot.preparing, self._stop_preparing)
                    ready = slot.preparing.result()
                else:
                    ready = slot.job.inspect(self.engine)
                if ready:
                    if self.ahead:
                        slot.job.stream(self.engine, finalize_with=lambda call: self._finish_pool.submit(
                            self._in_slot, slot, self._in_finish_thread, call),
                            transfers=lambda: self._connection("transfers"))
                    else:
                        slot.job.stream(self.engine)
            except Exception as e:
                slot.error = e

    def _finish(self, slot: _Slot) -> None:
        """Finish the VM (in the finish thread, or now without ``prepare_ahead``)."""
        if self.ahead:
            slot.finishing = self._finish_pool.submit(self._in_slot, slot, self._complete, slot)
        else:
            with slot.context():
                self._complete(slot)

    def _complete(self, slot: _Slot) -> None:
        """Finish the VM's engine work, then report it: its result, its error line, the plugins."""
        try:
            job = slot.job
            if job is not None:
                try:
                    job.finish(self._connection("finish") if self.ahead else self.engine, self._stop_finishing)
                except Exception as e:
                    slot.error = slot.error or e
            if slot.result is not None:  # skipped before any phase: nothing to tell
                return
            if slot.error is None:
                slot.result = job.result
                self.hooks.vm_finished(slot.vm, slot.result)
                return
            e = slot.error
            if isinstance(e, OvirtBorgError):
                message, exit_code = str(e), e.exit_code
            else:
                log.debug("VM %s: unexpected error", slot.vm.name, exc_info=e)
                message, exit_code = f"unexpected error (please report it; -v shows its trace): {e!r}", EXIT_ERROR
            log.error("VM %s: backup failed: %s", slot.vm.name, message)
            slot.result = job.result if job else VmResult(vm=slot.vm.name, vm_id=slot.vm.id)
            slot.result.error, slot.result.exit_code = message, exit_code
            self.hooks.backup_failed(slot.vm, message, exit_code)
        finally:
            self._order.done(slot.index)

    def _in_finish_thread(self, call: Callable[[Engine, threading.Event], Any]) -> Any:
        """In the finish thread: ``call(engine, stop)`` (a VM's transfers ended and its engine
        backup finalized beside its commit) on the thread's connection."""
        return call(self._connection("finish"), self._stop_finishing)

    def _end_in_flight(self) -> None:
        """What stopped the run (an interrupt) stops its VMs: their prepares are stopped, every
        engine backup they started (the streaming VM's, those prepared ahead) is finalized,
        their finishes are waited for, through further interrupts (each ends the waits for the
        engine)."""
        self._stop_preparing.set()
        for slot in self.slots:
            if slot.preparing is not None and slot.preparing.cancel():
                slot.preparing = None
        pending = [slot for slot in self.slots if slot.job is not None and slot.finishing is None
                   and slot.result is None]
        for slot in pending:
            if slot.preparing is not None:
                self._settle_quietly(slot.preparing)
            if slot.job.engine_backup is None and not slot.job.holds_transfers:
                continue
            with slot.context():
                if not slot.streamed and slot.job.engine_backup is not None:
                    log.info("VM %s: engine backup %s, started ahead of its turn, is finalized: the run "
                             "stops", slot.vm.name, slot.job.engine_backup)
                if self.ahead:
                    slot.finishing = self._finish_pool.submit(self._in_slot, slot, self._roll_back, slot)
                else:
                    self._settle_quietly(_in_thread("engine-finalize", slot.job.finish, self.engine,
                                                    self._stop_finishing))
        for slot in self.slots:
            if slot.finishing is not None:
                self._settle_quietly(slot.finishing)

    def _roll_back(self, slot: _Slot) -> None:
        """In the finish thread: finalize the engine backup of a VM the run stops."""
        slot.job.finish(self._connection("finish"), self._stop_finishing)

    def _settle_quietly(self, future: Future) -> None:
        """Wait for ``future`` through interrupts, each of which ends the waits for the engine;
        its outcome is left in it."""
        while True:
            try:
                future.exception()
                return
            except Interrupted:
                self._stop_preparing.set()
                self._stop_finishing.set()
            except CancelledError:
                return

    # -- threads and connections -------------------------------------------------------------

    def _in_slot(self, slot: _Slot, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` with log lines about the slot's VM (for a pool's thread)."""
        with slot.context():
            return call(*args)

    def _connection(self, role: str) -> Engine:
        """The engine connection of a pool thread of ``role`` (prepare, finish: one per thread)
        or of the disks' transfers opened ahead (one), opened at its first use: the SDK's
        connection is used by one thread at a time here."""
        key = role if role == "transfers" else f"{role}:{threading.current_thread().name}"
        with self._connections_lock:
            engine = self._connections.get(key)
            if engine is None:
                engine = Engine(self.engine.settings)
                engine.open()
                self._connections[key] = engine
            return engine


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _assemble(client: ImageioClient, blocks: Sequence[plan.Block], block_size: int,
              base_blocks: Iterator[tuple[int, bytes]] | None = None) -> Iterator[bytes]:
    """Read the data segments of READ and REBUILD blocks and yield each whole block (zeros
    filled in; a REBUILD block's ``base`` ranges taken from its data in the base archive, the
    next ``(index, data)`` of ``base_blocks``, which gives the REBUILD blocks in order).

    Data running across consecutive blocks is read in requests of up to ``READ_REQUEST``
    bytes, which the client cuts at block boundaries: a block read whole is given on as the
    client returned it, without a copy.
    """
    pieces = client.read_ranges(plan.read_ranges(blocks, READ_REQUEST), piece_size=block_size)
    piece = memoryview(b"")  # the part of the last piece received not yet given to a block
    piece_offset = 0
    for block in blocks:
        whole = block.segments == ((block.offset, block.length),)
        if not piece and block.segments:
            piece_offset, data = next(pieces)
            if whole and len(data) == block.length and piece_offset == block.offset:
                yield data  # a piece of exactly this block: no copy
                continue
            piece = memoryview(data)
        base = None
        if block.base:
            index, base_data = next(base_blocks, (None, b"")) if base_blocks is not None else (None, b"")
            if index != block.index:
                raise AssertionError(f"block {block.index} is to be rebuilt, but the base block given is {index}")
            base = memoryview(base_data)
            if len(base) != block.length:
                raise AssertionError(f"base block {block.index} has {len(base)} bytes, not {block.length}")
        # The block's parts in order (fetched data, base data, zeros in the gaps), joined by one
        # copy into the block given to the writer.
        parts: list[bytes | memoryview] = []
        position = block.offset
        for start, length, from_base in sorted([(s, n, False) for s, n in block.segments]
                                               + [(s, n, True) for s, n in block.base]):
            if start > position:
                parts.append(bytes(start - position))
            position = start + length
            if from_base:
                parts.append(base[start - block.offset:position - block.offset])
                continue
            while length:
                if not piece:
                    piece_offset, data = next(pieces)
                    piece = memoryview(data)
                if piece_offset != start:
                    raise AssertionError(f"read {piece_offset} where block {block.index} needs {start}")
                taken = min(length, len(piece))
                parts.append(piece[:taken])
                piece, piece_offset = piece[taken:], piece_offset + taken
                start += taken
                length -= taken
        if position < block.offset + block.length:
            parts.append(bytes(block.offset + block.length - position))
        yield b"".join(parts)
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
    """Back up the VMs, the next ``settings.prepare_ahead`` prepared while one streams
    (``_Pipeline``); one VM's failure does not stop the others.

    ``name_for(vm)`` gives the archive name; ``hooks`` tells the plugins (and may veto a VM:
    each is asked before anything is started for its VM); ``archives`` the repository's
    archive names read at the start of the run (see ``VmBackup``). Returns every VM's result,
    in the VMs' order, and the run's exit code (``run_exit_code``). An interrupt propagates
    once every VM in flight is rolled back (no engine backup left open).
    """
    results = _Pipeline(engine, repo, state, settings, vms, name_for, hooks, force_full=force_full,
                        archives=archives).run()
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
