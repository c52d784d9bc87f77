"""How long the lab engine's slow phases last: the figures of a real oVirt 4.5 engine, or none.

A real engine spends seconds in its asynchronous commands: a backup waits for a snapshot (or
scratch disks) and a checkpoint before it is ``ready``; a transfer waits for the host to prepare
the image and the imageio tickets; finalizing waits for the command's callback, a live merge or
a ticket removal. The lab answers at once unless given a ``Latency``; with one, each phase stays
in its intermediate state (backup ``starting`` or ``finalizing``, transfer ``initializing`` or
``finalizing_success``, a checkpoint still listed) for that many seconds, seen by a client that
polls, never by holding an HTTP request.

``--latency`` takes ``none``, ``real`` or ``PHASE=SECONDS`` items separated by commas, which
override the documented figures (``REAL``) or, after ``none``, start from zero::

    real                       the documented figures below
    ready=8,transfer=3         the documented figures with these two changed
    none,ready=2               only the backup start is slow

``--latency-scale F`` multiplies every figure (tests use small ones).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

__all__ = ["NONE", "PHASES", "REAL", "Latency", "LatencyError", "PhaseClock", "parse_latency"]


class LatencyError(ValueError):
    """A ``--latency`` or ``--latency-scale`` value the lab cannot use."""


@dataclass(frozen=True)
class Latency:
    """Seconds each slow engine phase lasts (0: the lab's instant behaviour)."""

    ready: float = 0.0              # backup started until phase ready
    transfer: float = 0.0           # image transfer initializing until transferring
    backup_finalize: float = 0.0    # backup finalize until succeeded
    transfer_finalize: float = 0.0  # transfer finalize until finished_success
    checkpoint_delete: float = 0.0  # checkpoint DELETE until the checkpoint is gone

    def __post_init__(self) -> None:
        for phase in PHASES:
            seconds = getattr(self, phase)
            if not isinstance(seconds, (int, float)) or math.isnan(seconds) or math.isinf(seconds):
                raise LatencyError(f"latency {phase}={seconds!r} is not a number of seconds")
            if seconds < 0:
                raise LatencyError(f"latency {phase}={seconds:g} is negative; give 0 or more seconds")

    def seconds(self, phase: str) -> float:
        """The seconds of ``phase`` (one of ``PHASES``); raises ``LatencyError`` for another."""
        if phase not in PHASES:
            raise LatencyError(f"unknown latency phase {phase!r}; known: {', '.join(PHASES)}")
        return getattr(self, phase)

    def scaled(self, factor: float) -> Latency:
        """Every figure multiplied by ``factor`` (0 or more); raises ``LatencyError``."""
        if math.isnan(factor) or math.isinf(factor) or factor < 0:
            raise LatencyError(f"latency scale {factor:g} must be a finite number, 0 or more")
        return Latency(**{phase: getattr(self, phase) * factor for phase in PHASES})

    @property
    def is_none(self) -> bool:
        return all(getattr(self, phase) == 0 for phase in PHASES)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def spec(self) -> str:
        """The ``--latency`` value that gives exactly these figures (``none,PHASE=S,...``)."""
        return ",".join(["none"] + [f"{phase}={getattr(self, phase)!r}" for phase in PHASES
                                    if getattr(self, phase)])


PHASES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Latency))

NONE = Latency()

# A real oVirt 4.5 engine (ovirt-engine 4.5.x, vdsm 4.50, ovirt-imageio 2.4) with its shipped
# configuration. The engine's asynchronous commands advance only when CommandCallbacksPoller runs
# their callback: every AsyncCommandPollingLoopInSeconds (1 s), with a command's delay doubling
# while its status does not change, up to AsyncCommandPollingRateInSeconds (10 s), and reset to
# 1 s when a child command ends (oVirt/ovirt-engine backend/manager/modules/bll/src/main/java/
# org/ovirt/engine/core/bll/tasks/CommandCallbacksPoller.java; the values in packaging/dbscripts/
# upgrade/pre_upgrade/0000_config.sql). SPM tasks (volume creation and deletion) are polled by
# AsyncTaskManager every AsyncTaskPollingRate (10 s, same 0000_config.sql; bll/tasks/
# AsyncTaskManager.java).
REAL = Latency(
    # HybridBackupCommand.executeCommand (cluster level 4.7+, the 4.5 default) creates the
    # backup's snapshot (CreateSnapshotForVm -> CreateSnapshotCommand: VDSCommandType.CreateVolume,
    # an SPM task polled every 10 s, then the live VM.snapshot); its callback then sees the child
    # done and performNextOperation creates the checkpoint and sets READY (bll/storage/backup/
    # HybridBackupCommand.java). A live backup (StartVmBackupCommand) creates scratch disks the
    # same way before VM.start_backup. Measured during the 4.5 cycle (March 2022): backup_vm.py printed
    # "[ 0.4 ] Waiting until backup ... is ready" and "[ 21.6 ] Created checkpoint" (an
    # incremental backup; https://github.com/oVirt/python-ovirt-engine-sdk4/pull/60).
    ready=20.0,
    # TransferDiskImageCommand.handleImageIsReadyForTransfer -> startImageTransferSession: the
    # host prepares the image (and starts an NBD server for a hybrid or cold backup), then
    # addImageTicketToDaemon and addImageTicketToProxy before TRANSFERRING (bll/storage/disk/image/
    # TransferDiskImageCommand.java). upload_disk.py printed "[ 5.7 ] Creating image transfer..."
    # and "[ 7.4 ] Transfer ID: ..." (https://github.com/oVirt/ovirt-imageio/issues/76). The real
    # engine spends it inside the POST; the lab shows it as phase initializing.
    transfer=2.0,
    # HybridBackupCommand.performNextOperation runs on the callback's next poll after the stop
    # (its delay has grown to 10 s while the backup was ready), starts RemoveSnapshot and shows
    # REMOVING_SNAPSHOT (API: finalizing). The live merge takes a callback poll per step
    # (RemoveSnapshotSingleDiskLiveCommand: EXTEND, MERGE, MERGE_STATUS, DESTROY_IMAGE,
    # REDUCE_IMAGE, COMPLETE), DESTROY_IMAGE being an SPM task polled every 10 s; the parent then
    # ends SUCCEEDED a poll later: about 5 s (half the 10 s poll) + 6 steps of 1-2 s + 10 s.
    backup_finalize=25.0,
    # handleFinalizingSuccess runs on the transfer callback's next poll (at most 10 s later),
    # removes the tickets and tears the image down; endSuccessfully sets FINISHED_SUCCESS a 1 s
    # poll after (TransferDiskImageCommand.java). upload_disk.py printed "[ 330.5 ] Finalizing
    # image transfer..." and "[ 333.6 ] Upload completed successfully"
    # (https://github.com/oVirt/ovirt-imageio/issues/76).
    transfer_finalize=3.0,
    # DeleteVmCheckpointCommand.executeCommand: for a running VM a synchronous VM.delete_checkpoints
    # (after redefining the checkpoint), then the row is removed (bll/storage/backup/
    # DeleteVmCheckpointCommand.java). checkpoints.py purge removed one checkpoint of a running VM
    # every 0.1 s ("[ 0.1 ] Removing checkpoint ..." "[ 0.2 ] Checkpoint ... removed successfully";
    # https://github.com/oVirt/python-ovirt-engine-sdk4/pull/35).
    checkpoint_delete=0.1,
)

_BASES = {"none": NONE, "real": REAL}


def parse_latency(text: str, scale: float = 1.0) -> Latency:
    """Return the latency a ``--latency`` value gives, every figure multiplied by ``scale``.

    ``text`` is ``none``, ``real``, or comma-separated ``PHASE=SECONDS`` items that override the
    ``REAL`` figures, or those of a leading ``none`` or ``real``. Raises ``LatencyError`` for an
    unknown phase, a value that is not a number, a negative number or a negative scale.
    """
    items = [item.strip() for item in text.split(",")]
    if not text.strip() or any(not item for item in items):
        raise LatencyError(f"empty latency item in {text!r}; give none, real or PHASE=SECONDS,...")
    base = REAL
    if items[0].lower() in _BASES:
        base = _BASES[items.pop(0).lower()]
    overrides: dict[str, float] = {}
    for item in items:
        phase, sep, value = item.partition("=")
        phase = phase.strip()
        if not sep:
            raise LatencyError(f"latency item {item!r} is not PHASE=SECONDS (none and real come first); "
                               f"phases: {', '.join(PHASES)}")
        if phase not in PHASES:
            raise LatencyError(f"unknown latency phase {phase!r}; known: {', '.join(PHASES)}")
        if phase in overrides:
            raise LatencyError(f"latency phase {phase!r} is given twice")
        try:
            seconds = float(value)
        except ValueError:
            raise LatencyError(f"latency {phase}={value.strip()!r} is not a number of seconds") from None
        overrides[phase] = seconds
    return dataclasses.replace(base, **overrides).scaled(scale)


class PhaseClock:
    """When each object entered a slow phase, and the actions deferred until one has passed.

    The engine model keeps its phases; it asks ``due`` before leaving a slow one. Deferred
    actions run from ``run_due``, which the engine calls between requests.
    """

    def __init__(self, latency: Latency = NONE, clock: Callable[[], float] = time.monotonic):
        self.latency = latency
        self._clock = clock
        self._started: dict[tuple[str, str], float] = {}
        self._deferred: dict[tuple[str, str], tuple[float, Callable[[], None]]] = {}

    def start(self, key: str, phase: str) -> None:
        """``key`` (an object id) enters ``phase`` now; a second start (a repeated finalize)
        keeps the first time."""
        if self.latency.seconds(phase):
            self._started.setdefault((key, phase), self._clock())

    def due(self, key: str, phase: str) -> bool:
        """True when ``key`` may leave ``phase``: its seconds have passed since ``start`` (or
        it was never started)."""
        seconds = self.latency.seconds(phase)
        started = self._started.get((key, phase))
        if not seconds or started is None or self._clock() - started >= seconds:
            self._started.pop((key, phase), None)
            return True
        return False

    def after(self, key: str, phase: str, action: Callable[[], None]) -> None:
        """Run ``action`` once ``phase`` has lasted its seconds (at once without latency).

        A second call for the same ``key`` and ``phase`` while the first waits is ignored.
        """
        seconds = self.latency.seconds(phase)
        if not seconds:
            action()
        elif (key, phase) not in self._deferred:
            self._deferred[(key, phase)] = (self._clock() + seconds, action)

    def pending(self, key: str, phase: str) -> bool:
        """True while an ``after`` action for ``key`` and ``phase`` waits."""
        return (key, phase) in self._deferred

    def run_due(self) -> None:
        """Run the deferred actions whose time has come, oldest first; one that fails is logged
        (the engine keeps running, as after a failed command)."""
        now = self._clock()
        for entry, (when, action) in sorted(self._deferred.items(), key=lambda item: item[1][0]):
            if when <= now:
                del self._deferred[entry]
                try:
                    action()
                except Exception:
                    log.exception("deferred %s of %s failed", entry[1], entry[0])
