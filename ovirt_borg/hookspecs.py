"""Every hook ovirt-borg calls, in one place.

Plugins implement these with ``@ovirt_borg.plugins.hookimpl``. Specifications only grow by
appending keyword arguments, so plugins written for an older version keep working.

Notification hooks (``run_started``, ``vm_finished``, ``backup_failed``, ``run_finished``) can
never fail a backup: an exception raised by one plugin is logged as a warning and the other
plugins still run. ``before_vm`` is the one hook that may veto: it says so by returning a reason; a plugin that
raises there fails that VM alone (it is not backed up, the others are).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("ovirt_borg")


@hookspec(firstresult=True)
def ovirt_borg_select_vms(config: Any, vms: list, requested: list[str], all_vms: bool) -> list | None:
    """Given the config, the engine's VMs and the names asked for, return the VMs to back up."""


@hookspec(firstresult=True)
def ovirt_borg_archive_name(config: Any, vm: Any, timestamp: str) -> str | None:
    """Return the archive name for ``vm`` (it must start with the configured prefix)."""


@hookspec
def ovirt_borg_run_started(config: Any, command: str, vms: list) -> None:
    """A run of ``command`` (backup, prune, restore...) starts on these VMs (monitoring: start ping)."""


@hookspec
def ovirt_borg_before_vm(config: Any, vm: Any) -> str | None:
    """Called before a VM is backed up; return a reason (a string) to veto, None to go on."""


@hookspec
def ovirt_borg_vm_finished(config: Any, vm: Any, result: dict) -> None:
    """A VM was backed up; ``result`` is its JSON summary (mode, archive, bytes, duration)."""


@hookspec
def ovirt_borg_backup_failed(config: Any, vm: Any, error: str, exit_code: int) -> None:
    """A VM's backup failed with ``error`` (nothing was committed for it)."""


@hookspec
def ovirt_borg_run_finished(config: Any, command: str, results: list, exit_code: int) -> None:
    """The run ended with ``exit_code``; ``results`` holds each VM's summary or error."""
