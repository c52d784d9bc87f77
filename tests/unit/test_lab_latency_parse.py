"""The lab engine's latency: parsing of ``--latency``, scaling, and the phase clock (no lab)."""

from __future__ import annotations

import dataclasses

import pytest

from ovirt_borg.lab import cli as lab_cli
from ovirt_borg.lab.latency import NONE, PHASES, REAL, Latency, LatencyError, PhaseClock, parse_latency


def test_keywords_give_none_and_the_documented_figures():
    assert parse_latency("none") == NONE
    assert NONE.is_none
    assert parse_latency("real") == REAL
    assert parse_latency(" REAL ") == REAL
    assert all(REAL.seconds(phase) > 0 for phase in PHASES)


def test_items_override_the_documented_figures_or_none():
    latency = parse_latency("ready=8,transfer=3")
    assert (latency.ready, latency.transfer) == (8, 3)
    assert latency.backup_finalize == REAL.backup_finalize
    assert parse_latency("real,ready=8") == dataclasses.replace(REAL, ready=8.0)
    only_ready = parse_latency("none, ready = 2.5")
    assert only_ready == Latency(ready=2.5)
    assert parse_latency("ready=0") == dataclasses.replace(REAL, ready=0)


def test_scale_multiplies_every_phase():
    scaled = parse_latency("real", 0.1)
    for phase in PHASES:
        assert scaled.seconds(phase) == pytest.approx(REAL.seconds(phase) * 0.1)
    assert parse_latency("real", 0).is_none
    assert REAL.scaled(2).ready == REAL.ready * 2


def test_spec_round_trips():
    for latency in (NONE, REAL, Latency(ready=0.25), parse_latency("real", 0.03)):
        assert parse_latency(latency.spec()) == latency


@pytest.mark.parametrize("text, words", [
    ("fast=1", ["unknown latency phase 'fast'", "ready"]),
    ("ready=-1", ["ready=-1", "negative"]),
    ("transfer=soon", ["transfer='soon'", "not a number"]),
    ("ready=nan", ["not a number"]),
    ("ready=inf", ["not a number"]),
    ("ready", ["not PHASE=SECONDS"]),
    ("ready=1,real", ["'real' is not PHASE=SECONDS"]),
    ("ready=1,ready=2", ["given twice"]),
    ("", ["empty"]),
    ("real,,ready=1", ["empty"]),
])
def test_bad_values_say_what_is_wrong(text, words):
    with pytest.raises(LatencyError) as error:
        parse_latency(text)
    for word in words:
        assert word in str(error.value)


def test_negative_scale_and_unknown_phase_lookups_are_refused():
    with pytest.raises(LatencyError, match="scale"):
        parse_latency("real", -1)
    with pytest.raises(LatencyError, match="negative"):
        Latency(transfer=-0.5)
    with pytest.raises(LatencyError, match="unknown latency phase"):
        REAL.seconds("snapshot")


def test_cli_checks_latency_arguments(capsys):
    parser = lab_cli.build_parser()
    args = parser.parse_args(["up", "--latency", "ready=8,transfer=3", "--latency-scale", "0.5"])
    assert (args.latency, args.latency_scale) == ("ready=8,transfer=3", 0.5)
    assert parser.parse_args(["up"]).latency == "none"
    assert parser.parse_args(["serve", "--latency", "real"]).latency == "real"
    for bad, word in ((["--latency", "ready=-2"], "negative"), (["--latency", "nap=1"], "'nap'"),
                      (["--latency-scale", "-1"], "0 or more"), (["--latency-scale", "x"], "not a number")):
        with pytest.raises(SystemExit):
            parser.parse_args(["up", *bad])
        assert word in capsys.readouterr().err


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_phase_clock_holds_a_phase_for_its_seconds():
    clock = FakeClock()
    delays = PhaseClock(Latency(ready=5, transfer_finalize=1), clock=clock)
    delays.start("b1", "ready")
    assert not delays.due("b1", "ready")
    clock.now += 4.9
    assert not delays.due("b1", "ready")
    clock.now += 0.1
    assert delays.due("b1", "ready")
    assert delays.due("b1", "ready")  # stays due
    assert delays.due("never-started", "ready")
    delays.start("t1", "transfer")  # a phase without latency is due at once
    assert delays.due("t1", "transfer")
    delays.start("t1", "transfer_finalize")
    clock.now += 0.6
    delays.start("t1", "transfer_finalize")  # a second finalize keeps the first start
    clock.now += 0.4
    assert delays.due("t1", "transfer_finalize")


def test_phase_clock_defers_actions_once():
    clock = FakeClock()
    done = []
    delays = PhaseClock(Latency(checkpoint_delete=2), clock=clock)
    delays.after("cp1", "checkpoint_delete", lambda: done.append("cp1"))
    delays.after("cp1", "checkpoint_delete", lambda: done.append("again"))
    assert delays.pending("cp1", "checkpoint_delete")
    delays.run_due()
    assert done == []
    clock.now += 2
    delays.run_due()
    delays.run_due()
    assert done == ["cp1"]
    assert not delays.pending("cp1", "checkpoint_delete")
    PhaseClock(NONE, clock=clock).after("cp2", "checkpoint_delete", lambda: done.append("cp2"))
    assert done == ["cp1", "cp2"]  # without latency at once


def test_a_failing_deferred_action_is_logged_not_raised(caplog):
    clock = FakeClock()
    delays = PhaseClock(Latency(checkpoint_delete=1), clock=clock)

    def broken():
        raise OSError("disk gone")

    delays.after("cp1", "checkpoint_delete", broken)
    clock.now += 1
    delays.run_due()
    assert "deferred checkpoint_delete of cp1 failed" in caplog.text
