"""Retention: prune each VM's archives with the configured keep rules, never another's.

Everything is restricted to this job's archives (``<prefix><vm>-<UTC time>``) and done per VM
with Borg's own ``prune --glob-archives``, so a foreign archive (borgmatic's, another job's) is
never touched. The archive the VM's sidecar names (where the next incremental starts) is kept
unless a newer committed archive of the VM exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ovirt_borg import archive, borgcli, sidecar as sc
from ovirt_borg.naming import vm_archive_glob, vm_of_archive

log = logging.getLogger(__name__)

#: Why a VM named to ``prune`` was not pruned when it has no archives (no warning).
NO_ARCHIVES = "no archives of this VM"


@dataclass
class PruneResult:
    vm: str
    kept: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    skipped: str = ""


def archives_by_vm(names: Iterable[str], prefix: str) -> dict[str, list[str]]:
    """This job's archive names grouped by VM, each VM's in the given order (pure)."""
    by_vm: dict[str, list[str]] = {}
    for name in names:
        vm = vm_of_archive(name, prefix)
        if vm is not None:
            by_vm.setdefault(vm, []).append(name)
    return by_vm


def keep_rules(retention) -> dict[str, int | str]:
    """Borg keep rules from the [retention] section; zero and empty rules are left out (pure)."""
    rules: dict[str, int | str] = {}
    for name in ("within", "daily", "weekly", "monthly", "yearly"):
        value = getattr(retention, f"keep_{name}")
        if value:
            rules[name] = value
    return rules


def prune(repo: archive.Repo, state: sc.StateDir, prefix: str, keep: dict[str, int | str],
          vms: list[str] | None = None, dry_run: bool = False) -> list[PruneResult]:
    """Prune this job's archives per VM (all VMs with archives, or ``vms``); then compact.

    Returns what was (or, with ``dry_run``, would be) pruned per VM.
    """
    by_vm = archives_by_vm((entry["name"] for entry in borgcli.list_archives(repo, f"{prefix}*")), prefix)
    protected = {s.vm_name: s.archive for s in state.all()}
    results = []
    for vm in sorted(vms or by_vm):
        names = by_vm.get(vm, [])
        result = PruneResult(vm)
        results.append(result)
        if not names:
            result.skipped = NO_ARCHIVES
            continue
        glob = vm_archive_glob(prefix, vm)
        doomed = borgcli.prune(repo, glob, keep, dry_run=True)
        anchor = protected.get(vm)
        if anchor in doomed and names[-1] == anchor:
            result.skipped = (f"the keep rules would remove {anchor}, the newest archive and the one the "
                              "next incremental starts from; widen the keep rules")
            log.warning("VM %s: not pruning: %s", vm, result.skipped)
            continue
        result.pruned = doomed if dry_run else borgcli.prune(repo, glob, keep)
        result.kept = [n for n in names if n not in result.pruned]
    if not dry_run and any(r.pruned for r in results):
        borgcli.compact(repo)
    return results
