"""Retention per VM with real Borg: this job's archives only, the incremental's anchor kept."""

from __future__ import annotations

import json


RETENTION = "[retention]\nkeep_daily = 1\nkeep_weekly = 0\nkeep_monthly = 0\n"


def test_prune_keeps_foreign_archives_and_prunes_per_vm(job, lab_vm, tmp_path):
    vm = lab_vm["name"]
    job.config.write_text(job.config.read_text() + RETENTION)
    # foreign archives: a file backup and another job's VM archive, in the same repository
    files = tmp_path / "etc"
    files.mkdir()
    (files / "hosts").write_text("127.0.0.1 localhost\n")
    job.borg("create", f"{job.repo}::host-etc-2026-11-26T01:00:00", str(files))
    job.borg("create", f"{job.repo}::other-{vm}-2026-11-26T01:00:00Z", str(files))
    names = [job.backup(vm)[vm]["archive"]]
    for i in range(2):
        job.lab.write(vm, disk=1, offset=i << 20, length=65536)
        names.append(job.backup(vm)[vm]["archive"])
    dry = json.loads(job.run("prune", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["repository"]["location"] == str(job.repo) and dry["skipped"] == []
    assert {a["vm"] for a in dry["archives"]} == {vm}
    assert sorted(a["name"] for a in dry["archives"] if a["action"] == "prune") == sorted(names[:2])
    assert [a["name"] for a in dry["archives"] if a["action"] == "keep"] == [names[-1]]
    assert set(names) <= set(job.archives()), "a dry run changes nothing"
    job.run("prune")
    remaining = job.archives()
    assert "host-etc-2026-11-26T01:00:00" in remaining and f"other-{vm}-2026-11-26T01:00:00Z" in remaining
    assert [n for n in remaining if n.startswith("ovirt-")] == [names[-1]]
    job.borg("check", str(job.repo))
    # the chain goes on from the kept archive
    job.lab.write(vm, disk=1, offset=5 << 20, length=65536)
    after = job.backup(vm)[vm]
    assert after["mode"] == "incremental"
    job.assert_identical(after)


def test_prune_without_keep_rules_is_a_config_error(job):
    job.config.write_text(job.config.read_text() +
                          "[retention]\nkeep_daily = 0\nkeep_weekly = 0\nkeep_monthly = 0\n")
    proc = job.run("prune", expect=2)
    assert "keeps nothing" in proc.stderr
