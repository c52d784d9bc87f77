"""Backups and checkpoints: the engine's StartVmBackupCommand, StopVmBackupCommand,
HybridBackupCommand and DeleteVmCheckpointCommand, as a client sees them.

A backup adds one persistent bitmap, named after the new checkpoint, to each qcow2 disk with
incremental backup enabled, and (live backups) exports every disk read-only (with
``--bitmap=<from checkpoint>`` for an incremental) until the backup is finalized; its phase
advances one step each time it is polled (``GET``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ovirt_borg.lab.model.api import ApiFault, _cannot, new_id, not_found, timestamp
from ovirt_borg.lab.model.inventory import Checkpoint, Disk, Vm

log = logging.getLogger(__name__)

# Backup phases in the order polling advances them.
_BACKUP_STARTUP = ("initializing", "starting", "ready")
_BACKUP_CLOSED = ("succeeded", "failed")
# Polls a hybrid backup spends removing its snapshot after finalize (REMOVING_SNAPSHOT).
_SNAPSHOT_REMOVAL_POLLS = 2
SNAPSHOT_DESCRIPTION = "Auto-generated for Backup VM"  # StorageConstants.BACKUP_VM_AUTO_GENERATED_SNAPSHOT_DESCRIPTION
_FINALIZE_STUCK_POLLS = 5

# VmBase.isHostedEngine(): the origins of the hosted-engine VM (VmBaseMapper writes the
# OriginType name in lowercase as the VM's <origin>).
HOSTED_ENGINE_ORIGINS = ("hosted_engine", "managed_hosted_engine")


@dataclass
class Backup:
    id: str
    vm_id: str
    host_id: str
    phase: str
    disk_ids: list[str]
    modes: dict[str, str]  # disk id -> "full" | "incremental"
    from_checkpoint_id: str | None
    new_checkpoint_id: str | None  # shown as to_checkpoint_id once ready
    creation_date: str
    exports: dict[str, str] = field(default_factory=dict)  # disk id -> export key
    finalize_polls: int = 0
    stale: bool = False  # left open by the stale_backup fault
    description: str = ""  # given by the client (engines >= 4.4.8 keep it; VmBackupMapper)
    # VmBackupType: "live" (libvirt exports the disks), "cold" (VM down, bitmaps added by
    # vdsm) or "hybrid" (a snapshot; HybridBackupCommand). Cold and hybrid transfers start
    # their own NBD server (TransferDiskImageCommand.usingNbdServer).
    type: str = "live"
    snapshot_id: str | None = None  # the hybrid backup's snapshot (VmBackupMapper: <snapshot>)
    stopped: bool = False  # a hybrid backup finalized, still "ready" until the engine acts
    stopped_seen: bool = False  # a poll saw it stopped (the next one starts the snapshot removal)
    snapshot_left: bool = False  # its snapshot survives the backup (a failed merge)

    @property
    def is_open(self) -> bool:
        return self.phase not in _BACKUP_CLOSED

    @property
    def to_checkpoint_id(self) -> str | None:
        if self.phase in ("initializing", "starting"):
            return None
        return self.new_checkpoint_id


class BackupRules:
    """The engine's backup and checkpoint commands (mixed into ``LabEngine``)."""

    def open_backup(self, vm_id: str) -> Backup | None:
        for backup in self.backups.values():
            if backup.vm_id == vm_id and backup.is_open:
                return backup
        return None

    def _broken_bitmaps(self, checkpoints: Iterable[Checkpoint]) -> list[tuple[Checkpoint, Disk]]:
        """(checkpoint, disk) pairs whose bitmap is missing or inconsistent on the disk."""
        found = []
        for cp in checkpoints:
            for disk_id in cp.disk_ids:
                disk = next((d for d in self.inv.disks if d.id == disk_id), None)
                if disk is None or not disk.tracks_changes:
                    continue
                if cp.id in self.plane.broken_bitmaps(Path(disk.path), [cp.id]):
                    found.append((cp, disk))
        return found

    def _redefine_checkpoints(self, vm: Vm, from_cp: Checkpoint) -> bool:
        """A live backup redefines checkpoints in libvirt first; return False when that fails.

        RedefineVmCheckpointCommand: from cluster level 4.6 only the checkpoint the backup
        starts from is redefined, before that the VM's whole chain; libvirt refuses a checkpoint
        whose bitmap is missing or inconsistent (vdsm virt/backup.py redefine_checkpoints:
        VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE). On failure the engine removes every
        checkpoint of the VM (removeCheckpointChain), in libvirt and in its database.
        """
        version = self.cluster(vm.cluster_id).version
        chain = [from_cp] if version >= (4, 6) else self.checkpoints_of(vm.id)
        broken = self._broken_bitmaps(chain)
        if not broken:
            return True
        for cp, disk in broken:
            log.warning("redefining checkpoint %s of VM %s failed: its bitmap on disk %s is missing or "
                        "inconsistent; removing every checkpoint of the VM", cp.id, vm.name, disk.name)
        for cp in self.checkpoints_of(vm.id):
            for disk_id in cp.disk_ids:
                disk = next((d for d in self.inv.disks if d.id == disk_id), None)
                if disk is not None:
                    self._remove_bitmap(disk, cp.id)
        self.inv.checkpoints = [c for c in self.inv.checkpoints if c.vm_id != vm.id]
        return False

    def add_backup(self, vm_id: str, *, from_checkpoint_id: str | None,
                   disk_ids: list[str] | None, legacy: bool = False,
                   description: str | None = None) -> Backup:
        """Start a backup of the VM's disks (all attached disks unless given).

        ``legacy`` is the API's ``?legacy=true``. The engine's choice (BackendVmBackupsResource
        .add): a snapshot-based "hybrid" backup when UseHybridBackup holds for the cluster level
        (4.7 and later) and legacy is not asked, else StartVmBackupCommand: "live" for a running
        VM (libvirt exports the disks now), "cold" for a powered-off one. The new checkpoint's
        bitmap is added to each change-tracking disk. Returns the backup in phase
        ``initializing``. Raises ``ApiFault`` as StartVmBackupCommand.validate does: 409 for the
        hosted engine's VM, when a backup is open, a requested disk is unplugged or the VM is
        powered off on an ``old_engine``; 400 for a description over 1024 characters, an unknown or
        invalid checkpoint, a disk not attached to the VM, an incremental or cold backup below
        cluster level 4.5; 409 when a disk is locked; and 400 "Operation Failed" with detail
        ``[]`` when a live backup's checkpoint redefinition failed (every checkpoint of the VM
        is then gone).
        """
        vm = self.vm(vm_id)
        if vm.origin in HOSTED_ENGINE_ORIGINS:
            # StartVmBackupCommand.validate, its first check (BZ#1989121); ErrorType.CONFLICT.
            raise _cannot(409, "backup VM", "Backup of Hosted Engine VM is not supported")
        version = self.cluster(vm.cluster_id).version
        incremental_supported = self.config_value("IsIncrementalBackupSupported", version)
        if vm.status not in ("up", "down"):
            raise _cannot(409, "backup VM", "The Virtual Machine should be in Up or Down status.")
        if vm.status == "down" and self.faults.is_on("old_engine"):
            # Engines before 4.4.5 back up running VMs only; the wording covers both refusals
            # OVIRT_API.md lists for them.
            raise _cannot(409, "backup VM", "The Virtual Machine should be in Up or Down status. "
                          "Backup is not supported by the host for a VM that is Down.")
        if (from_checkpoint_id or vm.status == "down") and not incremental_supported:
            # StartVmBackupCommand.validate: an incremental backup, and any cold backup, need
            # IsIncrementalBackupSupported (cluster level 4.5 and later).
            raise _cannot(400, "backup VM", "Incremental backup is not supported.")
        if self.open_backup(vm.id) is not None:
            raise _cannot(409, "backup VM", "The VM is during a backup operation.")
        if description is not None and len(description) > 1024:
            # StartVmBackupCommand.validate: ACTION_TYPE_FAILED_VM_BACKUP_DESCRIPTION_IS_TOO_LONG
            # (ErrorType.BAD_PARAMETERS); the vm_backups.description column is VARCHAR(1024).
            raise _cannot(400, "backup VM", "The VM backup description shouldn't contain more than "
                          "1024 characters.")
        plugged = {a.disk_id: a.active for a in vm.attachments}
        if disk_ids:
            for disk_id in disk_ids:
                if disk_id not in plugged:
                    self.disk(disk_id)
                    raise _cannot(400, "backup VM", f"Disk {disk_id} is not attached to the VM.")
            # StartVmBackupCommand.allDisksPlugged: a requested disk that is unplugged (its
            # attachment active=false, DiskAttachmentMapper) refuses the whole backup,
            # ACTION_TYPE_FAILED_DISKS_ARE_NOT_ACTIVE (ErrorType.CONFLICT).
            unplugged = [d for d in disk_ids if not plugged[d]]
            if unplugged:
                raise _cannot(409, "backup VM", f"The following disks are not active on VM {vm.name}: "
                              f"{', '.join(unplugged)}")
        else:
            disk_ids = [d for d, active in plugged.items() if active]
        if not disk_ids:
            raise _cannot(400, "backup VM", "The VM has no disks to back up.")
        # StartVmBackupCommand.getDisks: DisksFilter.filterImageDisks(ONLY_NOT_SHAREABLE,
        # ONLY_SNAPABLE, ONLY_ACTIVE) keeps image disks (DiskStorageType.IMAGE) that are not
        # shareable: a requested LUN, Cinder, managed-block or shareable disk is left out of
        # the backup without a word (its transfer then fails).
        disks = [disk for disk in (self.disk(d) for d in disk_ids)
                 if disk.storage_type == "image" and not disk.shareable]
        for disk in disks:
            if disk.status != "ok" or self.disk_exported(disk.id):
                raise _cannot(409, "backup VM", f"Disk {disk.name} is locked. "
                              "Please try again later.")

        from_cp = None
        if from_checkpoint_id:
            found = [c for c in self.checkpoints_of(vm.id) if c.id == from_checkpoint_id]
            if not found:
                raise _cannot(400, "backup VM",
                              f"Checkpoint ID {from_checkpoint_id} doesn't exist.")
            from_cp = found[0]
            if from_cp.state != "created":
                raise _cannot(400, "backup VM", f"Checkpoint ID {from_checkpoint_id} "
                              "is invalid and should be removed.")

        kind = ("hybrid" if not legacy and self.config_value("UseHybridBackup", version)
                else "live" if vm.status == "up" else "cold")
        backup = Backup(
            id=new_id(), vm_id=vm.id, host_id=self.host_for(vm).id, phase="initializing",
            disk_ids=[d.id for d in disks], modes={}, from_checkpoint_id=from_cp.id if from_cp else None,
            new_checkpoint_id=None, creation_date=timestamp(), type=kind, description=description or "",
        )
        if kind == "live" and from_cp is not None and not self._redefine_checkpoints(vm, from_cp):
            # StartVmBackupCommand.executeCommand: the backup entity exists, the command fails
            # without a message: the API answers 400 "Operation Failed" with detail "[]".
            backup.phase = "failed"
            self.backups[backup.id] = backup
            self.save()
            raise ApiFault(400, "[]")

        tracking = [d for d in disks if d.tracks_changes]
        # No checkpoint below cluster level 4.5 or for raw disks only (createVmCheckpoint).
        new_cp_id = new_id() if tracking and incremental_supported else None
        for disk in disks:
            incremental = (from_cp is not None and disk.tracks_changes
                           and disk.id in from_cp.disk_ids)
            backup.modes[disk.id] = "incremental" if incremental else "full"
        backup.new_checkpoint_id = new_cp_id
        if kind == "hybrid":
            backup.snapshot_id = new_id()  # CreateSnapshotForVm, its volumes carrying the new bitmap
        added_bitmaps: list[Disk] = []
        try:
            for disk in tracking if new_cp_id else ():
                self.plane.add_bitmap(Path(disk.path), new_cp_id)
                added_bitmaps.append(disk)
            for disk in disks if kind == "live" else ():
                bitmap = from_cp.id if backup.modes[disk.id] == "incremental" else None
                key = f"backup-{backup.id}-{disk.id}"
                self._start_export(key, disk, read_only=True, bitmap=bitmap)
                backup.exports[disk.id] = key
        except Exception:
            log.exception("starting backup of VM %s failed", vm.name)
            for disk_id, key in backup.exports.items():
                self._stop_export(key, disk_id)
            for disk in added_bitmaps:
                self._remove_bitmap(disk, new_cp_id)
            raise ApiFault(500, f"[Cannot backup VM. Failed to start the backup of VM {vm.name} "
                           "on the host.]") from None
        self.backups[backup.id] = backup
        self.delays.start(backup.id, "ready")
        self.save()
        log.info("%s backup %s of VM %s started (%s)", kind, backup.id, vm.name,
                 f"incremental from {from_cp.id}" if from_cp else "full")
        return backup

    def backup(self, vm_id: str, backup_id: str) -> Backup:
        self.vm(vm_id)
        backup = self.backups.get(backup_id)
        if backup is None or backup.vm_id != vm_id:
            raise not_found("Backup", backup_id)
        return backup

    def list_backups(self, vm_id: str) -> list[Backup]:
        self.vm(vm_id)
        return [b for b in self.backups.values() if b.vm_id == vm_id]

    def poll_backup(self, vm_id: str, backup_id: str) -> Backup:
        """Return the backup for a GET, advancing its phase one step.

        A finalized hybrid backup stays ``ready`` (stopped) until the engine's callback
        starts removing its snapshot (HybridBackupCommand.performNextOperation), shown as
        ``finalizing`` (VmBackupMapper: REMOVING_SNAPSHOT), for a few polls.
        """
        backup = self.backup(vm_id, backup_id)
        if backup.phase == "initializing" or (backup.phase == "starting"
                                              and self.delays.due(backup.id, "ready")):
            backup.phase = _BACKUP_STARTUP[_BACKUP_STARTUP.index(backup.phase) + 1]
            if backup.phase == "ready":
                self._record_checkpoint(backup)
        elif backup.phase == "ready" and backup.stopped:
            if backup.stopped_seen:
                backup.phase = "finalizing"
                backup.finalize_polls += _SNAPSHOT_REMOVAL_POLLS
            backup.stopped_seen = True  # the first poll after the stop still sees it ready
        elif backup.phase == "finalizing":
            if backup.finalize_polls > 0:
                backup.finalize_polls -= 1
            elif self.delays.due(backup.id, "backup_finalize"):
                # A failed snapshot removal still ends the backup "succeeded"
                # (HybridBackupCommand.endWithFailure: VM_BACKUP_SNAPSHOT_POSSIBLE_LEFTOVER).
                backup.phase = "succeeded"
                log.info("backup %s succeeded%s", backup.id,
                         f", its snapshot {backup.snapshot_id} left behind" if backup.snapshot_left else "")
        return backup

    def snapshots_of(self, vm_id: str) -> list[tuple[str, str]]:
        """(id, description) of the VM's snapshots: the active one and those of hybrid backups
        still open or left behind by a failed merge."""
        vm = self.vm(vm_id)
        found = [(vm.snapshot_id, "Active VM")]
        for b in self.backups.values():
            if b.vm_id == vm_id and b.snapshot_id and (b.is_open or b.snapshot_left):
                found.append((b.snapshot_id, SNAPSHOT_DESCRIPTION))
        return found

    def _record_checkpoint(self, backup: Backup) -> None:
        if not backup.new_checkpoint_id:
            return
        existing = self.checkpoints_of(backup.vm_id)
        parent = existing[-1].id if existing else None
        disk_ids = [d for d in backup.disk_ids if self.disk(d).tracks_changes]
        self.inv.checkpoints.append(Checkpoint(
            id=backup.new_checkpoint_id, vm_id=backup.vm_id, parent_id=parent,
            creation_date=timestamp(), state="created", disk_ids=disk_ids,
        ))
        self.save()

    def backup_disks(self, vm_id: str, backup_id: str) -> list[tuple[Disk, str]]:
        """Return (disk, backup_mode) for each disk of the backup."""
        backup = self.backup(vm_id, backup_id)
        return [(self.disk(d), backup.modes[d]) for d in backup.disk_ids
                if any(x.id == d for x in self.inv.disks)]

    def finalize_backup(self, vm_id: str, backup_id: str) -> Backup:
        """Finalize a backup: stop its exports; it reaches ``succeeded`` when polled.

        StopVmBackupCommand: refused with 409 while any of the backup's transfers is not
        finished (validate: ImageTransferPhase.isFinished), and with 400 when the backup is
        already finalizing or done, or (hybrid) already stopped (executeCommand). A hybrid
        backup is only marked stopped: it stays ``ready`` until the next poll.
        """
        backup = self.backup(vm_id, backup_id)
        for transfer in self.transfers.values():
            if transfer.backup_id == backup.id and transfer.is_active:
                raise _cannot(409, "stop VM backup",
                              "There is an active image transfer for VM backup")
        if backup.phase in ("finalizing", "succeeded", "failed"):
            engine_phase = ("REMOVING_SNAPSHOT" if backup.type == "hybrid" and backup.phase == "finalizing"
                            else backup.phase.upper())
            raise ApiFault(400, f"[VM '{vm_id}' backup '{backup.id}' is already in '{engine_phase}' phase, "
                           "no need to stop the backup again]")
        if backup.stopped:
            raise ApiFault(400, f"[VM '{vm_id}' backup '{backup.id}' is already stopped, "
                           "no need to stop the backup again]")
        was_ready = backup.phase == "ready"
        for disk_id, key in backup.exports.items():
            self._stop_export(key, disk_id)
        backup.exports.clear()
        if not was_ready and backup.new_checkpoint_id:
            # The checkpoint was never reported, so its bitmaps must not outlive the backup.
            for disk_id in backup.disk_ids:
                disk = self.disk(disk_id)
                if disk.tracks_changes:
                    self._remove_bitmap(disk, backup.new_checkpoint_id)
            backup.new_checkpoint_id = None
        self.delays.start(backup.id, "backup_finalize")
        if self.faults.consume("finalize_stuck"):
            backup.finalize_polls = _FINALIZE_STUCK_POLLS
            log.info("fault finalize_stuck: backup %s stays in finalizing", backup.id)
        if backup.type == "hybrid" and was_ready:
            backup.stopped = True
            if self.faults.consume("snapshot_left"):
                backup.snapshot_left = True
                log.info("fault snapshot_left: the snapshot of backup %s will survive it", backup.id)
            log.info("backup %s stopped; its snapshot is removed next", backup.id)
            return backup
        backup.phase = "finalizing"
        log.info("backup %s finalizing", backup.id)
        return backup

    def _abort_backup(self, backup: Backup) -> None:
        for transfer in self.transfers.values():
            if transfer.backup_id == backup.id and transfer.is_active:
                self._close_transfer(transfer, "finished_failure")
        for disk_id, key in backup.exports.items():
            self._stop_export(key, disk_id)
        backup.exports.clear()
        backup.phase = "failed"

    # -- checkpoints ----------------------------------------------------------------------

    def remove_checkpoint(self, vm_id: str, cp_id: str) -> None:
        """Delete a checkpoint and its bitmaps (once no export holds the disk).

        DeleteVmCheckpointCommand.validate: 409 while any backup of the VM is unfinished
        (VmCommand.isVmDuringBackup, hybrid ones included: shouldBlockDuringBackup).
        """
        cp = self.checkpoint(vm_id, cp_id)
        if any(b.vm_id == vm_id and b.is_open for b in self.backups.values()):
            raise _cannot(409, "remove checkpoint", "The VM is during a backup operation.")
        self.delays.after(cp.id, "checkpoint_delete", lambda: self._forget_checkpoint(cp))

    def _forget_checkpoint(self, cp: Checkpoint) -> None:
        self.inv.checkpoints = [c for c in self.inv.checkpoints if c.id != cp.id]
        for child in self.inv.checkpoints:
            if child.parent_id == cp.id:
                child.parent_id = cp.parent_id
        for disk_id in cp.disk_ids:
            try:
                disk = self.disk(disk_id)
            except ApiFault:
                continue
            self._remove_bitmap(disk, cp.id)
        self.save()
        log.info("removed checkpoint %s", cp.id)
