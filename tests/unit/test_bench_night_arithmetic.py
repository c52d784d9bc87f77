"""The night case of the benchmark without a lab: its arithmetic (the reference from the latency
phases and the data phases, the ratios, the goals), its table and its options. One small night
end to end is in tests/test_bench_night.py."""

import math
import os
import sys
from pathlib import Path

import pytest

# The benchmark is a package of the repository, not of the installed distribution.
sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[2]))

from bench import cli, report  # noqa: E402
from ovirt_borg.lab.latency import NONE, REAL  # noqa: E402

MiB = 1 << 20


def test_engine_latency_of_one_vm_is_the_sum_of_its_phases():
    real = REAL.as_dict()
    # ready 20 + transfer start 2 + transfer finalize 3 + backup finalize 25 + checkpoint delete 0.1
    assert report.engine_latency(real) == pytest.approx(50.1)
    # Each further disk has a transfer of its own.
    assert report.engine_latency(real, disks=3) == pytest.approx(60.1)
    assert report.engine_latency(REAL.scaled(0.1).as_dict()) == pytest.approx(5.01)
    assert report.engine_latency(NONE.as_dict()) == 0


def test_data_phase_is_the_disks_seconds():
    # ovirt-borg's per-disk seconds run from the open transfer to the last block written
    assert report.data_seconds([0.75]) == pytest.approx(0.75)
    assert report.data_seconds([0.5, 2.0]) == pytest.approx(2.5)
    assert report.data_seconds([]) == 0


def test_reference_is_the_data_phases_plus_one_vms_latency():
    real = REAL.as_dict()
    reference = report.night_reference([[0.5], [1.0], [0.25]], real)
    assert reference["vm_data_seconds"] == pytest.approx([0.5, 1.0, 0.25])
    assert reference["data_seconds"] == pytest.approx(1.75)
    assert reference["engine_latency"] == pytest.approx(50.1)
    assert reference["seconds"] == pytest.approx(51.85)
    # The VM with the most disks sets the latency: two transfers.
    assert report.night_reference([[5.5], [5.5, 5.5]], real)["engine_latency"] == pytest.approx(55.1)


def test_ratios_and_goals():
    ratios = report.night_ratios(sequential_wall=300.0, one_run_wall=60.0, reference_seconds=50.0)
    assert ratios == pytest.approx({"sequential_vs_one_run": 5.0, "one_run_vs_reference": 1.2})
    goals = report.night_goals(ratios, vms=20)
    assert [g["met"] for g in goals] == [True, True]
    assert "20 VMs at least 3x faster than 20 backups one after another" in goals[0]["goal"]
    assert "5.00x" in goals[0]["value"] and "1.20x" in goals[1]["value"]
    # The goals' bounds are inclusive: exactly 3x and exactly 1.3x are met.
    assert [g["met"] for g in report.night_goals(report.night_ratios(3.0, 1.0, 1.0 / 1.3), 2)] == [True, True]
    # One after another as fast as the one run, the one run twice the reference: neither met.
    assert [g["met"] for g in report.night_goals(report.night_ratios(100.0, 100.0, 50.0), 2)] == [False, False]
    assert all(math.isnan(v) for v in report.night_ratios(1.0, 0.0, 0.0).values())


def _results():
    latency = REAL.as_dict()
    reference = report.night_reference([[0.5]] * 4, latency)
    row = {"wall": 0.0, "cpu_seconds": 2.0, "lab_cpu_seconds": 1.0, "moved": 192 * MiB, "stored": 160 * MiB}
    contenders = {report.NIGHT_SEQUENTIAL: dict(row, how="4 x ovirt-borg backup VM", wall=220.0),
                  report.NIGHT_ONE_RUN: dict(row, how="backup --all", wall=55.0)}
    ratios = report.night_ratios(220.0, 55.0, reference["seconds"])
    return {"case": "night", "options": {"vms": 4, "disk_size": 64 * MiB, "data_bytes": 48 * MiB,
                                         "prepare_ahead": None, "latency": "real", "latency_scale": 1.0,
                                         "encryption": "repokey-blake2", "compression": "lz4"},
            "machine": {"nproc": 2, "cpu": "cpu", "memory": 1 << 30, "kernel": "k", "python": "3", "borg": "1.4",
                        "ovirt_imageio": "2.5", "qemu": "qemu"}, "load": {},
            "latency": latency, "reference": reference, "contenders": contenders,
            "images": [{"contender": report.NIGHT_SEQUENTIAL, "vm": "night-a-01", "identical": True},
                       {"contender": report.NIGHT_ONE_RUN, "vm": "night-b-01", "identical": True}],
            "goals": report.night_goals(ratios, 4)}


def test_night_table():
    text = report.render(_results())
    assert "A night of 4 VMs" in text
    # One after another over the one run: 220 / 55; the one run over the reference 55 / 52.1.
    assert "4.00x" in text and "1.06x" in text
    assert "data phases 2.00 s + one VM's engine latency 50.10 s" in text
    assert "night-a-01 (one after another); night-b-01 (ovirt-borg, one run)" in text
    assert "[NOT met] one run of 4 VMs at least 3x" not in text and "[met] one run at most 1.3x" in text
    assert report.render(_results(), markdown=True).count("|---|") == 1


def test_night_options():
    defaults = cli.night_options_from(cli.parser().parse_args(["--case", "night"]))
    assert (defaults.vms, defaults.latency, defaults.latency_scale, defaults.prepare_ahead) == (20, "real", 1.0, None)
    assert defaults.disk_size == 64 * MiB
    quick = cli.night_options_from(cli.parser().parse_args(["--case", "night", "--quick"]))
    assert (quick.vms, quick.latency_scale) == (4, 0.1)
    given = cli.night_options_from(cli.parser().parse_args(
        ["--case", "night", "--quick", "--vms", "2", "--latency-scale", "0.5", "--latency", "none,ready=3",
         "--prepare-ahead", "2"]))
    assert (given.vms, given.latency_scale, given.latency, given.prepare_ahead) == (2, 0.5, "none,ready=3", 2)


@pytest.mark.parametrize("argv, message", [
    (["--vms", "3"], "--vms applies to --case night only"),
    (["--case", "night", "--vms", "0"], "--vms must be at least 1"),
    (["--case", "night", "--latency-scale", "-1"], "--latency-scale must be 0 or more"),
])
def test_night_options_refused_before_any_lab(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        cli.main([*argv, "--workdir", os.fspath(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_night_latency_spec_is_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["--case", "night", "--latency", "ready=soon"])
    assert "not a number of seconds" in capsys.readouterr().err
