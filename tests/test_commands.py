"""The commands as an operator meets them, through the real program against the lab: errors a
user makes, dry runs, quiet output, Borg-shaped JSON, one spelling for each thing, config
validate and generate."""

from __future__ import annotations

import itertools
import json
import os
import pty
import re
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ovirt_borg.progress import human_size

from conftest import make_job
from helpers import file_sha256

OVIRT_BORG = str(Path(sys.executable).parent / "ovirt-borg")
_names = itertools.count(1)
# Lab calls that start, change or end something on the engine.
READS = re.compile(r"(\.get|\.list|\.disks|^sso\..*)$")


def set_options(job, **sections: dict) -> None:
    """Append options to the job's configuration (sections it does not have yet)."""
    text = job.config.read_text()
    for section, values in sections.items():
        text += f"\n[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
    job.config.write_text(text)


def replace_engine_url(job, url: str) -> None:
    data = job.config.read_text()
    job.config.write_text(re.sub(r'(?m)^url = ".*"$', f'url = "{url}"', data, count=1))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("ERROR")]


def one_error_line(proc) -> str:
    """The single ERROR line a refused run prints, with no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = error_lines(proc.stderr)
    return line


# -- errors a user makes -------------------------------------------------------------------------


def test_config_naming_a_directory_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([OVIRT_BORG, "-c", str(tmp_path), "list"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"ERROR ovirt_borg: {tmp_path}: is a directory, not a configuration "
                                                "file (-c names a job's TOML file, as /etc/ovirt-borg/NAME.toml)"]


def test_values_refused_at_load_name_the_file_and_the_key(job):
    good = job.config.read_text()
    set_options(job, transfer={"read_timeout": -5})
    proc = job.run("backup", "vm1", expect=2)
    assert one_error_line(proc).endswith(f"{job.config}: 'transfer.read_timeout' must be positive (got -5)")
    job.config.write_text(good.replace("poll_interval", "pol_interval"))
    proc = job.run("list", expect=2)
    line = one_error_line(proc)
    assert f"{job.config}: unknown key 'engine.pol_interval'; did you mean 'poll_interval'?" in line


def test_an_engine_url_without_the_api_path_says_so(job):
    replace_engine_url(job, re.sub(r"/ovirt-engine/api$", "", job.lab.url))
    proc = job.run("backup", "vm1", expect=2)
    assert "'engine.url' must be the engine's API URL, ending in /ovirt-engine/api" in one_error_line(proc)


def test_a_host_name_that_does_not_resolve_is_said_once(job):
    replace_engine_url(job, "https://no-such-engine.invalid/ovirt-engine/api")
    proc = job.run("backup", "vm1", expect=4)
    line = one_error_line(proc)
    assert "cannot resolve the engine's host name 'no-such-engine.invalid'" in line
    assert "CA" not in line and "ca_file" not in line
    assert "retrying" not in proc.stderr, "a name that does not resolve is not repeated"


def test_a_refused_connection_names_the_host_and_port(job):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replace_engine_url(job, f"https://127.0.0.1:{port}/ovirt-engine/api")
    text = job.config.read_text().replace("poll_interval = 0.05", "poll_interval = 0.05\nretries = 1")
    job.config.write_text(text)
    proc = job.run("backup", "vm1", expect=4)
    assert f"cannot connect to the engine at 127.0.0.1:{port}" in one_error_line(proc)
    assert len(re.findall(r"WARNING .*retrying", proc.stderr)) == 1, "refused (restarting?) is repeated"


def test_unknown_vm_names_suggest_the_nearest(job, lab_vm):
    proc = job.run("backup", lab_vm["name"] + "x", expect=11)
    assert f"no VM named '{lab_vm['name']}x' on the engine; did you mean '{lab_vm['name']}'?" in one_error_line(proc)


# -- dry runs ------------------------------------------------------------------------------------


def tree(path: Path) -> dict[str, str]:
    """Every file below ``path`` (relative name -> sha256), {} when it does not exist."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): file_sha256(p)
            for p in sorted(path.rglob("*")) if p.is_file()}


def untouched(job) -> dict:
    """What a dry run must leave as it is: the engine's writes, what is open, imageio's bytes,
    the repository and the state directory."""
    stats = job.lab.stats()
    return {"writes": {k: v for k, v in stats["calls"].items() if not READS.search(k)},
            "open": (stats["open_backups"], stats["open_transfers"]),
            "imageio": (stats["imageio.host.bytes"], stats["imageio.proxy.bytes"]),
            "repository": tree(job.repo), "state": tree(job.dir / "state")}


@pytest.fixture
def dry_vm(lab_clean):
    """An up VM with two 8 MiB disks and a direct LUN (which the engine does not back up)."""
    name = f"dry{next(_names)}-{os.getpid()}"
    lab_clean.add_vm(name, disks=2, size="8M")
    lab_clean.add_disk(name, size="2M", storage_type="lun")
    try:
        yield name
    finally:
        lab_clean.delete_vm(name)


def test_dry_run_decides_as_the_run_does_and_changes_nothing(job, dry_vm):
    vm = dry_vm
    before = untouched(job)
    proc = job.run("backup", vm, "--dry-run", expect=1)  # exit 1: the LUN is not backed up
    assert untouched(job) == before and before["state"] == {}
    lines = proc.stdout.splitlines()
    assert re.fullmatch(rf"{vm} \(up\): full \(no previous backup of this VM in this repository\), into "
                        rf"ovirt-{vm}-\S+Z; live or snapshot-based backup, as the engine chooses", lines[0]), lines
    assert any(re.fullmatch(rf"  {vm}_Disk1 \(cow, 8.0 MiB\): full", line) for line in lines), lines
    assert any("not backed up: it is a direct LUN" in line for line in lines), lines
    assert lines[-1] == ("dry run: 1 VMs selected: 1 full, 0 incremental, 0 skipped; nothing was started on "
                         "the engine or written")
    first = job.backup(vm, expect=1)[vm]
    job.lab.write(vm, disk=2, percent=5)
    before = untouched(job)
    proc = job.run("backup", vm, "--dry-run", "--json", expect=1)
    assert untouched(job) == before
    doc = json.loads(proc.stdout)
    assert doc["dry_run"] is True and doc["exit_code"] == 1 and doc["totals"]["incremental"] == 1
    [plan] = doc["archives"]
    assert plan["mode"] == "incremental"
    assert plan["reason"] == f"from checkpoint {first['checkpoint']} of {first['archive']}"
    assert [d["mode"] for d in plan["disks"]] == ["incremental", "incremental"]
    assert [d["id"] for d in plan["skipped_disks"]] == [job.lab.vm_info(vm)["disks"][2]["id"]]
    second = job.backup(vm, expect=1)[vm]
    assert (second["mode"], second["reason"], second["path"]) == (plan["mode"], plan["reason"], plan["path"])
    # --full, and a powered-off VM that may not be backed up cold
    plan = json.loads(job.run("backup", vm, "--dry-run", "--full", "--json", expect=1).stdout)["archives"][0]
    assert (plan["mode"], plan["reason"]) == ("full", "a full backup was requested (--full)")
    job.lab.stop_vm(vm)
    set_options(job, backup={"cold_backup": False})
    before = untouched(job)
    plan = json.loads(job.run("backup", vm, "--dry-run", "--json", expect=1).stdout)["archives"][0]
    assert untouched(job) == before
    assert (plan["status"], plan["mode"], plan["path"]) == ("down", "full", "engine-transfer")
    third = job.backup(vm, expect=1)[vm]
    assert (third["mode"], third["reason"], third["path"]) == (plan["mode"], plan["reason"], plan["path"])


def test_dry_run_of_the_hosted_engine_says_it_would_be_skipped(job, lab_clean):
    name = f"he{next(_names)}-{os.getpid()}"
    lab_clean.add_vm(name, disks=1, size="2M", origin="managed_hosted_engine")
    try:
        proc = job.run("backup", name, "--dry-run", expect=1)
        assert proc.stdout.splitlines()[0].startswith(f"{name}: would be skipped: it is the hosted engine's VM")
    finally:
        lab_clean.delete_vm(name)


def test_an_empty_selection_takes_every_vm_and_says_how_many(job, lab_vm):
    everything = [vm["name"] for vm in job.lab.describe()["vms"]]
    proc = job.run("backup", "--all", "--dry-run", "--json", expect=None)
    assert proc.returncode in (0, 1), proc.stderr
    assert sorted(p["vm"] for p in json.loads(proc.stdout)["archives"]) == sorted(everything)
    assert (f"[selection] names no VMs, tags or clusters: every VM of the engine is selected: "
            f"{len(everything)} of {len(everything)} (0 excluded)") in proc.stderr
    set_options(job, selection={"exclude": [lab_vm["name"]]})
    proc = job.run("backup", "--all", "--dry-run", expect=None)
    assert f"is selected: {len(everything) - 1} of {len(everything)} (1 excluded)" in proc.stderr
    assert "every VM of the engine" in job.run("generate-config").stdout


# -- output --------------------------------------------------------------------------------------


def test_default_output_is_one_line_per_vm_and_a_summary(job, two_vms):
    a, b = two_vms
    proc = job.run("backup", a, b)
    lines = proc.stdout.splitlines()
    assert len(lines) == 3, lines
    for vm, line in zip(two_vms, lines):
        assert re.fullmatch(rf"{vm}: full, read \d+\.\d MiB in \d+\.\d s \(\d+\.\d [KMG]iB/s\), "
                            rf"archive ovirt-{vm}-\S+Z", line), line
    assert re.fullmatch(r"2 of 2 VMs backed up \(2 full, 0 incremental\), 0 failed, 0 skipped; read \d+\.\d MiB "
                        r"in \d+\.\d s; exit 0", lines[2]), lines[2]
    log = proc.stderr.splitlines()
    assert [re.sub(r"into \S+ \(.*\)$", "", line) for line in log] == [
        f"INFO ovirt_borg.backup: VM {a} (1 of 2): full backup ", f"INFO ovirt_borg.backup: VM {b} (2 of 2): full backup "]
    # -v: each disk's plan and each file the archive gets, rates in MiB/s
    job.lab.write(a, disk=1, percent=5)
    proc = job.run("-v", "backup", a, "--json")
    assert re.search(rf"DEBUG ovirt_borg.archive.borg14: {a}/vm.ovf: 1 blocks .* \d+\.\d MiB/s", proc.stderr), proc.stderr
    assert "MB/s" not in proc.stderr


def test_the_bitmap_check_reads_are_counted_as_read(job, lab_vm):
    vm = lab_vm["name"]
    job.backup(vm)
    proc = job.run("-v", "backup", vm, "--json")  # nothing changed: only the sampled clean blocks are read
    result = json.loads(proc.stdout)["archives"][0]
    read = sum(d["bytes_read"] for d in result["disks"])
    assert result["mode"] == "incremental" and read > 0
    assert re.search(rf"0 to read \(0 bytes[^)]*\), after {read} bytes read to check the dirty bitmap", proc.stderr), \
        proc.stderr
    assert re.search(rf"{re.escape(human_size(read))} read in \d+\.\d s", proc.stderr), proc.stderr
    proc = job.run("backup", vm)
    assert re.match(rf"{vm}: incremental, read [1-9]\d*\.\d MiB", proc.stdout), proc.stdout


def test_the_progress_line_says_which_vm_of_how_many(job, two_vms):
    """On a terminal the progress line names 'VM n of m' and the rate of the bytes read."""
    set_options(job, transfer={"bandwidth_limit": "1M"})  # a disk takes seconds: the line is drawn
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([OVIRT_BORG, "-c", str(job.config), "backup", *two_vms], env=job.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the program closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(controller)
    assert proc.wait() == 0
    text = shown.decode(errors="replace")
    for number, vm in enumerate(two_vms, 1):
        assert re.search(rf"VM {number} of 2, {vm}/{vm}_Disk1: +\d+\.\d% of 8\.0 MiB, read [\d.]+ (B|KiB|MiB) at "
                         r"[\d.]+ (B|KiB|MiB)/s, ETA", text), text


# -- JSON in Borg's shape --------------------------------------------------------------------------


def test_json_documents_have_borgs_shape(job, two_vms, lab_clean):
    a, b = two_vms
    repository = json.loads(job.borg("info", "--json", str(job.repo)).stdout)["repository"]["id"]
    expected = {"id": repository, "location": str(job.repo)}
    engine_vm = f"he{next(_names)}-{os.getpid()}"
    lab_clean.add_vm(engine_vm, disks=1, size="2M", origin="managed_hosted_engine")
    try:
        proc = job.run("backup", a, b, engine_vm, "--json", expect=1)
    finally:
        lab_clean.delete_vm(engine_vm)
    doc = json.loads(proc.stdout)
    assert list(doc) == ["repository", "archives", "totals", "exit_code"]
    assert doc["repository"] == expected and doc["exit_code"] == proc.returncode == 1
    assert [r["vm"] for r in doc["archives"]] == sorted([a, b, engine_vm])
    totals = doc["totals"]
    assert {k: totals[k] for k in ("vms", "backed_up", "full", "incremental", "failed", "skipped")} == \
        {"vms": 3, "backed_up": 2, "full": 2, "incremental": 0, "failed": 0, "skipped": 1}
    assert totals["bytes_read"] == sum(d["bytes_read"] for r in doc["archives"] for d in r["disks"]) > 0
    listing = json.loads(job.run("list", "--json").stdout)
    assert list(listing) == ["repository", "archives"] and listing["repository"] == expected
    assert [r["name"] for r in listing["archives"]] == [r["archive"] for r in doc["archives"] if r["ok"]]
    verified = json.loads(job.run("verify", a, b, "--json").stdout)
    assert list(verified) == ["repository", "archives"] and verified["repository"] == expected
    assert [(r["name"], r["ok"]) for r in verified["archives"]] == [(r["archive"], True) for r in doc["archives"]
                                                                     if r["ok"]]
    set_options(job, retention={"keep_daily": 1})
    pruned = json.loads(job.run("prune", "--dry-run", "--json").stdout)
    assert pruned["repository"] == expected and {a["action"] for a in pruned["archives"]} == {"keep"}
    checkpoints = json.loads(job.run("checkpoints", a, "--json").stdout)
    assert checkpoints["repository"] == expected and [v["vm"] for v in checkpoints["vms"]] == [a]


# -- one spelling for each thing -----------------------------------------------------------------


def test_old_spellings_still_work_with_a_warning(job, lab_vm):
    vm = lab_vm["name"]
    result = job.backup(vm)[vm]
    proc = job.run("verify", "--vm", vm)
    assert "WARNING ovirt_borg: --vm is deprecated and will be removed: use the VM's name as an argument" \
        in proc.stderr and f"{result['archive']}: OK" in proc.stdout
    assert "deprecated" not in job.run("verify", vm).stderr
    disk = lab_vm["disks"][0]["id"]
    proc = job.run("restore", result["archive"], "--disk", disk, "--to-storage-domain", "data1", "--json")
    assert "--to-storage-domain is deprecated and will be removed: use --storage-domain" in proc.stderr
    new_id = json.loads(proc.stdout)["disks"][0]["new_id"]
    proc = job.run("restore", result["archive"], "--disk", disk, "--storage-domain", "data1", "--json")
    assert "deprecated" not in proc.stderr and json.loads(proc.stdout)["disks"][0]["new_id"] != new_id
    help_text = subprocess.run([OVIRT_BORG, "restore", "--help"], capture_output=True, text=True).stdout
    assert "--to-storage-domain" not in help_text and "--storage-domain" in help_text


def test_mount_of_a_missing_archive_is_exit_11(job, lab_vm, tmp_path):
    job.backup(lab_vm["name"])
    proc = job.run("mount", f"ovirt-{lab_vm['name']}-2020-01-01T00:00:00Z", str(tmp_path / "mnt"), expect=11)
    assert "does not exist" in one_error_line(proc)
    assert not (tmp_path / "mnt").exists()


def test_checkpoints_purge_keeps_what_another_job_needs(lab_clean, lab_vm, tmp_path):
    """checkpoints --purge applies the backup's policy: a checkpoint another job sharing the
    state directory starts from is kept (it deleted every checkpoint before the one in use)."""
    vm = lab_vm["name"]
    state = tmp_path / "state"
    onsite, offsite = (make_job(lab_clean, tmp_path / name) for name in ("onsite", "offsite"))
    for job in (onsite, offsite):
        job.config.write_text(re.sub(r'(?m)^directory = ".*"$', f'directory = "{state}"', job.config.read_text()))
    kept_by_one = onsite.config.read_text()
    onsite.config.write_text(kept_by_one + "[checkpoints]\nkeep = 2\n")
    cp0 = onsite.backup(vm)[vm]["checkpoint"]
    cp1 = offsite.backup(vm)[vm]["checkpoint"]
    cp2 = onsite.backup(vm)[vm]["checkpoint"]
    assert [c["id"] for c in lab_clean.stats()["checkpoints"][vm]] == [cp0, cp1, cp2]
    onsite.config.write_text(kept_by_one)  # keep = 1: only what the jobs need
    report = json.loads(onsite.run("checkpoints", vm, "--purge", "--json").stdout)
    [item] = report["vms"]
    assert item["purged"] == [cp0] and item["in_use"] == cp2
    assert [c["id"] for c in item["checkpoints"]] == [cp1, cp2], "the offsite job's next incremental starts at cp1"
    assert offsite.backup(vm)[vm]["mode"] == "incremental"


# -- config validate and generate ----------------------------------------------------------------


def test_config_validate(job, tmp_path):
    proc = job.run("config", "validate")
    assert proc.stdout.splitlines()[0] == f"configuration {job.config}: valid"
    proc = job.run("config", "validate", "--connect")
    assert re.search(rf"engine {re.escape(job.lab.url)}: logged in as {job.lab.user}; \d+ VMs, \d+ selected",
                     proc.stdout), proc.stdout
    assert re.search(rf"repository {re.escape(str(job.repo))}: opened \(id [0-9a-f]{{64}}\)", proc.stdout)
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    wrong.chmod(0o600)
    good = job.config.read_text()
    job.config.write_text(good.replace(str(job.lab.password_file), str(wrong)))
    job.run("config", "validate")  # the file is readable: without --connect that is all
    assert "refused the credentials" in one_error_line(job.run("config", "validate", "--connect", expect=5))
    job.config.write_text(good.replace(f'location = "{job.repo}"', f'location = "{tmp_path / "none"}"'))
    assert one_error_line(job.run("config", "validate", "--connect", expect=9))
    job.config.write_text(good + "\n[transfer]\nreaders = 0\n")
    assert "'transfer.readers' must be from 1 to 16 (got 0)" in one_error_line(job.run("config", "validate", expect=2))


def test_config_generate(tmp_path):
    destination = tmp_path / "job.toml"
    proc = subprocess.run([OVIRT_BORG, "config", "generate", "--destination", str(destination)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_IMODE(destination.stat().st_mode) == 0o600
    sample = subprocess.run([OVIRT_BORG, "config", "generate"], capture_output=True, text=True, check=True).stdout
    assert destination.read_text() + "\n" == sample
    assert subprocess.run([OVIRT_BORG, "generate-config"], capture_output=True, text=True).stdout == sample
    assert tomllib.loads(sample)["engine"]["url"].endswith("/ovirt-engine/api")
    destination.write_text("# mine\n")
    proc = subprocess.run([OVIRT_BORG, "config", "generate", "--destination", str(destination)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "exists; not overwritten (--force replaces it)" in proc.stderr
    assert destination.read_text() == "# mine\n"
    subprocess.run([OVIRT_BORG, "config", "generate", "--destination", str(destination), "--force"], check=True,
                   capture_output=True)
    assert destination.read_text() + "\n" == sample
