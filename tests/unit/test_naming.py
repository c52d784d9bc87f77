"""Archive names, the timestamps they carry, the VM directory inside an archive and the archive
comment (ovirt_borg.naming): pure functions, no repository."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from ovirt_borg.naming import (TIMESTAMP_PATTERN, archive_comment, archive_name, parse_archive_comment,
                               parse_timestamp, safe_name, timestamp, unused_timestamp, vm_archive_glob,
                               vm_directory, vm_of_archive)


def test_timestamp_is_utc_to_the_second_and_parses_back():
    moment = datetime(2026, 11, 26, 3, 4, 5, 678000, tzinfo=timezone.utc)
    stamp = timestamp(moment)
    assert stamp == "2026-11-26T03:04:05Z"
    assert re.fullmatch(TIMESTAMP_PATTERN, stamp)
    assert parse_timestamp(stamp) == moment.replace(microsecond=0)
    assert parse_timestamp(stamp).tzinfo is timezone.utc
    with pytest.raises(ValueError):
        parse_timestamp("2026-11-26 03:04:05")


def test_archive_name_is_prefix_vm_and_time_and_reads_back():
    name = archive_name("ovirt-", "web-2", "2026-11-26T03:00:00Z")
    assert name == "ovirt-web-2-2026-11-26T03:00:00Z"
    assert vm_of_archive(name, "ovirt-") == "web-2"
    assert fnmatch.fnmatchcase(name, vm_archive_glob("ovirt-", "web-2"))


def test_vm_of_archive_is_strict():
    assert vm_of_archive("ovirt-web-2-2026-11-26T03:00:00Z", "ovirt-") == "web-2"
    assert vm_of_archive("ovirt-web-2026-11-26T03:00:00Z.checkpoint", "ovirt-") is None
    assert vm_of_archive("host-etc-2026-11-26T03:00:00Z", "ovirt-") is None
    assert vm_of_archive("ovirt-web-2026-11-26T03:00:00Z.weekly", "ovirt-") == "web"
    assert vm_of_archive("ovirt-web", "ovirt-") is None


def test_vm_glob_does_not_match_similar_names():
    glob = vm_archive_glob("ovirt-", "web")
    assert fnmatch.fnmatchcase("ovirt-web-2026-11-26T03:00:00Z", glob)
    assert not fnmatch.fnmatchcase("ovirt-web-2-2026-11-26T03:00:00Z", glob)


def test_unused_timestamp_waits_for_the_next_second_when_taken():
    clock = [datetime(2026, 11, 26, 3, 0, 0, 900000, tzinfo=timezone.utc)]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += timedelta(seconds=seconds)

    taken = ["ovirt-vm1-2026-11-26T03:00:00Z", "ovirt-vm2-2026-11-26T03:00:00Z.tag", "foreign"]
    assert unused_timestamp(taken, now=lambda: clock[0], sleep=sleep) == "2026-11-26T03:00:01Z"
    assert 0 < sum(slept) <= 0.15
    assert unused_timestamp([], now=lambda: clock[0], sleep=sleep) == "2026-11-26T03:00:01Z"


def test_safe_name_is_one_harmless_path_component():
    assert safe_name("web1.example.com_db+2") == "web1.example.com_db+2"
    assert safe_name("my vm/../x") == "my_vm_.._x"
    assert safe_name("Données") == "Donn_es"
    assert safe_name("") == "_"


def test_vm_directory_follows_the_name_even_of_another_prefix():
    assert vm_directory("ovirt-web 1-2026-11-26T03:00:00Z", "ovirt-") == "web_1"
    assert vm_directory("ovirt-web-2026-11-26T03:00:00Z.weekly", "ovirt-") == "web"
    # another job's prefix: the name is still <vm>-<UTC time>
    assert vm_directory("offsite-db1-2026-11-26T03:00:00Z", "ovirt-") == "offsite-db1"
    assert vm_directory("ovirt-db1-2026-11-26T03:00:00Z", "other-") == "ovirt-db1"


@dataclass
class Disk:
    provisioned_size: int
    bytes_read: int
    stored: int


def test_archive_comment_reads_back_with_and_without_sizes():
    started = archive_comment("web1", "full", "backup", None)
    assert started == "ovirt-borg vm=web1 mode=full path=backup checkpoint=-"
    assert parse_archive_comment(started) == {"vm": "web1", "mode": "full", "path": "backup", "checkpoint": "-"}
    done = archive_comment("web1", "incremental", "backup", "c1", [Disk(8, 4, 2), Disk(16, 0, 0)])
    assert parse_archive_comment(done) == {"vm": "web1", "mode": "incremental", "path": "backup",
                                           "checkpoint": "c1", "disks": "2", "size": "24", "read": "4",
                                           "blocks_stored": "2"}
    assert parse_archive_comment("a comment of someone else") == {}
