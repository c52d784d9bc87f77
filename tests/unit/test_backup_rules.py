"""Rules a backup follows towards the engine, as pure functions: the inactivity timeout it asks
for an image transfer, and which checkpoints it purges."""

from __future__ import annotations


def test_the_inactivity_timeout_given_to_the_engine_outlasts_ovirt_borgs_pauses():
    """imageio counts only running reads as activity: the engine's inactivity_timeout must exceed
    the extents query, a bandwidth-limited wait and (cli writer) a borg waiting for its lock."""
    from ovirt_borg.backup import IDLE_SLACK, BackupSettings, transfer_inactivity_timeout
    from ovirt_borg.imageio import TransferSettings

    def timeout(**kw):
        transfer = TransferSettings(**{k: v for k, v in kw.items() if k in ("extents_timeout", "bandwidth_limit")})
        settings = BackupSettings(**{k: v for k, v in kw.items() if k in ("inactivity_timeout", "writer")},
                                  transfer=transfer)
        return transfer_inactivity_timeout(settings, lock_wait=kw.get("lock_wait", 60))

    assert timeout(inactivity_timeout=120, extents_timeout=600.0) == 600 + IDLE_SLACK
    assert timeout(inactivity_timeout=3600, extents_timeout=600.0) == 3600
    assert timeout(inactivity_timeout=1, extents_timeout=1.0, bandwidth_limit=256 << 10) == 16 + IDLE_SLACK
    assert timeout(inactivity_timeout=1, extents_timeout=1.0, writer="cli", lock_wait=300) == 300 + IDLE_SLACK
    assert timeout(inactivity_timeout=1, extents_timeout=1.0, writer="internal", lock_wait=300) == 1 + IDLE_SLACK
    assert timeout(inactivity_timeout=0) == 0  # no limit stays no limit


def test_checkpoint_purge_keeps_what_any_job_needs():
    """Pure: only the head of the chain before the oldest checkpoint any job needs goes."""
    from ovirt_borg.engine import checkpoints_to_purge

    chain = ["c1", "c2", "c3", "c4", "c5"]
    assert checkpoints_to_purge(chain, "c5") == ["c1", "c2", "c3", "c4"]
    assert checkpoints_to_purge(chain, "c5", also_keep=["c3"]) == ["c1", "c2"]
    assert checkpoints_to_purge(chain, "c5", keep=2, also_keep=["c3"]) == ["c1"]
    assert checkpoints_to_purge(chain, "c4", also_keep=["gone", "c5"]) == ["c1", "c2", "c3"]
    assert checkpoints_to_purge(chain, "missing", also_keep=["c3"]) == []
