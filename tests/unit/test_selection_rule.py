"""VM selection (ovirt_borg.selection): a pure rule over the engine's inventory."""

from __future__ import annotations

from ovirt_borg.engine import VmInfo
from ovirt_borg.selection import Rule, select, skip_reason

VMS = [
    VmInfo("1", "web-1", "up", cluster="Prod", tags=("nightly",)),
    VmInfo("2", "web-2", "down", cluster="Prod"),
    VmInfo("3", "db-1", "up", cluster="Db", tags=("nightly",)),
    VmInfo("4", "db-scratch", "up", cluster="Db"),
    VmInfo("5", "HostedEngine", "up", cluster="Prod", origin="managed_hosted_engine"),
]


def names(vms):
    return [vm.name for vm in vms]


def test_an_empty_rule_takes_every_vm_less_the_excluded_ones():
    assert Rule().everything
    assert names(select(VMS, Rule())) == sorted(names(VMS))
    assert names(select(VMS, Rule(exclude=("*-scratch", "Hosted*")))) == ["db-1", "web-1", "web-2"]


def test_names_tags_and_clusters_each_take_vms_then_exclude_takes_them_out():
    assert names(select(VMS, Rule(names=("web-*",)))) == ["web-1", "web-2"]
    assert names(select(VMS, Rule(tags=("nightly",)))) == ["db-1", "web-1"]
    assert names(select(VMS, Rule(clusters=("Db",)))) == ["db-1", "db-scratch"]
    assert names(select(VMS, Rule(names=("web-2",), tags=("nightly",), exclude=("web-1",)))) == ["db-1", "web-2"]
    assert names(select(VMS, Rule(clusters=("Db",), exclude=("*-scratch",)))) == ["db-1"]
    assert select(VMS, Rule(names=("nothing-*",))) == []


def test_named_vms_are_taken_whatever_the_rule_excludes():
    rule = Rule(names=("web-*",), exclude=("db-*",))
    assert names(select(VMS, rule, requested=["db-scratch", "web-2"])) == ["db-scratch", "web-2"]


def test_the_hosted_engine_is_skipped_with_the_reason_and_the_way_out():
    reason = skip_reason(VMS[4])
    assert "hosted engine" in reason and "selection.exclude" in reason and "engine-backup" in reason
    assert all(skip_reason(vm) is None for vm in VMS[:4])
