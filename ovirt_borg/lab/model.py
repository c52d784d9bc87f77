"""The lab engine's state and rules: VMs, disks, backups, checkpoints, image transfers, faults.

This module decides what the engine answers; it never speaks HTTP and never runs a process
itself. Everything that touches real data (qcow2 bitmaps, qemu-nbd exports, imageio tickets,
guest writes) goes through a ``DataPlane`` given to ``Engine``, so the rules here read like
the engine's own commands:

- a backup adds one persistent bitmap, named after the new checkpoint, to each qcow2 disk with
  incremental backup enabled, and exports every disk read-only (with ``--bitmap=<from
  checkpoint>`` for an incremental) until the backup is finalized;
- phases advance one step each time the object is polled (``GET``), as the real engine's
  asynchronous commands appear to a client;
- refusals are ``ApiFault`` errors with the engine's status codes and wording.

The inventory (clusters, hosts, storage domains, tags, VMs, disks, checkpoints) is saved as
JSON after every change, so an engine restart keeps it; open backups and transfers are not.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import math
import os
import random
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from ovirt_borg.lab.latency import Latency, PhaseClock

log = logging.getLogger(__name__)

ZERO_ID = "00000000-0000-0000-0000-000000000000"
API_PATH = "/ovirt-engine/api"

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
TICKET_TIMEOUT = 24 * 3600  # imageio resets a patched timeout, so give tickets a long one

# Backup phases in the order polling advances them.
_BACKUP_STARTUP = ("initializing", "starting", "ready")
_BACKUP_CLOSED = ("succeeded", "failed")
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
# Polls a hybrid backup spends removing its snapshot after finalize (REMOVING_SNAPSHOT).
_SNAPSHOT_REMOVAL_POLLS = 2
SNAPSHOT_DESCRIPTION = "Auto-generated for Backup VM"  # StorageConstants.BACKUP_VM_AUTO_GENERATED_SNAPSHOT_DESCRIPTION
_FINALIZE_STUCK_POLLS = 5

# VmBase.isHostedEngine(): the origins of the hosted-engine VM (VmBaseMapper writes the
# OriginType name in lowercase as the VM's <origin>).
HOSTED_ENGINE_ORIGINS = ("hosted_engine", "managed_hosted_engine")


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


class ApiFault(Exception):
    """An engine refusal: HTTP status, fault reason and detail (rendered as fault XML).

    The detail follows the engine's ``[Cannot <action> <object>. <why>.]`` wording.
    """

    def __init__(self, status: int, detail: str, reason: str = "Operation Failed"):
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail


class AuthFailed(Exception):
    """SSO refused the credentials (rendered as JSON ``access_denied``)."""


def not_found(kind: str, ident: str) -> ApiFault:
    """Given an entity kind and the id or name asked for, return the engine's 404 fault."""
    return ApiFault(404, f"Entity not found: {kind}: {ident}", reason="Resource not found")


def _cannot(status: int, action: str, why: str) -> ApiFault:
    return ApiFault(status, f"[Cannot {action}. {why}]")


def new_id() -> str:
    """Return a fresh engine-style UUID."""
    return str(uuid.uuid4())


def timestamp(when: datetime | None = None) -> str:
    """Return an engine date string such as ``2024-01-01T10:00:00.000+00:00``."""
    when = when or datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}+00:00"


# ---------------------------------------------------------------------------------------------
# The lab directory


@dataclass(frozen=True)
class LabLayout:
    """Where a lab keeps its files, given the lab directory."""

    dir: Path

    @property
    def lab_json(self) -> Path:
        return self.dir / "lab.json"

    @property
    def config(self) -> Path:
        return self.dir / "config.toml"

    @property
    def password(self) -> Path:
        return self.dir / "password"

    @property
    def passphrase(self) -> Path:
        return self.dir / "passphrase"

    @property
    def control_token(self) -> Path:
        return self.dir / "control.token"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def storage(self) -> Path:
        return self.dir / "storage"

    @property
    def engine_state(self) -> Path:
        return self.dir / "engine-state.json"

    @property
    def sample(self) -> Path:
        return self.dir / "sample.json"

    @property
    def repo(self) -> Path:
        return self.dir / "repo"

    @property
    def state(self) -> Path:
        """The ovirt-borg state directory the lab's config.toml names."""
        return self.dir / "state"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    @property
    def engine_json(self) -> Path:
        """Written by the running engine: its pid, port and children."""
        return self.run / "engine.json"

    @property
    def engine_log(self) -> Path:
        return self.dir / "engine.log"


# ---------------------------------------------------------------------------------------------
# Inventory (persisted)


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


# ---------------------------------------------------------------------------------------------
# Transient state


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


# ---------------------------------------------------------------------------------------------
# Faults


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


# ---------------------------------------------------------------------------------------------
# Search


_SEARCH_TOKEN = re.compile(
    r"""\s*(?:
        (?P<conj>and|or)(?=\s|$)
      | (?P<key>[A-Za-z_][\w.]*)\s*(?P<op>!=|=)\s*(?P<val>"[^"]*"|'[^']*'|[^\s"']+)
      | (?P<bare>"[^"]*"|[^\s"'=!]+)
    )""",
    re.VERBOSE | re.IGNORECASE,
)

SearchTerm = tuple[str, str, str]  # key, op, value


def parse_search(text: str) -> list[list[SearchTerm]]:
    """Given an engine search string, return OR-groups of AND-ed ``(key, op, value)`` terms.

    Accepts ``name=web* and tag=prod``, ``cluster=Default status=up`` (space means and),
    ``name=a or name=b``, quoted values and an optional ``Vms:`` prefix; a bare word
    matches the name. Raises ``ApiFault`` (400) for text it cannot read.
    """
    text = text.strip()
    text = re.sub(r"^\w+\s*:\s*", "", text) if re.match(r"^\w+\s*:", text) else text
    groups: list[list[SearchTerm]] = [[]]
    pos = 0
    while pos < len(text):
        match = _SEARCH_TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ApiFault(400, f"Search query [{text}] is invalid")
        pos = match.end()
        if match.group("conj"):
            if match.group("conj").lower() == "or":
                groups.append([])
            continue
        if match.group("key"):
            value = match.group("val")
            if value[:1] in "\"'":
                value = value[1:-1]
            groups[-1].append((match.group("key").lower(), match.group("op"), value))
        elif match.group("bare"):
            value = match.group("bare").strip("\"'")
            groups[-1].append(("name", "=", value))
    return [g for g in groups if g] or [[]]


def matches_search(groups: list[list[SearchTerm]], fields: Callable[[str], list[str] | None],
                   *, case_sensitive: bool = True) -> bool:
    """Return True when an object matches the parsed search.

    ``fields(key)`` returns the object's values for a search key (a VM has several tags), or
    None when the key is unknown, which is a 400 fault as on the engine.
    """
    def term_ok(key: str, op: str, pattern: str) -> bool:
        values = fields(key)
        if values is None:
            raise ApiFault(400, f"Search query is invalid: unknown field '{key}'")
        if not case_sensitive or key != "name":
            pattern = pattern.lower()
            values = [v.lower() for v in values]
        hit = any(fnmatch.fnmatchcase(v, pattern) for v in values)
        return hit if op == "=" else not hit

    return any(all(term_ok(*term) for term in group) for group in groups)


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """The lab engine's state machine. Callers hold ``engine.lock`` around every call.

    Given the inventory, the data plane, the file the inventory is saved to after each change,
    and the admin password (checked by ``login``). New disks go to the storage domain's path.
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
            if vm.name == name or vm.id == name:
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

    def open_backup(self, vm_id: str) -> Backup | None:
        for backup in self.backups.values():
            if backup.vm_id == vm_id and backup.is_open:
                return backup
        return None

    def disk_exported(self, disk_id: str) -> bool:
        return bool(self._exports_by_disk.get(disk_id))

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

    # -- backups --------------------------------------------------------------------------

    def config_value(self, name: str, version: tuple[int, int]) -> bool:
        """The engine option ``name`` for a compatibility version (unset versions: False)."""
        return bool(self.inv.engine_config.get(name, {}).get(f"{version[0]}.{version[1]}", False))

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
                           "on the host.]")
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

    def _remove_bitmap(self, disk: Disk, name: str) -> None:
        if self.disk_exported(disk.id):
            self._pending_bitmap_removals.setdefault(disk.id, set()).add(name)
            return
        try:
            self.plane.remove_bitmap(Path(disk.path), name)
        except Exception as e:
            log.warning("removing bitmap %s from disk %s failed: %s", name, disk.name, e)

    # -- image transfers ------------------------------------------------------------------

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
                               f"{disk.name} on the host.]")
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

    # -- exports --------------------------------------------------------------------------

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

    # -- faults ---------------------------------------------------------------------------

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

    # -- guest side (lab control) ---------------------------------------------------------

    def vm_disk(self, vm_name: str, disk: int | str = 1) -> Disk:
        """Return a VM's disk by 1-based index or by id/name; raises ``ApiFault`` 404."""
        vm = self.vm_by_name(vm_name)
        disks = self.vm_disks(vm, active_only=False)
        if isinstance(disk, int) or (isinstance(disk, str) and disk.isdigit()):
            index = int(disk)
            if not 1 <= index <= len(disks):
                raise not_found("Disk", f"{vm.name} disk {index} (it has {len(disks)})")
            return disks[index - 1]
        for d in disks:
            if d.id == disk or d.name == disk:
                return d
        raise not_found("Disk", f"{vm.name} disk {disk}")

    def guest_write(self, vm_name: str, disk: int | str = 1, *, percent: float | None = None,
                    offset: int | None = None, length: int | None = None,
                    zero: bool = False, discard: bool = False,
                    seed: int | None = None) -> list[dict[str, int]]:
        """Write to a VM disk as its guest would; return the written ranges.

        ``percent`` writes that share of the disk as scattered 64 KiB-aligned runs of random
        data; otherwise ``offset``/``length`` are written (random data, or zeroes/discard).
        Raises ``ApiFault`` 409 while the disk is exported (an open backup or transfer) and
        400 for ranges outside the disk.
        """
        target = self.vm_disk(vm_name, disk)
        # The lab has no snapshot overlay to take a hybrid backup's writes: a disk in any open
        # backup keeps the data the backup reads, as a live backup's scratch disk would.
        in_backup = any(b.is_open and target.id in b.disk_ids for b in self.backups.values())
        if self.disk_exported(target.id) or target.status == "locked" or in_backup:
            raise ApiFault(409, f"[Cannot write to disk {target.name} of VM {vm_name}. The disk "
                           "is exported by an open backup or image transfer; finalize it first.]")
        rng = random.Random(seed) if seed is not None else self._rng
        size = target.provisioned_size
        if percent is not None:
            if not 0 < percent <= 100:
                raise ApiFault(400, "percent must be in (0, 100]")
            ranges = _scattered_ranges(size, percent, rng)
        else:
            if offset is None or length is None:
                raise ApiFault(400, "give percent, or offset and length")
            if offset < 0 or length <= 0 or offset + length > size:
                raise ApiFault(400, f"range {offset}+{length} is outside the disk "
                               f"({size} bytes)")
            # In pieces: random.randbytes() takes at most 256 MiB at a time.
            piece = 64 << 20
            ranges = [(start, min(piece, offset + length - start)) for start in range(offset, offset + length, piece)]
        writes = [(start, count, None if zero or discard else rng.randbytes(count))
                  for start, count in ranges]
        self.plane.guest_write(Path(target.path), target.qemu_format, writes,
                               zero=zero, discard=discard)
        log.info("guest wrote %d range(s) to disk %s of VM %s", len(ranges), target.name, vm_name)
        return [{"offset": s, "length": n} for s, n in ranges]

    def image(self, vm_name: str, disk: int | str, out: Path) -> Disk:
        """Write the disk's current content as a raw file ``out``; raises ``ApiFault``."""
        target = self.vm_disk(vm_name, disk)
        for transfer in self.transfers.values():
            if transfer.is_active and transfer.disk_id == target.id and transfer.direction == "upload":
                raise ApiFault(409, f"disk {target.name} is being uploaded; finish the transfer")
        self.plane.to_raw(Path(target.path), Path(out), target.qemu_format)
        return target

    def add_vm_disk(self, vm_name: str, *, size: int, fmt: str = "cow", storage_type: str = "image",
                    shareable: bool = False, active: bool = True) -> Disk:
        """Create a disk and attach it to the VM (a disk added between backups).

        ``storage_type`` "lun", "managed_block_storage" or "cinder" and ``shareable`` make the
        disks a backup leaves out (raw, without incremental backup); ``active=False`` attaches
        the disk unplugged. Raises ``ApiFault`` 400 for an unknown storage type.
        """
        if storage_type not in ("image", "lun", "managed_block_storage", "cinder"):
            raise ApiFault(400, f"unknown disk storage type {storage_type}")
        vm = self.vm_by_name(vm_name)
        sd = self.inv.storage_domains[0]
        index = len(vm.attachments) + 1
        if storage_type != "image" or shareable:
            fmt = "raw"
        disk = self.add_disk(name=f"{vm.name}_Disk{index}", fmt=fmt, provisioned_size=size,
                             backup="incremental" if fmt == "cow" else "none",
                             storage_domain={"id": sd.id})
        disk.storage_type, disk.shareable = storage_type, shareable
        disk.status = "ok"
        self._new_disks.discard(disk.id)
        self.attach_disk(vm.id, disk.id, active=active)
        return disk

    def add_sample_vm(self, name: str, *, disks: int = 1, size: int = 64 << 20,
                      fmt: str = "cow", status: str = "up", tags: Iterable[str] = (),
                      seed: int | None = None, origin: str = "ovirt", cluster: str | None = None) -> Vm:
        """Create a VM with ``disks`` data disks holding some random data (for isolated tests).

        Each disk gets random data in its first MiB and at its middle; ``origin``
        "managed_hosted_engine" makes it a hosted-engine VM. The VM goes to the cluster named
        ``cluster`` (default: the first). Raises ``ApiFault`` 409 when the name is taken, 400
        for a bad size or status, 404 for an unknown cluster.
        """
        if status not in ("up", "down"):
            raise ApiFault(400, f"status must be up or down, got {status}")
        if size < (2 << 20) or size % BLOCK:
            raise ApiFault(400, "size must be a multiple of 64 KiB and at least 2 MiB")
        target = {"name": cluster} if cluster else {"id": self.inv.clusters[0].id}
        vm = self.add_vm(name=name, cluster=target, ovf=None, description="lab test VM")
        vm.status = status
        vm.origin = origin
        for tag_name in tags:
            found = [t for t in self.inv.tags if t.name == tag_name]
            if not found:
                found = [Tag(id=new_id(), name=tag_name)]
                self.inv.tags.append(found[0])
            vm.tags.append(found[0].id)
        rng = random.Random(seed) if seed is not None else self._rng
        for _ in range(disks):
            disk = self.add_vm_disk(vm.name, size=size, fmt=fmt)
            writes = [(offset, 1 << 20, rng.randbytes(1 << 20)) for offset in (0, size // 2)]
            self.plane.guest_write(Path(disk.path), disk.qemu_format, writes,
                                   zero=False, discard=False)
        self.save()
        return vm

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


def _scattered_ranges(size: int, percent: float, rng: random.Random) -> list[tuple[int, int]]:
    """Pick non-overlapping 64 KiB-aligned runs (1-16 blocks) covering ``percent`` of ``size``.

    Returns sorted (offset, length) pairs; adjacent runs are merged.
    """
    blocks = size // BLOCK
    wanted = max(1, round(blocks * percent / 100))
    if wanted >= blocks:
        return [(0, blocks * BLOCK)]
    taken = bytearray(blocks)
    chosen = 0
    attempts = 0
    while chosen < wanted and attempts < 100000:
        attempts += 1
        run = min(rng.randint(1, 16), wanted - chosen)
        start = rng.randrange(0, blocks - run + 1)
        if any(taken[start:start + run]):
            continue
        taken[start:start + run] = b"\x01" * run
        chosen += run
    if chosen < wanted:  # a crowded disk: fill the first free blocks
        for i in range(blocks):
            if chosen >= wanted:
                break
            if not taken[i]:
                taken[i] = 1
                chosen += 1
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < blocks:
        if taken[i]:
            j = i
            while j < blocks and taken[j]:
                j += 1
            ranges.append((i * BLOCK, (j - i) * BLOCK))
            i = j
        else:
            i += 1
    return ranges
