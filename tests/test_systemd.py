"""The systemd units: they verify, run the right commands, and the timer fires nightly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

UNITS = Path(__file__).resolve().parent.parent / "systemd"
OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")


def instance(tmp_path: Path) -> tuple[Path, Path]:
    """The units as installed for the job 'nightly', ExecStart pointing at this venv's ovirt-borg."""
    service = tmp_path / "ovirt-borg@nightly.service"
    timer = tmp_path / "ovirt-borg@nightly.timer"
    service.write_text((UNITS / "ovirt-borg@.service").read_text().replace("/usr/local/bin/ovirt-borg", OVIRT_BORG))
    timer.write_text((UNITS / "ovirt-borg@.timer").read_text())
    return service, timer


def test_units_verify(tmp_path):
    service, timer = instance(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_service_runs_backup_then_prune_hardened_with_credentials():
    text = (UNITS / "ovirt-borg@.service").read_text()
    execs = re.findall(r"^ExecStart=(.*)$", text, re.M)
    assert execs == ["/usr/local/bin/ovirt-borg -c /etc/ovirt-borg/%i.toml backup --all",
                     "/usr/local/bin/ovirt-borg -c /etc/ovirt-borg/%i.toml prune"]
    for directive in ("Type=oneshot", "SuccessExitStatus=1", "Nice=", "IOSchedulingClass=idle", "ProtectSystem=strict",
                      "PrivateTmp=true", "NoNewPrivileges=true", "ReadWritePaths=/var/lib/ovirt-borg",
                      "LoadCredential=engine-password:", "LoadCredential=borg-passphrase:"):
        assert directive in text, directive
    # no secret on a command line
    assert "password" not in " ".join(execs) and "passphrase" not in " ".join(execs)


def test_service_hardening_scores_ok(tmp_path):
    service, _ = instance(tmp_path)
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
