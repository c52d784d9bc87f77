"""The hook contract, end to end: every hook in hookspecs.py through the real CLI and the lab.

A plugin file, ``recorder.py``, sits in a temporary ``[plugins] directories`` directory and is
enabled by ``[hooks.recorder]``. It writes every call it gets into a JSON-lines file and,
depending on its options, selects VMs, names archives, vetoes a VM or raises. The tests run
``ovirt-borg backup`` against the lab with real Borg repositories and check what the plugin
saw, the exit code, and what was (or was not) written.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from conftest import Job, make_job
from helpers import file_sha256
from ovirt_borg import hookspecs


RECORDER = '''\
"""Records every hook call into a JSON-lines file; its options make it select, name, veto or raise."""

import json

from ovirt_borg.plugins import hookimpl

OPTIONS = ("log", "select", "archive_tag", "veto", "raise_in", "raise_for")
_options = {}


def configure(options):
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}")
    _options.clear()
    _options.update(options)


def _record(hook, **data):
    with open(_options["log"], "a") as f:
        f.write(json.dumps({"hook": hook, **data}) + "\\n")
    if hook in _options.get("raise_in", []):
        raise RuntimeError(f"recorder breaks in {hook}")


@hookimpl
def ovirt_borg_select_vms(config, vms, requested, all_vms):
    _record("select_vms", vms=[vm.name for vm in vms], requested=requested, all_vms=all_vms)
    if "select" not in _options:
        return None
    return [vm for vm in vms if vm.name.startswith(_options["select"])]


@hookimpl
def ovirt_borg_archive_name(config, vm, timestamp):
    _record("archive_name", vm=vm.name, timestamp=timestamp)
    if "archive_tag" not in _options:
        return None
    return f"{config.repository.prefix}{vm.name}-{timestamp}.{_options['archive_tag']}"


@hookimpl
def ovirt_borg_run_started(config, command, vms):
    _record("run_started", command=command, vms=[vm.name for vm in vms])


@hookimpl
def ovirt_borg_before_vm(config, vm):
    _record("before_vm", vm=vm.name)
    if vm.name == _options.get("raise_for"):
        raise RuntimeError(f"recorder breaks for {vm.name}")
    if vm.name == _options.get("veto"):
        return f"vetoed by recorder for {vm.name}"
    return None


@hookimpl
def ovirt_borg_vm_finished(config, vm, result):
    _record("vm_finished", vm=vm.name, result=result)


@hookimpl
def ovirt_borg_backup_failed(config, vm, error, exit_code):
    _record("backup_failed", vm=vm.name, error=error, exit_code=exit_code)


@hookimpl
def ovirt_borg_run_finished(config, command, results, exit_code):
    _record("run_finished", command=command, results=results, exit_code=exit_code)
'''


def toml_table(name: str, options: dict) -> str:
    """A TOML table; JSON strings and lists of strings are valid TOML values."""
    return f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())


def recorder_job(lab, directory: Path, plugin_files: dict[str, dict], extra: str = "") -> Job:
    """A job whose config enables the recorder plugin once per entry of ``plugin_files``
    (file name -> options; the call log goes to ``<directory>/<name>.jsonl``)."""
    plugins = directory / "plugins"
    plugins.mkdir(parents=True)
    toml = toml_table("plugins", {"directories": [str(plugins)]})
    for name, options in plugin_files.items():
        (plugins / f"{name}.py").write_text(RECORDER)
        toml += toml_table(f"hooks.{name}", {"log": str(directory / f"{name}.jsonl"), **options})
    return make_job(lab, directory, toml + extra)


def calls(job: Job, name: str = "recorder") -> list[dict]:
    path = job.dir / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def hooks_called(records: list[dict]) -> list[str]:
    return [r["hook"] for r in records]


def state_files(job: Job, vm_id: str) -> list[Path]:
    return [p for p in (job.dir / "state").rglob("*") if vm_id in p.name]


def test_selection_archive_name_and_run_hooks(lab_clean, two_vms, tmp_path):
    a, b = two_vms
    job = recorder_job(lab_clean, tmp_path / "job", {"recorder": {"select": a, "archive_tag": "nightly"}})
    results = job.backup("--all")
    assert list(results) == [a], "the plugin selects only VM a out of every VM on the engine"
    result = results[a]
    timestamp = [r for r in calls(job) if r["hook"] == "archive_name"][0]["timestamp"]
    assert result["archive"] == f"ovirt-{a}-{timestamp}.nightly"
    assert job.archives() == [result["archive"]]
    job.assert_identical(result)

    records = calls(job)
    assert hooks_called(records) == ["select_vms", "run_started", "before_vm", "archive_name",
                                     "vm_finished", "run_finished"]
    selected = records[0]
    assert selected["all_vms"] is True and selected["requested"] == []
    assert {a, b} <= set(selected["vms"]), "select_vms is given every VM of the engine"
    assert records[1] == {"hook": "run_started", "command": "backup", "vms": [a]}
    finished = records[4]["result"]
    assert finished["mode"] == "full" and finished["archive"] == result["archive"]
    assert [d["id"] for d in finished["disks"]] == [d["id"] for d in result["disks"]]
    assert finished["disks"][0]["bytes_read"] > 0
    run = records[5]
    assert run["exit_code"] == 0 and run["command"] == "backup"
    assert [r["vm"] for r in run["results"]] == [a] and run["results"][0]["ok"] is True

    # a custom name does not break the chain: the next run is an incremental on top of it
    job.lab.write(a, disk=1, offset=0, length=65536)
    second = job.backup("--all")[a]
    assert second["mode"] == "incremental", second["reason"]
    assert second["archive"].startswith(f"ovirt-{a}-") and second["archive"].endswith(".nightly")
    job.assert_identical(second)

    # verify and restore find the VM's files in a tagged archive
    job.run("verify", second["archive"])
    job.run("verify", a)
    out = tmp_path / "restored"
    job.run("restore", second["archive"], "--to-dir", str(out))
    for index, disk in enumerate(second["disks"]):
        assert file_sha256(out / f"{disk['alias']}-{disk['id']}.raw") == job.lab_image_sha(a, index)


def test_before_vm_veto_skips_the_vm_and_writes_nothing(lab_clean, two_vms, tmp_path):
    a, b = two_vms
    job = recorder_job(lab_clean, tmp_path / "job", {"recorder": {"veto": b}})
    proc = job.run("backup", a, b, "--json", expect=1)
    results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
    assert results[a]["ok"] is True
    job.assert_identical(results[a])
    assert results[b]["ok"] is False and results[b]["exit_code"] == 1
    assert results[b]["error"] == f"skipped: vetoed by recorder for {b}"
    assert f"VM {b} skipped: vetoed by recorder for {b}" in proc.stderr

    # nothing for b: no archive, no sidecar, no engine backup or checkpoint
    assert job.archives() == [results[a]["archive"]]
    b_id = lab_clean.vm_info(b)["id"]
    assert state_files(job, b_id) == []
    stats = lab_clean.stats()
    assert stats["checkpoints"][b] == [] and stats["open_backups"] == []

    records = calls(job)
    assert [r["vm"] for r in records if r["hook"] == "before_vm"] == [a, b]
    assert [r["vm"] for r in records if r["hook"] == "vm_finished"] == [a]
    assert "backup_failed" not in hooks_called(records), "a veto is not a failure"
    run = records[-1]
    assert run["hook"] == "run_finished" and run["exit_code"] == 1
    assert {r["vm"]: r["ok"] for r in run["results"]} == {a: True, b: False}


def test_plugin_raising_in_before_vm_fails_that_vm_alone(lab_clean, two_vms, tmp_path):
    """A plugin that may veto and raises instead: its VM is not backed up (the plugin may have
    meant to stop it), the others are, the run exits 2 and the plugin is named."""
    a, b = two_vms
    job = recorder_job(lab_clean, tmp_path / "job", {"recorder": {"raise_for": a}})
    proc = job.run("backup", a, b, "--json", expect=2)
    results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
    assert results[b]["ok"] is True
    job.assert_identical(results[b])
    assert results[a]["ok"] is False and results[a]["exit_code"] == 2
    error = results[a]["error"]
    assert error.startswith("plugin recorder failed before the VM's backup: recorder breaks for "), error
    assert f"VM {a}: backup failed: {error}" in proc.stderr
    assert "Traceback" not in proc.stderr, "the trace is for -v"
    assert job.archives() == [results[b]["archive"]]
    assert state_files(job, lab_clean.vm_info(a)["id"]) == []
    assert lab_clean.stats()["open_backups"] == []
    records = calls(job)
    assert [r for r in records if r["hook"] == "backup_failed"] == [
        {"hook": "backup_failed", "vm": a, "error": error, "exit_code": 2}]


def test_backup_failed_gets_the_error_and_exit_code(lab_clean, two_vms, tmp_path):
    job = recorder_job(lab_clean, tmp_path / "job", {"recorder": {}})
    lab_clean.fault("engine_500:backups.add", times=1)  # the first VM's backup cannot start
    proc = job.run("backup", *two_vms, "--json", expect=4)
    results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
    failed = [vm for vm in two_vms if not results[vm]["ok"]]
    assert len(failed) == 1, results
    bad, = failed
    good, = set(two_vms) - {bad}
    job.assert_identical(results[good])
    assert job.archives() == [results[good]["archive"]], "the failed VM left no archive"

    records = calls(job)
    failures = [r for r in records if r["hook"] == "backup_failed"]
    assert failures == [{"hook": "backup_failed", "vm": bad, "error": results[bad]["error"], "exit_code": 4}]
    assert "HTTP 500" in failures[0]["error"], failures[0]["error"]
    assert [r["vm"] for r in records if r["hook"] == "vm_finished"] == [good]
    run = records[-1]
    assert run["hook"] == "run_finished" and run["exit_code"] == 4
    assert {r["vm"]: r["exit_code"] for r in run["results"]} == {good: 0, bad: 4}
    assert lab_clean.stats()["open_backups"] == []


def test_plugin_raising_in_notification_hooks_does_not_fail_the_backup(lab_clean, lab_vm, tmp_path):
    vm = lab_vm["name"]
    broken = ["run_started", "vm_finished", "run_finished"]
    # 'broken' raises in every notification hook it gets; 'witness' (loaded after it) must still hear them
    job = recorder_job(lab_clean, tmp_path / "job", {"broken": {"raise_in": broken}, "witness": {}})
    proc = job.run("backup", vm, "--json")
    result = json.loads(proc.stdout)["archives"][0]
    assert result["ok"] is True
    job.assert_identical(result)
    for hook in broken:
        assert f"WARNING ovirt_borg.plugins: plugin broken failed in ovirt_borg_{hook}: " \
               f"recorder breaks in {hook}" in proc.stderr
    assert hooks_called(calls(job, "broken")) == hooks_called(calls(job, "witness")) == [
        "select_vms", "run_started", "before_vm", "archive_name", "vm_finished", "run_finished"]
    assert calls(job, "witness")[-1]["exit_code"] == 0


def test_entry_point_plugin_is_loaded_and_configured(lab_clean, lab_vm, tmp_path):
    """A plugin installed as a distribution with an 'ovirt_borg' entry point."""
    site = tmp_path / "site"
    (site / "vetoall").mkdir(parents=True)
    (site / "vetoall" / "__init__.py").write_text(textwrap.dedent('''\
        from ovirt_borg.plugins import hookimpl

        reason = "no reason given"


        def configure(options):
            global reason
            reason = options.pop("reason")
            if options:
                raise ValueError(f"unknown option {sorted(options)[0]!r}")


        @hookimpl
        def ovirt_borg_before_vm(config, vm):
            return reason
        '''))
    dist = site / "vetoall-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vetoall\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ovirt_borg]\nvetoall = vetoall\n")
    job = make_job(lab_clean, tmp_path / "job", toml_table("hooks.vetoall", {"reason": "maintenance window"}))
    job.env["PYTHONPATH"] = str(site)
    proc = job.run("backup", lab_vm["name"], "--json", expect=1)
    assert json.loads(proc.stdout)["archives"][0]["error"] == "skipped: maintenance window"
    assert job.archives() == []


def test_unknown_hooks_section_is_a_one_line_config_error(lab_clean, tmp_path):
    job = make_job(lab_clean, tmp_path / "job", toml_table("hooks.nosuch", {"url": "http://127.0.0.1/x"}))
    proc = job.run("backup", "--all", expect=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "[hooks.nosuch]: no plugin named 'nosuch'" in lines[0]
    assert proc.stdout == "" and job.archives() == []


def test_plugin_refusing_its_options_is_a_one_line_config_error(lab_clean, tmp_path):
    job = make_job(lab_clean, tmp_path / "job",
                   toml_table("hooks.healthchecks", {"url": "https://hc-ping.com/x", "bogus": "1"}))
    proc = job.run("backup", "--all", expect=2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "[hooks.healthchecks]: unknown option 'bogus'; known options: timeout, url" in lines[0]


def hookspec_functions() -> dict[str, object]:
    return {name: f for name, f in vars(hookspecs).items()
            if name.startswith("ovirt_borg_") and callable(f)}


def test_every_hookspec_is_exercised_here():
    namespace: dict = {}
    exec(compile(RECORDER, "recorder.py", "exec"), namespace)
    implemented = {name for name in namespace if name.startswith("ovirt_borg_")}
    assert implemented == set(hookspec_functions()), "the recorder must implement every hook"


