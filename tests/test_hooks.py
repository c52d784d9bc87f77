"""The ready plugins in hooks/, against real endpoints, files and shells.

Each plugin runs at least once through the real CLI backup against the lab (a success and a
failure), with a real HTTP server on 127.0.0.1 recording what it receives, a real textfile
directory, or real shell commands writing to files. The other cases call the plugins through
a real plugin manager (``plugins.build_manager`` loading the files from hooks/).
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import shlex
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from conftest import Job, make_job
from ovirt_borg import config as config_mod, logs, plugins
from ovirt_borg.engine import VmInfo
from ovirt_borg.errors import ConfigError, Interrupted

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "PLUGINS.md"
SECRET = "9d8c7b6a-5f4e-4d3c-b2a1-0f9e8d7c6b5a"  # stands for a Healthchecks UUID / ntfy topic


# -- a local HTTP endpoint ------------------------------------------------------------------------


class Endpoint:
    """An HTTP server on 127.0.0.1 recording every request; answers ``status`` after ``delay``."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.delay = 0.0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                endpoint.requests.append({"method": self.command, "path": self.path,
                                          "headers": dict(self.headers), "body": body})
                time.sleep(endpoint.delay)
                self.send_response(endpoint.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            do_GET = do_POST = do_HEAD = _serve

            def log_message(self, format, *args):  # keep the test output quiet
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that gave up (timeout)
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def endpoint():
    server = Endpoint()
    try:
        yield server
    finally:
        server.close()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- helpers --------------------------------------------------------------------------------------


def toml_table(name: str, options: dict) -> str:
    return f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())


def hook_job(lab, directory: Path, name: str, options: dict) -> Job:
    return make_job(lab, directory, toml_table(f"hooks.{name}", options))


def set_hook_options(job: Job, name: str, options: dict) -> None:
    text = job.config.read_text()
    start = text.index(f"[hooks.{name}]")
    job.config.write_text(text[:start] + toml_table(f"hooks.{name}", options))


def manager(name: str, options: dict):
    """A real plugin manager with the ready plugin ``name`` loaded from hooks/ and configured."""
    return plugins.build_manager({name: options})


CONFIG = config_mod.from_dict({"engine": {"url": "https://engine.example/ovirt-engine/api"}},
                              source="/etc/ovirt-borg/nightly.toml")
VM = VmInfo(id="6c1a9e0e-0000-4000-8000-000000000001", name="web1", status="up")


def ok_result(vm: str = "web1", mode: str = "full", seconds: float = 2.5) -> dict:
    return {"vm": vm, "vm_id": "id-" + vm, "ok": True, "mode": mode, "reason": "", "path": "backup",
            "archive": f"ovirt-{vm}-2026-11-26T02:00:00Z", "checkpoint": "cp", "seconds": seconds,
            "error": "", "exit_code": 0,
            "disks": [{"id": "d1", "alias": "disk1", "mode": mode, "size": 8 << 20, "blocks": 2, "holes": 0,
                       "reused": 1, "stored": 1, "bytes_read": 4 << 20, "seconds": 1.0}]}


def failed_result(vm: str = "db1", error: str = "the engine failed (HTTP 500)", code: int = 4) -> dict:
    return {"vm": vm, "vm_id": "id-" + vm, "ok": False, "mode": "", "reason": "", "path": "", "archive": "",
            "checkpoint": None, "seconds": 0.0, "error": error, "exit_code": code, "disks": []}


# -- shared plugin helpers (ovirt_borg.plugins) ---------------------------------------------------


def test_plugin_options_fills_defaults_and_refuses_bad_options():
    spec = {"url": (str, plugins.REQUIRED), "timeout": (float, 10.0), "on": (bool, False),
            "items": ((str, list), [])}
    assert plugins.plugin_options({"url": "u", "timeout": 3}, spec) == \
        {"url": "u", "timeout": 3.0, "on": False, "items": []}
    with pytest.raises(ValueError, match=r"unknown option 'timout'; known options: items, on, timeout, url"):
        plugins.plugin_options({"url": "u", "timout": 3}, spec)
    with pytest.raises(ValueError, match="missing required option 'url'"):
        plugins.plugin_options({}, spec)
    with pytest.raises(ValueError, match=r"option 'timeout' must be a number, got True"):
        plugins.plugin_options({"url": "u", "timeout": True}, spec)
    with pytest.raises(ValueError, match=r"option 'items' must be a string or a list, got 3"):
        plugins.plugin_options({"url": "u", "items": 3}, spec)


def test_secret_url_masks_path_query_and_password():
    shown = plugins.secret_url(f"https://user:pw-{SECRET}@hc.example.com:8443/ping/{SECRET}?token=tok-{SECRET}")
    assert shown == "https://hc.example.com:8443/****"
    text = logs.mask(f"POST https://hc.example.com:8443/ping/{SECRET}/start?token=tok-{SECRET} pw-{SECRET}")
    assert SECRET not in text
    with pytest.raises(ValueError, match="option 'url' must be an http:// or https:// URL"):
        plugins.secret_url(f"ftp://example.com/{SECRET}")


def test_notify_lets_an_interrupt_through_but_no_other_error():
    class Plugin:
        @plugins.hookimpl
        def ovirt_borg_run_started(self, config, command, vms):
            raise self.error

    pm = plugins.build_manager()
    plugin = Plugin()
    pm.register(plugin, name="raiser")
    plugin.error = RuntimeError("broken")
    plugins.notify(pm, "ovirt_borg_run_started", config=CONFIG, command="backup", vms=[VM])
    plugin.error = Interrupted(15)
    with pytest.raises(Interrupted):
        plugins.notify(pm, "ovirt_borg_run_started", config=CONFIG, command="backup", vms=[VM])


# -- healthchecks ---------------------------------------------------------------------------------


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


def test_healthchecks_keeps_the_query_and_warns_on_http_errors(endpoint, caplog):
    pm = manager("healthchecks", {"url": f"{endpoint.url}/{SECRET}?create=1"})
    endpoint.status = 500
    plugins.notify(pm, "ovirt_borg_run_started", config=CONFIG, command="backup", vms=[VM])
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup",
                   results=[ok_result(), failed_result()], exit_code=4)
    start, fail = endpoint.requests
    assert re.fullmatch(rf"/{SECRET}/start\?create=1&rid=[0-9a-f-]{{36}}", start["path"])
    assert fail["path"].startswith(f"/{SECRET}/fail?create=1&rid=")
    assert fail["body"].decode().splitlines()[2:] == [
        "db1: FAILED (exit 4): the engine failed (HTTP 500)",
        "web1: full backup in 2.5 s, archive ovirt-web1-2026-11-26T02:00:00Z"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("answered HTTP 500" in w for w in warnings)
    assert SECRET not in caplog.text


def test_healthchecks_timeout_is_short_and_only_warns(endpoint, caplog):
    endpoint.delay = 3
    pm = manager("healthchecks", {"url": f"{endpoint.url}/{SECRET}", "timeout": 0.3})
    started = time.monotonic()
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup", results=[], exit_code=0)
    assert time.monotonic() - started < 2
    assert "ReadTimeout" in caplog.text and SECRET not in caplog.text


def test_healthchecks_down_only_warns_and_never_logs_the_secret(caplog):
    port = closed_port()
    pm = manager("healthchecks", {"url": f"http://127.0.0.1:{port}/ping/{SECRET}"})
    plugins.notify(pm, "ovirt_borg_run_started", config=CONFIG, command="backup", vms=[VM])
    assert f"the start ping to http://127.0.0.1:{port}/**** failed: ConnectionError" in caplog.text
    assert "Max retries exceeded" in caplog.text and SECRET not in caplog.text


def test_healthchecks_ignores_other_commands(endpoint):
    pm = manager("healthchecks", {"url": f"{endpoint.url}/{SECRET}"})
    plugins.notify(pm, "ovirt_borg_run_started", config=CONFIG, command="prune", vms=[])
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="prune", results=[], exit_code=0)
    assert endpoint.requests == []


@pytest.mark.parametrize("options, message", [
    ({}, "missing required option 'url'"),
    ({"url": "hc-ping.com/x"}, "option 'url' must be an http:// or https:// URL"),
    ({"url": "https://hc-ping.com/x", "timeout": 0}, "option 'timeout' must be positive"),
    ({"url": "https://hc-ping.com/x", "retries": 3}, "unknown option 'retries'"),
])
def test_healthchecks_refuses_bad_options(options, message):
    with pytest.raises(ConfigError, match=re.escape(f"[hooks.healthchecks]: {message}")):
        manager("healthchecks", options)


# -- prometheus -----------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (-?[0-9.]+(?:e[+-]?[0-9]+)?)$')


def parse_textfile(path: Path) -> dict[tuple, float]:
    """Parse a textfile strictly: {(metric, (label pairs...)): value}; HELP/TYPE once each, first."""
    samples: dict[tuple, float] = {}
    typed: set[str] = set()
    helped: set[str] = set()
    for line in path.read_text().splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind == "gauge" and name in helped and name not in typed
            typed.add(name)
        else:
            match = _SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.groups()
            assert name in typed, f"{name} has no TYPE before its samples"
            pairs = tuple(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', labels))
            assert (name, pairs) not in samples
            samples[(name, pairs)] = float(value)
    return samples


def vm_metrics(samples: dict[tuple, float], vm: str) -> dict[str, float]:
    out = {}
    for (name, pairs), value in samples.items():
        labels = dict(pairs)
        if labels.get("vm") == vm:
            out[name + (f"/{labels['mode']}" if "mode" in labels else "")] = value
    return out


def run_metrics(samples: dict[tuple, float]) -> dict[str, float]:
    return {name: value for (name, pairs), value in samples.items() if "vm" not in dict(pairs)}


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


def test_prometheus_keeps_other_vms_and_survives_a_damaged_file(tmp_path, caplog):
    prom = tmp_path / "job.prom"
    prom.write_text('# HELP something else\n'
                    'node_time_seconds 1.7e9\n'
                    'ovirt_borg_last_success_timestamp_seconds{job="old",vm="we\\"ird\\\\vm"} 1700000000.000\n'
                    'ovirt_borg_last_exit_code{job="old",vm="we\\"ird\\\\vm"} 0\n'
                    'this line is garbage {\n')
    pm = manager("prometheus", {"path": str(prom)})
    plugins.notify(pm, "ovirt_borg_run_started", config=CONFIG, command="backup", vms=[VM])
    plugins.notify(pm, "ovirt_borg_vm_finished", config=CONFIG, vm=VM, result=ok_result(mode="incremental"))
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup",
                   results=[ok_result(mode="incremental")], exit_code=0)
    samples = parse_textfile(prom)
    weird = vm_metrics(samples, 'we\\"ird\\\\vm')
    assert weird == {"ovirt_borg_last_success_timestamp_seconds": 1700000000.0, "ovirt_borg_last_exit_code": 0}
    web1 = vm_metrics(samples, "web1")
    assert web1["ovirt_borg_backup_mode/incremental"] == 1 and web1["ovirt_borg_bytes_read"] == 4 << 20
    assert web1["ovirt_borg_blocks_stored"] == 1 and web1["ovirt_borg_last_duration_seconds"] == 2.5
    assert all(dict(pairs)["job"] == "nightly" for _, pairs in samples), "job label: the config file's name"
    assert "line 5 does not parse" in caplog.text


def test_prometheus_write_failure_only_warns(tmp_path, caplog):
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    pm = manager("prometheus", {"path": str(textdir / "job.prom")})
    textdir.rmdir()  # the directory vanished after the config was read
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup",
                   results=[ok_result()], exit_code=0)
    assert "prometheus: cannot write" in caplog.text


@pytest.mark.parametrize("options, message", [
    ({}, "missing required option 'path'"),
    ({"path": "/tmp/metrics.txt"}, "must name a file ending in .prom"),
    ({"path": "/nonexistent-dir/x.prom"}, "the directory '/nonexistent-dir' does not exist"),
    ({"path": "/tmp/x.prom", "job": 3}, "option 'job' must be a string"),
])
def test_prometheus_refuses_bad_options(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        manager("prometheus", options)


# -- command --------------------------------------------------------------------------------------


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


def test_command_variables_are_quoted_for_the_shell(tmp_path, monkeypatch):
    hostile = "it's; touch PWNED $(touch PWNED2) `touch PWNED3`"
    out = tmp_path / "out"
    pm = manager("command", {"after_vm": [f"printf '%s\\n' {{vm}} {{archive}} > {shlex.quote(str(out))}",
                                          f'printf "%s\\n" "$OVIRT_BORG_VM" >> {shlex.quote(str(out))}']})
    vm = VmInfo(id="id-1", name=hostile, status="up")
    monkeypatch.chdir(tmp_path)  # where an unquoted 'touch PWNED' would land
    plugins.notify(pm, "ovirt_borg_vm_finished", config=CONFIG, vm=vm, result={"archive": "ovirt-x y", "mode": "full"})
    assert out.read_text().splitlines() == [hostile, "ovirt-x y", hostile]
    assert not list(tmp_path.glob("PWNED*"))


def test_command_leaves_other_braces_alone_and_gives_vms_one_a_line(tmp_path):
    out = tmp_path / "out"
    pm = manager("command", {"before_run": [
        f"echo 'a b' | awk '{{print $2}}' > {out}",
        f'printf "%s|" "$OVIRT_BORG_VMS" {{vms}} >> {out}']})
    vms = [VmInfo(id="1", name="x 1", status="up"), VmInfo(id="2", name="y", status="up")]
    plugins.notify(pm, "ovirt_borg_run_started", config=CONFIG, command="backup", vms=vms)
    assert out.read_text() == "b\nx 1\ny|x 1|y|"


def test_command_before_vm_timeout_vetoes_and_kills_the_group(tmp_path):
    pidfile = tmp_path / "pid"
    pm = manager("command", {"before_vm": f"echo $$ > {pidfile}; sleep 30 & sleep 30", "timeout": 0.5})
    started = time.monotonic()
    reasons = pm.hook.ovirt_borg_before_vm(config=CONFIG, vm=VM)
    assert time.monotonic() - started < 5
    assert reasons == ["before_vm command 1 of 1 timed out after 0.5 s"]
    pgid = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the orphaned sleeps are reaped by init a moment later
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"processes of the command's group {pgid} are still there")


def test_command_failures_outside_before_vm_only_warn(tmp_path, caplog):
    out = tmp_path / "out"
    pm = manager("command", {"on_failure": ["exit 7", f"echo {{error}} > {out}"],
                             "before_vm": ["true", "echo fine"]})
    plugins.notify(pm, "ovirt_borg_backup_failed", config=CONFIG, vm=VM, error="disk gone", exit_code=8)
    assert "command hook (VM web1): on_failure command 1 of 2 exited with 7" in caplog.text
    assert out.read_text() == "disk gone\n", "the next command still runs"
    assert pm.hook.ovirt_borg_before_vm(config=CONFIG, vm=VM) == []


@pytest.mark.parametrize("options, message", [
    ({"before_vm": "echo {archive}"}, "option 'before_vm': {archive} is not known there; "
                                      "its variables are {config}, {vm}, {vm_id}"),
    ({"after_run": ["true", ""]}, "option 'after_run': command 2 must be a non-empty string"),
    ({"after_run": ["true", 3]}, "option 'after_run': command 2 must be a non-empty string"),
    ({"before": "true"}, "unknown option 'before'"),
    ({"timeout": -1}, "option 'timeout' must be positive"),
])
def test_command_refuses_bad_options(options, message):
    with pytest.raises(ConfigError, match=re.escape(f"[hooks.command]: {message}")):
        manager("command", options)


# -- webhook / ntfy -------------------------------------------------------------------------------


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


def test_webhook_ntfy_always(endpoint):
    pm = manager("webhook", {"url": f"{endpoint.url}/{SECRET}", "format": "ntfy", "when": "always",
                             "priority": "urgent", "headers": {"X-Tags": "backup"}})
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup",
                   results=[ok_result()], exit_code=0)
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup",
                   results=[ok_result(), failed_result()], exit_code=4)
    success, failure = endpoint.requests
    assert success["headers"]["Title"] == "ovirt-borg backup: success"
    assert success["headers"]["Priority"] == "default" and success["headers"]["X-Tags"] == "backup"
    assert success["body"].decode() == "job nightly: 1 of 1 VM(s) backed up, exit code 0\nweb1: full in 2 s"
    assert failure["headers"]["Title"] == "ovirt-borg backup: failure"
    assert failure["headers"]["Priority"] == "urgent" and failure["headers"]["Tags"] == "warning"
    assert failure["headers"]["Content-Type"].startswith("text/plain")
    assert failure["body"].decode().splitlines() == [
        "job nightly: 1 of 2 VM(s) backed up, exit code 4", "web1: full in 2 s",
        "db1: FAILED: the engine failed (HTTP 500)"]


def test_webhook_warning_status_and_errors_only_warn(endpoint, caplog, tmp_path):
    token = tmp_path / "token"
    token.write_text(f"tk_{SECRET}")
    pm = manager("webhook", {"url": f"{endpoint.url}/{SECRET}", "token_file": str(token)})
    endpoint.status = 503
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup",
                   results=[failed_result(error="skipped: maintenance", code=1)], exit_code=1)
    assert json.loads(endpoint.requests[0]["body"])["status"] == "warning"
    assert f"webhook: {endpoint.url}/**** answered HTTP 503" in caplog.text

    down = manager("webhook", {"url": f"http://127.0.0.1:{closed_port()}/{SECRET}", "token_file": str(token)})
    plugins.notify(down, "ovirt_borg_run_finished", config=CONFIG, command="backup", results=[], exit_code=2)
    assert "webhook: cannot notify" in caplog.text and "ConnectionError" in caplog.text
    assert SECRET not in caplog.text


@pytest.mark.parametrize("options, message", [
    ({}, "missing required option 'url'"),
    ({"url": "https://x.example/h", "when": "sometimes"}, "option 'when' must be one of failure, always"),
    ({"url": "https://x.example/h", "format": "xml"}, "option 'format' must be one of json, ntfy"),
    ({"url": "https://x.example/h", "priority": "max"}, "option 'priority' must be one of min, low"),
    ({"url": "https://x.example/h", "token_file": "/nonexistent/token"},
     "option 'token_file': cannot read /nonexistent/token"),
    ({"url": "https://x.example/h", "headers": {"X-A": 1}}, "option 'headers': the value of 'X-A' must be a string"),
    ({"url": "https://x.example/h", "title": "Sauvegarde \u2713"}, "option 'title' must use latin-1"),
])
def test_webhook_refuses_bad_options(options, message):
    with pytest.raises(ConfigError, match=re.escape(f"[hooks.webhook]: {message}")):
        manager("webhook", options)


# -- the docs -------------------------------------------------------------------------------------


def test_every_ready_plugin_and_option_is_documented():
    docs = DOCS.read_text()
    ready = sorted(p.stem for p in (ROOT / "hooks").glob("*.py"))
    assert ready == ["command", "healthchecks", "prometheus", "webhook"]
    for name in ready:
        heading = f"\n### {name}\n"
        assert heading in docs, f"docs/PLUGINS.md has no section for the {name} plugin"
        section = docs.split(heading, 1)[1].split("\n### ", 1)[0]
        assert f"[hooks.{name}]" in section, f"the {name} section has no config example"
        module = plugins._load_file_plugin(name, [ROOT / "hooks"])
        for option in module.OPTIONS:
            assert f"`{option}`" in section, f"option {option} of {name} is not documented"
        assert (module.__doc__ or "").strip() and module.configure.__doc__


def test_config_examples_in_the_docs_are_valid():
    import tomllib

    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    checked = set()
    for block in blocks:
        data = tomllib.loads(block)  # every example is valid TOML
        for name, options in data.get("hooks", {}).items():
            if (ROOT / "hooks" / f"{name}.py").exists():
                module = plugins._load_file_plugin(name, [ROOT / "hooks"])
                plugins.plugin_options(options, module.OPTIONS)  # names and types the plugin takes
                checked.add(name)
    assert checked == {"command", "healthchecks", "prometheus", "webhook"}
