"""The ready plugins in hooks/ through the real CLI backup against the lab.

Each plugin runs at least once (a success and a failure), with a real HTTP server on 127.0.0.1
recording what it receives, a real textfile directory, or real shell commands writing to files.
The plugins' other cases, called through a real plugin manager without the lab, are in
tests/unit/test_ready_plugins.py.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import stat
import time
from pathlib import Path

import pytest

from conftest import Job, make_job
from hook_helpers import SECRET, closed_port, parse_textfile, run_metrics, vm_metrics


# -- helpers --------------------------------------------------------------------------------------


def toml_table(name: str, options: dict) -> str:
    return f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())


def hook_job(lab, directory: Path, name: str, options: dict) -> Job:
    return make_job(lab, directory, toml_table(f"hooks.{name}", options))


def set_hook_options(job: Job, name: str, options: dict) -> None:
    text = job.config.read_text()
    start = text.index(f"[hooks.{name}]")
    job.config.write_text(text[:start] + toml_table(f"hooks.{name}", options))


# -- healthchecks ------------------------------------------------------------------------------


def test_healthchecks_through_backups(lab_clean, lab_vm, tmp_path, endpoint):
    vm = lab_vm["name"]
    job = hook_job(lab_clean, tmp_path / "job", "healthchecks", {"url": f"{endpoint.url}/ping/{SECRET}"})
    result = job.backup(vm)[vm]
    start, success = endpoint.requests
    rid = re.fullmatch(rf"/ping/{SECRET}/start\?rid=([0-9a-f-]{{36}})", start["path"])[1]
    assert start["method"] == "POST" and vm in start["body"].decode()
    assert success["path"] == f"/ping/{SECRET}?rid={rid}"
    body = success["body"].decode()
    assert "exit code 0" in body and result["archive"] in body

    # a failed VM: /fail with the error in the body, and a new run id
    endpoint.requests.clear()
    lab_clean.fault("engine_500:backups.add", times=1)
    proc = job.run("backup", vm, "--json", expect=4)
    error = json.loads(proc.stdout)["archives"][0]["error"]
    start, fail = endpoint.requests
    rid2 = re.fullmatch(rf"/ping/{SECRET}/start\?rid=([0-9a-f-]{{36}})", start["path"])[1]
    assert rid2 != rid and fail["path"] == f"/ping/{SECRET}/fail?rid={rid2}"
    assert f"{vm}: FAILED (exit 4): {error}" in fail["body"].decode()

    # Healthchecks down: the backup still succeeds, the warning does not show the secret
    port = closed_port()
    set_hook_options(job, "healthchecks", {"url": f"http://127.0.0.1:{port}/ping/{SECRET}", "timeout": 2})
    proc = job.run("backup", vm, "--json")
    assert json.loads(proc.stdout)["archives"][0]["ok"] is True
    assert f"healthchecks: the start ping to http://127.0.0.1:{port}/**** failed: ConnectionError" in proc.stderr
    assert f"healthchecks: the success ping to http://127.0.0.1:{port}/**** failed" in proc.stderr
    assert SECRET not in proc.stderr


# -- prometheus --------------------------------------------------------------------------------


def test_prometheus_through_backups(lab_clean, two_vms, tmp_path):
    a, b = two_vms
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    prom = textdir / "ovirt-borg.prom"
    job = hook_job(lab_clean, tmp_path / "job", "prometheus", {"path": str(prom), "job": "nightly"})

    before = time.time()
    first = job.backup(a)[a]
    samples = parse_textfile(prom)
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644
    assert sorted(p.name for p in textdir.iterdir()) == ["ovirt-borg.prom"], "no temporary file is left"
    assert ("ovirt_borg_last_run_exit_code", (("job", "nightly"),)) in samples
    assert run_metrics(samples)["ovirt_borg_last_run_exit_code"] == 0
    metrics_a = vm_metrics(samples, a)
    assert before <= metrics_a["ovirt_borg_last_success_timestamp_seconds"] <= time.time()
    assert metrics_a["ovirt_borg_last_duration_seconds"] == pytest.approx(first["seconds"], abs=0.001)
    assert metrics_a["ovirt_borg_bytes_read"] == sum(d["bytes_read"] for d in first["disks"]) > 0
    assert metrics_a["ovirt_borg_blocks_stored"] == sum(d["stored"] for d in first["disks"]) > 0
    assert metrics_a["ovirt_borg_backup_mode/full"] == 1 and metrics_a["ovirt_borg_backup_mode/incremental"] == 0
    assert metrics_a["ovirt_borg_last_exit_code"] == 0
    assert vm_metrics(samples, b) == {}

    # a run of b alone keeps a's values as they were
    job.backup(b)
    samples = parse_textfile(prom)
    assert vm_metrics(samples, a) == metrics_a
    metrics_b = vm_metrics(samples, b)
    assert metrics_b["ovirt_borg_last_exit_code"] == 0 and metrics_b["ovirt_borg_backup_mode/full"] == 1

    # one VM fails: it keeps its last success, with its exit code; the other is incremental
    lab_clean.fault("engine_500:backups.add", times=1)
    proc = job.run("backup", a, b, "--json", expect=4)
    results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
    bad, = [vm for vm in results if not results[vm]["ok"]]
    good, = [vm for vm in results if results[vm]["ok"]]
    old = {a: metrics_a, b: metrics_b}
    samples = parse_textfile(prom)
    assert run_metrics(samples)["ovirt_borg_last_run_exit_code"] == 4
    assert vm_metrics(samples, bad) == {**old[bad], "ovirt_borg_last_exit_code": 4}
    now_good = vm_metrics(samples, good)
    assert now_good["ovirt_borg_backup_mode/incremental"] == 1 and now_good["ovirt_borg_backup_mode/full"] == 0
    assert now_good["ovirt_borg_last_success_timestamp_seconds"] > old[good]["ovirt_borg_last_success_timestamp_seconds"]
    assert now_good["ovirt_borg_blocks_reused"] == sum(d["reused"] for d in results[good]["disks"]) > 0


# -- command -----------------------------------------------------------------------------------


def test_command_hooks_through_backups(lab_clean, two_vms, tmp_path):
    a, b = two_vms
    log = tmp_path / "commands.log"
    out = f">> {shlex.quote(str(log))}"
    job = hook_job(lab_clean, tmp_path / "job", "command", {
        "before_run": f"printf 'before_run %s\\n' {{vms}} {out}",
        "before_vm": [f'echo "before_vm $OVIRT_BORG_VM {{vm}}" {out}',
                      f'test {{vm}} != {b} || {{ echo "{b} is busy"; exit 3; }}'],
        "after_vm": f'echo "after_vm {{vm}} {{archive}} $OVIRT_BORG_MODE" {out}',
        "on_failure": f'printf "%s\\n" "on_failure {{vm}} {{exit_code}} $OVIRT_BORG_ERROR" {out}',
        "after_run": f'echo "after_run {{exit_code}} $OVIRT_BORG_HOOK" {out}',
    })
    proc = job.run("backup", a, b, "--json", expect=1)
    results = {r["vm"]: r for r in json.loads(proc.stdout)["archives"]}
    assert results[b]["error"] == f"skipped: before_vm command 2 of 2 exited with 3: {b} is busy"
    assert job.archives() == [results[a]["archive"]]
    job.assert_identical(results[a])
    assert f"command before_vm[2] (VM {b}): {b} is busy" in proc.stderr, "command output is logged"
    # b is asked before a is finished: its engine backup would be started while a streams
    # ([backup] prepare_ahead)
    assert log.read_text().splitlines() == [
        f"before_run {a}", f"before_run {b}",
        f"before_vm {a} {a}", f"before_vm {b} {b}",
        f"after_vm {a} {results[a]['archive']} full",
        "after_run 1 after_run"]

    log.unlink()
    lab_clean.fault("engine_500:backups.add", times=1)
    proc = job.run("backup", a, "--json", expect=4)
    error = json.loads(proc.stdout)["archives"][0]["error"]
    assert log.read_text().splitlines() == [
        f"before_run {a}", f"before_vm {a} {a}", f"on_failure {a} 4 {error}", "after_run 4 after_run"]


# -- webhook / ntfy ----------------------------------------------------------------------------


def test_webhook_json_through_backups(lab_clean, lab_vm, tmp_path, endpoint):
    vm = lab_vm["name"]
    token = tmp_path / "token"
    token.write_text(f"tk_{SECRET}\n")
    job = hook_job(lab_clean, tmp_path / "job", "webhook", {"url": f"{endpoint.url}/hook/{SECRET}",
                                                            "token_file": str(token)})
    job.backup(vm)
    assert endpoint.requests == [], "when = failure: a successful run sends nothing"

    lab_clean.fault("engine_500:backups.add", times=1)
    proc = job.run("backup", vm, "--json", expect=4)
    error = json.loads(proc.stdout)["archives"][0]["error"]
    request, = endpoint.requests
    assert request["method"] == "POST" and request["path"] == f"/hook/{SECRET}"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["headers"]["Authorization"] == f"Bearer tk_{SECRET}"
    payload = json.loads(request["body"])
    assert payload["status"] == "failure" and payload["exit_code"] == 4 and payload["job"] == "job"
    assert payload["command"] == "backup" and payload["host"] == socket.gethostname()
    assert payload["vms"] == [{"vm": vm, "ok": False, "exit_code": 4, "error": error, "mode": "",
                               "archive": payload["vms"][0]["archive"], "seconds": 0.0, "bytes_read": 0}]
    assert payload["vms"][0]["archive"].startswith(f"ovirt-{vm}-")
    assert SECRET not in proc.stderr

