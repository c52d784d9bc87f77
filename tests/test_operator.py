"""What an operator sees and gets: journald priorities, Borg-shaped JSON log lines, private
files, warnings about secrets others can read, one VM's bug failing only that VM."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import make_job

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")


def run_into_journal(job, *args: str, stream: Path) -> tuple[int, list[str]]:
    """Run ovirt-borg with stderr on ``stream`` and JOURNAL_STREAM naming it, as systemd does."""
    with open(stream, "wb") as f:
        status = os.fstat(f.fileno())
        env = {**job.env, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        proc = subprocess.run([OVIRT_BORG, "-c", str(job.config), *args], stderr=f, stdout=subprocess.PIPE,
                              env=env, stdin=subprocess.DEVNULL)
    return proc.returncode, stream.read_text().splitlines()


def test_journal_lines_carry_their_syslog_priority(job, lab_vm, tmp_path):
    """Under systemd each line starts with <N>, so `journalctl -p err` finds the errors."""
    password = tmp_path / "engine-password"
    password.write_text(job.lab.password)
    password.chmod(0o644)  # readable by others: a warning
    text = job.config.read_text().replace(str(job.lab.password_file), str(password))
    job.config.write_text(text)
    code, lines = run_into_journal(job, "backup", lab_vm["name"], stream=tmp_path / "stderr")
    assert code == 0, lines
    code, refused = run_into_journal(job, "backup", "no-such-vm", stream=tmp_path / "stderr2")
    assert code == 11, refused
    lines += refused
    priorities = {line[:3] for line in lines}
    assert priorities <= {"<3>", "<4>", "<6>", "<7>"}, lines
    assert any(line.startswith("<3>ERROR ") and "no-such-vm" in line for line in lines), lines
    assert any(line.startswith("<4>WARNING ") and "readable by every user" in line for line in lines), lines
    assert any(line.startswith("<6>INFO ") and lab_vm["name"] in line for line in lines), lines
    # stderr that is not the journal's stream (a redirect inside the unit) gets plain lines
    proc = job.run("backup", lab_vm["name"])
    assert proc.stderr and not re.search(r"^<\d>", proc.stderr, re.M), proc.stderr


def test_log_json_lines_have_borgs_shape_with_vm_and_archive(job, lab_vm):
    proc = job.run("--log-json", "backup", lab_vm["name"], "--json")
    archive = json.loads(proc.stdout)["archives"][0]["archive"]
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert lines
    for line in lines:
        assert line["type"] == "log_message" and isinstance(line["time"], float), line
        assert {"levelname", "name", "message"} <= set(line), line
    about_vm = [line for line in lines if line.get("vm") == lab_vm["name"]]
    assert about_vm and all(line["archive"] == archive for line in about_vm), lines
    assert any("backup into" in line["message"] for line in about_vm), lines


def test_files_are_private_without_systemds_umask(lab_clean, lab_vm, tmp_path):
    """Run from a shell with umask 022: the repository's new files and the state are not readable by others."""
    job = make_job(lab_clean, tmp_path / "job")
    before = {p for p in job.repo.rglob("*")}
    subprocess.run(["sh", "-c", 'umask 022; exec "$@"', "sh", OVIRT_BORG, "-c", str(job.config), "backup",
                    lab_vm["name"]], env=job.env, check=True, capture_output=True)
    created = [p for p in job.repo.rglob("*") if p not in before]
    assert any(p.parent.name.isdigit() for p in created), "a new segment file"
    for path in created + list((job.dir / "state").rglob("*")):
        assert not path.stat().st_mode & 0o077, f"{path} is mode {path.stat().st_mode & 0o777:o}"


def test_a_bug_in_one_vm_fails_that_vm_only(job, two_vms, tmp_path):
    """An unexpected exception (here from a plugin's archive name) fails its VM with exit 2; the
    next VM is still backed up, and the trace is there with -v."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    first, second = two_vms
    (plugins / "broken.py").write_text(f'''
from ovirt_borg.plugins import hookimpl

@hookimpl
def ovirt_borg_archive_name(config, vm, timestamp):
    if vm.name == {first!r}:
        raise ValueError("a bug")
    return None
''')
    job.config.write_text(job.config.read_text() + f'\n[plugins]\ndirectories = ["{plugins}"]\n[hooks.broken]\n')
    proc = job.run("-v", "backup", first, second, "--json", expect=None)
    assert proc.returncode == 2 and proc.stdout, proc.stderr
    results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
    assert results[first]["exit_code"] == 2 and "ValueError" in results[first]["error"]
    assert results[second]["exit_code"] == 0
    job.assert_identical(results[second])
    assert "Traceback" in proc.stderr and "a bug" in proc.stderr


def test_verify_all_verifies_each_vms_newest_archives(job, two_vms):
    first = job.backup(*two_vms)
    job.lab.write(two_vms[0], disk=1, percent=5)
    second = job.backup(*two_vms)
    report = json.loads(job.run("verify", "--all", "--json").stdout)["archives"]
    assert sorted(r["name"] for r in report) == sorted(r["archive"] for r in second.values())
    assert all(r["ok"] for r in report)
    report = json.loads(job.run("verify", "--all", "--last", "2", "--json").stdout)["archives"]
    assert sorted(r["name"] for r in report) == sorted(r["archive"] for r in [*first.values(), *second.values()])
    proc = job.run("verify", "--all", "--vm", two_vms[0], expect=2)
    assert "not allowed with argument" in proc.stderr


def test_verify_all_of_an_empty_repository_is_not_found(job):
    proc = job.run("verify", "--all", expect=11)
    assert "no archives of this job" in proc.stderr
