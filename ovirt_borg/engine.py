"""The oVirt engine control plane, through ovirtsdk4.

Everything ovirt-borg asks of the engine goes through this module: VM and disk inventory,
backups and their checkpoints, image transfers, and (for restore) disks and VMs. SDK errors are
turned into the typed errors of ``ovirt_borg.errors`` with messages that say what was asked of
which object; nothing here logs a password, a token or an imageio ticket URL.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import ovirtsdk4 as sdk
from ovirtsdk4 import types
import tenacity

from ovirt_borg.errors import AuthError, CheckpointError, ConfigError, EngineError, NotFound, TransferError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class EngineSettings:
    """How to reach the engine.

    ``timeout`` bounds each wait for a phase (and each HTTP request); ``retries`` is how often an
    idempotent call (a read, a finalize, a cancel, a delete) is repeated after a transient
    failure (HTTP 500/502/503/504, a refused, reset or timed-out connection), waiting
    ``poll_interval`` doubled each time (at most 30 s) in between.
    """

    url: str
    user: str
    password: str = field(repr=False)
    ca_file: str = ""
    insecure: bool = False
    timeout: float = 300.0
    poll_interval: float = 1.0
    retries: int = 3


#: The origins of the hosted engine's VM (ovirt-engine VmBase.isHostedEngine).
HOSTED_ENGINE_ORIGINS = ("hosted_engine", "managed_hosted_engine")


@dataclass(frozen=True)
class VmInfo:
    id: str
    name: str
    status: str  # "up", "down", ...
    cluster: str = ""
    tags: tuple[str, ...] = ()
    origin: str = ""

    @property
    def hosted_engine(self) -> bool:
        """The engine's own VM: StartVmBackupCommand refuses to back it up (409)."""
        return self.origin in HOSTED_ENGINE_ORIGINS


@dataclass(frozen=True)
class DiskInfo:
    id: str
    alias: str
    format: str  # "cow" or "raw"
    provisioned_size: int
    backup: str  # "incremental" or "none"
    interface: str = "virtio_scsi"
    bootable: bool = False
    active: bool = True
    status: str = "ok"
    storage_type: str = "image"  # "image", "lun", "cinder", "managed_block_storage"
    shareable: bool = False

    @property
    def incremental_capable(self) -> bool:
        return self.format == "cow" and self.backup == "incremental"

    @property
    def not_backed_up(self) -> str | None:
        """Why the engine's backup leaves this disk out, or None when it backs it up.

        StartVmBackupCommand takes plugged image disks that are not shareable: a LUN, Cinder,
        managed-block or shareable disk is left out silently (its transfer then fails) and an
        unplugged one fails the whole backup with 409 "disks are not active".
        """
        if self.storage_type != "image":
            kind = {"lun": "a direct LUN", "managed_block_storage": "a managed block storage disk",
                    "cinder": "a Cinder disk"}.get(self.storage_type, f"a {self.storage_type} disk")
            return f"it is {kind}: the engine backs up image disks only"
        if self.shareable:
            return "it is shareable: the engine does not back up shareable disks"
        if not self.active:
            return "it is unplugged (inactive): the engine refuses a backup that names an unplugged disk"
        return None


@dataclass(frozen=True)
class StorageDomainInfo:
    name: str
    type: str  # the storage type: "nfs", "localfs", "iscsi", "fcp", ...

    @property
    def is_block(self) -> bool:
        """A block domain: its volumes are LVs (the engine's StorageType.isBlockDomain)."""
        return self.type in ("iscsi", "fcp")


@dataclass(frozen=True)
class Checkpoint:
    id: str
    parent_id: str | None
    state: str
    created: float


@dataclass(frozen=True)
class Transfer:
    id: str
    transfer_url: str = field(repr=False)
    proxy_url: str | None = field(repr=False)


class CheckpointRefused(CheckpointError):
    """The engine refused the checkpoint an incremental backup was to start from."""


class ColdBackupRefused(EngineError):
    """The engine cannot back up this powered-off VM through the backup API."""


class BackupBusy(EngineError):
    """The VM has a backup in progress."""


class TransferStopped(TransferError):
    """The engine stopped an image transfer before it started (``cancelled_system``).

    On a hybrid or cold backup this is how a missing, inconsistent or disabled bitmap shows
    (vdsm nbd._find_bitmap fails the transfer's NBD server).
    """


class StillFinalizing(EngineError):
    """A finalized backup was still finalizing when the wait for it ended (a hybrid backup
    removing its snapshot can take long); the engine goes on with it."""


@dataclass(frozen=True)
class BackupEnd:
    """How a finalized backup ended: its phase, and the snapshot of a hybrid backup that is
    still there afterwards (the engine's merge failed; it still reports ``succeeded``)."""

    phase: str
    snapshot_left: str | None = None


def _enum(value) -> str:
    return value.value if hasattr(value, "value") else str(value or "")


def _fault_detail(error: sdk.Error) -> str:
    """The fault's detail as the engine sent it ("" when there is none)."""
    fault = getattr(error, "fault", None)
    return (fault.detail or "") if fault is not None else ""


def _fault_text(error: sdk.Error) -> str:
    text = str(error)
    # The SDK renders faults as 'Fault reason is "...". Fault detail is "...". HTTP response code is N.'
    return text.replace("\n", " ")


# The SDK reports transport failures as 'Error while sending HTTP request: (CURLCODE, "text")',
# and a reply cut short as 'Failed to read response: [(<pycurl.Curl object ...>, CURLCODE, ...)]'.
_CURL_ERROR = re.compile(r"(?:Error while sending HTTP request: \(|Failed to read response: \[\(<[^>]*>, )(\d+),")
# curl: the peer's certificate is not trusted, does not match the host, or the CA file is bad.
_CURL_TLS_UNTRUSTED = {51, 60, 77, 83, 90}
# curl: refused, timed out, empty reply, send/receive failure (a reset), partial transfer.
_CURL_TRANSIENT = {7, 18, 28, 52, 55, 56}
# curl: the host name (or the proxy's) does not resolve: a typo or a DNS set-up that a retry
# seconds later does not change.
_CURL_UNRESOLVED = {5, 6}
_CURL_REFUSED = 7
# HTTP answers of an engine (or the proxy before it) that is restarting or overloaded.
_HTTP_TRANSIENT = {500, 502, 503, 504}
_RETRY_MAX_DELAY = 30.0


def _curl_code(error: sdk.Error) -> int | None:
    match = _CURL_ERROR.search(str(error))
    return int(match.group(1)) if match else None


def is_transient(error: BaseException) -> bool:
    """True when repeating the same idempotent call may succeed: an SDK error that is an HTTP
    5xx, a refused, reset or timed-out connection; never a TLS, auth or DNS error."""
    if not isinstance(error, sdk.Error) or isinstance(error, (sdk.AuthError, sdk.NotFoundError)):
        return False
    if getattr(error, "code", None) in _HTTP_TRANSIENT:
        return True
    curl = _curl_code(error)
    if curl is not None:
        return curl in _CURL_TRANSIENT
    return isinstance(error, (sdk.ConnectionError, sdk.TimeoutError))


def _host_port(url: str) -> str:
    """``host:port`` of an engine URL (the port https implies when none is written)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    return f"{parts.hostname}:{port}"


def engine_error(error: Exception, doing: str, url: str = "") -> Exception:
    """Map an SDK exception raised while ``doing`` something to a typed error.

    ``url``, the engine's URL when known, names the host and port a connection failed to
    reach. Returns the typed error (an OvirtBorgError) to raise, or ``error`` itself when it is
    no SDK error.
    """
    if isinstance(error, sdk.AuthError):
        return AuthError(f"the engine refused the credentials while {doing}: {_fault_text(error)}; "
                         "check engine.user and the password file")
    if isinstance(error, sdk.NotFoundError):
        return NotFound(f"not found on the engine while {doing}")
    curl = _curl_code(error) if isinstance(error, sdk.Error) else None
    if curl in _CURL_TLS_UNTRUSTED:
        return EngineError(f"the engine's TLS certificate is not trusted while {doing} ({error}); "
                           "set engine.ca_file to the engine's CA certificate (ovirt-borg never falls "
                           "back to an unverified connection unless engine.insecure is set)")
    if curl in _CURL_UNRESOLVED:
        host = urllib.parse.urlsplit(url).hostname if url else None
        name = f"the engine's host name {host!r}" if host else "the engine's host name"
        return EngineError(f"cannot resolve {name} while {doing} ({error}); check the host name in "
                           "engine.url and this machine's DNS")
    if curl == _CURL_REFUSED:
        where = f"the engine at {_host_port(url)}" if url else "the engine"
        return EngineError(f"cannot connect to {where} while {doing} ({error}): is the engine up, and "
                           "is the port in engine.url open from this machine?")
    if isinstance(error, (sdk.ConnectionError, sdk.TimeoutError)) or curl is not None:
        return EngineError(f"cannot reach the engine while {doing}: {error}; check engine.url and the "
                           "network")
    if isinstance(error, sdk.Error):
        code = getattr(error, "code", None)
        return EngineError(f"the engine failed while {doing} (HTTP {code}): {_fault_text(error)}")
    return error


@contextlib.contextmanager
def _calling(doing: str, url: str = "") -> Iterator[None]:
    """Within the block, SDK errors are raised as the typed errors of ``engine_error``."""
    try:
        yield
    except sdk.Error as e:
        raise engine_error(e, doing, url) from None


class WaitStopped(EngineError):
    """A wait for the engine ended by the caller that started it."""


class Engine:
    """A connection to the engine; use as a context manager."""

    def __init__(self, settings: EngineSettings):
        self.settings = settings
        self._connection: sdk.Connection | None = None

    def __enter__(self) -> "Engine":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Connect and log in. Raises ConfigError for an unreadable CA file, else typed errors."""
        s = self.settings
        if s.ca_file and not os.access(s.ca_file, os.R_OK):
            raise ConfigError(f"engine.ca_file {s.ca_file} does not exist or cannot be read; "
                              "download the engine's CA certificate there")
        with _calling(f"connecting to {s.url}", s.url):
            self._connection = sdk.Connection(
                url=s.url, username=s.user, password=s.password,
                ca_file=s.ca_file or None, insecure=s.insecure, timeout=max(1, math.ceil(s.timeout)),
            )
            try:
                self._retry(lambda: self._connection.test(raise_exception=True), f"connecting to {s.url}")
            except sdk.NotFoundError as e:
                # Logged in (SSO lives at a fixed path), but the API is not where engine.url says.
                raise EngineError(f"{s.url} is not the engine's API ({_fault_text(e)}); engine.url must be "
                                  "https://ENGINE/ovirt-engine/api") from None

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # logging out is a courtesy; never hide the real outcome
                log.debug("engine logout failed", exc_info=True)
            self._connection = None

    @property
    def system(self):
        assert self._connection is not None, "engine connection is not open"
        return self._connection.system_service()

    # -- polling -----------------------------------------------------------------------------

    def _retry(self, call: Callable[[], T], doing: str) -> T:
        """Run an idempotent SDK call, repeating it after transient failures (see EngineSettings).

        Returns its result; raises the last SDK error when it is not transient or the retries are
        used up (callers map it with ``_calling`` or ``engine_error``).
        """
        attempts = self.settings.retries + 1

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            log.warning("engine: %s failed (%s); retrying in %.1f s (attempt %d of %d)", doing,
                        _fault_text(error), state.next_action.sleep if state.next_action else 0,
                        state.attempt_number + 1, attempts)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            # poll_interval doubled at each attempt: 2, 4, 8 ... times it, at most _RETRY_MAX_DELAY.
            wait=tenacity.wait_exponential(multiplier=2 * self.settings.poll_interval, max=_RETRY_MAX_DELAY),
            retry=tenacity.retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(call)

    def _call(self, call: Callable[[], T], doing: str) -> T:
        """``_retry`` with SDK errors mapped to typed errors."""
        with _calling(doing):
            return self._retry(call, doing)

    def _poll(self, get: Callable[[], T], done: Callable[[T], bool], what: str,
              failed: Callable[[T], str | None] = lambda _: None, timeout: float | None = None,
              stop: threading.Event | None = None) -> T:
        """Call ``get`` until ``done`` holds; raise EngineError when ``failed`` says why or on timeout.

        Transient failures of ``get`` are retried; other SDK errors propagate unmapped. Once
        ``stop`` is set, the next wait between two calls raises WaitStopped at once.
        """
        deadline = time.monotonic() + (timeout or self.settings.timeout)
        # Most engine operations finish within a second or two: poll quickly first, then back
        # off to poll_interval so that long waits do not hammer the engine.
        delay = min(0.1, self.settings.poll_interval)
        while True:
            value = self._retry(get, what)
            if done(value):
                return value
            reason = failed(value)
            if reason:
                raise EngineError(f"{what}: {reason}")
            if time.monotonic() > deadline:
                raise EngineError(f"{what}: timed out after {timeout or self.settings.timeout:.0f} s")
            if stop is None:
                time.sleep(delay)
            elif stop.wait(delay):
                raise WaitStopped(f"{what}: no longer waited for")
            delay = min(delay * 1.5, self.settings.poll_interval)

    # -- inventory ---------------------------------------------------------------------------

    def list_vms(self, search: str | None = None, *, with_tags: bool = False) -> list[VmInfo]:
        """VMs matching an engine search (all when None); tags are fetched only when asked."""
        with _calling("listing VMs"):
            vms = self._retry(lambda: self.system.vms_service().list(search=search), "listing VMs")
            clusters = {}
            if vms:
                clusters = {c.id: c.name for c in self._retry(
                    lambda: self.system.clusters_service().list(), "listing clusters")}
            result = []
            for vm in vms:
                tags: tuple[str, ...] = ()
                if with_tags:
                    tag_list = self._retry(
                        lambda: self.system.vms_service().vm_service(vm.id).tags_service().list(),  # noqa: B023 (called at once)
                        f"listing the tags of VM {vm.name}")
                    tags = tuple(t.name for t in tag_list if t.name)
                cluster = ""
                if vm.cluster is not None:
                    cluster = vm.cluster.name or clusters.get(vm.cluster.id, "")
                result.append(VmInfo(vm.id, vm.name, _enum(vm.status), cluster, tags, vm.origin or ""))
        return result

    def get_vm(self, vm_id: str) -> VmInfo:
        """The VM as the engine has it now; raises NotFound when it was deleted."""
        vm = self._call(lambda: self.system.vms_service().vm_service(vm_id).get(), f"reading VM {vm_id}")
        return VmInfo(vm.id, vm.name, _enum(vm.status), origin=vm.origin or "")

    def find_vm(self, name: str) -> VmInfo:
        for vm in self.list_vms(search=f"name={name}"):
            if vm.name == name:
                return vm
        raise NotFound(f"no VM named {name!r} on the engine; check the name with the engine's UI")

    def vm_ovf(self, vm_id: str) -> str:
        """Return the VM's OVF configuration (all_content)."""
        vm = self._call(lambda: self.system.vms_service().vm_service(vm_id).get(all_content=True),
                        f"reading the configuration of VM {vm_id}")
        config = vm.initialization.configuration if vm.initialization else None
        if config is None or not config.data:
            raise EngineError(f"the engine returned no OVF for VM {vm.name}")
        return config.data

    def vm_disks(self, vm_id: str) -> list[DiskInfo]:
        """Return the VM's attached disks with their properties."""
        result = []
        doing = f"listing the disks of VM {vm_id}"
        with _calling(doing):
            attachments = self._retry(
                lambda: self.system.vms_service().vm_service(vm_id).disk_attachments_service().list(), doing)
            for attachment in attachments:
                disk = self._retry(lambda: self.system.disks_service().disk_service(attachment.disk.id).get(),  # noqa: B023 (called at once)
                                   f"reading disk {attachment.disk.id}")
                result.append(DiskInfo(
                    id=disk.id, alias=disk.alias or disk.name or disk.id, format=_enum(disk.format),
                    provisioned_size=int(disk.provisioned_size or 0), backup=_enum(disk.backup) or "none",
                    interface=_enum(attachment.interface) or "virtio_scsi",
                    bootable=bool(attachment.bootable), active=attachment.active is not False,
                    status=_enum(disk.status) or "ok", storage_type=_enum(disk.storage_type) or "image",
                    shareable=bool(disk.shareable)))
        return result

    def enable_incremental(self, disk: DiskInfo) -> DiskInfo:
        """Turn on incremental backup for a qcow2 disk; return the updated DiskInfo."""
        self._call(lambda: self.system.disks_service().disk_service(disk.id).update(
            types.Disk(backup=types.DiskBackup.INCREMENTAL)), f"enabling incremental backup on disk {disk.alias}")
        return DiskInfo(**{**disk.__dict__, "backup": "incremental"})

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoints(self, vm_id: str) -> list[Checkpoint]:
        """The VM's checkpoints, oldest first."""
        items = self._call(lambda: self.system.vms_service().vm_service(vm_id).checkpoints_service().list(),
                           f"listing checkpoints of VM {vm_id}")
        result = [Checkpoint(c.id, c.parent_id, _enum(c.state) or "created",
                             c.creation_date.timestamp() if c.creation_date else 0.0) for c in items]
        return _chain_order(result)

    def delete_checkpoint(self, vm_id: str, checkpoint_id: str) -> None:
        """Delete a checkpoint and wait until it is gone; raises BackupBusy while a backup of
        the VM is open, typed errors otherwise."""
        service = self.system.vms_service().vm_service(vm_id).checkpoints_service().checkpoint_service(checkpoint_id)
        with _calling(f"deleting checkpoint {checkpoint_id}"):
            try:
                self._retry(service.remove, f"deleting checkpoint {checkpoint_id}")
            except sdk.NotFoundError:
                return
            except sdk.Error as e:
                if getattr(e, "code", None) == 409 and "during a backup" in _fault_text(e):
                    # DeleteVmCheckpointCommand.validate: refused while any backup of the VM
                    # is unfinished (a hybrid one still removing its snapshot included).
                    raise BackupBusy(f"the engine keeps checkpoint {checkpoint_id} while a backup of VM "
                                     f"{vm_id} is open: {_fault_text(e)}") from None
                raise

        def gone() -> bool:
            try:
                service.get()
                return False
            except sdk.NotFoundError:
                return True

        with _calling(f"waiting for checkpoint {checkpoint_id} to be deleted"):
            self._poll(gone, bool, f"deleting checkpoint {checkpoint_id}")

    def purge_checkpoints(self, vm_id: str, keep_id: str, keep: int = 1, also_keep: Iterable[str] = ()) -> list[str]:
        """Delete the checkpoints ``checkpoints_to_purge`` chooses, oldest first.

        Returns the ids deleted. The checkpoint the next incremental starts from (``keep_id``)
        and those other jobs' next incrementals start from (``also_keep``) are never deleted.
        """
        ids = [c.id for c in self.checkpoints(vm_id)]
        removable = checkpoints_to_purge(ids, keep_id, keep, also_keep)
        for checkpoint_id in removable:
            self.delete_checkpoint(vm_id, checkpoint_id)
            log.debug("deleted engine checkpoint %s of VM %s", checkpoint_id, vm_id)
        return removable

    # -- backups -----------------------------------------------------------------------------

    def _backups_service(self, vm_id: str):
        return self.system.vms_service().vm_service(vm_id).backups_service()

    def open_backups(self, vm_id: str) -> list[tuple[str, str]]:
        """(id, phase) of the VM's backups that are not finished."""
        backups = self._call(lambda: self._backups_service(vm_id).list(), f"listing backups of VM {vm_id}")
        return [(b.id, _enum(b.phase)) for b in backups
                if _enum(b.phase) not in ("succeeded", "failed")]

    def finalize_stale_backups(self, vm_id: str, description: str = "",
                               foreign_after: float = 0.0) -> dict[str, BackupEnd]:
        """Close backups an earlier run left open on the VM (killed, or the engine failed it).

        A backup still starting is waited for; the image transfers of a ready one are ended
        (``abandon_transfer``: the engine refuses to finalize a backup with an unfinished
        transfer), then it is finalized; one finalizing is waited for. Only this job's backups
        (their ``description`` is the marker the job writes) are finalized at once: another
        tool's or job's only once it is older than ``foreign_after`` seconds with no active image
        transfer (0: at once), else BackupBusy is raised (the engine allows one backup per VM).
        Returns how each ended, by id; raises typed errors.
        """
        finalized = {}
        for backup_id, phase in self.open_backups(vm_id):
            if phase in ("initializing", "starting"):
                log.warning("waiting for a stale backup %s of VM %s to start", backup_id, vm_id)
                phase = self._backup_phase_when(vm_id, backup_id, lambda p: p not in ("initializing", "starting"))
            if phase == "finalizing":
                log.warning("waiting for backup %s of VM %s to finish finalizing", backup_id, vm_id)
                finalized[backup_id] = self._wait_backup_end(vm_id, backup_id)
                continue
            if phase != "ready":
                continue
            self._check_abandoned(vm_id, backup_id, description, foreign_after)
            log.warning("finalizing a stale backup %s left open on VM %s", backup_id, vm_id)
            for transfer_id in self._active_transfers(vm_id, backup_id):
                log.warning("ending image transfer %s left open by backup %s", transfer_id, backup_id)
                self.abandon_transfer(transfer_id)
            finalized[backup_id] = self.finalize_backup(vm_id, backup_id)
        return finalized

    def _check_abandoned(self, vm_id: str, backup_id: str, description: str, foreign_after: float) -> None:
        """Return when the ready backup may be finalized as stale; raise BackupBusy when it is
        another's (see ``finalize_stale_backups``).

        The API lists every backup of a VM, whoever started it. Engines before 4.4.8 keep no
        description: there, this job's own backups count as another's.
        """
        backup = self._call(lambda: self._backups_service(vm_id).backup_service(backup_id).get(),
                            f"reading backup {backup_id} of VM {vm_id}")
        if (description and backup.description == description) or foreign_after == 0:
            return
        age = time.time() - backup.creation_date.timestamp() if backup.creation_date else 0.0
        started = backup.creation_date.isoformat() if backup.creation_date else "at an unknown time"
        owner = f"{backup.description!r}" if backup.description else "no description"
        if age >= foreign_after and not self._active_transfers(vm_id, backup_id):
            log.warning("backup %s of VM %s (%s), started %s by another tool or job, has no active image "
                        "transfer and is older than backup.foreign_stale_hours: finalizing it as abandoned",
                        backup_id, vm_id, owner, started)
            return
        raise BackupBusy(f"VM {vm_id} has backup {backup_id} open ({owner}, started {started}), not started by "
                         "this job: it is left alone (the engine runs one backup of a VM at a time); the "
                         "VM is backed up by the next run after it ends, or once it is older than "
                         "backup.foreign_stale_hours with no active image transfer")

    def _active_transfers(self, vm_id: str, backup_id: str) -> list[str]:
        """Ids of the image transfers of a backup that have not finished.

        The engine's transfers carry neither their backup nor their disk, only ``<image id>``,
        which is the disk id (ImageTransferMapper): a backup's transfers are those of its disks.
        While the backup is open its disks are locked, so no other transfer of them can run.
        """
        disk_ids = set(self.backup_disk_modes(vm_id, backup_id))
        transfers = self._call(lambda: self.system.image_transfers_service().list(), "listing image transfers")
        return [t.id for t in transfers
                if t.image is not None and t.image.id in disk_ids
                and not _enum(t.phase).startswith(("finished", "cancelled"))]

    def start_backup(self, vm_id: str, disk_ids: list[str], from_checkpoint: str | None,
                     description: str | None = None) -> str:
        """Start a backup of ``disk_ids``, marked with ``description``; return its id.

        Raises CheckpointRefused when the engine refuses ``from_checkpoint``, ColdBackupRefused
        when it cannot back up the (powered-off) VM, BackupBusy when a backup is in progress.
        """
        backup = types.Backup(disks=[types.Disk(id=d) for d in disk_ids],
                              from_checkpoint_id=from_checkpoint, description=description or None)
        try:
            created = self._backups_service(vm_id).add(backup)
        except sdk.Error as e:
            text = _fault_text(e)
            code = getattr(e, "code", None)
            if from_checkpoint and code == 400 and "heckpoint" in text:
                raise CheckpointRefused(f"the engine refused checkpoint {from_checkpoint}: {text}") from None
            if from_checkpoint and code == 400 and _fault_detail(e) == "[]":
                # StartVmBackupCommand: a live backup whose checkpoint redefinition failed (a
                # missing or broken bitmap); the engine has removed every checkpoint of the VM.
                raise CheckpointRefused(f"the engine could not redefine checkpoint {from_checkpoint} (a "
                                        f"missing or broken bitmap): {text}") from None
            if code == 400 and "Incremental backup is not supported" in text:
                # StartVmBackupCommand.validate below cluster level 4.5: no cold backup, no
                # incremental one (IsIncrementalBackupSupported).
                if from_checkpoint:
                    raise CheckpointRefused(f"the engine refused an incremental backup: {text}") from None
                raise ColdBackupRefused(f"the engine cannot back up VM {vm_id} now: {text}") from None
            if code == 409 and "during a backup" in text:
                raise BackupBusy(f"VM {vm_id} already has a backup in progress: {text}") from None
            if code == 409:
                raise ColdBackupRefused(f"the engine cannot back up VM {vm_id} now: {text}") from None
            raise engine_error(e, f"starting a backup of VM {vm_id}") from None
        return created.id

    def wait_backup_ready(self, vm_id: str, backup_id: str, stop: threading.Event | None = None) -> str | None:
        """Wait for the backup to be ready; return its to_checkpoint_id (None for raw-only).

        Setting ``stop`` (from another thread) ends the wait with WaitStopped.
        """
        service = self._backups_service(vm_id).backup_service(backup_id)
        try:
            with _calling(f"waiting for backup {backup_id} of VM {vm_id}"):
                backup = self._poll(
                    service.get, lambda b: _enum(b.phase) == "ready",
                    f"backup {backup_id} of VM {vm_id}",
                    failed=lambda b: f"phase {_enum(b.phase)}" if _enum(b.phase) in ("failed", "succeeded") else None,
                    stop=stop)
        except NotFound:
            # Engines before 4.4.7 delete a backup that failed.
            raise EngineError(f"backup {backup_id} of VM {vm_id} failed while the engine prepared it "
                              "(the engine removed it; see the engine's events)") from None
        return backup.to_checkpoint_id

    def backup_disk_modes(self, vm_id: str, backup_id: str) -> dict[str, str]:
        """disk id -> backup_mode ("full" or "incremental") the engine chose for each disk."""
        service = self._backups_service(vm_id).backup_service(backup_id).disks_service()
        disks = self._call(service.list, f"listing the disks of backup {backup_id}")
        return {d.id: _enum(d.backup_mode) or "full" for d in disks}

    def finalize_backup(self, vm_id: str, backup_id: str, stop: threading.Event | None = None) -> BackupEnd:
        """Finalize the backup and wait until the engine is done with it; return how it ended.

        A finalize refused while an image transfer of the backup is still ending (409) is
        repeated until ``timeout``; one refused because the backup is already stopped or
        finalizing (400: a reply lost on the way back, then retried) counts as done. Setting
        ``stop`` (from another thread) ends the wait with WaitStopped; the engine goes on
        finalizing. Raises StillFinalizing when the backup is still finalizing at ``timeout``.
        """
        service = self._backups_service(vm_id).backup_service(backup_id)
        doing = f"finalizing backup {backup_id} of VM {vm_id}"

        def finalize() -> bool:
            try:
                service.finalize()  # _poll repeats it after transient failures
            except sdk.NotFoundError:
                return True  # engines before 4.4.7 delete finished backups
            except sdk.Error as e:
                text = _fault_text(e)
                if getattr(e, "code", None) == 409 and "active image transfer" in text:
                    log.debug("%s: an image transfer is still ending; finalizing again", doing)
                    return False
                if getattr(e, "code", None) == 400 and "no need to stop the backup again" in text:
                    # StopVmBackupCommand: already stopped, finalizing or done.
                    log.info("%s: the engine has it already (%s)", doing, text)
                    return True
                raise
            return True

        with _calling(doing):
            self._poll(finalize, bool, doing, stop=stop)
        return self._wait_backup_end(vm_id, backup_id, stop)

    def _backup_phase_when(self, vm_id: str, backup_id: str, done: Callable[[str], bool],
                           what: str = "", stop: threading.Event | None = None) -> str:
        """Poll the backup's phase until ``done(phase)``; return it (a deleted backup: succeeded)."""
        service = self._backups_service(vm_id).backup_service(backup_id)

        def phase() -> str:
            try:
                return _enum(service.get().phase)
            except sdk.NotFoundError:  # engines before 4.4.7 delete finished backups
                return "succeeded"

        what = what or f"backup {backup_id} of VM {vm_id}"
        with _calling(f"waiting for {what}"):
            return self._poll(phase, done, what, stop=stop)

    def _wait_backup_end(self, vm_id: str, backup_id: str, stop: threading.Event | None = None) -> BackupEnd:
        """Wait for a finalized backup to end; return its phase and any snapshot it left behind.

        Raises StillFinalizing when it is still finalizing (or, hybrid, still ready) at timeout.
        """
        service = self._backups_service(vm_id).backup_service(backup_id)
        last: list = []

        def get():
            try:
                backup = service.get()
            except sdk.NotFoundError:  # engines before 4.4.7 delete finished backups
                return None
            last[:] = [backup]
            return backup

        what = f"finalizing backup {backup_id}"
        try:
            with _calling(f"waiting for {what}"):
                backup = self._poll(get, lambda b: b is None or _enum(b.phase) in ("succeeded", "failed"),
                                    what, stop=stop)
        except EngineError as e:
            if isinstance(e, WaitStopped) or "timed out" not in str(e):
                raise
            phase = _enum(last[0].phase) if last else "unknown"
            raise StillFinalizing(f"backup {backup_id} of VM {vm_id} is still {phase} after "
                                  f"{self.settings.timeout:.0f} s (a hybrid backup removes its snapshot "
                                  "now); the engine goes on with it") from None
        if backup is None:
            return BackupEnd("succeeded")
        end = BackupEnd(_enum(backup.phase), self._snapshot_left(vm_id, backup))
        if end.phase == "failed":
            log.warning("the engine reports backup %s of VM %s as failed after finalize", backup_id, vm_id)
        return end

    def _snapshot_left(self, vm_id: str, backup) -> str | None:
        """The id and description of a hybrid backup's snapshot that outlived it, or None.

        HybridBackupCommand.endWithFailure: a snapshot removal that failed still ends the
        backup ``succeeded`` (event VM_BACKUP_SNAPSHOT_POSSIBLE_LEFTOVER); only the snapshot
        itself, still listed on the VM, tells.
        """
        if backup.snapshot is None or not backup.snapshot.id:
            return None
        service = self.system.vms_service().vm_service(vm_id).snapshots_service().snapshot_service(backup.snapshot.id)
        try:
            snapshot = self._call(service.get, f"reading snapshot {backup.snapshot.id} of VM {vm_id}")
        except NotFound:
            return None
        return f"{snapshot.id} ({snapshot.description or 'no description'})"

    # -- image transfers ---------------------------------------------------------------------

    def start_transfer(self, disk_id: str, *, direction: str, backup_id: str | None = None,
                       inactivity_timeout: int = 120) -> Transfer:
        """Create an image transfer and wait until it is transferring.

        On any failure (or an interrupt) the transfer is ended (``abandon_transfer``) before
        the error is raised: TransferStopped when the engine stopped it (``cancelled_system``),
        TransferError otherwise.
        """
        request = types.ImageTransfer(
            disk=types.Disk(id=disk_id),
            backup=types.Backup(id=backup_id) if backup_id else None,
            direction=types.ImageTransferDirection(direction),
            format=types.DiskFormat.RAW,
            inactivity_timeout=inactivity_timeout,
        )
        with _calling(f"starting the {direction} transfer of disk {disk_id}"):
            created = self.system.image_transfers_service().add(request)
        service = self.system.image_transfers_service().image_transfer_service(created.id)
        try:
            with _calling(f"waiting for the transfer of disk {disk_id}"):
                transfer = self._poll(
                    service.get, lambda t: _enum(t.phase) == "transferring",
                    f"image transfer of disk {disk_id}",
                    failed=lambda t: (f"it went to phase {_enum(t.phase)}"
                                      if _enum(t.phase) in _TRANSFER_FAILED else None))
        except (EngineError, NotFound) as e:
            self.abandon_transfer(created.id, direction)
            stopped = isinstance(e, EngineError) and "cancelled_system" in str(e)
            raise (TransferStopped if stopped else TransferError)(
                f"the image transfer of disk {disk_id} did not start: {e}") from None
        except BaseException:
            self.abandon_transfer(created.id, direction)
            raise
        return Transfer(created.id, transfer.transfer_url, transfer.proxy_url)

    def _transfer_phase(self, service) -> str:
        try:
            return _enum(service.get().phase)
        except sdk.NotFoundError:  # engines before 4.4.7 drop finished transfers at once
            return "finished_success"

    def finalize_transfer(self, transfer_id: str) -> None:
        """Finalize a transfer and wait for finished_success; raises TransferError otherwise."""
        self.request_transfer_finalize(transfer_id)
        end = self.wait_transfer_end(transfer_id)
        if end != "finished_success":
            raise TransferError(f"image transfer {transfer_id} ended in phase {end}")

    def request_transfer_finalize(self, transfer_id: str) -> None:
        """Ask the engine to finalize a transfer, without waiting for it to end
        (``wait_transfer_end``); raises typed errors when the engine does not take the request."""
        service = self.system.image_transfers_service().image_transfer_service(transfer_id)
        with _calling(f"finalizing image transfer {transfer_id}"):
            self._retry(service.finalize, f"finalizing image transfer {transfer_id}")

    def wait_transfer_end(self, transfer_id: str, stop: threading.Event | None = None) -> str:
        """Wait until a transfer being finalized (or stopped) is finished; return its last phase,
        ``finished_success`` or ``finished_failure``.

        Setting ``stop`` (from another thread) ends the wait with WaitStopped; raises
        EngineError when it is not finished within ``timeout``, else typed errors.
        """
        service = self.system.image_transfers_service().image_transfer_service(transfer_id)
        with _calling(f"waiting for image transfer {transfer_id} to finish"):
            return self._poll(lambda: self._transfer_phase(service), lambda p: p in _TRANSFER_FINISHED,
                              f"finalizing image transfer {transfer_id}", stop=stop)

    def abandon_transfer(self, transfer_id: str, direction: str = "download") -> None:
        """End a transfer given up on a failure path and wait until it is finished_*; logs, never raises.

        ``direction`` is the transfer's. A download is finalized (the SDK's
        helpers/imagetransfer.py: "a download can always be finalized"; cancelled only when the
        engine refuses that), an upload cancelled (the engine then removes its disk); a
        transfer the engine is already stopping is left to it. The engine takes several steps
        (a cancel: cancelled_user -> finalizing_cleanup -> finished_cleanup -> finished_failure),
        and its backup cannot be finalized before the last (StopVmBackupCommand.validate).
        """
        service = self.system.image_transfers_service().image_transfer_service(transfer_id)
        try:
            try:
                phase = self._transfer_phase(service)
            except sdk.Error as e:
                log.warning("cannot read image transfer %s (%s); ending it anyway", transfer_id, _fault_text(e))
                phase = "unknown"
            if phase in _TRANSFER_FINISHED:
                return
            if phase not in _TRANSFER_ENDING:
                self._end_transfer(service, transfer_id, direction)
            self._poll(lambda: self._transfer_phase(service), lambda p: p in _TRANSFER_FINISHED,
                       f"ending image transfer {transfer_id}")
        except sdk.NotFoundError:
            pass
        except (sdk.Error, EngineError) as e:
            log.warning("image transfer %s did not end: %s", transfer_id, e)

    def _end_transfer(self, service, transfer_id: str, direction: str) -> None:
        """Finalize a download (cancel it when the engine refuses that), cancel an upload."""
        if direction == "download":
            try:
                self._retry(service.finalize, f"finalizing image transfer {transfer_id}")
                return
            except sdk.NotFoundError:
                raise
            except sdk.Error as e:
                log.warning("finalizing image transfer %s failed (%s); cancelling it", transfer_id, _fault_text(e))
        self._retry(service.cancel, f"cancelling image transfer {transfer_id}")

    @contextlib.contextmanager
    def transfer(self, disk_id: str, *, direction: str, backup_id: str | None = None,
                 inactivity_timeout: int = 120) -> Iterator[Transfer]:
        """A transfer that is finalized on success and ended (``abandon_transfer``) on error."""
        transfer = self.start_transfer(disk_id, direction=direction, backup_id=backup_id,
                                       inactivity_timeout=inactivity_timeout)
        try:
            yield transfer
        except BaseException:
            self.abandon_transfer(transfer.id, direction)
            raise
        try:
            self.finalize_transfer(transfer.id)
        except BaseException:
            # A transfer left active would block finalizing the backup (and lock the disk).
            self.abandon_transfer(transfer.id, direction)
            raise

    # -- restore -----------------------------------------------------------------------------

    def storage_domains(self) -> list[StorageDomainInfo]:
        """The engine's storage domains with their storage type, by name."""
        found = self._call(self.system.storage_domains_service().list, "listing storage domains")
        return sorted((StorageDomainInfo(sd.name, _enum(sd.storage.type) if sd.storage else "")
                       for sd in found if sd.name), key=lambda sd: sd.name)

    def cluster_names(self) -> list[str]:
        """The names of the engine's clusters, sorted."""
        found = self._call(self.system.clusters_service().list, "listing clusters")
        return sorted(c.name for c in found if c.name)

    def create_disk(self, name: str, provisioned_size: int, storage_domain: str,
                    initial_size: int | None = None) -> str:
        """Create a qcow2 sparse disk with incremental backup enabled; wait until ok; return id.

        ``initial_size`` is the room the disk's volume starts with on a block domain, where an
        upload does not grow it (the engine passes it on to vdsm only for sparse disks on block
        domains: AddImageFromScratchCommand.getInitialSize). A disk that does not become ok (an
        error, a timeout, an interrupt) is removed again.
        """
        disk = types.Disk(
            name=name, format=types.DiskFormat.COW, sparse=True, provisioned_size=provisioned_size,
            initial_size=initial_size, backup=types.DiskBackup.INCREMENTAL,
            content_type=types.DiskContentType.DATA,
            storage_domains=[types.StorageDomain(name=storage_domain)])
        with _calling(f"creating disk {name} on storage domain {storage_domain}"):
            created = self.system.disks_service().add(disk)
        try:
            self.wait_disk_ok(created.id)
        except BaseException:
            self.remove_disk(created.id)
            raise
        return created.id

    def wait_disk_ok(self, disk_id: str) -> None:
        service = self.system.disks_service().disk_service(disk_id)
        with _calling(f"waiting for disk {disk_id}"):
            self._poll(service.get, lambda d: _enum(d.status) == "ok", f"disk {disk_id}",
                       failed=lambda d: "it became illegal" if _enum(d.status) == "illegal" else None)

    def remove_disk(self, disk_id: str) -> None:
        try:
            self.system.disks_service().disk_service(disk_id).remove()
        except sdk.NotFoundError:
            pass
        except sdk.Error as e:
            log.warning("could not remove disk %s: %s", disk_id, _fault_text(e))

    def create_vm_from_ovf(self, ovf: str, name: str, cluster: str) -> str:
        """Create a VM from a saved OVF with new ids under ``name``; return its id."""
        vm = types.Vm(
            name=name,
            cluster=types.Cluster(name=cluster),
            initialization=types.Initialization(
                configuration=types.Configuration(type=types.ConfigurationType.OVF, data=ovf),
                regenerate_ids=True),
        )
        with _calling(f"creating VM {name} from its saved configuration"):
            return self.system.vms_service().add(vm).id

    def attach_disk(self, vm_id: str, disk: DiskInfo, new_disk_id: str) -> None:
        attachment = types.DiskAttachment(
            disk=types.Disk(id=new_disk_id), active=True, bootable=disk.bootable,
            interface=types.DiskInterface(disk.interface))
        with _calling(f"attaching disk {new_disk_id} to VM {vm_id}"):
            self.system.vms_service().vm_service(vm_id).disk_attachments_service().add(attachment)

    def remove_vm(self, vm_id: str) -> None:
        try:
            self.system.vms_service().vm_service(vm_id).remove()
        except sdk.NotFoundError:
            pass
        except sdk.Error as e:
            log.warning("could not remove VM %s: %s", vm_id, _fault_text(e))

    def start_vm(self, vm_id: str) -> None:
        with _calling(f"starting VM {vm_id}"):
            self.system.vms_service().vm_service(vm_id).start()


_TRANSFER_FAILED = {"finished_failure", "paused_system", "cancelled", "cancelled_system",
                    "cancelled_user", "finalizing_failure", "finished_cleanup", "unknown"}
# ImageTransferPhase.isFinished(): the engine is done with the transfer (nothing else is).
_TRANSFER_FINISHED = {"finished_success", "finished_failure"}
# Phases in which the engine is already ending the transfer on its own.
_TRANSFER_ENDING = {"cancelled_system", "cancelled_user", "finalizing_success", "finalizing_failure",
                    "finalizing_cleanup", "finished_cleanup"}


def checkpoints_to_purge(chain: list[str], keep_id: str, keep: int = 1, also_keep: Iterable[str] = ()) -> list[str]:
    """Pure: the checkpoints of ``chain`` (ids, oldest first) to delete, oldest first.

    Those older than the oldest of ``keep_id`` and ``also_keep`` present in the chain, less the
    ``keep - 1`` newest of them. Only the head of the chain goes: engines before 4.4.7 delete
    the root checkpoint only (DeleteVmCheckpointCommand), and each deletion here is of the root.
    Nothing goes when ``keep_id`` is not in the chain.
    """
    if keep_id not in chain:
        return []
    oldest = min(chain.index(c) for c in {keep_id, *also_keep} if c in chain)
    older = chain[:oldest]
    return older[: max(0, len(older) - (keep - 1))]


def _chain_order(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """Order checkpoints from the root of the parent chain; fall back to creation time."""
    by_parent = {c.parent_id: c for c in checkpoints}
    ids = {c.id for c in checkpoints}
    roots = [c for c in checkpoints if c.parent_id not in ids]
    if len(roots) != 1:
        return sorted(checkpoints, key=lambda c: c.created)
    chain = [roots[0]]
    while chain[-1].id in by_parent and len(chain) < len(checkpoints):
        chain.append(by_parent[chain[-1].id])
    if len(chain) != len(checkpoints):
        return sorted(checkpoints, key=lambda c: c.created)
    return chain

