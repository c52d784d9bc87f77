"""Which VMs a backup run takes: a pure rule over the engine's inventory.

A VM is taken when the run names it, or (``backup --all``) when its name matches a pattern of
``[selection] names``, it carries one of ``tags`` or it runs in one of ``clusters``; with none
of the three, every VM of the engine is taken. ``exclude`` patterns then take VMs out again
(not those named on the command line). A VM that is taken may still not be backed up: the
hosted engine's VM, which the engine refuses to back up, is skipped with a reason.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Iterable

from ovirt_borg.engine import VmInfo


@dataclass(frozen=True)
class Rule:
    """The ``[selection]`` section's VM rule: glob patterns of names, tags, clusters, exclusions."""

    names: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        """No names, tags or clusters: every VM of the engine (less the excluded ones)."""
        return not (self.names or self.tags or self.clusters)

    def wants(self, vm: VmInfo) -> bool:
        """Whether ``vm`` matches a name pattern, a tag or a cluster (or the rule takes every VM)."""
        return (self.everything
                or any(fnmatch.fnmatchcase(vm.name, pattern) for pattern in self.names)
                or any(tag in self.tags for tag in vm.tags)
                or vm.cluster in self.clusters)

    def excludes(self, vm: VmInfo) -> bool:
        """Whether an ``exclude`` pattern matches the name of ``vm``."""
        return any(fnmatch.fnmatchcase(vm.name, pattern) for pattern in self.exclude)


def select(vms: Iterable[VmInfo], rule: Rule, requested: Iterable[str] = ()) -> list[VmInfo]:
    """The VMs a run backs up, sorted by name (pure).

    Given the engine's VMs, the rule and the names asked for on the command line: the VMs of
    those names when any is given (exclusions do not apply to a VM named on purpose),
    otherwise those the rule wants and does not exclude.
    """
    requested = set(requested)
    if requested:
        chosen = [vm for vm in vms if vm.name in requested]
    else:
        chosen = [vm for vm in vms if rule.wants(vm) and not rule.excludes(vm)]
    return sorted(chosen, key=lambda vm: vm.name)


def skip_reason(vm: VmInfo) -> str | None:
    """Why a selected VM is not backed up, or None (pure).

    The hosted engine's VM: StartVmBackupCommand refuses it (409), so asking would fail it
    every night; it is skipped with a warning until ``exclude`` names it.
    """
    if vm.hosted_engine:
        return ("it is the hosted engine's VM, which the engine refuses to back up (use engine-backup "
                "for the engine); name it in selection.exclude to leave it out without this warning")
    return None
