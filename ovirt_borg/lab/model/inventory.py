"""The persisted inventory (clusters, hosts, storage domains, tags, VMs, disks, checkpoints)
and the engine's rules for it: lookups, searches, adding and removing disks and VMs, cluster
levels and engine options.

The inventory is saved as JSON after every change, so an engine restart keeps it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ovirt_borg.lab.model.api import ZERO_ID, ApiFault, _cannot, new_id, not_found, timestamp
from ovirt_borg.lab.model.search import matches_search, parse_search

log = logging.getLogger(__name__)

BLOCK = 64 * 1024  # guest writes and bitmap granularity: qcow2 cluster size
MIB = 1 << 20
# vdsm's sizes for volumes on block storage domains (iSCSI, FC), where each volume is an LV:
# the first allocation of a thin volume without an initial size (lib/vdsm/common/config.py.in,
# [irs] volume_utilization_chunk_mb: 2560 since vdsm 4.50.0.7, 1024 before), and the extent
# size of the domain's VG, which every LV is a multiple of (lib/vdsm/storage/constants.py
# VG_EXTENT_SIZE; lvm.py creates the VG with --physicalextentsize 128m).
VDSM_CHUNK_SIZE = 2560 * MIB
VG_EXTENT_SIZE = 128 * MIB
# blockVolume.py QCOW_OVERHEAD_FACTOR (applied to an initial size) and constants.py
# COW_OVERHEAD (volume.py max_size: the largest qcow2 volume of a virtual size).
QCOW_OVERHEAD_FACTOR = 1.1
COW_OVERHEAD = 1.1
# The engine's storage types that are block domains (StorageType.isBlockDomain: ISCSI, FCP).
BLOCK_STORAGE_TYPES = ("iscsi", "fcp")


def default_engine_config() -> dict[str, dict[str, bool]]:
    """The engine's per-compatibility-version options the lab obeys, with their shipped values.

    From ovirt-engine packaging/dbscripts/upgrade/pre_upgrade/0000_config.sql: incremental
    backup (and cold backup) from cluster level 4.5 on, snapshot-based ("hybrid") backups from
    4.7 on. An admin may change them (engine-config), so they are inventory, not constants.
    """
    versions = [f"4.{minor}" for minor in range(2, 9)]
    return {
        "IsIncrementalBackupSupported": {v: v >= "4.5" for v in versions},
        "UseHybridBackup": {v: v >= "4.7" for v in versions},
    }


@dataclass
class Cluster:
    id: str
    name: str
    version: tuple[int, int] = (4, 7)


@dataclass
class Host:
    id: str
    name: str
    address: str
    cluster_id: str


@dataclass
class StorageDomain:
    """A data storage domain: a directory of image files (``type`` localfs, nfs...) or, for
    ``type`` iscsi or fcp, a block domain whose volumes are LVs of a fixed size.

    The lab keeps a block domain's volumes as files too, each as large as its LV: a qcow2 at
    the start of a sparse file of ``lv_size`` bytes, written through a qemu ``raw`` node of that
    size, which refuses writes past it with ENOSPC as the LV's end does. ``chunk_size`` and
    ``extent_size`` are vdsm's (VDSM_CHUNK_SIZE, VG_EXTENT_SIZE); tests may make them small.
    """

    id: str
    name: str
    path: str
    type: str = "localfs"
    chunk_size: int = VDSM_CHUNK_SIZE
    extent_size: int = VG_EXTENT_SIZE

    @property
    def is_block(self) -> bool:
        return self.type in BLOCK_STORAGE_TYPES


@dataclass
class Tag:
    id: str
    name: str


@dataclass
class Disk:
    """A virtual disk: one image file (qcow2 for ``cow``, raw for ``raw``) on a storage domain."""

    id: str
    image_id: str
    name: str
    format: str  # "cow" | "raw"
    provisioned_size: int
    path: str
    storage_domain_id: str
    backup: str = "incremental"  # "incremental" | "none"
    status: str = "ok"  # "ok" | "locked" | "illegal"
    description: str = ""
    sparse: bool = True
    content_type: str = "data"
    created: str = ""
    lv_size: int = 0  # on a block domain: the size of the volume's LV (0 on file domains)
    # DiskStorageType as the API writes it: "image", "lun", "cinder", "managed_block_storage"
    # (a LUN or managed-block disk is backed by a raw file here).
    storage_type: str = "image"
    shareable: bool = False

    @property
    def qemu_format(self) -> str:
        return "qcow2" if self.format == "cow" else "raw"

    @property
    def tracks_changes(self) -> bool:
        """True when the engine keeps checkpoint bitmaps for this disk."""
        return self.format == "cow" and self.backup == "incremental"


@dataclass
class Attachment:
    disk_id: str
    bootable: bool = False
    interface: str = "virtio_scsi"
    active: bool = True


@dataclass
class Vm:
    id: str
    name: str
    status: str  # "up" | "down"
    cluster_id: str
    memory: int = 1 << 30
    sockets: int = 1
    cores: int = 1
    threads: int = 1
    os_type: str = "other_linux"
    description: str = ""
    tags: list[str] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    creation_time: str = ""
    snapshot_id: str = field(default_factory=new_id)
    origin: str = "ovirt"  # "hosted_engine" / "managed_hosted_engine" for the hosted engine


@dataclass
class Checkpoint:
    id: str
    vm_id: str
    parent_id: str | None
    creation_date: str
    state: str  # "created" | "invalid"
    disk_ids: list[str]


@dataclass
class Inventory:
    """Everything the engine keeps across restarts, saved as JSON."""

    clusters: list[Cluster] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)
    storage_domains: list[StorageDomain] = field(default_factory=list)
    tags: list[Tag] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)
    disks: list[Disk] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    engine_config: dict[str, dict[str, bool]] = field(default_factory=default_engine_config)

    def to_json(self) -> dict[str, Any]:
        """Return the inventory as plain JSON-ready data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Inventory:
        """Given data from ``to_json``, return the inventory; raises KeyError/TypeError on junk."""
        vms = []
        for raw in data.get("vms", []):
            raw = dict(raw)
            raw["attachments"] = [Attachment(**a) for a in raw.get("attachments", [])]
            vms.append(Vm(**raw))
        clusters = []
        for raw in data.get("clusters", []):
            raw = dict(raw)
            raw["version"] = tuple(raw.get("version", (4, 7)))
            clusters.append(Cluster(**raw))
        return cls(
            clusters=clusters,
            hosts=[Host(**h) for h in data.get("hosts", [])],
            storage_domains=[StorageDomain(**s) for s in data.get("storage_domains", [])],
            tags=[Tag(**t) for t in data.get("tags", [])],
            vms=vms,
            disks=[Disk(**d) for d in data.get("disks", [])],
            checkpoints=[Checkpoint(**c) for c in data.get("checkpoints", [])],
            engine_config=data.get("engine_config") or default_engine_config(),
        )

    def save(self, path: Path) -> None:
        """Write the inventory to ``path`` atomically (temp file, fsync, rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Inventory:
        """Read an inventory saved by ``save``; raises OSError or ValueError."""
        with open(path) as f:
            return cls.from_json(json.load(f))


def _round_up(value: float, unit: int) -> int:
    return -(-int(math.ceil(value)) // unit) * unit


def block_volume_size(domain: StorageDomain, *, fmt: str, sparse: bool, capacity: int,
                      initial_size: int | None) -> int:
    """Return the size of the LV vdsm creates for a new volume on the block domain ``domain``.

    Given the disk's format ("cow" or "raw"), allocation, virtual size and the initial size the
    engine passes on (AddImageFromScratchCommand.getInitialSize: a sparse disk's initial_size on
    a block domain, else none). As vdsm's BlockVolumeManifest.calculate_volume_alloc_size: a
    thin volume gets its initial size times QCOW_OVERHEAD_FACTOR, or without one a chunk (at
    most the virtual size, since vdsm 4.50.3); a preallocated one its initial size or its
    virtual size.
    BlockVolume._create rounds that up to MiB for lvcreate, LVM up to whole extents.

    Raises ValueError where vdsm refuses (InvalidParameterException): an initial size for a
    raw volume, or one above volume.py max_size (the virtual size times COW_OVERHEAD, in
    whole extents).
    """
    if initial_size and fmt == "raw":
        raise ValueError("initial size is not supported for raw preallocated volumes")
    if initial_size:
        max_size = _round_up(capacity * COW_OVERHEAD, domain.extent_size)
        if initial_size > max_size:
            raise ValueError(f"initial size {initial_size} is bigger than the max size {max_size}")
    if sparse:
        alloc = int(initial_size * QCOW_OVERHEAD_FACTOR) if initial_size else min(domain.chunk_size, capacity)
    else:
        alloc = initial_size or capacity
    return _round_up(_round_up(alloc, MIB), domain.extent_size)


class InventoryRules:
    """The engine's inventory commands: lookups, listings, disks, VMs, clusters, options.

    Mixed into ``LabEngine``, whose state (``inv``, ``plane``, ``backups``...) it uses.
    """

    # -- lookups --------------------------------------------------------------------------

    def vm(self, vm_id: str) -> Vm:
        """Return the VM with this id; raises ``ApiFault`` 404."""
        for vm in self.inv.vms:
            if vm.id == vm_id:
                return vm
        raise not_found("VM", vm_id)

    def vm_by_name(self, name: str) -> Vm:
        """Return the VM with this name (or id); raises ``ApiFault`` 404."""
        for vm in self.inv.vms:
            if name in (vm.name, vm.id):
                return vm
        raise not_found("VM", f"name={name}")

    def disk(self, disk_id: str) -> Disk:
        """Return the disk with this id; raises ``ApiFault`` 404."""
        for disk in self.inv.disks:
            if disk.id == disk_id:
                return disk
        raise not_found("Disk", disk_id)

    def cluster(self, cluster_id: str) -> Cluster:
        for cluster in self.inv.clusters:
            if cluster.id == cluster_id:
                return cluster
        raise not_found("Cluster", cluster_id)

    def host(self, host_id: str) -> Host:
        for host in self.inv.hosts:
            if host.id == host_id:
                return host
        raise not_found("Host", host_id)

    def storage_domain(self, sd_id: str) -> StorageDomain:
        for sd in self.inv.storage_domains:
            if sd.id == sd_id:
                return sd
        raise not_found("StorageDomain", sd_id)

    def tag(self, tag_id: str) -> Tag:
        for tag in self.inv.tags:
            if tag.id == tag_id:
                return tag
        raise not_found("Tag", tag_id)

    def checkpoints_of(self, vm_id: str) -> list[Checkpoint]:
        """Return the VM's checkpoints, oldest first."""
        return [c for c in self.inv.checkpoints if c.vm_id == vm_id]

    def checkpoint(self, vm_id: str, cp_id: str) -> Checkpoint:
        self.vm(vm_id)
        for cp in self.checkpoints_of(vm_id):
            if cp.id == cp_id:
                return cp
        raise not_found("Checkpoint", cp_id)

    def vm_of_disk(self, disk_id: str) -> Vm | None:
        for vm in self.inv.vms:
            if any(a.disk_id == disk_id for a in vm.attachments):
                return vm
        return None

    def vm_disks(self, vm: Vm, *, active_only: bool = True) -> list[Disk]:
        """Return the VM's attached disks in attachment order."""
        return [self.disk(a.disk_id) for a in vm.attachments if a.active or not active_only]

    def host_for(self, vm: Vm) -> Host:
        cluster_hosts = [h for h in self.inv.hosts if h.cluster_id == vm.cluster_id]
        return (cluster_hosts or self.inv.hosts)[0]

    # -- inventory listings ---------------------------------------------------------------

    def _vm_fields(self, vm: Vm) -> Callable[[str], list[str] | None]:
        def fields(key: str) -> list[str] | None:
            if key == "name":
                return [vm.name]
            if key in ("tag", "tags"):
                return [self.tag(t).name for t in vm.tags]
            if key in ("cluster", "cluster.name"):
                return [self.cluster(vm.cluster_id).name]
            if key == "status":
                return [vm.status]
            if key == "id":
                return [vm.id]
            if key == "description":
                return [vm.description]
            if key in ("host", "host.name"):
                return [self.host_for(vm).name] if vm.status == "up" else []
            return None
        return fields

    def list_vms(self, search: str | None = None, *, case_sensitive: bool = True,
                 max_results: int | None = None) -> list[Vm]:
        """Return the VMs matching an engine search string (all without one)."""
        vms = list(self.inv.vms)
        if search:
            groups = parse_search(search)
            vms = [vm for vm in vms
                   if matches_search(groups, self._vm_fields(vm), case_sensitive=case_sensitive)]
        return vms[:max_results] if max_results is not None and max_results >= 0 else vms

    @staticmethod
    def _named_search(items: Iterable[Any], search: str | None, extra: dict[str, str] | None = None,
                      *, case_sensitive: bool = True) -> list[Any]:
        items = list(items)
        if not search:
            return items
        groups = parse_search(search)

        def fields_of(item: Any) -> Callable[[str], list[str] | None]:
            def fields(key: str) -> list[str] | None:
                if key in ("name", "alias"):
                    return [item.name]
                if key == "id":
                    return [item.id]
                if extra and key in extra:
                    return [str(getattr(item, extra[key]))]
                return None
            return fields

        return [i for i in items if matches_search(groups, fields_of(i), case_sensitive=case_sensitive)]

    def list_disks(self, search: str | None = None, *, case_sensitive: bool = True) -> list[Disk]:
        return self._named_search(self.inv.disks, search, {"status": "status", "format": "format"},
                                  case_sensitive=case_sensitive)

    def list_storage_domains(self, search: str | None = None) -> list[StorageDomain]:
        return self._named_search(self.inv.storage_domains, search)

    def add_storage_domain(self, name: str, *, type: str, chunk_size: int = VDSM_CHUNK_SIZE,
                           extent_size: int = VG_EXTENT_SIZE) -> StorageDomain:
        """Add a data storage domain (lab control); its files go to ``storage-<name>`` beside
        the inventory. Raises ``ApiFault`` 409 for a name in use, 400 for bad values."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,50}", name or ""):
            raise ApiFault(400, f"a storage domain name is 1-50 letters, digits, _ or -: {name!r}")
        if any(sd.name == name for sd in self.inv.storage_domains):
            raise ApiFault(409, f"[Cannot add Storage. The Storage Domain name {name} is already in use.]")
        if type not in ("localfs", "nfs", *BLOCK_STORAGE_TYPES):
            raise ApiFault(400, f"unknown storage type {type!r} (localfs, nfs, iscsi, fcp)")
        if chunk_size < MIB or chunk_size % MIB or extent_size < MIB or extent_size % MIB:
            raise ApiFault(400, "chunk_size and extent_size are whole MiB")
        sd = StorageDomain(id=new_id(), name=name, path=str(self.state_file.parent / f"storage-{name}"),
                           type=type, chunk_size=chunk_size, extent_size=extent_size)
        self.inv.storage_domains.append(sd)
        self.save()
        log.info("added %s storage domain %s", type, name)
        return sd

    def list_clusters(self, search: str | None = None) -> list[Cluster]:
        return self._named_search(self.inv.clusters, search)

    def list_hosts(self, search: str | None = None) -> list[Host]:
        return self._named_search(self.inv.hosts, search, {"address": "address"})

    # -- disks ----------------------------------------------------------------------------

    def poll_disk(self, disk_id: str) -> Disk:
        """Return the disk for a GET; a freshly added disk turns ``ok`` on its first poll.

        A disk whose volume the host could not create is gone by then (404), as the engine
        removes it (AddImageFromScratchCommand.endWithFailure).
        """
        disk = self.disk(disk_id)
        failed = self._failed_disks.pop(disk.id, None)
        if failed is not None:
            self._new_disks.discard(disk.id)
            self.inv.disks = [d for d in self.inv.disks if d.id != disk.id]
            self.save()
            self._event("USER_ADD_DISK_FINISHED_FAILURE",
                        f"Add-Disk operation failed to complete: {disk.name} ({failed}).")
            raise not_found("Disk", disk_id)
        if disk.status == "locked" and disk.id in self._new_disks:
            self._new_disks.discard(disk.id)
            disk.status = "ok"
            self.save()
        return disk

    def add_disk(self, *, name: str | None, fmt: str | None, provisioned_size: int | None,
                 backup: str | None, storage_domain: dict[str, str] | None,
                 sparse: bool | None = None, description: str = "",
                 initial_size: int | None = None) -> Disk:
        """Create a floating disk (restore); it is ``locked`` until polled once.

        On a block domain the disk's volume is an LV sized by ``block_volume_size``: the
        engine passes ``initial_size`` on for a sparse disk there and ignores it elsewhere
        (AddImageFromScratchCommand.getInitialSize). An initial size vdsm refuses fails the
        volume's creation: the disk is gone at its first poll. Raises ``ApiFault`` 400 for a
        missing size or bad format, 404 for an unknown storage domain, 409 for a format and
        allocation the domain does not take.
        """
        if not provisioned_size or provisioned_size <= 0:
            raise _cannot(400, "add Virtual Disk", "provisioned_size is required.")
        fmt = fmt or "cow"
        if fmt not in ("cow", "raw"):
            raise _cannot(400, "add Virtual Disk", f"Unknown disk format {fmt}.")
        if not storage_domain:
            raise _cannot(400, "add Virtual Disk", "Storage Domain is required.")
        sd = self._find_storage_domain(storage_domain)
        if backup == "incremental" and fmt == "raw":
            raise _cannot(409, "add Virtual Disk",
                          "Incremental backup is supported only for QCOW2 disks.")
        sparse = True if sparse is None else sparse
        # ImagesHandler.checkImageConfiguration: preallocated qcow2 only with incremental
        # backup, and no thin raw volume on a block domain (an LV cannot be sparse).
        if (not sparse and fmt == "cow" and backup != "incremental") or (sd.is_block and sparse and fmt == "raw"):
            allocation = "Sparse" if sparse else "Preallocated"
            raise _cannot(409, "add Virtual Disk", f"Disk configuration ({fmt.upper()} {allocation} "
                          f"backup-{'Incremental' if backup == 'incremental' else 'None'}) is "
                          "incompatible with the storage domain type.")
        disk_id = new_id()
        disk = Disk(
            id=disk_id, image_id=new_id(), name=name or f"disk-{disk_id[:8]}", format=fmt,
            provisioned_size=int(provisioned_size),
            path=str(Path(sd.path) / f"{disk_id}.{'qcow2' if fmt == 'cow' else 'raw'}"),
            storage_domain_id=sd.id, backup=backup or "none", status="locked",
            description=description, sparse=sparse, created=timestamp(),
        )
        failed = None
        if sd.is_block:
            try:
                disk.lv_size = block_volume_size(sd, fmt=fmt, sparse=sparse, capacity=disk.provisioned_size,
                                                 initial_size=initial_size if sparse else None)
            except ValueError as e:
                failed = str(e)
        if failed is None:
            # A qcow2 volume starts at the beginning of its LV; a raw one is the LV.
            self.plane.create_image(Path(disk.path), disk.provisioned_size, disk.qemu_format,
                                    container_size=disk.lv_size if fmt == "cow" else 0)
        else:
            log.info("vdsm refuses the volume of disk %s: %s", disk.name, failed)
            self._failed_disks[disk.id] = failed
        self.inv.disks.append(disk)
        self._new_disks.add(disk.id)
        self.save()
        log.info("added disk %s (%s, %d bytes%s) on %s", disk.name, fmt, disk.provisioned_size,
                 f", LV {disk.lv_size} bytes" if disk.lv_size else "", sd.name)
        return disk

    def _find_storage_domain(self, ref: dict[str, str]) -> StorageDomain:
        for sd in self.inv.storage_domains:
            if ref.get("id") and sd.id == ref["id"]:
                return sd
            if ref.get("name") and sd.name == ref["name"]:
                return sd
        ident = f"name={ref['name']}" if ref.get("name") else ref.get("id", "?")
        raise not_found("StorageDomain", ident)

    def update_disk(self, disk_id: str, *, backup: str | None = None, name: str | None = None,
                    description: str | None = None) -> Disk:
        """Change a disk's backup mode, alias or description; raises ``ApiFault``."""
        disk = self.disk(disk_id)
        if disk.status == "locked":
            raise _cannot(409, "edit Virtual Disk", "Disk is locked. Please try again later.")
        if backup is not None:
            if backup not in ("incremental", "none"):
                raise _cannot(400, "edit Virtual Disk", f"Unknown backup mode {backup}.")
            if backup == "incremental" and disk.format == "raw":
                raise _cannot(409, "edit Virtual Disk",
                              "Incremental backup is supported only for QCOW2 disks.")
            disk.backup = backup
        if name is not None:
            disk.name = name
        if description is not None:
            disk.description = description
        self.save()
        return disk

    def remove_disk(self, disk_id: str) -> None:
        """Delete a disk and its image; raises ``ApiFault`` 409 while it is in use."""
        disk = self.disk(disk_id)
        if self.disk_exported(disk_id) or disk.status == "locked":
            raise _cannot(409, "remove Virtual Disk", "Disk is locked. Please try again later.")
        vm = self.vm_of_disk(disk_id)
        if vm is not None and vm.status == "up":
            raise _cannot(409, "remove Virtual Disk", "Disk is attached to a running VM.")
        self._drop_disk(disk)
        self.save()

    def _drop_disk(self, disk: Disk) -> None:
        for vm in self.inv.vms:
            vm.attachments = [a for a in vm.attachments if a.disk_id != disk.id]
        for cp in self.inv.checkpoints:
            if disk.id in cp.disk_ids:
                cp.disk_ids.remove(disk.id)
        self.inv.disks = [d for d in self.inv.disks if d.id != disk.id]
        self.plane.remove_image(Path(disk.path))
        log.info("removed disk %s", disk.name)

    # -- VMs ------------------------------------------------------------------------------

    def add_vm(self, *, name: str | None, cluster: dict[str, str] | None,
               ovf: dict[str, Any] | None, memory: int | None = None,
               description: str | None = None) -> Vm:
        """Create a VM, from a parsed OVF when given (new ids always); raises ``ApiFault``."""
        ovf = ovf or {}
        name = name or ovf.get("name")
        if not name:
            raise _cannot(400, "add VM", "VM name is required.")
        if any(v.name == name for v in self.inv.vms):
            raise _cannot(409, "add VM", "The VM name is already in use, "
                          "please choose a unique name and try again.")
        if not cluster:
            raise _cannot(400, "add VM", "Cluster is required.")
        found = [c for c in self.inv.clusters
                 if (cluster.get("id") and c.id == cluster["id"])
                 or (cluster.get("name") and c.name == cluster["name"])]
        if not found:
            raise not_found("Cluster", cluster.get("name") or cluster.get("id", "?"))
        vm = Vm(
            id=new_id(), name=name, status="down", cluster_id=found[0].id,
            memory=memory or ovf.get("memory") or 1 << 30,
            sockets=ovf.get("sockets") or 1, cores=ovf.get("cores") or 1,
            threads=ovf.get("threads") or 1, os_type=ovf.get("os_type") or "other_linux",
            description=description if description is not None else ovf.get("description", ""),
            creation_time=timestamp(),
        )
        self.inv.vms.append(vm)
        self.save()
        log.info("added VM %s", vm.name)
        if ovf.get("disk_ids"):
            self._attach_ovf_disks(vm, ovf)
        return vm

    def _attach_ovf_disks(self, vm: Vm, ovf: dict[str, Any]) -> None:
        """What the engine does with the disks of an OVF it imports a VM from.

        ImportVmFromConfigurationCommand takes the OVF's disks off the new VM
        (setDisksToBeAttached) and, once the VM exists, attaches each with its DiskVmElement
        from the OVF (attemptToAttachDisksToImportedVm), which names the OVF's own VM
        (OvfReader.fixDiskVmElements), even with regenerated ids: a disk of a VM that still
        has it fails, logged as an event; a floating disk goes back to that VM.
        """
        aliases = {d["disk_id"]: d.get("alias") for d in ovf.get("disks", [])}
        failed = []
        for disk_id in ovf["disk_ids"]:
            try:
                self.attach_disk(ovf.get("id") or ZERO_ID, disk_id)
            except ApiFault:
                failed.append(aliases.get(disk_id) or disk_id)
        if failed:
            self._event("VM_IMPORT_FROM_CONFIGURATION_ATTACH_DISKS_FAILED",
                        f"VM {vm.name} has been imported from the given configuration but the "
                        f"following disk(s) failed to attach: {','.join(failed)}.")

    def remove_vm(self, vm_id: str, *, detach_only: bool = False, force: bool = False) -> None:
        """Delete a VM (and its disks unless ``detach_only``); raises ``ApiFault`` 409.

        ``force`` (the lab's delete-vm) also powers the VM off and closes an open backup.
        """
        vm = self.vm(vm_id)
        backup = self.open_backup(vm.id)
        if backup is not None:
            if not force:
                raise _cannot(409, "remove VM", "VM is during a backup operation.")
            self._abort_backup(backup)
        if vm.status == "up" and not force:
            raise _cannot(409, "remove VM", "VM is running.")
        for transfer in self.transfers.values():
            if transfer.is_active and any(a.disk_id == transfer.disk_id for a in vm.attachments):
                if not force:
                    raise _cannot(409, "remove VM", "Disk is locked. Please try again later.")
                self._close_transfer(transfer, "finished_failure")
        disks = self.vm_disks(vm, active_only=False)
        self.inv.vms = [v for v in self.inv.vms if v.id != vm.id]
        self.inv.checkpoints = [c for c in self.inv.checkpoints if c.vm_id != vm.id]
        if not detach_only:
            for disk in disks:
                self._drop_disk(disk)
        self.save()
        log.info("removed VM %s", vm.name)

    def attach_disk(self, vm_id: str, disk_id: str, *, bootable: bool = False,
                    interface: str | None = None, active: bool = True) -> Attachment:
        """Attach a disk to a VM; raises ``ApiFault`` 404/409."""
        vm = self.vm(vm_id)
        disk = self.disk(disk_id)
        if disk.status == "locked":
            raise _cannot(409, "attach Virtual Disk", "Disk is locked. Please try again later.")
        owner = self.vm_of_disk(disk_id)
        if owner is not None:
            raise _cannot(409, "attach Virtual Disk",
                          f"The disk is already attached to VM {owner.name}.")
        attachment = Attachment(disk_id=disk.id, bootable=bootable,
                                interface=interface or "virtio_scsi", active=active)
        vm.attachments.append(attachment)
        self.save()
        return attachment

    def attachment(self, vm_id: str, disk_id: str) -> Attachment:
        vm = self.vm(vm_id)
        for a in vm.attachments:
            if a.disk_id == disk_id:
                return a
        raise not_found("DiskAttachment", disk_id)

    def detach_disk(self, vm_id: str, disk_id: str) -> None:
        """Detach a disk (it stays as a floating disk); raises ``ApiFault``."""
        vm = self.vm(vm_id)
        self.attachment(vm_id, disk_id)
        if self.disk_exported(disk_id):
            raise _cannot(409, "detach Virtual Disk", "Disk is locked. Please try again later.")
        vm.attachments = [a for a in vm.attachments if a.disk_id != disk_id]
        self.save()

    def set_vm_status(self, vm_id: str, status: str) -> Vm:
        vm = self.vm(vm_id)
        vm.status = status
        self.save()
        return vm

    # -- clusters and engine options ------------------------------------------------------

    def config_value(self, name: str, version: tuple[int, int]) -> bool:
        """The engine option ``name`` for a compatibility version (unset versions: False)."""
        return bool(self.inv.engine_config.get(name, {}).get(f"{version[0]}.{version[1]}", False))

    def set_cluster(self, name: str, version: str) -> Cluster:
        """Create the cluster ``name`` or change its compatibility level (``"4.4"``...).

        Raises ValueError for a level the engine does not know.
        """
        match = re.fullmatch(r"4\.([2-8])", version)
        if not match:
            raise ValueError(f"cluster level must be 4.2 .. 4.8, got {version!r}")
        level = (4, int(match.group(1)))
        for cluster in self.inv.clusters:
            if cluster.name == name:
                cluster.version = level
                break
        else:
            cluster = Cluster(id=new_id(), name=name, version=level)
            self.inv.clusters.append(cluster)
        self.save()
        log.info("cluster %s is at level %d.%d", name, *level)
        return cluster

    def set_config(self, name: str, version: str, value: bool) -> dict[str, Any]:
        """Set an engine option for one compatibility level, as ``engine-config -s`` does.

        Raises ValueError for an option the lab does not model.
        """
        if name not in self.inv.engine_config:
            raise ValueError(f"unknown engine option {name!r}; known: {', '.join(sorted(self.inv.engine_config))}")
        self.inv.engine_config[name][version] = value
        self.save()
        return {"name": name, "version": version, "value": value}
