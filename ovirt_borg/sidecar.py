"""The checkpoint sidecar: what an archive holds and where the next incremental starts.

Each archive carries ``<vm-name>/ovirt-borg.json``; the same document is kept in the state
directory, ``<state>/<repo-id>/<vm-id>.json``, written only after Borg committed the archive
(temporary file, fsync, ``os.replace``), with the per-disk block digests beside it
(``<vm-id>.<disk-id>.blocks``). The next run starts its incremental from the checkpoint of the
last committed archive.

Format (``format: "ovirt-borg-sidecar"``, ``version: 2``), all keys required unless noted:

- ``vm``: ``{"id", "name"}``
- ``archive``: the archive name; ``previous_archive``: the archive this one reused blocks from
  (null for a full read)
- ``mode``: ``"full"`` or ``"incremental"``; ``reason``: why this mode was chosen
- ``path``: ``"backup"`` (the engine's backup API, host imageio) or ``"engine-transfer"`` (a plain
  image transfer of a powered-off VM's disk, for engines that refuse cold backups)
- ``checkpoint_id``: the engine checkpoint this archive corresponds to (null when none, e.g.
  raw-only disks or the engine-transfer path); ``from_checkpoint_id``; ``backup_id``
- ``block_size``: bytes per block (one Borg chunk)
- ``last_full``: UTC time of the newest full read in this chain (for ``full_every_days``)
- ``started``, ``finished``: UTC times (ISO 8601)
- ``disks``: list of ``{"id", "alias", "format", "provisioned_size", "backup_mode", "interface",
  "bootable", "image" (path in the archive), "blocks_file" (path of the digests in the archive),
  "blocks_kind", "blocks_sha256" (sha256 of the digests file), "bytes_read", "holes", "reused",
  "stored", "blocks"}``. The digests file holds one 32-byte digest per block of the image, in
  order: with ``blocks_kind`` ``"borg-id"`` the block's Borg chunk id (the keyed hash Borg
  stores the chunk under and checks on every read; what the next incremental reuses blocks by),
  with ``"sha256"`` its sha256 (archives written by the command-line writer, which cannot learn
  chunk ids). Its hash, recorded here, lets ``verify`` check any archive against what was read
  at backup time.

Version 1 documents (before ``blocks_kind``) are read as ``"sha256"``: such archives still
restore and verify, and the next backup of their VM reads every block once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = "ovirt-borg-sidecar"
VERSION = 2
SIDECAR_NAME = "ovirt-borg.json"
DIGEST_SIZE = 32
#: ``blocks_kind`` values: what the digests file holds per block.
BLOCKS_BORG_ID = "borg-id"
BLOCKS_SHA256 = "sha256"


class SidecarInvalid(ValueError):
    """A sidecar document that does not match the schema."""


@dataclass(frozen=True)
class DiskRecord:
    id: str
    alias: str
    format: str
    provisioned_size: int
    backup_mode: str
    image: str
    blocks_file: str
    blocks_sha256: str
    blocks_kind: str = BLOCKS_SHA256
    bytes_read: int = 0
    holes: int = 0
    reused: int = 0
    stored: int = 0
    blocks: int = 0
    interface: str = "virtio_scsi"
    bootable: bool = False


@dataclass(frozen=True)
class Sidecar:
    vm_id: str
    vm_name: str
    archive: str
    mode: str
    reason: str
    path: str
    block_size: int
    started: str
    finished: str
    last_full: str
    disks: tuple[DiskRecord, ...]
    previous_archive: str | None = None
    checkpoint_id: str | None = None
    from_checkpoint_id: str | None = None
    backup_id: str | None = None

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT, "version": VERSION,
            "vm": {"id": self.vm_id, "name": self.vm_name},
            "archive": self.archive, "previous_archive": self.previous_archive,
            "mode": self.mode, "reason": self.reason, "path": self.path,
            "checkpoint_id": self.checkpoint_id, "from_checkpoint_id": self.from_checkpoint_id,
            "backup_id": self.backup_id, "block_size": self.block_size,
            "last_full": self.last_full, "started": self.started, "finished": self.finished,
            "disks": [asdict(d) for d in self.disks],
        }
        return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"

    def disk(self, disk_id: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.id == disk_id), None)


_STR, _INT, _OPT = str, int, (str, type(None))
_TOP = {"archive": _STR, "previous_archive": _OPT, "mode": _STR, "reason": _STR, "path": _STR,
        "checkpoint_id": _OPT, "from_checkpoint_id": _OPT, "backup_id": _OPT,
        "block_size": _INT, "last_full": _STR, "started": _STR, "finished": _STR}
_DISK = {"id": _STR, "alias": _STR, "format": _STR, "provisioned_size": _INT, "backup_mode": _STR,
         "image": _STR, "blocks_file": _STR, "blocks_sha256": _STR, "bytes_read": _INT,
         "holes": _INT, "reused": _INT, "stored": _INT, "blocks": _INT, "interface": _STR,
         "bootable": bool, "blocks_kind": _STR}


def _check(doc: dict, schema: dict, where: str) -> None:
    for key, tp in schema.items():
        if key not in doc:
            raise SidecarInvalid(f"{where}: missing '{key}'")
        value = doc[key]
        if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise SidecarInvalid(f"{where}: '{key}' must be an integer")
        if not isinstance(value, tp):
            raise SidecarInvalid(f"{where}: '{key}' has the wrong type")


def parse(data: bytes) -> Sidecar:
    """Parse and validate a sidecar document; raises SidecarInvalid."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SidecarInvalid(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SidecarInvalid("not an ovirt-borg sidecar")
    version = doc.get("version")
    if version not in (1, VERSION):
        raise SidecarInvalid(f"unsupported sidecar version {version!r} (this ovirt-borg reads 1 and {VERSION})")
    _check(doc, _TOP, "sidecar")
    vm = doc.get("vm")
    if not isinstance(vm, dict) or not isinstance(vm.get("id"), str) or not isinstance(vm.get("name"), str):
        raise SidecarInvalid("sidecar: 'vm' must hold 'id' and 'name'")
    if doc["mode"] not in ("full", "incremental"):
        raise SidecarInvalid("sidecar: 'mode' must be full or incremental")
    if not isinstance(doc.get("disks"), list):
        raise SidecarInvalid("sidecar: 'disks' must be a list")
    disks = []
    for i, disk in enumerate(doc["disks"]):
        if not isinstance(disk, dict):
            raise SidecarInvalid(f"sidecar: disks[{i}] must be an object")
        if version == 1:
            disk = {**disk, "blocks_kind": BLOCKS_SHA256}
        _check(disk, _DISK, f"sidecar disks[{i}]")
        if disk["blocks_kind"] not in (BLOCKS_BORG_ID, BLOCKS_SHA256):
            raise SidecarInvalid(f"sidecar disks[{i}]: unknown blocks_kind {disk['blocks_kind']!r}")
        disks.append(DiskRecord(**{k: disk[k] for k in _DISK}))
    return Sidecar(vm_id=vm["id"], vm_name=vm["name"], disks=tuple(disks),
                   **{k: doc[k] for k in _TOP})


def digests_sha256(digests: bytes) -> str:
    return hashlib.sha256(digests).hexdigest()


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """sha256 of ``length`` zero bytes (cached: holes are common, of few lengths)."""
    return hashlib.sha256(bytes(length)).digest()


@dataclass
class StateDir:
    """The local copies of the sidecars of one repository: ``<state>/<repo-id>/``."""

    root: Path
    repo_id: str
    _dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self._dir = Path(self.root) / self.repo_id

    def sidecar_path(self, vm_id: str) -> Path:
        return self._dir / f"{vm_id}.json"

    def digests_path(self, vm_id: str, disk_id: str) -> Path:
        return self._dir / f"{vm_id}.{disk_id}.blocks"

    def load(self, vm_id: str) -> Sidecar | None:
        """The VM's last committed sidecar, or None if absent or invalid (logged)."""
        path = self.sidecar_path(vm_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            sidecar = parse(data)
        except SidecarInvalid as e:
            log.error("ignoring the local sidecar %s: %s; the next backup of this VM will be full", path, e)
            return None
        if sidecar.vm_id != vm_id:
            log.error("ignoring the local sidecar %s: it names VM %s", path, sidecar.vm_id)
            return None
        return sidecar

    def all(self) -> list[Sidecar]:
        """Every valid sidecar of this repository (invalid ones are logged and skipped)."""
        if not self._dir.is_dir():
            return []
        found = []
        for path in sorted(self._dir.glob("*.json")):
            sidecar = self.load(path.stem)
            if sidecar is not None:
                found.append(sidecar)
        return found

    def other_jobs(self, vm_id: str) -> list[Sidecar]:
        """The VM's sidecars kept by other jobs under the same state root (``<state>/<other
        repo-id>/<vm-id>.json``: jobs writing to other repositories); unreadable or invalid
        ones are skipped."""
        found = []
        try:
            directories = sorted(p for p in Path(self.root).iterdir() if p.is_dir() and p.name != self.repo_id)
        except OSError:
            return []
        for directory in directories:
            try:
                sidecar = parse((directory / f"{vm_id}.json").read_bytes())
            except (OSError, SidecarInvalid) as e:
                if not isinstance(e, FileNotFoundError):
                    log.debug("not reading the sidecar of VM %s in %s: %s", vm_id, directory, e)
                continue
            if sidecar.vm_id == vm_id:
                found.append(sidecar)
        return found

    def load_digests(self, vm_id: str, record: DiskRecord) -> bytes | None:
        """The block digests of a disk if present locally and matching the sidecar's hash."""
        try:
            data = self.digests_path(vm_id, record.id).read_bytes()
        except FileNotFoundError:
            return None
        if digests_sha256(data) != record.blocks_sha256:
            log.warning("local block digests of disk %s do not match the sidecar; not using them", record.alias)
            return None
        return data

    def store(self, sidecar: Sidecar, digests: dict[str, bytes]) -> None:
        """Write the digests, then the sidecar, each atomically (temp, fsync, rename)."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        os.chmod(self._dir, 0o700)
        for disk_id, data in digests.items():
            _atomic_write(self.digests_path(sidecar.vm_id, disk_id), data)
        _atomic_write(self.sidecar_path(sidecar.vm_id), sidecar.to_json())
        known = {d.id for d in sidecar.disks}
        for path in self._dir.glob(f"{sidecar.vm_id}.*.blocks"):
            if path.name.split(".")[1] not in known:
                path.unlink()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

