"""The systemd units: they verify, run the right commands, the backup timer fires nightly and the
verify timer weekly; only timers can be enabled; a local repository is a documented drop-in."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")


def instance(tmp_path: Path, unit: str = "ovirt-borg") -> tuple[Path, Path]:
    """A unit pair as installed for the job 'nightly' (with the local-repository drop-in),
    ExecStart pointing at this venv's ovirt-borg."""
    service = tmp_path / f"{unit}@nightly.service"
    timer = tmp_path / f"{unit}@nightly.timer"
    service.write_text((UNITS / f"{unit}@.service").read_text().replace("/usr/local/bin/ovirt-borg", OVIRT_BORG))
    timer.write_text((UNITS / f"{unit}@.timer").read_text())
    dropins = tmp_path / f"{unit}@nightly.service.d"
    dropins.mkdir()
    (dropins / "repository.conf").write_text((UNITS / "repository.conf").read_text())
    return service, timer


@pytest.mark.parametrize("unit", ["ovirt-borg", "ovirt-borg-verify"])
def test_units_verify(tmp_path, unit):
    service, timer = instance(tmp_path, unit)
    proc = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_a_drop_in_allows_a_local_repository():
    text = (UNITS / "repository.conf").read_text()
    directives = re.findall(r"^(\w+)=(.*)$", text, re.M)
    assert re.search(r"^\[Service\]$", text, re.M) and directives == [("ReadWritePaths", "/srv/borg/ovirt")]
    for unit in ("ovirt-borg@.service", "ovirt-borg-verify@.service"):
        assert "/srv/borg" not in (UNITS / unit).read_text(), "no repository path hard-coded in " + unit


def test_only_timers_can_be_enabled():
    """Enabling a service by mistake must not run a backup (or verify) at every boot."""
    for unit in ("ovirt-borg@.service", "ovirt-borg-verify@.service"):
        assert not re.search(r"^\[Install\]", (UNITS / unit).read_text(), re.M), unit
    for unit in ("ovirt-borg@.timer", "ovirt-borg-verify@.timer"):
        assert re.search(r"^\[Install\]\nWantedBy=timers.target$", (UNITS / unit).read_text(), re.M), unit


#: Directives newer than systemd 239 (EL8), with the version that brought them (systemd NEWS).
NEWER_THAN_239 = {"LogRateLimitIntervalSec": 240, "RestrictSUIDSGID": 242, "ProtectHostname": 242,
                  "ProtectKernelLogs": 244, "ProtectClock": 245, "ProtectProc": 247, "LoadCredential": 247}


def test_directives_newer_than_el8_say_so():
    """The README's EL8 variant rests on these comments: each newer directive names its version."""
    text = (UNITS / "ovirt-borg@.service").read_text()
    assert "systemd 239 (EL8)" in text
    for directive in set(re.findall(r"^(\w+)=", text, re.M)) & set(NEWER_THAN_239):
        assert re.search(rf"^#.*\b{directive}\b[^(\n]*\(>= {NEWER_THAN_239[directive]}\)", text, re.M), directive


def test_service_runs_backup_then_prune_hardened_with_credentials():
    text = (UNITS / "ovirt-borg@.service").read_text()
    execs = re.findall(r"^ExecStart=(.*)$", text, re.M)
    assert execs == ["/usr/local/bin/ovirt-borg -c /etc/ovirt-borg/%i.toml backup --all",
                     "/usr/local/bin/ovirt-borg -c /etc/ovirt-borg/%i.toml prune"]
    for directive in ("Type=oneshot", "SuccessExitStatus=1", "LogRateLimitIntervalSec=0", "Nice=", "IOSchedulingClass=idle", "ProtectSystem=strict",
                      "PrivateTmp=true", "NoNewPrivileges=true", "ReadWritePaths=/var/lib/ovirt-borg",
                      "LoadCredential=engine-password:", "LoadCredential=borg-passphrase:"):
        assert directive in text, directive
    # no secret on a command line
    assert "password" not in " ".join(execs) and "passphrase" not in " ".join(execs)


def test_verify_service_verifies_every_vm_weekly():
    text = (UNITS / "ovirt-borg-verify@.service").read_text()
    assert re.findall(r"^ExecStart=(.*)$", text, re.M) == [
        "/usr/local/bin/ovirt-borg -c /etc/ovirt-borg/%i.toml verify --all --last 1"]
    assert "LoadCredential=borg-passphrase:" in text and "engine-password" not in text
    timer = (UNITS / "ovirt-borg-verify@.timer").read_text()
    calendar = re.search(r"^OnCalendar=(.*)$", timer, re.M).group(1)
    proc = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True, text=True, check=True)
    assert "Normalized form: Sun *-*-* 12:00:00" in proc.stdout
    assert re.search(r"^Persistent=true$", timer, re.M)


@pytest.mark.parametrize("unit", ["ovirt-borg", "ovirt-borg-verify"])
def test_service_hardening_scores_ok(tmp_path, unit):
    service, _ = instance(tmp_path, unit)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(service)],
                          capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 3.0


def test_timer_is_daily_persistent_and_randomized():
    text = (UNITS / "ovirt-borg@.timer").read_text()
    assert re.search(r"^Persistent=true$", text, re.M)
    assert re.search(r"^RandomizedDelaySec=\S+", text, re.M)
    calendar = re.search(r"^OnCalendar=(.*)$", text, re.M).group(1)
    proc = subprocess.run(["systemd-analyze", "calendar", calendar], capture_output=True, text=True, check=True)
    assert "Normalized form: *-*-* 00:00:00" in proc.stdout
