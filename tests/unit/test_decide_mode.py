"""Full or incremental: the pure decision from the sidecar, the engine and the repository."""

from datetime import datetime, timezone

from ovirt_borg.backup import PATH_BACKUP, PATH_ENGINE_TRANSFER, decide_mode
from ovirt_borg.sidecar import Sidecar

NOW = datetime(2026, 11, 26, 3, 0, tzinfo=timezone.utc)
B = 4 << 20


def sidecar(**kw):
    base = dict(vm_id="v", vm_name="vm1", archive="ovirt-vm1-2026-11-25T03:00:00Z", mode="full",
                reason="", path=PATH_BACKUP, block_size=B, started="2026-11-25T03:00:00Z",
                finished="2026-11-25T03:01:00Z", last_full="2026-11-20T03:00:00Z", disks=(),
                checkpoint_id="c1")
    base.update(kw)
    return Sidecar(**base)


def decide(previous, **kw):
    args = dict(force_full=False, checkpoints={"c0": "created", "c1": "created"}, archive_present=True,
                full_every_days=0, now=NOW, block_size=B)
    args.update(kw)
    return decide_mode(previous, **args)


def test_incremental_when_everything_is_in_place():
    d = decide(sidecar())
    assert (d.mode, d.from_checkpoint) == ("incremental", "c1")


def test_full_cases_say_why():
    cases = [
        (decide(None), "no previous backup"),
        (decide(sidecar(), force_full=True), "--full"),
        (decide(sidecar(checkpoint_id=None)), "no engine checkpoint"),
        (decide(sidecar(path=PATH_ENGINE_TRANSFER)), "no engine checkpoint"),
        (decide(sidecar(), checkpoints={"c0": "created"}), "no longer exists"),
        (decide(sidecar(), checkpoints={"c1": "invalid"}), "is invalid"),
        (decide(sidecar(), archive_present=False), "no longer in the repository"),
        (decide(sidecar(), full_every_days=5), "periodic full"),
        (decide(sidecar(block_size=1 << 20)), "block size changed"),
    ]
    for decision, why in cases:
        assert decision.mode == "full" and decision.from_checkpoint is None
        assert why in decision.reason, (why, decision.reason)


def test_periodic_full_not_due_yet():
    assert decide(sidecar(), full_every_days=7).mode == "incremental"


