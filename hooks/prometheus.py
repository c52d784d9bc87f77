"""Prometheus metrics of backup runs, as a node_exporter textfile.

Enabled by a ``[hooks.prometheus]`` section::

    [hooks.prometheus]
    path = "/var/lib/prometheus/node-exporter/ovirt-borg-nightly.prom"
    job = "nightly"        # label value; default: the config file's name without .toml

After each backup run the file is rewritten atomically (a temporary file in the same
directory, which node_exporter ignores because it does not end in .prom, then a rename).
Per VM (labels ``job`` and ``vm``) it holds the last successful backup's time, duration,
bytes read, blocks stored and reused and mode, and the VM's last exit code; per job the last
run's exit code and time. A VM that is not in this run, or failed in it, keeps the values of
its last successful backup from the previous file, so ``time() -
ovirt_borg_last_success_timestamp_seconds`` is the alert to set up.

Each job (config file) needs a file of its own. Writing the file never fails a backup: an
error is logged as a warning.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from ovirt_borg.plugins import REQUIRED, hookimpl, plugin_options

log = logging.getLogger(__name__)

OPTIONS = {
    "path": (str, REQUIRED),
    "job": (str, ""),
}

# name -> (type, help); per-VM metrics unless listed in RUN_METRICS
METRICS = {
    "ovirt_borg_last_success_timestamp_seconds": ("gauge", "Unix time the VM's last successful backup finished."),
    "ovirt_borg_last_duration_seconds": ("gauge", "Duration of the VM's last successful backup."),
    "ovirt_borg_bytes_read": ("gauge", "Bytes read from the VM's disks by its last successful backup."),
    "ovirt_borg_blocks_stored": ("gauge", "Blocks stored as new chunks by the VM's last successful backup."),
    "ovirt_borg_blocks_reused": ("gauge", "Blocks reused from the previous archive by the VM's last successful backup."),
    "ovirt_borg_backup_mode": ("gauge", "Mode of the VM's last successful backup (1 for the mode it used)."),
    "ovirt_borg_last_exit_code": ("gauge", "Exit code of the VM's last backup attempt (0 ok, 1 skipped)."),
    "ovirt_borg_last_run_exit_code": ("gauge", "Exit code of the job's last backup run."),
    "ovirt_borg_last_run_timestamp_seconds": ("gauge", "Unix time the job's last backup run finished."),
}
RUN_METRICS = ("ovirt_borg_last_run_exit_code", "ovirt_borg_last_run_timestamp_seconds")
MODES = ("full", "incremental")

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)\s*$')
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')

_settings: dict[str, Any] | None = None
_finished_at: dict[str, float] = {}


def configure(options: dict[str, Any]) -> None:
    """Take the ``[hooks.prometheus]`` options; raises ValueError for a bad or missing one."""
    global _settings
    settings = plugin_options(options, OPTIONS)
    path = Path(settings["path"])
    if not path.name.endswith(".prom"):
        raise ValueError(f"option 'path' must name a file ending in .prom (node_exporter reads only those), "
                         f"got {settings['path']!r}")
    if not path.parent.is_dir():
        raise ValueError(f"option 'path': the directory {str(path.parent)!r} does not exist")
    _settings = settings


def escape(value: str) -> str:
    """Return ``value`` escaped for a label value of the text exposition format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def read_vm_metrics(path: Path) -> dict[str, dict[str, str]]:
    """Return the per-VM values of a previous textfile: {vm: {metric or metric/mode: value}}.

    A missing file gives {}; lines that are not ours or do not parse are ignored (logged).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        log.warning("prometheus: cannot read the previous metrics %s: %s; starting afresh", path, e)
        return {}
    vms: dict[str, dict[str, str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            log.warning("prometheus: %s line %d does not parse; ignored", path, number)
            continue
        name = match["name"]
        labels = {m["key"]: _unescape(m["value"]) for m in _LABEL.finditer(match["labels"] or "")}
        if name not in METRICS or name in RUN_METRICS or "vm" not in labels:
            continue
        key = f"{name}/{labels['mode']}" if name == "ovirt_borg_backup_mode" else name
        vms.setdefault(labels["vm"], {})[key] = match["value"]
    return vms


def update_vm_metrics(vms: dict[str, dict[str, str]], results: list[dict],
                      finished_at: dict[str, float], now: float) -> None:
    """Fold a run's ``results`` into the per-VM values ``vms`` (changed in place).

    A successful VM gets all its values anew (its finish time from ``finished_at``, else
    ``now``); a failed or skipped VM only its exit code.
    """
    for r in results:
        values = vms.setdefault(r["vm"], {})
        values["ovirt_borg_last_exit_code"] = "0" if r.get("ok") else str(int(r.get("exit_code") or 2))
        if not r.get("ok"):
            continue
        disks = r.get("disks") or []
        values["ovirt_borg_last_success_timestamp_seconds"] = f"{finished_at.get(r['vm'], now):.3f}"
        values["ovirt_borg_last_duration_seconds"] = f"{float(r.get('seconds') or 0):.3f}"
        values["ovirt_borg_bytes_read"] = str(sum(int(d.get("bytes_read", 0)) for d in disks))
        values["ovirt_borg_blocks_stored"] = str(sum(int(d.get("stored", 0)) for d in disks))
        values["ovirt_borg_blocks_reused"] = str(sum(int(d.get("reused", 0)) for d in disks))
        for mode in MODES:
            values[f"ovirt_borg_backup_mode/{mode}"] = "1" if r.get("mode") == mode else "0"


def render(job: str, vms: dict[str, dict[str, str]], exit_code: int, now: float) -> str:
    """Return the textfile for ``job``: HELP and TYPE once per metric, VMs sorted by name."""
    out = []
    job_label = f'job="{escape(job)}"'
    for name, (kind, help_text) in METRICS.items():
        lines = []
        if name == "ovirt_borg_last_run_exit_code":
            lines.append(f"{name}{{{job_label}}} {exit_code}")
        elif name == "ovirt_borg_last_run_timestamp_seconds":
            lines.append(f"{name}{{{job_label}}} {now:.3f}")
        else:
            for vm in sorted(vms):
                vm_labels = f'{job_label},vm="{escape(vm)}"'
                if name == "ovirt_borg_backup_mode":
                    for mode in MODES:
                        value = vms[vm].get(f"{name}/{mode}")
                        if value is not None:
                            lines.append(f'{name}{{{vm_labels},mode="{mode}"}} {value}')
                elif name in vms[vm]:
                    lines.append(f"{name}{{{vm_labels}}} {vms[vm][name]}")
        if lines:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temporary file in the same directory, fsync, rename.

    node_exporter reads only ``*.prom`` files, so it never sees the half-written temporary
    file. Raises OSError; the temporary file is removed on failure.
    """
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # node_exporter usually runs as another user
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


def job_name(config: Any) -> str:
    """The ``job`` label: the option, else the config file's name without its suffix."""
    if _settings and _settings["job"]:
        return _settings["job"]
    return Path(getattr(config, "path", "") or "ovirt-borg").stem


@hookimpl
def ovirt_borg_run_started(config: Any, command: str, vms: list) -> None:
    if command == "backup":
        _finished_at.clear()


@hookimpl
def ovirt_borg_vm_finished(config: Any, vm: Any, result: dict) -> None:
    _finished_at[vm.name] = time.time()


@hookimpl
def ovirt_borg_run_finished(config: Any, command: str, results: list, exit_code: int) -> None:
    if _settings is None or command != "backup":
        return
    path = Path(_settings["path"])
    now = time.time()
    vms = read_vm_metrics(path)
    update_vm_metrics(vms, results, _finished_at, now)
    try:
        write_atomically(path, render(job_name(config), vms, exit_code, now))
    except OSError as e:  # metrics never fail a backup
        log.warning("prometheus: cannot write %s: %s", path, e)
        return
    log.debug("prometheus: metrics of %d VM(s) written to %s", len(vms), path)
