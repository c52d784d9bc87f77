"""Fault injection: switches that make the lab engine misbehave as real ones do."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ovirt_borg.lab.model.api import ApiFault, _cannot
from ovirt_borg.lab.model.inventory import Vm

log = logging.getLogger(__name__)

# Faults that stay on until turned off, and those consumed by the next matching event.
PERSISTENT_FAULTS = ("wrong_password", "old_engine")
ONE_SHOT_FAULTS = ("transfer_fail", "transfer_stuck", "finalize_stuck", "imageio_restart", "no_dirty_extents",
                   "snapshot_left")
# Faults that change state once, when turned on.
ACTION_FAULTS = ("invalid_checkpoint", "missing_checkpoint", "broken_bitmap", "stale_backup",
                 "expired_tokens")
ENGINE_500 = "engine_500"
REPLY_LOST = "reply_lost"  # reply_lost:<call>: the call is carried out, its reply never sent
FAULT_HELP = {
    "invalid_checkpoint": "the newest checkpoint of each VM (or --vm) becomes state invalid",
    "missing_checkpoint": "the newest checkpoint of each VM (or --vm) disappears, bitmaps removed",
    "broken_bitmap": "the newest checkpoint's bitmaps are really broken (in use): a live "
                     "incremental backup from it fails (400, every checkpoint of the VM removed), "
                     "a hybrid or cold one's image transfer ends cancelled_system",
    "stale_backup": "a full backup is left open in phase ready on vm1 (or --vm)",
    "expired_tokens": "every SSO token issued so far expires now (clients must log in again)",
    "transfer_fail": "the engine stops the next image transfer before it starts (cancelled_system, "
                     "then finished_failure)",
    "transfer_stuck": "the next image transfer never reaches transferring",
    "no_dirty_extents": "the next incremental backup transfer's ticket does not allow dirty extents "
                        "(imageio answers 404, as with a ticket from a host that cannot give them)",
    "finalize_stuck": "the next finalized backup stays in finalizing for several polls",
    "snapshot_left": "the next hybrid backup's snapshot is not removed (a failed merge); the "
                     "backup still ends succeeded",
    "imageio_restart": "the host imageio daemon restarts once the next download has served "
                       "some bytes; tickets are re-added",
    "engine_500:<call>": "the call answers 500 with fault XML (e.g. backups.add, "
                         "backup.finalize, imagetransfers.add, transfer.finalize, "
                         "checkpoints.delete, vms.list, disks.add, vms.add; * for all)",
    "reply_lost:<call>": "the call is carried out but its reply is cut short (the status line, "
                         "then the connection closes), e.g. backup.finalize",
    "wrong_password": "SSO answers access_denied",
    "old_engine": "backups of powered-off VMs are refused with 409 as on engines before 4.4.5",
}


class Faults:
    """Fault switches: name -> remaining count (None: until turned off)."""

    def __init__(self) -> None:
        self._active: dict[str, int | None] = {}

    @staticmethod
    def check_name(name: str) -> None:
        """Raise ValueError unless ``name`` is a known fault switch."""
        for family in (ENGINE_500, REPLY_LOST):
            if name.startswith(family + ":") and len(name) > len(family) + 1:
                return
        if name in PERSISTENT_FAULTS or name in ONE_SHOT_FAULTS or name in ACTION_FAULTS:
            return
        known = ", ".join(sorted(FAULT_HELP))
        raise ValueError(f"unknown fault {name!r}; known faults: {known}")

    def on(self, name: str, times: int | None = None) -> None:
        """Turn a switch on, for ``times`` events (default: one for one-shot faults)."""
        if times is None and (name in ONE_SHOT_FAULTS or name.startswith(REPLY_LOST + ":")):
            times = 1
        self._active[name] = times

    def off(self, name: str) -> None:
        self._active.pop(name, None)

    def clear(self) -> None:
        self._active.clear()

    def is_on(self, name: str) -> bool:
        return name in self._active

    def consume(self, name: str) -> bool:
        """Return True when ``name`` is on, counting one use of it."""
        if name not in self._active:
            return False
        remaining = self._active[name]
        if remaining is not None:
            if remaining <= 1:
                del self._active[name]
            else:
                self._active[name] = remaining - 1
        return True

    def engine_500(self, call: str) -> bool:
        """Return True when the API call named ``call`` must answer 500 now."""
        return self.consume(f"{ENGINE_500}:{call}") or self.consume(f"{ENGINE_500}:*")

    def reply_lost(self, call: str) -> bool:
        """Return True when the reply of the API call named ``call`` must be lost now."""
        return self.consume(f"{REPLY_LOST}:{call}")

    def listing(self) -> dict[str, int | None]:
        return dict(self._active)


class FaultRules:
    """Turning faults on and off; state faults change the inventory at once (mixed into
    ``LabEngine``)."""

    def set_fault(self, name: str, on: bool = True, *, vm_name: str | None = None,
                  times: int | None = None) -> dict[str, Any]:
        """Turn a fault switch on or off; state faults are applied at once.

        Returns what was done. Raises ValueError for an unknown name and ``ApiFault`` when a
        state fault has nothing to act on.
        """
        Faults.check_name(name)
        if not on:
            self.faults.off(name)
            if name == "stale_backup":
                closed = []
                for backup in list(self.backups.values()):
                    if backup.is_open and backup.stale:
                        self._abort_backup(backup)
                        closed.append(backup.id)
                return {"fault": name, "on": False, "closed_backups": closed}
            return {"fault": name, "on": False}
        if name in ACTION_FAULTS:
            return {"fault": name, "on": True, **self._apply_state_fault(name, vm_name)}
        self.faults.on(name, times)
        return {"fault": name, "on": True, "times": self.faults.listing().get(name)}

    def _fault_targets(self, vm_name: str | None) -> list[Vm]:
        if vm_name:
            return [self.vm_by_name(vm_name)]
        return list(self.inv.vms)

    def _apply_state_fault(self, name: str, vm_name: str | None) -> dict[str, Any]:
        if name == "expired_tokens":
            expired = len(self._tokens)
            self._tokens.clear()
            log.info("fault expired_tokens: %d SSO token(s) expired", expired)
            return {"expired": expired}
        if name == "stale_backup":
            vm = self.vm_by_name(vm_name) if vm_name else self.inv.vms[0]
            backup = self.add_backup(vm.id, from_checkpoint_id=None, disk_ids=None)
            backup.stale = True
            self.poll_backup(vm.id, backup.id)
            self.poll_backup(vm.id, backup.id)
            log.info("fault stale_backup: backup %s left open on VM %s", backup.id, vm.name)
            return {"vm": vm.name, "backup": backup.id}
        changed = []
        for vm in self._fault_targets(vm_name):
            checkpoints = self.checkpoints_of(vm.id)
            if not checkpoints:
                continue
            newest = checkpoints[-1]
            disks = [self.disk(d) for d in newest.disk_ids
                     if any(x.id == d for x in self.inv.disks)]
            if name == "invalid_checkpoint":
                newest.state = "invalid"
            elif name == "missing_checkpoint":
                self.inv.checkpoints = [c for c in self.inv.checkpoints if c.id != newest.id]
                for disk in disks:
                    self._remove_bitmap(disk, newest.id)
            elif name == "broken_bitmap":
                for disk in disks:
                    if self.disk_exported(disk.id):
                        raise _cannot(409, "break bitmap", f"Disk {disk.name} is exported.")
                    self.plane.break_bitmap(Path(disk.path), newest.id)
            changed.append({"vm": vm.name, "checkpoint": newest.id})
            log.info("fault %s applied to checkpoint %s of VM %s", name, newest.id, vm.name)
        if not changed:
            raise ApiFault(409, f"fault {name}: no VM has a checkpoint to act on")
        self.save()
        return {"checkpoints": changed}
