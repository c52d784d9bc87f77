"""Shell commands before and after backups, in the manner of borgmatic's command hooks.

Enabled by a ``[hooks.command]`` section; each option is one command or a list of commands,
run in order by ``/bin/sh -c``::

    [hooks.command]
    before_run = "logger -t ovirt-borg backup starts: {vms}"
    before_vm = "/usr/local/bin/quiesce-app {vm}"
    after_vm = "echo \\"$OVIRT_BORG_VM -> $OVIRT_BORG_ARCHIVE\\" >> /var/log/ovirt-borg-archives"
    on_failure = "echo {error} | mail -s \\"backup of $OVIRT_BORG_VM failed\\" root"
    after_run = "/usr/local/bin/report {exit_code}"
    timeout = 300

When they run (backup runs only):

==========  =====================================  ==========================================
option      when                                   variables
==========  =====================================  ==========================================
before_run  once, before the first VM              config, vms
before_vm   before each VM; **a command that       config, vm, vm_id
            fails vetoes that VM** (it is skipped,
            the run exits 1, nothing is written)
after_vm    after each VM backed up                config, vm, vm_id, archive, mode
on_failure  after each VM whose backup failed      config, vm, vm_id, error, exit_code
after_run   once, at the end, whatever happened    config, exit_code
==========  =====================================  ==========================================

Every variable is in the environment as ``OVIRT_BORG_<NAME>`` (``OVIRT_BORG_VM``,
``OVIRT_BORG_ARCHIVE``, ...; ``OVIRT_BORG_VMS`` one name a line), and ``{name}`` in a command
is replaced by the value quoted for the shell with ``shlex.quote`` (``{vms}``: each name quoted
on its own), so never put quotes around ``{name}`` yourself. A ``{name}`` that is not one of
these variables is left as it is (shell braces, awk programs).

Apart from ``before_vm``, a command that fails (non-zero exit, timeout, cannot start) is
logged as a warning and never fails the backup; the next command still runs. A command that
outlives ``timeout`` is killed with its whole process group. Command lines are not logged
(they may hold secrets); their output is, at INFO level, with known secrets masked.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
from typing import Any

from ovirt_borg import logs
from ovirt_borg.plugins import hookimpl, plugin_options

log = logging.getLogger(__name__)

VARIABLES = {
    "before_run": ("config", "vms"),
    "before_vm": ("config", "vm", "vm_id"),
    "after_vm": ("config", "vm", "vm_id", "archive", "mode"),
    "on_failure": ("config", "vm", "vm_id", "error", "exit_code"),
    "after_run": ("config", "exit_code"),
}
ALL_VARIABLES = sorted({name for names in VARIABLES.values() for name in names})
OPTIONS = {**{hook: ((str, list), []) for hook in VARIABLES}, "timeout": (float, 300.0)}
_PLACEHOLDER = re.compile(r"\{(" + "|".join(ALL_VARIABLES) + r")\}")
_OUTPUT_LINES = 50  # lines of a command's output worth keeping in the log

_commands: dict[str, list[str]] = {}
_timeout = 300.0


def configure(options: dict[str, Any]) -> None:
    """Take the ``[hooks.command]`` options; raises ValueError for a bad one.

    Refused: a command that is not a non-empty string, and a ``{name}`` that names a variable
    the option does not have (``{archive}`` in ``before_vm``).
    """
    global _commands, _timeout
    settings = plugin_options(options, OPTIONS)
    if settings["timeout"] <= 0:
        raise ValueError(f"option 'timeout' must be positive, got {settings['timeout']}")
    commands = {}
    for hook, available in VARIABLES.items():
        value = settings[hook]
        items = [value] if isinstance(value, str) else value
        for index, command in enumerate(items, 1):
            if not isinstance(command, str) or not command.strip():
                raise ValueError(f"option {hook!r}: command {index} must be a non-empty string")
            for name in _PLACEHOLDER.findall(command):
                if name not in available:
                    raise ValueError(f"option {hook!r}: {{{name}}} is not known there; its variables are "
                                     + ", ".join(f"{{{v}}}" for v in available))
        commands[hook] = list(items)
    _commands, _timeout = commands, settings["timeout"]


def expand(command: str, variables: dict[str, str | list[str]]) -> str:
    """Return ``command`` with each ``{name}`` of ``variables`` replaced by its shell-quoted value.

    A list value becomes its items, each quoted, separated by spaces. Unknown names stay as
    they are.
    """
    def replace(match: re.Match) -> str:
        value = variables.get(match[1])
        if value is None:
            return match[0]
        return shlex.join(value) if isinstance(value, list) else shlex.quote(value)

    return _PLACEHOLDER.sub(replace, command)


def environment(hook: str, variables: dict[str, str | list[str]]) -> dict[str, str]:
    """The commands' environment: ours, plus ``OVIRT_BORG_HOOK`` and one ``OVIRT_BORG_<NAME>``
    per variable (a list one item a line)."""
    env = dict(os.environ, OVIRT_BORG_HOOK=hook)
    for name, value in variables.items():
        env[f"OVIRT_BORG_{name.upper()}"] = "\n".join(value) if isinstance(value, list) else value
    return env


def run_command(hook: str, index: int, command: str, variables: dict[str, str | list[str]],
                timeout: float) -> tuple[str | None, str]:
    """Run one command of ``hook`` with ``variables`` through ``/bin/sh -c``.

    Returns (problem, output): problem is None when the command exited 0, else says what went
    wrong ("exited with 3", "timed out after 300 s" -- its process group is then killed --, or
    "could not start: ..."). The output (stdout and stderr together) is logged. Never raises
    for a failing command; an interrupt (signal) kills the command's group and propagates.
    """
    where = f"command {hook}[{index}]" + (f" (VM {variables['vm']})" if "vm" in variables else "")
    try:
        process = subprocess.Popen(expand(command, variables), shell=True, env=environment(hook, variables),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in a variable
        return f"could not start: {e}", ""
    problem = None
    try:
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            output, _ = process.communicate()
            problem = f"timed out after {timeout:g} s"
    finally:
        if process.returncode is None:  # interrupted: leave no command behind
            _kill_group(process)
            process.wait()
    if problem is None and process.returncode != 0:
        problem = f"exited with {process.returncode}"
    text = logs.mask(output.decode(errors="replace"))
    for line in text.splitlines()[-_OUTPUT_LINES:]:
        log.info("%s: %s", where, line)
    return problem, text


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_hook(hook: str, variables: dict[str, str | list[str]], *, stop_on_failure: bool = False) -> str | None:
    """Run every command of ``hook``; return None when all succeeded, else what failed.

    A failure is logged as a warning; with ``stop_on_failure`` the next commands do not run.
    """
    failure = None
    commands = _commands.get(hook, [])
    for index, command in enumerate(commands, 1):
        problem, output = run_command(hook, index, command, variables, _timeout)
        if problem is None:
            continue
        lines = output.strip().splitlines()
        failure = f"{hook} command {index} of {len(commands)} {problem}" + (f": {lines[-1]}" if lines else "")
        vm = f" (VM {variables['vm']})" if "vm" in variables else ""
        log.warning("command hook%s: %s", vm, failure)
        if stop_on_failure:
            break
    return failure


def _config_path(config: Any) -> str:
    return str(getattr(config, "path", "") or "")


@hookimpl
def ovirt_borg_run_started(config: Any, command: str, vms: list) -> None:
    if command == "backup":
        run_hook("before_run", {"config": _config_path(config), "vms": [vm.name for vm in vms]})


@hookimpl
def ovirt_borg_before_vm(config: Any, vm: Any) -> str | None:
    return run_hook("before_vm", {"config": _config_path(config), "vm": vm.name, "vm_id": vm.id},
                    stop_on_failure=True)


@hookimpl
def ovirt_borg_vm_finished(config: Any, vm: Any, result: dict) -> None:
    run_hook("after_vm", {"config": _config_path(config), "vm": vm.name, "vm_id": vm.id,
                          "archive": str(result.get("archive", "")), "mode": str(result.get("mode", ""))})


@hookimpl
def ovirt_borg_backup_failed(config: Any, vm: Any, error: str, exit_code: int) -> None:
    run_hook("on_failure", {"config": _config_path(config), "vm": vm.name, "vm_id": vm.id,
                            "error": error, "exit_code": str(exit_code)})


@hookimpl
def ovirt_borg_run_finished(config: Any, command: str, results: list, exit_code: int) -> None:
    if command == "backup":
        run_hook("after_run", {"config": _config_path(config), "exit_code": str(exit_code)})
