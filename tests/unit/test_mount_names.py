"""The names 'ovirt-borg mount' gives on the host (one harmless path component per guest name,
kept apart when cut) and its reading of /proc/self/mountinfo: pure functions, no mount."""

from __future__ import annotations

import pytest

from ovirt_borg.mount import host_name, unique_name
from ovirt_borg.mountrecord import parse_mountinfo


@pytest.mark.parametrize("name, expected", [
    ("disk1", "disk1"),
    ("..", "%2E."),
    (".", "%2E"),
    (".hidden", "%2Ehidden"),
    ("../../etc", "%2E.%2F..%2Fetc"),
    ("a/b", "a%2Fb"),
    ("100%", "100%25"),
    ("line\nbreak\x7f", "line%0Abreak%7F"),
    ("rtl\u202eoverride", "rtl%E2%80%AEoverride"),
    ("", "%"),
    ("bad\udcffbyte", "bad%FFbyte"),
    ("Données ü", "Données ü"),
])
def test_host_name_makes_one_harmless_component(name, expected):
    assert host_name(name) == expected


def test_host_name_cuts_long_names_and_keeps_them_apart():
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    assert len(host_name(long_a).encode()) <= 255
    assert host_name(long_a) != host_name(long_b)
    assert len(host_name("é" * 200).encode()) <= 255
    taken: set[str] = {"README"}
    assert [unique_name(n, taken) for n in ("README", "disk", "disk")] == ["README~2", "disk", "disk~2"]


def test_parse_mountinfo_unescapes_paths():
    text = ("36 35 98:0 / /mnt/with\\040space rw,nosuid,nodev shared:1 - ext4 /dev/loop0 ro,noload\n"
            "37 36 0:45 / /mnt/with\\040space/x rw,relatime - tmpfs tmp\\134fs rw\n")
    first, second = parse_mountinfo(text)
    assert (first.mount_id, first.parent_id, first.mount_point, first.fstype, first.source) == \
        (36, 35, "/mnt/with space", "ext4", "/dev/loop0")
    assert first.options == {"rw", "nosuid", "nodev"}
    assert second.mount_point == "/mnt/with space/x" and second.source == "tmp\\fs"
