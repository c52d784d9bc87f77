"""The night case of the benchmark: one small night end to end through ``python -m bench``. Its
arithmetic, table and options, without a lab, are in tests/unit/test_bench_night_arithmetic.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark is a package of the repository, not of the installed distribution.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.fspath(ROOT))

from bench import report  # noqa: E402
from ovirt_borg.lab.latency import REAL  # noqa: E402

MiB = 1 << 20


@pytest.mark.slow
def test_a_small_night_end_to_end(tmp_path_factory):
    """Two VMs per contender at a fiftieth of the real engine's latency, through the real program."""
    # A short work directory: the lab's unix sockets live below it.
    tmp_path = tmp_path_factory.mktemp("night")
    results_dir = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", "--case", "night", "--quick", "--vms", "2",
                           "--latency-scale", "0.02", "--workdir", os.fspath(tmp_path), "--results-dir",
                           os.fspath(results_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [out] = results_dir.glob("*-night.json")
    results = json.loads(out.read_text())
    assert results["case"] == "night"
    assert set(results["contenders"]) == {report.NIGHT_SEQUENTIAL, report.NIGHT_ONE_RUN}
    assert results["latency"] == REAL.scaled(0.02).as_dict()
    for step in results["steps"]:
        assert [a["mode"] for a in step["extra"]["archives"]] == ["full", "full"]
    # Both contenders moved the same data: two VMs of 48 MiB each.
    assert {step["moved"] for step in results["steps"]} == {2 * 48 * MiB}
    checked = {(i["contender"], i["vm"]) for i in results["images"] if i["identical"]}
    assert checked == {(report.NIGHT_SEQUENTIAL, "night-a-01"), (report.NIGHT_SEQUENTIAL, "night-a-02"),
                       (report.NIGHT_ONE_RUN, "night-b-01"), (report.NIGHT_ONE_RUN, "night-b-02")}
    assert results["reference"]["engine_latency"] == pytest.approx(report.engine_latency(results["latency"]))
    assert {g["goal"].split(" at ")[0] for g in results["goals"]} == {"one run of 2 VMs", "one run"}
    assert "A night of 2 VMs" in proc.stdout
    # The work directory is gone, the results stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
