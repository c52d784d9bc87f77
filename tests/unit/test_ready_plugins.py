"""The ready plugins in hooks/ without the lab: called through a real plugin manager
(``plugins.build_manager`` loading the files from hooks/), against a real HTTP server on
127.0.0.1, real files and real shell commands; and their documentation. Each plugin's run
through the real CLI backup is in tests/test_hooks.py."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from pathlib import Path

import pytest

from helpers import wait_for
from hook_helpers import CONFIG, SECRET, VM, closed_port, failed_result, manager, ok_result, parse_textfile, vm_metrics
from ovirt_borg import logs, plugins
from ovirt_borg.engine import VmInfo
from ovirt_borg.errors import ConfigError, Interrupted

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "PLUGINS.md"


# -- shared plugin helpers (ovirt_borg.plugins) ------------------------------------------------


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


# -- healthchecks ------------------------------------------------------------------------------


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
    endpoint.answering.clear()  # the request arrives, its answer is held back
    pm = manager("healthchecks", {"url": f"{endpoint.url}/{SECRET}", "timeout": 0.3})
    plugins.notify(pm, "ovirt_borg_run_finished", config=CONFIG, command="backup", results=[], exit_code=0)
    # notify returned while the answer is still held back: the ping gave up waiting for it
    assert endpoint.answered == 0
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


# -- prometheus --------------------------------------------------------------------------------


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


# -- command -----------------------------------------------------------------------------------


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
    pidfile, ended = tmp_path / "pid", tmp_path / "ended"
    # the command and a process it left in the background would each leave a mark, had they ended
    command = f"echo $$ > {pidfile}; (sleep 30; echo background >> {ended}) & sleep 30; echo command >> {ended}"
    pm = manager("command", {"before_vm": command, "timeout": 0.5})
    reasons = pm.hook.ovirt_borg_before_vm(config=CONFIG, vm=VM)
    assert reasons == ["before_vm command 1 of 1 timed out after 0.5 s"]
    pgid = int(pidfile.read_text())

    def group_gone() -> bool:  # the orphaned sleeps are reaped by init a moment later
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, what=f"the end of the processes of the command's group {pgid}")
    assert not ended.exists(), "the command's processes were killed, not waited for"


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


# -- webhook / ntfy ----------------------------------------------------------------------------


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


# -- the docs ----------------------------------------------------------------------------------


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

