"""The qemu-nbd exports the engine keeps open on disks, and bitmap removals that wait for them."""

from __future__ import annotations

import logging
from pathlib import Path

from ovirt_borg.lab.model.api import ApiFault
from ovirt_borg.lab.model.inventory import Disk

log = logging.getLogger(__name__)


class ExportRules:
    """Exports by disk: a disk with an open export is locked, and qemu-img cannot change its
    bitmaps until the export closes (mixed into ``LabEngine``)."""

    def disk_exported(self, disk_id: str) -> bool:
        return bool(self._exports_by_disk.get(disk_id))

    def _start_export(self, key: str, disk: Disk, *, read_only: bool, bitmap: str | None,
                      limit: int = 0) -> None:
        url = self.plane.start_export(key, Path(disk.path), disk.qemu_format,
                                      read_only=read_only, bitmap=bitmap, limit=limit)
        self._export_urls[key] = url
        self._exports_by_disk.setdefault(disk.id, set()).add(key)

    def _stop_export(self, key: str, disk_id: str) -> None:
        try:
            self.plane.stop_export(key)
        except Exception as e:
            log.warning("stopping export %s failed: %s", key, e)
        self._export_urls.pop(key, None)
        keys = self._exports_by_disk.get(disk_id, set())
        keys.discard(key)
        if not keys:
            self._exports_by_disk.pop(disk_id, None)
            pending = self._pending_bitmap_removals.pop(disk_id, set())
            for name in pending:
                try:
                    disk = self.disk(disk_id)
                except ApiFault:
                    break
                self._remove_bitmap(disk, name)

    def _remove_bitmap(self, disk: Disk, name: str) -> None:
        if self.disk_exported(disk.id):
            self._pending_bitmap_removals.setdefault(disk.id, set()).add(name)
            return
        try:
            self.plane.remove_bitmap(Path(disk.path), name)
        except Exception as e:
            log.warning("removing bitmap %s from disk %s failed: %s", name, disk.name, e)
