"""``LabEngine``: the lab engine's state, composed with the rules of each concern, and the
``DataPlane`` it drives."""

from __future__ import annotations

import logging
import random
import secrets
import threading
from pathlib import Path
from typing import Any, Iterable, Protocol

from ovirt_borg.lab.latency import Latency, PhaseClock
from ovirt_borg.lab.model.api import AuthFailed, timestamp
from ovirt_borg.lab.model.backups import Backup, BackupRules
from ovirt_borg.lab.model.exports import ExportRules
from ovirt_borg.lab.model.faults import FaultRules, Faults
from ovirt_borg.lab.model.guest import GuestRules
from ovirt_borg.lab.model.inventory import Inventory, InventoryRules
from ovirt_borg.lab.model.transfers import Transfer, TransferRules

log = logging.getLogger(__name__)


class DataPlane(Protocol):
    """The real parts the engine drives: qcow2 files, bitmaps, qemu-nbd, imageio tickets."""

    def create_image(self, path: Path, size: int, fmt: str, *, container_size: int = 0) -> None: ...
    def remove_image(self, path: Path) -> None: ...
    def add_bitmap(self, path: Path, name: str) -> None: ...
    def remove_bitmap(self, path: Path, name: str) -> None: ...
    def broken_bitmaps(self, path: Path, names: Iterable[str]) -> set[str]: ...
    def break_bitmap(self, path: Path, name: str) -> None: ...
    def start_export(self, key: str, path: Path, fmt: str, *, read_only: bool,
                     bitmap: str | None, limit: int = 0) -> str: ...
    def stop_export(self, key: str) -> None: ...
    def add_ticket(self, ticket: dict[str, Any]) -> tuple[str, str]: ...
    def delete_ticket(self, ticket_id: str) -> None: ...
    def ticket_status(self, ticket_id: str) -> dict[str, Any]: ...
    def restart_host_daemon_during(self, ticket_id: str) -> None: ...
    def guest_write(self, path: Path, fmt: str, writes: list[tuple[int, int, bytes | None]], *,
                    zero: bool, discard: bool) -> None: ...
    def to_raw(self, path: Path, out: Path, fmt: str) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def shutdown(self) -> None: ...


class LabEngine(InventoryRules, BackupRules, TransferRules, ExportRules, FaultRules, GuestRules):
    """The lab engine's state machine. Callers hold ``engine.lock`` around every call.

    Given the inventory, the data plane, the file the inventory is saved to after each change,
    and the admin password (checked by ``login``). New disks go to the storage domain's path.

    The rules live by concern in the mixins (``InventoryRules``, ``BackupRules``,
    ``TransferRules``, ``ExportRules``, ``FaultRules``, ``GuestRules``), which call one another
    through ``self``; this class holds the state they share.
    """

    def __init__(self, inventory: Inventory, plane: DataPlane, *, state_file: Path,
                 password: str, user: str = "admin@internal", latency: Latency | None = None):
        self.inv = inventory
        self.plane = plane
        self.state_file = Path(state_file)
        self.user = user
        self._password = password
        self.lock = threading.RLock()
        self.faults = Faults()
        self.calls: dict[str, int] = {}
        self.backups: dict[str, Backup] = {}
        self.transfers: dict[str, Transfer] = {}
        self._tokens: set[str] = set()
        # Exports open on each disk, and bitmaps whose removal waits for them to close
        # (qemu-img cannot change an image that qemu-nbd holds open).
        self._exports_by_disk: dict[str, set[str]] = {}
        self._pending_bitmap_removals: dict[str, set[str]] = {}
        self._export_urls: dict[str, str] = {}  # export key -> nbd URL
        self._new_disks: set[str] = set()  # added disks still locked until their first poll
        self._failed_disks: dict[str, str] = {}  # added disks whose volume vdsm refused: why
        self.events: list[dict[str, str]] = []  # the engine's audit log (lab stats "events")
        self._rng = random.Random()
        self.delays = PhaseClock(latency or Latency())  # slow phases (ovirt_borg.lab.latency)

    # -- persistence ----------------------------------------------------------------------

    def save(self) -> None:
        """Persist the inventory; a failure is logged, the engine keeps running."""
        try:
            self.inv.save(self.state_file)
        except OSError as e:
            log.error("cannot save lab engine state to %s: %s", self.state_file, e)

    def _event(self, code: str, message: str) -> None:
        """Add an entry to the engine's audit log (what its event list would show)."""
        self.events.append({"time": timestamp(), "code": code, "message": message})
        log.info("event %s: %s", code, message)

    # -- authentication -------------------------------------------------------------------

    def login(self, username: str, password: str) -> str:
        """Given SSO credentials, return a new access token; raises ``AuthFailed``."""
        if self.faults.is_on("wrong_password"):
            raise AuthFailed(f"Cannot authenticate user '{username}': "
                             "The username or password is incorrect.")
        if username != self.user or not secrets.compare_digest(password, self._password):
            raise AuthFailed(f"Cannot authenticate user '{username}': "
                             "The username or password is incorrect.")
        token = secrets.token_urlsafe(32)
        self._tokens.add(token)
        return token

    def token_valid(self, token: str | None) -> bool:
        return token is not None and token in self._tokens

    def logout(self, token: str | None) -> None:
        self._tokens.discard(token or "")

    def count_call(self, call: str) -> None:
        self.calls[call] = self.calls.get(call, 0) + 1

    # -- reports ------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Return counters for tests and benchmarks (see the lab CLI ``stats``)."""
        plane = self.plane.stats()
        names = {vm.id: vm.name for vm in self.inv.vms}
        return {
            **plane,
            "open_backups": [
                {"id": b.id, "vm": names.get(b.vm_id, b.vm_id), "phase": b.phase,
                 "description": b.description, "type": b.type}
                for b in self.backups.values() if b.is_open
            ],
            "open_transfers": [
                {"id": t.id, "direction": t.direction, "disk": t.disk_id, "phase": t.phase,
                 "backup": t.backup_id}
                for t in self.transfers.values() if t.is_active
            ],
            "checkpoints": {
                vm.name: [{"id": c.id, "state": c.state, "parent_id": c.parent_id}
                          for c in self.checkpoints_of(vm.id)]
                for vm in self.inv.vms
            },
            "calls": dict(sorted(self.calls.items())),
            "faults": self.faults.listing(),
            "events": list(self.events),
        }

    def describe(self) -> dict[str, Any]:
        """Return the inventory as JSON-ready data with disk paths (for tests and the CLI)."""
        out = []
        for vm in self.inv.vms:
            out.append({
                "id": vm.id, "name": vm.name, "status": vm.status,
                "tags": [self.tag(t).name for t in vm.tags],
                "cluster": self.cluster(vm.cluster_id).name,
                "disks": [
                    {"id": d.id, "name": d.name, "format": d.format, "path": d.path,
                     "size": d.provisioned_size, "backup": d.backup, "status": d.status,
                     "storage_domain": self.storage_domain(d.storage_domain_id).name,
                     "lv_size": d.lv_size}
                    for d in self.vm_disks(vm, active_only=False)
                ],
            })
        return {"vms": out}

    def shutdown(self) -> None:
        """Close every transfer and backup (tickets, then exports); used on engine stop."""
        for transfer in self.transfers.values():
            if transfer.is_active:
                self._release_transfer(transfer)
                transfer.phase = "finished_failure"
        for backup in self.backups.values():
            for disk_id, key in backup.exports.items():
                self._stop_export(key, disk_id)
            backup.exports.clear()
        self.save()
