"""The lab's data plane: qcow2 files, qemu-nbd exports and the two imageio daemons (host and
proxy) behind the lab engine, as the ``DataPlane`` the engine's rules drive."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ovirt_borg.lab import LabError, qemu
from ovirt_borg.lab.imageiod import ImageioDaemon, free_port
from ovirt_borg.lab.tls import LabPki

log = logging.getLogger(__name__)

_MAX_SOCKET_DIR = 80  # leaves room for "<n>.sock" under the 107-byte sun_path limit
_WRITE_BATCH = 64 << 20  # guest-write data staged per qemu-io run


class LabDataPlane:
    """The real parts behind the engine: qcow2 files, qemu-nbd exports, two imageio daemons.

    Given the run directory (daemon work dirs, export sockets) and the PKI (None for plain
    HTTP). ``start()`` starts the daemons; ``shutdown()`` stops exports and daemons.
    ``on_change`` is called whenever the set of child processes changes.
    """

    def __init__(self, run_dir: Path, pki: LabPki | None,
                 on_change: Callable[[], None] = lambda: None):
        self.run_dir = Path(run_dir)
        self.socket_dir = _short_dir(self.run_dir / "nbd")
        # The host daemon under the engine's internal CA, the proxy under the web certificate
        # (see tls): a client needs the right CA for each.
        self.host = ImageioDaemon(self.run_dir / "imageio", "host", port=free_port(),
                                  pki=pki.host() if pki else None)
        self.proxy = ImageioDaemon(self.run_dir / "imageio", "proxy", port=free_port(), pki=pki,
                                   backend_ca_file=pki.host_ca_file if pki else None)
        self.exports: dict[str, qemu.NbdExport] = {}
        self._on_change = on_change
        self._lock = threading.RLock()  # daemons and exports: engine calls and the restart thread
        self._socket_seq = 0
        self._write_tickets: dict[str, dict[str, Any]] = {}
        self._written = {"host": 0, "proxy": 0}
        self._restarts = 0
        self._watchers: list[threading.Thread] = []
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start both imageio daemons; raises ``LabError``."""
        self.host.start()
        try:
            self.proxy.start()
        except Exception:
            self.host.stop()
            raise
        self._on_change()

    # Images and bitmaps.

    def create_image(self, path: Path, size: int, fmt: str, *, container_size: int = 0) -> None:
        """Create an empty image; ``container_size`` makes its file that large (sparse), as
        the LV a qcow2 volume of a block domain lives in."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        qemu.create_image(path, size, fmt)
        if container_size:
            os.truncate(path, container_size)

    def remove_image(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def add_bitmap(self, path: Path, name: str) -> None:
        qemu.add_bitmap(path, name)

    def remove_bitmap(self, path: Path, name: str) -> None:
        if any(b.name == name for b in qemu.list_bitmaps(path)):
            qemu.remove_bitmap(path, name)

    def broken_bitmaps(self, path: Path, names: Iterable[str]) -> set[str]:
        """Return the names that are missing from the image, inconsistent (in use) or disabled
        (no ``auto`` flag): the bitmaps vdsm's nbd._find_bitmap refuses."""
        present = {b.name: b for b in qemu.list_bitmaps(path)}
        return {n for n in names
                if n not in present or present[n].inconsistent or "auto" not in present[n].flags}

    def break_bitmap(self, path: Path, name: str) -> None:
        qemu.break_bitmap(path, name)

    def guest_write(self, path: Path, fmt: str, writes: list[tuple[int, int, bytes | None]], *,
                    zero: bool, discard: bool) -> None:
        """Write (offset, length, data) ranges through qemu, as few qemu-io runs as possible.

        One qemu-io per range costs a process start each, so a scattered write of many ranges is batched:
        one qemu-io with a ``-c`` command per range, data staged in temp files of at most
        ``_WRITE_BATCH`` bytes per run. Raises ``LabError``.
        """
        if len(writes) == 1:
            offset, length, data = writes[0]
            qemu.write(path, offset, length, fmt=fmt, data=data, zero=zero, discard=discard)
            return
        if zero or discard:
            verb = "write -q -z -u" if zero else "discard -q"
            _qemu_io(path, fmt, [f"{verb} {offset} {length}" for offset, length, _ in writes])
            return
        batch: list[tuple[int, int, bytes | None]] = []
        size = 0
        for write in writes:
            if batch and size + write[1] > _WRITE_BATCH:
                self._write_batch(path, fmt, batch)
                batch, size = [], 0
            batch.append(write)
            size += write[1]
        if batch:
            self._write_batch(path, fmt, batch)

    @staticmethod
    def _write_batch(path: Path, fmt: str, writes: list[tuple[int, int, bytes | None]]) -> None:
        with tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".guest-write-") as tmp:
            commands = []
            for index, (offset, length, data) in enumerate(writes):
                source = Path(tmp) / str(index)
                source.write_bytes(data if data is not None else os.urandom(length))
                commands.append(f"write -q -s {source} {offset} {length}")
            _qemu_io(path, fmt, commands)

    def to_raw(self, path: Path, out: Path, fmt: str) -> None:
        qemu.to_raw(path, out, fmt)

    # Exports.

    def start_export(self, key: str, path: Path, fmt: str, *, read_only: bool,
                     bitmap: str | None, limit: int = 0) -> str:
        """Start a qemu-nbd export named ``key``; return its ``nbd:unix:`` URL.

        ``limit`` bounds the image's file (the LV of a block volume): writes past it fail with
        ENOSPC. A file the guest's writes made larger is taken whole, as vdsm extends a running
        VM's LV while it fills.
        """
        if limit:
            limit = max(limit, os.path.getsize(path))
        with self._lock:
            self._socket_seq += 1
            sock = self.socket_dir / f"{self._socket_seq}.sock"
            export = qemu.start_export(Path(path), sock, fmt=fmt, read_only=read_only,
                                       bitmap=bitmap, shared=8, discard=not read_only,
                                       limit=limit)
            self.exports[key] = export
        self._on_change()
        return export.url

    def stop_export(self, key: str) -> None:
        with self._lock:
            export = self.exports.pop(key, None)
        if export is None:
            return
        export.stop()
        export.socket_path.unlink(missing_ok=True)
        export.log_path.unlink(missing_ok=True)
        self._on_change()

    # Tickets.

    def add_ticket(self, ticket: dict[str, Any]) -> tuple[str, str]:
        """Add the ticket to the host daemon and a forwarding one to the proxy daemon.

        Returns (transfer_url, proxy_url). Raises ``LabError``.
        """
        ticket_id = ticket["uuid"]
        with self._lock:
            self.host.add_ticket(ticket)
            proxy_ticket = dict(ticket, url=self.host.images_url(ticket_id))
            try:
                self.proxy.add_ticket(proxy_ticket)
            except Exception:
                self.host.delete_ticket(ticket_id)
                raise
            if "write" in ticket["ops"]:
                self._write_tickets[ticket_id] = ticket
        return self.host.images_url(ticket_id), self.proxy.images_url(ticket_id)

    def delete_ticket(self, ticket_id: str) -> None:
        """Delete the ticket from the proxy, then from the host; raises ``LabError``."""
        with self._lock:
            if ticket_id in self._write_tickets:
                for name, daemon in (("proxy", self.proxy), ("host", self.host)):
                    self._written[name] += self._transferred(daemon, ticket_id)
                del self._write_tickets[ticket_id]
            self.proxy.delete_ticket(ticket_id)
            self.host.delete_ticket(ticket_id)

    def ticket_status(self, ticket_id: str) -> dict[str, Any]:
        """The host daemon's status of the ticket (``active``, ``idle_time``...); raises ``LabError``."""
        with self._lock:
            return self.host.get_ticket(ticket_id)

    @staticmethod
    def _transferred(daemon: ImageioDaemon, ticket_id: str) -> int:
        if not daemon.running:
            return 0
        try:
            return daemon.get_ticket(ticket_id).get("transferred") or 0
        except LabError:
            return 0

    def restart_host_daemon_during(self, ticket_id: str) -> None:
        """Restart the host daemon once this download ticket has served bytes; re-add tickets.

        Watches the ticket from a thread, so the engine keeps answering meanwhile.
        """
        thread = threading.Thread(target=self._restart_when_reading, args=(ticket_id,),
                                  name="imageio-restart", daemon=True)
        self._watchers.append(thread)
        thread.start()

    def _restart_when_reading(self, ticket_id: str, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set() and time.monotonic() < deadline:
            try:
                status = self.host.get_ticket(ticket_id)
            except LabError:
                log.info("imageio_restart: ticket gone before any byte was served")
                return
            if (status.get("transferred") or 0) > 0:
                break
            time.sleep(0.005)
        else:
            return
        with self._lock:
            log.info("imageio_restart: restarting the host imageio daemon mid-transfer")
            try:
                self.host.restart()
                self.host.readd_tickets()
            except LabError:
                log.exception("imageio_restart: the host daemon did not come back")
            self._restarts += 1
        self._on_change()

    # Bookkeeping.

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self._lock:
            for name, daemon in (("host", self.host), ("proxy", self.proxy)):
                served = daemon.bytes_served
                written = self._written[name] + sum(
                    self._transferred(daemon, t) for t in self._write_tickets)
                out[f"imageio.{name}.bytes"] = served
                out[f"imageio.{name}.bytes_read"] = max(0, served - written)
                out[f"imageio.{name}.bytes_written"] = written
                out[f"imageio.{name}.url"] = daemon.base_url
                out[f"imageio.{name}.pid"] = daemon.pid
            out["imageio.host.restarts"] = self._restarts
            out["exports"] = len(self.exports)
        return out

    def children(self) -> dict[str, Any]:
        """Pids of the daemons and exports, for run/engine.json."""
        with self._lock:
            return {
                "imageio_host": self.host.pid,
                "imageio_proxy": self.proxy.pid,
                "exports": {key: e.pid for key, e in self.exports.items()},
            }

    def shutdown(self) -> None:
        """Stop every export, then both daemons; never raises."""
        self._stopping.set()
        for thread in self._watchers:
            thread.join(timeout=5)
        for key in list(self.exports):
            try:
                self.stop_export(key)
            except Exception:
                log.exception("stopping export %s failed", key)
        for daemon in (self.proxy, self.host):
            try:
                daemon.stop()
            except Exception:
                log.exception("stopping imageio daemon %s failed", daemon.name)
        self._on_change()


def _qemu_io(path: Path, fmt: str, commands: list[str]) -> None:
    """Run one qemu-io with several commands on the image; raises ``LabError``."""
    cmd = ["qemu-io", "-f", fmt]
    for command in commands:
        cmd += ["-c", command]
    cmd.append(os.fspath(path))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise LabError("qemu-io is not installed; install the Debian package qemu-utils") from e
    # qemu-io reports a failed command on stderr/stdout but may still exit 0.
    output = (result.stderr + result.stdout).strip()
    if result.returncode != 0 or output:
        raise LabError(f"qemu-io on {path} failed (exit {result.returncode}): {output[:500]}")


def _short_dir(preferred: Path) -> Path:
    """Return ``preferred`` (created) or, when too deep for unix sockets, a new dir in /tmp."""
    if len(os.fspath(preferred)) <= _MAX_SOCKET_DIR:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    return Path(tempfile.mkdtemp(prefix="ovirt-borg-lab-"))
