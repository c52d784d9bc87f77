"""The lab's data plane: PKI, qemu wrappers and bitmaps, the real imageio daemon."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import uuid

import pytest
import requests

pytest.register_assert_rewrite("fixtures_dataplane")

from fixtures_dataplane import KiB, MiB, build_sample_disk  # noqa: E402
from helpers import file_sha256  # noqa: E402
from ovirt_borg.lab import LabError, qemu  # noqa: E402
from ovirt_borg.lab.imageiod import ImageioDaemon, free_port, make_ticket  # noqa: E402
from ovirt_borg.lab.tls import make_lab_pki  # noqa: E402

pytest_plugins = ["fixtures_dataplane"]


def _session(pki) -> requests.Session:
    session = requests.Session()
    # The environment may name a system CA bundle, which requests would prefer.
    session.trust_env = False
    session.verify = str(pki.ca_file)
    return session


def _merged(ranges):
    merged: list[list[int]] = []
    for start, length in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + length)
        else:
            merged.append([start, start + length])
    return [(start, end - start) for start, end in merged]


# PKI


def test_lab_pki_is_valid_private_and_reused(tmp_path):
    pki = make_lab_pki(tmp_path / "pki")

    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", pki.ca_file, pki.cert_file], capture_output=True, text=True
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", pki.cert_file, "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    for key in (pki.key_file, tmp_path / "pki" / "ca.key"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600

    ca_before = pki.ca_file.read_bytes()
    cert_before = pki.cert_file.read_bytes()
    again = make_lab_pki(tmp_path / "pki")
    assert again == pki
    assert pki.ca_file.read_bytes() == ca_before
    assert pki.cert_file.read_bytes() == cert_before


# qemu


def test_write_kinds_reach_the_image(tmp_path):
    image = tmp_path / "d.qcow2"
    qemu.create_image(image, 4 * MiB)
    payload = os.urandom(128 * KiB)
    qemu.write(image, 1 * MiB, len(payload), fmt="qcow2", data=payload)
    qemu.write(image, 2 * MiB, 1 * MiB, fmt="qcow2")
    qemu.write(image, 2 * MiB, 64 * KiB, fmt="qcow2", zero=True)
    qemu.write(image, 3 * MiB - 64 * KiB, 64 * KiB, fmt="qcow2", discard=True)

    raw = tmp_path / "d.raw"
    qemu.to_raw(image, raw, "qcow2")
    content = raw.read_bytes()
    assert len(content) == 4 * MiB
    assert content[1 * MiB : 1 * MiB + len(payload)] == payload
    assert content[2 * MiB : 2 * MiB + 64 * KiB] == bytes(64 * KiB)
    assert content[3 * MiB - 64 * KiB : 3 * MiB] == bytes(64 * KiB)
    random_part = content[2 * MiB + 64 * KiB : 3 * MiB - 64 * KiB]
    assert random_part.count(0) < len(random_part) // 100  # random, not a pattern of zeroes
    assert qemu.image_info(image)["virtual-size"] == 4 * MiB

    with pytest.raises(ValueError):
        qemu.write(image, 0, 10, fmt="qcow2", data=b"short")
    with pytest.raises(LabError, match="failed"):
        qemu.write(image, 8 * MiB, 64 * KiB, fmt="qcow2")


def test_bitmap_add_list_remove(tmp_path):
    image = tmp_path / "d.qcow2"
    qemu.create_image(image, 1 * MiB)
    assert qemu.list_bitmaps(image) == []
    qemu.add_bitmap(image, "a")
    qemu.add_bitmap(image, "b", granularity=128 * KiB)
    bitmaps = {b.name: b for b in qemu.list_bitmaps(image)}
    assert bitmaps["a"].granularity == 64 * KiB
    assert bitmaps["b"].granularity == 128 * KiB
    assert not bitmaps["a"].inconsistent
    assert "auto" in bitmaps["a"].flags
    qemu.remove_bitmap(image, "a")
    assert [b.name for b in qemu.list_bitmaps(image)] == ["b"]
    with pytest.raises(LabError):
        qemu.remove_bitmap(image, "a")
    with pytest.raises(LabError, match="no bitmap"):
        qemu.bitmap_is_broken(image, "a")


def test_bitmaps_record_writes_as_dirty_extents(sample_disk, nbd_exports, imageio_host, lab_pki):
    export = nbd_exports(sample_disk.path, fmt="qcow2", bitmap=sample_disk.bitmap)
    ticket_id = str(uuid.uuid4())
    imageio_host.add_ticket(make_ticket(ticket_id, export.url, sample_disk.size, dirty=True))
    try:
        with _session(lab_pki) as session:
            response = session.get(imageio_host.images_url(ticket_id) + "/extents?context=dirty")
            response.raise_for_status()
            extents = response.json()
    finally:
        imageio_host.delete_ticket(ticket_id)

    assert sum(e["length"] for e in extents) == sample_disk.size
    dirty = [(e["start"], e["length"]) for e in extents if e["dirty"]]
    assert _merged(dirty) == _merged(sample_disk.dirty_writes)
    for start, length in sample_disk.zeroed:
        assert any(e["start"] == start and e["length"] == length and e["zero"] for e in extents)


def test_break_bitmap_makes_it_inconsistent(tmp_path, nbd_exports):
    disk = build_sample_disk(tmp_path)
    before = file_sha256(disk.raw_copy(tmp_path / "before.raw"))
    assert not qemu.bitmap_is_broken(disk.path, disk.bitmap)

    qemu.break_bitmap(disk.path, disk.bitmap)

    assert qemu.bitmap_is_broken(disk.path, disk.bitmap)
    with pytest.raises(LabError, match="inconsistent"):
        nbd_exports(disk.path, fmt="qcow2", bitmap=disk.bitmap)
    # Guest data is untouched; a broken bitmap can only be removed.
    assert file_sha256(disk.raw_copy(tmp_path / "after.raw")) == before
    qemu.remove_bitmap(disk.path, disk.bitmap)
    assert qemu.list_bitmaps(disk.path) == []


def test_nbd_export_lifecycle(tmp_path):
    image = tmp_path / "d.qcow2"
    qemu.create_image(image, 1 * MiB)
    socket_path = tmp_path / "d.sock"
    with qemu.start_export(image, socket_path, fmt="qcow2") as export:
        assert export.url == f"nbd:unix:{socket_path}"
        assert export.running
        os.kill(export.pid, 0)
        # The export holds the image: qemu-img bitmap must fail while it runs.
        with pytest.raises(LabError):
            qemu.add_bitmap(image, "x")
    assert not export.running
    export.stop()  # idempotent
    assert not socket_path.exists()
    qemu.add_bitmap(image, "x")

    with pytest.raises(LabError, match="exited"):
        qemu.start_export(tmp_path / "missing.qcow2", tmp_path / "m.sock", fmt="qcow2")


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


def test_nbd_export_bypasses_page_cache(tmp_path):
    """As on oVirt hosts, exports use cache=none (O_DIRECT, native AIO); the data reads the same."""
    image = tmp_path / "d.raw"
    data = os.urandom(1 * MiB)
    image.write_bytes(data)
    with qemu.start_export(image, tmp_path / "d.sock", fmt="raw") as export:
        args = _cmdline(export.pid)
        assert "--cache=none" in args and "--aio=native" in args
        copy = tmp_path / "copy.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", export.url, os.fspath(copy)],
                       check=True, capture_output=True)
        assert copy.read_bytes() == data

# imageio daemon


def test_daemon_serves_tickets_and_counts_bytes(sample_disk, nbd_exports, imageio_host, imageio_proxy, lab_pki):
    export = nbd_exports(sample_disk.path, fmt="qcow2")
    host_id, proxy_id = str(uuid.uuid4()), str(uuid.uuid4())
    imageio_host.add_ticket(make_ticket(host_id, export.url, sample_disk.size))
    imageio_proxy.add_ticket(make_ticket(proxy_id, imageio_host.images_url(host_id), sample_disk.size))
    assert imageio_host.get_ticket(host_id)["url"] == export.url
    raw = sample_disk.raw_copy(sample_disk.path.with_suffix(".raw")).read_bytes()

    with _session(lab_pki) as session:
        direct = session.get(imageio_host.images_url(host_id), headers={"Range": "bytes=0-1048575"})
        assert direct.status_code == 206 and direct.content == raw[: 1 * MiB]
        # Through the proxy, which forwards to the host daemon: both count the bytes.
        routed = session.get(
            imageio_proxy.images_url(proxy_id), headers={"Range": f"bytes={2 * MiB}-{4 * MiB - 1}"}
        )
        assert routed.status_code == 206 and routed.content == raw[2 * MiB : 4 * MiB]
        assert imageio_proxy.get_ticket(proxy_id)["transferred"] == 2 * MiB

    assert imageio_host.bytes_served == 3 * MiB
    # A restart loses the tickets but not the count; the recorded tickets can be added again.
    old_pid = imageio_host.pid
    imageio_host.restart()
    assert imageio_host.pid != old_pid
    with pytest.raises(LabError):
        imageio_host.get_ticket(host_id)
    assert imageio_host.bytes_served == 3 * MiB
    imageio_host.readd_tickets()
    with _session(lab_pki) as session:
        again = session.get(imageio_host.images_url(host_id), headers={"Range": f"bytes={6 * MiB}-{7 * MiB - 1}"})
        assert again.content == raw[6 * MiB : 7 * MiB]

    imageio_proxy.delete_ticket(proxy_id)
    imageio_host.delete_ticket(host_id)
    imageio_host.delete_ticket(host_id)  # idempotent
    assert imageio_host.tickets == {}
    assert imageio_host.bytes_served == 4 * MiB
    assert imageio_proxy.bytes_served == 2 * MiB


def test_plain_http_daemon_and_start_failure(tmp_path):
    with ImageioDaemon(tmp_path, "plain", port=free_port(), pki=None) as daemon:
        assert daemon.base_url.startswith("http://")
        info = requests.get(daemon.base_url + "/info/", timeout=5)
        assert info.json()["version"].startswith("2.")
    assert daemon.pid is None

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        blocked = ImageioDaemon(tmp_path, "blocked", port=port, pki=None)
        with pytest.raises(LabError, match="exited"):
            blocked.start()
    assert blocked.pid is None
