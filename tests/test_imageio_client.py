"""ovirt-borg's imageio client against real imageio daemons, qemu-nbd exports and bitmaps."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import subprocess
import threading
import uuid

import pytest

pytest.register_assert_rewrite("fixtures_dataplane")

from fixtures_dataplane import MiB  # noqa: E402
from helpers import file_sha256  # noqa: E402
from ovirt_borg.errors import ConfigError, TransferError  # noqa: E402
from ovirt_borg.imageio import ImageioClient, NoDirtyExtents, TransferSettings, mask_ticket_url  # noqa: E402
from ovirt_borg.lab import qemu  # noqa: E402
from ovirt_borg.lab.imageiod import free_port  # noqa: E402

pytest_plugins = ["fixtures_dataplane"]


def _settings(pki, **overrides) -> TransferSettings:
    return TransferSettings(ca_file=str(pki.ca_file), **overrides)


def _blocks(size: int, block: int) -> list[tuple[int, int]]:
    return [(offset, min(block, size - offset)) for offset in range(0, size, block)]


def _merged(ranges):
    merged: list[list[int]] = []
    for start, length in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + length)
        else:
            merged.append([start, start + length])
    return [(start, end - start) for start, end in merged]


def _read_all(client: ImageioClient, size: int, block: int) -> str:
    """Read the whole image in blocks; check the order; return the sha256 of the bytes."""
    ranges = _blocks(size, block)
    digest = hashlib.sha256()
    offsets = []
    for offset, data in client.read_ranges(ranges):
        assert isinstance(data, bytes)
        offsets.append(offset)
        digest.update(data)
    assert offsets == [offset for offset, _ in ranges]
    return digest.hexdigest()


@pytest.fixture
def source(sample_disk, tmp_path):
    """The sample disk, its raw conversion (qemu-img) and that file's sha256."""
    raw = sample_disk.raw_copy(tmp_path / "source.raw")
    return sample_disk, raw, file_sha256(raw)


class _CuttingRelay:
    """A TCP relay to a real server that cuts one connection after ``cut_after`` bytes.

    It stands for a network that drops a connection in the middle of a response; TLS passes
    through untouched, so the client still talks to the real daemon.
    """

    def __init__(self, upstream_port: int, cut_after: int):
        self._upstream_port = upstream_port
        self._cut_after = cut_after
        self._cut_done = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def cut(self) -> bool:
        return self._cut_done.is_set()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream_port))
            self._sockets += [client, upstream]
            for src, dst, downstream in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=(src, dst, downstream), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if downstream and not self._cut_done.is_set() and sent + len(data) > self._cut_after:
                    self._cut_done.set()
                    dst.sendall(data[: self._cut_after - sent])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._closing = True
        try:
            # Wakes the thread blocked in accept(); close() alone does not.
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)


# Extents


def test_extents_match_qemu_map_and_bitmap(source, nbd_exports, publish, lab_pki):
    disk, _, _ = source
    qemu_map = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qcow2", disk.path],
            capture_output=True, text=True, check=True,
        ).stdout
    )
    export = nbd_exports(disk.path, fmt="qcow2", bitmap=disk.bitmap)
    urls = publish(export, disk.size, dirty=True)

    with ImageioClient(urls.transfer_url, urls.proxy_url, _settings(lab_pki)) as client:
        zero_extents = client.extents("zero")
        dirty_extents = client.extents("dirty")
        assert not client.via_proxy
        options = client.options()

    assert options["max_readers"] >= 1 and "extents" in options["features"]
    for extents in (zero_extents, dirty_extents):
        assert extents[0].start == 0
        assert all(a.end == b.start for a, b in zip(extents, extents[1:]))
        assert extents[-1].end == disk.size
    assert _merged((e.start, e.length) for e in zero_extents if e.zero) == _merged(
        (m["start"], m["length"]) for m in qemu_map if m["zero"]
    )
    assert any(e.hole for e in zero_extents)
    assert _merged((e.start, e.length) for e in dirty_extents if e.dirty) == _merged(disk.dirty_writes)
    for start, length in disk.zeroed:
        assert any(e.dirty and e.zero and e.start == start and e.length == length for e in dirty_extents)


def test_dirty_extents_without_bitmap_is_a_clear_error(source, nbd_exports, publish, lab_pki):
    disk, _, _ = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size, dirty=False)
    with ImageioClient(urls.transfer_url, None, _settings(lab_pki, retries=0)) as client:
        with pytest.raises(NoDirtyExtents, match="no dirty extents") as raised:
            client.extents("dirty")
        with pytest.raises(ValueError):
            client.extents("bogus")
    assert urls.host_ticket_id not in str(raised.value)


# Reads


@pytest.mark.parametrize("readers", [1, 4])
def test_read_ranges_equal_qemu_raw(source, nbd_exports, publish, imageio_host, lab_pki, readers):
    disk, _, expected = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    with ImageioClient(urls.transfer_url, urls.proxy_url, _settings(lab_pki, readers=readers)) as client:
        assert _read_all(client, disk.size, 1 * MiB) == expected
        # Ranges need not be aligned or sorted; order is kept.
        odd = [(5 * MiB + 7, 1000), (0, 1), (disk.size - 3, 3), (123, 0)]
        got = list(client.read_ranges(odd))
    raw = source[1].read_bytes()
    assert [offset for offset, _ in got] == [offset for offset, _ in odd]
    assert [data for _, data in got] == [raw[o : o + n] for o, n in odd]
    assert client.bytes_read == disk.size + 1004
    assert imageio_host.bytes_served >= disk.size


def test_read_ranges_cut_into_block_pieces(source, nbd_exports, publish, lab_pki):
    """With piece_size, each range comes back as pieces ending at multiples of piece_size."""
    disk, raw, _ = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    piece = 256 * 1024
    ranges = [(0, 4 * piece), (5 * piece + 100, 2 * piece), (8 * piece, 17)]
    with ImageioClient(urls.transfer_url, None, _settings(lab_pki, readers=2)) as client:
        got = list(client.read_ranges(ranges, piece_size=piece))
    data = raw.read_bytes()
    assert [(o, len(d)) for o, d in got] == [
        (0, piece), (piece, piece), (2 * piece, piece), (3 * piece, piece),
        (5 * piece + 100, piece - 100), (6 * piece, piece), (7 * piece, 100),
        (8 * piece, 17)]
    assert all(type(d) is bytes and d == data[o:o + len(d)] for o, d in got)
    assert client.bytes_read == sum(n for _, n in ranges)

def test_workers_leave_a_backend_connection_to_the_main_one(source, nbd_exports, publish, lab_pki):
    """More readers than the server allows: one fewer worker than max_readers, and all data.

    The main connection holds one of qemu-nbd's ``--shared`` client slots; a worker per slot
    would leave the last one waiting until another connection closes.
    """
    disk, raw, _ = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    with ImageioClient(urls.transfer_url, None, _settings(lab_pki, readers=16)) as client:
        server_max = client.options()["max_readers"]
        client.extents("zero")  # the main connection opens its backend
        reader = client.read_ranges(_blocks(disk.size, 256 * 1024))
        pieces = [next(reader)]
        workers = [t for t in threading.enumerate() if t.name.startswith("imageio-read")]
        pieces += list(reader)
    assert server_max > 1 and len(workers) == server_max - 1
    assert b"".join(data for _, data in pieces) == raw.read_bytes()


def test_read_stops_cleanly_when_consumer_stops(source, nbd_exports, publish, lab_pki):
    disk, raw, _ = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    with ImageioClient(urls.transfer_url, None, _settings(lab_pki, readers=2)) as client:
        reader = client.read_ranges(_blocks(disk.size, 512 * 1024))
        offset, data = next(reader)
        assert (offset, data) == (0, raw.read_bytes()[: 512 * 1024])
        reader.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("imageio-read")]
        # The client still works after an abandoned read.
        assert list(client.read_ranges([(0, 16)])) == [(0, data[:16])]


def test_wrong_ca_is_a_transfer_error(source, nbd_exports, publish, other_pki, lab_pki):
    disk, _, expected = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    client = ImageioClient(urls.transfer_url, urls.proxy_url, _settings(other_pki, retries=0))
    with client, pytest.raises(TransferError, match="not trusted") as raised:
        client.extents()
    message = str(raised.value)
    assert urls.host_ticket_id not in message and urls.proxy_ticket_id not in message
    assert "/images/****" in message
    # A certificate problem is not a connection problem: no silent switch to the proxy.
    assert not client.via_proxy

    insecure = TransferSettings(ca_file=str(other_pki.ca_file), verify=False)
    with ImageioClient(urls.transfer_url, None, insecure) as client:
        assert _read_all(client, disk.size, 4 * MiB) == expected


def test_unknown_ticket_error_is_masked(imageio_host, lab_pki, caplog):
    secret = str(uuid.uuid4())
    caplog.set_level(logging.DEBUG)
    with ImageioClient(imageio_host.images_url(secret), None, _settings(lab_pki, retries=1)) as client:
        with pytest.raises(TransferError, match="403") as raised:
            client.options()
    assert secret not in str(raised.value)
    assert "after 2 attempts" in str(raised.value)
    assert secret not in caplog.text
    assert "retrying" in caplog.text
    assert mask_ticket_url(f"https://h:1/images/{secret}?x=1") == "https://h:1/images/****"


def test_daemon_restart_mid_read_completes(source, nbd_exports, publish, imageio_host, lab_pki, caplog):
    disk, _, expected = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    ranges = _blocks(disk.size, 512 * 1024)
    digest = hashlib.sha256()
    old_pid = imageio_host.pid
    readd = threading.Timer(1.0, imageio_host.readd_tickets)
    with ImageioClient(urls.transfer_url, None, _settings(lab_pki, readers=2)) as client:
        try:
            for index, (_, data) in enumerate(client.read_ranges(ranges)):
                digest.update(data)
                if index == 3:
                    # Like a host's imageio restart: tickets are lost until the engine
                    # re-adds them a moment later; in-flight and idle connections die.
                    imageio_host.restart()
                    readd.start()
        finally:
            readd.cancel()
            if readd.is_alive():
                readd.join()
    assert imageio_host.pid != old_pid
    assert digest.hexdigest() == expected
    assert "retrying" in caplog.text
    assert urls.host_ticket_id not in caplog.text


def test_cut_connection_resumes_at_the_failed_byte(source, nbd_exports, publish, imageio_host, lab_pki, caplog):
    disk, _, expected = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    relay = _CuttingRelay(imageio_host.port, cut_after=1 * MiB + 12345)
    try:
        relayed = urls.transfer_url.replace(f":{imageio_host.port}/", f":{relay.port}/")
        with ImageioClient(relayed, None, _settings(lab_pki, readers=1)) as client:
            assert _read_all(client, disk.size, 4 * MiB) == expected
    finally:
        relay.close()
    assert relay.cut
    assert "retrying" in caplog.text
    # Resumed, not restarted: every byte crossed the wire once.
    assert client.bytes_read == disk.size


def test_unreachable_transfer_url_falls_back_to_proxy(
    source, nbd_exports, publish, imageio_host, imageio_proxy, lab_pki, caplog
):
    disk, _, expected = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    dead = urls.transfer_url.replace(f":{imageio_host.port}/", f":{free_port()}/")
    with ImageioClient(dead, urls.proxy_url, _settings(lab_pki)) as client:
        assert _read_all(client, disk.size, 1 * MiB) == expected
        assert client.via_proxy
    assert "using the engine's proxy" in caplog.text
    assert urls.host_ticket_id not in caplog.text
    # Data really went proxy -> host -> qemu-nbd.
    assert imageio_proxy.bytes_served == disk.size
    assert imageio_host.bytes_served == disk.size


def test_force_proxy_and_settings(source, nbd_exports, publish, imageio_host, imageio_proxy, lab_pki):
    disk, _, expected = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    with ImageioClient(urls.transfer_url, urls.proxy_url, _settings(lab_pki, force_proxy=True)) as client:
        assert client.via_proxy
        assert _read_all(client, disk.size, 2 * MiB) == expected
    assert imageio_proxy.bytes_served == disk.size

    with pytest.raises(ConfigError):
        ImageioClient(urls.transfer_url, None, _settings(lab_pki, force_proxy=True))
    with pytest.raises(ConfigError):
        TransferSettings(readers=0)
    with pytest.raises(ConfigError):
        ImageioClient(urls.transfer_url, None, TransferSettings(ca_file="/nonexistent/ca.pem"))


class _StoppedClock:
    """Stands in for the ``time`` module of ovirt_borg.imageio: the clock stands still and the
    sleeps asked for are recorded instead of slept, so that what the bandwidth limit asks of
    the readers is seen whatever the machine's load."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return 0.0

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)


def test_bandwidth_limit_slows_reads(source, nbd_exports, publish, lab_pki, monkeypatch):
    from ovirt_borg import imageio

    disk, raw, _ = source
    export = nbd_exports(disk.path, fmt="qcow2")
    urls = publish(export, disk.size)
    clock = _StoppedClock()
    monkeypatch.setattr(imageio, "time", clock)
    limited = _settings(lab_pki, readers=4, bandwidth_limit=16 * MiB)
    with ImageioClient(urls.transfer_url, None, limited) as client:
        data = b"".join(piece for _, piece in client.read_ranges(_blocks(8 * MiB, 1 * MiB)))
    assert data == raw.read_bytes()[:8 * MiB]
    # Eight 1 MiB ranges at 16 MiB/s, shared by four readers: each range starts 1/16 s after
    # the one before (the first at once), the last 7/16 s after the first.
    assert sorted(clock.sleeps) == pytest.approx([k / 16 for k in range(1, 8)])


# Writes (restore)


def test_writes_zero_and_flush_rebuild_the_image(source, tmp_path, nbd_exports, publish, imageio_host,
                                                 imageio_proxy, lab_pki):
    disk, raw, expected = source
    target = tmp_path / "target.qcow2"
    qemu.create_image(target, disk.size)
    # Garbage everywhere first, so zero requests must really zero.
    qemu.write(target, 0, disk.size, fmt="qcow2")
    export = nbd_exports(target, fmt="qcow2", read_only=False, discard=True)
    urls = publish(export, disk.size, ops=("write",))

    content = raw.read_bytes()
    block = 1 * MiB
    items = []
    for offset, length in _blocks(disk.size, block):
        data = content[offset : offset + length]
        items.append((offset, length, None if data == bytes(length) else data))
    assert any(data is None for _, _, data in items) and any(data for _, _, data in items)
    data_bytes = sum(length for _, length, data in items if data is not None)

    with ImageioClient(urls.transfer_url, urls.proxy_url, _settings(lab_pki)) as client:
        assert {"zero", "flush"} <= set(client.options()["features"])
        # One at a time for the first two blocks, in parallel for the rest.
        for offset, length, data in items[:2]:
            if data is None:
                client.zero(offset, length)
            else:
                client.write(offset, data)
        client.flush()
        # A request may come as parts (sent one after the other): the next two blocks as one.
        (o3, n3, d3), (o4, n4, d4) = items[2:4]
        assert d3 is not None and d4 is not None and o3 + n3 == o4
        items[2:4] = [(o3, n3 + n4, (d3, memoryview(d4)))]
        client.write_ranges(items[2:])
        with pytest.raises(TransferError, match="416"):
            client.write(disk.size, b"x" * 512)
    assert client.bytes_written == data_bytes

    imageio_proxy.delete_ticket(urls.proxy_ticket_id)
    imageio_host.delete_ticket(urls.host_ticket_id)
    export.stop()
    rebuilt = tmp_path / "rebuilt.raw"
    qemu.to_raw(target, rebuilt, "qcow2")
    assert file_sha256(rebuilt) == expected
