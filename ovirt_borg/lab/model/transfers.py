"""Image transfers: the engine's TransferDiskImageCommand and its callback, as a client sees
them (phases stepping at each poll, tickets added to imageio, inactivity stops).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ovirt_borg.lab.model.api import ApiFault, _cannot, new_id, not_found, timestamp

log = logging.getLogger(__name__)

TICKET_TIMEOUT = 24 * 3600  # imageio resets a patched timeout, so give tickets a long one

# ImageTransferPhase.isFinished(): only these two; "finished_cleanup" is still a step of a cancel.
_TRANSFER_DONE = ("finished_success", "finished_failure")
# The engine's transfer callback (TransferDiskImageCommand.executeStateHandler) moves a transfer
# one step each time it runs; the lab takes a step at each poll.
_TRANSFER_STEPS = {
    "cancelled_user": "finalizing_cleanup",    # handleCancelledUser
    "finalizing_cleanup": "finished_cleanup",  # handleFinalizingCleanup -> cleanup()
    "finished_cleanup": "finished_failure",    # handleFinishedCleanup -> endWithFailure
    "cancelled_system": "finalizing_failure",  # handleCancelledSystem
    "finalizing_failure": "finished_failure",  # handleFinalizingFailure -> endWithFailure
    "finalizing_success": "finished_success",  # handleFinalizingSuccess
}
# Seconds after which a stopping transfer nobody polls takes its next step anyway, as the
# engine's callback (CommandCallbacksPoller) runs on its own.
_CALLBACK_INTERVAL = 2.0


@dataclass
class Transfer:
    id: str
    direction: str  # "download" | "upload"
    disk_id: str
    backup_id: str | None
    host_id: str
    phase: str
    format: str
    inactivity_timeout: int
    ticket_id: str
    export_key: str  # the qemu-nbd export the ticket points at
    owns_export: bool  # plain downloads and uploads start their own export
    dirty: bool
    fail: bool = False
    stuck: bool = False
    bitmap: str | None = None  # the NBD server's --bitmap for a cold or hybrid incremental
    stepped: float = 0.0  # time.monotonic() of its last step (poll)
    idle_stop: bool = False  # its ticket idled past inactivity_timeout: the engine stops it
    nbd_error: str = ""  # why vdsm could not start the NBD server (nbd._find_bitmap)
    ticket_added: bool = False
    transfer_url: str | None = None
    proxy_url: str | None = None
    created: str = ""

    @property
    def is_active(self) -> bool:
        return self.phase not in _TRANSFER_DONE


class TransferRules:
    """The engine's image transfer commands and what its transfer callback does on its own
    (mixed into ``LabEngine``)."""

    def add_transfer(self, *, direction: str | None, disk_id: str | None,
                     backup_id: str | None, fmt: str | None,
                     inactivity_timeout: int | None) -> Transfer:
        """Create an image transfer (``initializing``); the ticket is added when polled.

        Downloads read a backup's export of the disk or, without a backup, an export of a
        powered-off VM's disk; uploads write to a disk through a writable export. Raises
        ``ApiFault`` 400/404/409 as the engine does.
        """
        direction = direction or "download"
        fmt = fmt or "cow"
        if direction not in ("download", "upload"):
            raise _cannot(400, "transfer Virtual Disk", f"Unknown direction {direction}.")
        if not disk_id:
            raise _cannot(400, "transfer Virtual Disk", "Disk id is required.")
        disk = self.disk(disk_id)
        transfer_id = new_id()
        dirty = False
        owns_export = False
        bitmap = None
        if backup_id:
            backup = self.backups.get(backup_id)
            if backup is None:
                raise not_found("Backup", backup_id)
            if direction != "download":
                raise _cannot(400, "transfer Virtual Disk", "Only downloads are possible "
                              "from a VM backup.")
            if backup.phase != "ready":
                raise _cannot(409, "transfer Virtual Disk", "The VM backup is not ready "
                              f"(phase {backup.phase}).")
            if fmt != "raw":
                raise _cannot(400, "transfer Virtual Disk", "The image transfer format must "
                              "be raw for a VM backup.")
            # TransferDiskImageCommand.validateImageTransfer checks the backup's phase and the
            # format, not that the disk is in the backup: a disk the backup left out has no
            # backup URL (prepareImage), so its transfer fails once started.
            outside_backup = disk.id not in backup.disk_ids
            dirty = (not outside_backup and backup.modes[disk.id] == "incremental"
                     and not self.faults.consume("no_dirty_extents"))
            host_id = backup.host_id
            if outside_backup:
                key = ""
            elif backup.type == "live":
                key = backup.exports[disk.id]  # libvirt's export, started with the backup
            else:
                # Cold and hybrid backups: the transfer starts an NBD server of its own, with the
                # checkpoint's bitmap for an incremental disk (TransferDiskImageCommand.getBitmap).
                key = f"transfer-{transfer_id}"
                owns_export = True
                if backup.modes[disk.id] == "incremental":
                    bitmap = backup.from_checkpoint_id
        else:
            vm = self.vm_of_disk(disk.id)
            if disk.status != "ok" or self.disk_exported(disk.id):
                raise _cannot(409, "transfer Virtual Disk", f"Disk {disk.name} is locked. "
                              "Please try again later.")
            if vm is not None and vm.status == "up":
                raise _cannot(409, "transfer Virtual Disk", f"Disk {disk.name} is attached "
                              f"to VM {vm.name} which is running.")
            key = f"transfer-{transfer_id}"
            owns_export = True
            outside_backup = False
            host_id = self.host_for(vm).id if vm else self.inv.hosts[0].id
        transfer = Transfer(
            id=transfer_id, direction=direction, disk_id=disk.id, backup_id=backup_id,
            host_id=host_id, phase="initializing", format=fmt,
            inactivity_timeout=inactivity_timeout or 60, ticket_id=new_id(),
            export_key=key, owns_export=owns_export, dirty=dirty, created=timestamp(),
        )
        transfer.fail = outside_backup or self.faults.consume("transfer_fail")
        transfer.stuck = not transfer.fail and self.faults.consume("transfer_stuck")
        transfer.bitmap = bitmap
        if bitmap and self.plane.broken_bitmaps(Path(disk.path), [bitmap]):
            # vdsm nbd.start_server -> _find_bitmap: a missing, in-use or disabled bitmap fails
            # the NBD server; the engine stops the transfer (updateEntityPhaseToStoppedBySystem).
            transfer.nbd_error = f"bitmap {bitmap} of disk {disk.name} is missing, in use or disabled"
            owns_export = transfer.owns_export = False
        if owns_export:
            try:
                # An upload writes into the volume vdsm prepared (nbd.py start_server): a qcow2
                # on a block domain can grow only to the end of its LV, which vdsm does not
                # extend during a transfer (a VM's drive monitor extends it, no upload's).
                limit = disk.lv_size if direction == "upload" and disk.format == "cow" else 0
                self._start_export(key, disk, read_only=direction == "download", bitmap=bitmap,
                                   limit=limit)
            except Exception:
                log.exception("exporting disk %s failed", disk.name)
                raise ApiFault(500, f"[Cannot transfer Virtual Disk. Failed to prepare disk "
                               f"{disk.name} on the host.]") from None
            disk.status = "locked"
        self.transfers[transfer.id] = transfer
        self.delays.start(transfer.id, "transfer")
        log.info("image transfer %s: %s of disk %s%s", transfer.id, direction, disk.name,
                 f" in backup {backup_id}" if backup_id else "")
        return transfer

    def transfer(self, transfer_id: str) -> Transfer:
        transfer = self.transfers.get(transfer_id)
        if transfer is None:
            raise not_found("ImageTransfer", transfer_id)
        return transfer

    def poll_transfer(self, transfer_id: str) -> Transfer:
        """Return the transfer for a GET, advancing it one step (``_TRANSFER_STEPS``).

        Starting fails to ``cancelled_system`` when the NBD server cannot start (a bad bitmap)
        or on the ``transfer_fail`` fault; a failed or cancelled transfer then takes a step per
        poll to ``finished_failure``, releasing its ticket and export on the way (cleanup()).
        """
        transfer = self.transfer(transfer_id)
        transfer.stepped = time.monotonic()
        if transfer.phase == "initializing":
            if transfer.nbd_error or transfer.fail:
                log.info("image transfer %s stopped by the system: %s", transfer.id,
                         transfer.nbd_error or "fault transfer_fail")
                transfer.phase = "cancelled_system"
            elif not transfer.stuck and self.delays.due(transfer.id, "transfer"):
                self._open_ticket(transfer)
        elif transfer.phase == "transferring" and transfer.idle_stop:
            transfer.phase = "cancelled_system" if transfer.direction == "download" else "paused_system"
        elif transfer.phase == "finalizing_success" and not self.delays.due(transfer.id, "transfer_finalize"):
            pass  # the engine's callback has not finished it yet
        elif transfer.phase in _TRANSFER_STEPS:
            following = _TRANSFER_STEPS[transfer.phase]
            if transfer.phase.startswith("finalizing"):
                self._release_transfer(transfer)
            if following == "finished_failure":
                self._close_transfer(transfer, following)
            else:
                transfer.phase = following
            log.info("image transfer %s: %s", transfer.id, transfer.phase)
        return transfer

    def tick(self, now: float | None = None) -> None:
        """What the engine does on its own between client requests (the server calls this often).

        The engine's transfer callback keeps running without a client: a transfer being
        stopped or ended that nobody polled for ``_CALLBACK_INTERVAL`` takes its next step; a
        transfer whose ticket idles too long is stopped (``check_inactivity``).
        """
        now = time.monotonic() if now is None else now
        for transfer in list(self.transfers.values()):
            moving = transfer.phase in _TRANSFER_STEPS or (transfer.phase == "transferring" and transfer.idle_stop)
            if moving and now - transfer.stepped >= _CALLBACK_INTERVAL:
                self.poll_transfer(transfer.id)
        self.delays.run_due()
        self.check_inactivity()

    def check_inactivity(self) -> list[str]:
        """Stop transfers whose ticket was idle longer than their inactivity_timeout; return their ids.

        TransferDiskImageCommand.pollTransferStatus/stopTransferIfNecessary: the engine reads
        the host ticket's ``idle_time`` and ``active``; imageio counts a ticket active only
        while a read or write runs, and resets its idle time when one completes or on OPTIONS
        (ovirt_imageio auth.Ticket.idle_time, touch) - an extents query does not count. With
        the "legacy" timeout policy a download is cancelled, an upload paused.
        """
        stopped = []
        for transfer in self.transfers.values():
            if (transfer.phase != "transferring" or transfer.idle_stop or not transfer.ticket_added
                    or transfer.inactivity_timeout <= 0):
                continue
            try:
                status = self.plane.ticket_status(transfer.ticket_id)
            except Exception as e:  # a restarting daemon: the next check sees it again
                log.debug("reading the ticket of transfer %s failed: %s", transfer.id, e)
                continue
            if not status.get("active") and (status.get("idle_time") or 0) > transfer.inactivity_timeout:
                transfer.idle_stop = True  # its next step (a poll, or the callback) stops it
                log.info("image transfer %s idle for %s s (inactivity_timeout %d): stopping it", transfer.id,
                         status.get("idle_time"), transfer.inactivity_timeout)
                stopped.append(transfer.id)
        return stopped

    def _open_ticket(self, transfer: Transfer) -> None:
        disk = self.disk(transfer.disk_id)
        ticket = {
            "uuid": transfer.ticket_id,
            "size": disk.provisioned_size,
            "url": self._export_urls[transfer.export_key],
            "timeout": TICKET_TIMEOUT,
            "inactivity_timeout": transfer.inactivity_timeout,
            "ops": ["read"] if transfer.direction == "download" else ["write"],
            "transfer_id": transfer.id,
            "sparse": True,
            "dirty": transfer.dirty,
        }
        try:
            transfer.transfer_url, transfer.proxy_url = self.plane.add_ticket(ticket)
        except Exception:
            log.exception("adding the ticket of transfer %s failed", transfer.id)
            self._close_transfer(transfer, "finished_failure")
            return
        transfer.ticket_added = True
        transfer.phase = "transferring"
        if transfer.direction == "download" and self.faults.consume("imageio_restart"):
            log.info("fault imageio_restart armed for transfer %s", transfer.id)
            self.plane.restart_host_daemon_during(transfer.ticket_id)

    def finalize_transfer(self, transfer_id: str) -> Transfer:
        """Finalize: ``finalizing_success``; the next poll deletes the ticket, stops an owned
        export, unlocks the disk and reports ``finished_success``.

        TransferImageStatusCommand sets the phase from any phase that is not finished
        (ImageTransferPhase.isValidTransition) and always answers 200: a second finalize, or
        one of a failed download, is accepted (the SDK's helpers/imagetransfer.py: a download
        can always be finalized).
        """
        transfer = self.transfer(transfer_id)
        if transfer.is_active:
            transfer.phase = "finalizing_success"
            transfer.stepped = time.monotonic()
            self.delays.start(transfer.id, "transfer_finalize")
        return transfer

    def cancel_transfer(self, transfer_id: str) -> Transfer:
        """Cancel: ``cancelled_user``, then one poll each to ``finalizing_cleanup``,
        ``finished_cleanup`` and ``finished_failure`` (an upload's disk is removed then)."""
        transfer = self.transfer(transfer_id)
        if transfer.is_active:
            transfer.phase = "cancelled_user"
            transfer.stepped = time.monotonic()
        return transfer

    def _release_transfer(self, transfer: Transfer) -> None:
        # The ticket goes first: imageio must not hold connections to a stopping qemu-nbd.
        if transfer.ticket_added:
            try:
                self.plane.delete_ticket(transfer.ticket_id)
            except Exception as e:
                log.warning("deleting the ticket of transfer %s failed: %s", transfer.id, e)
            transfer.ticket_added = False
        if transfer.owns_export:
            self._stop_export(transfer.export_key, transfer.disk_id)
            transfer.owns_export = False
            try:
                disk = self.disk(transfer.disk_id)
                disk.status = "ok"
            except ApiFault:
                pass

    def _close_transfer(self, transfer: Transfer, phase: str) -> None:
        self._release_transfer(transfer)
        transfer.phase = phase
        if transfer.direction == "upload" and phase == "finished_failure":
            try:
                disk = self.disk(transfer.disk_id)
            except ApiFault:
                return
            if self.vm_of_disk(disk.id) is None:
                self._drop_disk(disk)
                self.save()
