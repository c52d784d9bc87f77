"""Pytest fixtures for the lab's data plane: PKI, imageio daemons, qemu-nbd exports, disks.

Use from a test module or conftest with ``pytest_plugins = ["tests.fixtures_dataplane"]``
(or ``["fixtures_dataplane"]`` when ``tests`` is on ``sys.path``). Every process a fixture
starts is stopped at teardown, tickets before the exports behind them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ovirt_borg.lab import qemu
from ovirt_borg.lab.imageiod import ImageioDaemon, free_port, make_ticket
from ovirt_borg.lab.tls import LabPki, make_lab_pki

MiB = 1024 * 1024
KiB = 1024


@dataclass
class SampleDisk:
    """A small qcow2 disk with data, zeroes, holes and one bitmap that recorded known writes.

    ``base_writes`` happened before the bitmap was added, ``dirty_writes`` after it (data,
    zero-writes and discards), as ``(offset, length)``.
    """

    path: Path
    size: int
    bitmap: str
    base_writes: list[tuple[int, int]] = field(default_factory=list)
    dirty_writes: list[tuple[int, int]] = field(default_factory=list)
    zeroed: list[tuple[int, int]] = field(default_factory=list)

    def raw_copy(self, out: Path) -> Path:
        """Convert the disk to a raw file at ``out`` (qemu-img) and return ``out``."""
        qemu.to_raw(self.path, out, "qcow2")
        return out


@dataclass(frozen=True)
class Published:
    """An export reachable through both daemons: the URLs an engine's image transfer shows."""

    transfer_url: str
    proxy_url: str
    host_ticket_id: str
    proxy_ticket_id: str


def build_sample_disk(directory: Path, name: str = "disk.qcow2", size: int = 8 * MiB) -> SampleDisk:
    """Create the ``SampleDisk`` layout in ``directory`` (random data, so nothing dedups)."""
    disk = SampleDisk(path=directory / name, size=size, bitmap="chk-1")
    qemu.create_image(disk.path, size)
    for offset, length in [(0, 1 * MiB), (3 * MiB, 512 * KiB), (6 * MiB, 1 * MiB)]:
        qemu.write(disk.path, offset, length, fmt="qcow2")
        disk.base_writes.append((offset, length))
    qemu.add_bitmap(disk.path, disk.bitmap)
    for offset, length in [(64 * KiB, 64 * KiB), (2 * MiB, 256 * KiB), (7 * MiB + 128 * KiB, 64 * KiB)]:
        qemu.write(disk.path, offset, length, fmt="qcow2")
        disk.dirty_writes.append((offset, length))
    # A zero-write and a discard over old data must show up as dirty too.
    qemu.write(disk.path, 3 * MiB, 128 * KiB, fmt="qcow2", zero=True)
    qemu.write(disk.path, 6 * MiB + 512 * KiB, 64 * KiB, fmt="qcow2", discard=True)
    disk.dirty_writes += [(3 * MiB, 128 * KiB), (6 * MiB + 512 * KiB, 64 * KiB)]
    disk.zeroed += [(3 * MiB, 128 * KiB), (6 * MiB + 512 * KiB, 64 * KiB)]
    return disk


@pytest.fixture(scope="session")
def lab_pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    """The lab CA and server certificate, made once per test session."""
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    """A second, unrelated CA: trusting it must not let a client accept the lab's daemons."""
    return make_lab_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def imageio_host(tmp_path: Path, lab_pki: LabPki) -> Iterator[ImageioDaemon]:
    """A running imageio daemon in the host's role (HTTPS with the lab CA)."""
    daemon = ImageioDaemon(tmp_path, "host-imageio", port=free_port(), pki=lab_pki)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def imageio_proxy(tmp_path: Path, lab_pki: LabPki) -> Iterator[ImageioDaemon]:
    """A running imageio daemon in the engine proxy's role (HTTPS with the lab CA)."""
    daemon = ImageioDaemon(tmp_path, "proxy-imageio", port=free_port(), pki=lab_pki)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def nbd_exports(tmp_path: Path) -> Iterator[Callable[..., qemu.NbdExport]]:
    """Factory ``start(image, *, fmt, **options) -> NbdExport``; all are stopped at teardown."""
    started: list[qemu.NbdExport] = []
    socket_dir = tmp_path / "nbd"
    socket_dir.mkdir()

    def start(image: Path, **options) -> qemu.NbdExport:
        socket_path = socket_dir / f"{len(started)}.sock"
        export = qemu.start_export(image, socket_path, **options)
        started.append(export)
        return export

    try:
        yield start
    finally:
        for export in started:
            export.stop()


@pytest.fixture
def publish(
    imageio_host: ImageioDaemon,
    imageio_proxy: ImageioDaemon,
    nbd_exports: Callable[..., qemu.NbdExport],
) -> Iterator[Callable[..., Published]]:
    """Factory ``publish(export, size, *, ops=("read",), dirty=False) -> Published``.

    Adds a host ticket pointing at the qemu-nbd export and a proxy ticket pointing at the host
    daemon's image URL (data flows proxy -> host -> qemu-nbd), as the engine does for an image
    transfer. Tickets are deleted at teardown, before the exports stop.
    """
    added: list[tuple[ImageioDaemon, str]] = []

    def publish_export(
        export: qemu.NbdExport, size: int, *, ops: tuple[str, ...] = ("read",), dirty: bool = False
    ) -> Published:
        host_id = str(uuid.uuid4())
        proxy_id = str(uuid.uuid4())
        imageio_host.add_ticket(make_ticket(host_id, export.url, size, ops=ops, dirty=dirty))
        added.append((imageio_host, host_id))
        imageio_proxy.add_ticket(
            make_ticket(proxy_id, imageio_host.images_url(host_id), size, ops=ops, dirty=dirty)
        )
        added.append((imageio_proxy, proxy_id))
        return Published(
            transfer_url=imageio_host.images_url(host_id),
            proxy_url=imageio_proxy.images_url(proxy_id),
            host_ticket_id=host_id,
            proxy_ticket_id=proxy_id,
        )

    try:
        yield publish_export
    finally:
        # The proxy's tickets first: their connections hold the host's tickets open.
        for daemon, ticket_id in reversed(added):
            if daemon.running:
                daemon.delete_ticket(ticket_id)


@pytest.fixture
def sample_disk(tmp_path: Path) -> SampleDisk:
    """An 8 MiB qcow2 ``SampleDisk`` (see ``build_sample_disk``)."""
    return build_sample_disk(tmp_path)
