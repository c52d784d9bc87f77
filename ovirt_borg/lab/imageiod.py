"""The real ``ovirt-imageio`` daemon, run standalone for the lab.

Two daemons play the two roles of an oVirt data path:

- the host's imageio (``transfer_url``): its tickets point at qemu-nbd sockets
  (``nbd:unix:/path.sock``);
- the engine's imageio proxy (``proxy_url``): its tickets point at the host daemon's image URL
  (``https://127.0.0.1:PORT/images/ID``). The daemon's own http backend then forwards every
  request, extents included, so data really flows proxy -> host -> qemu-nbd as in oVirt. As
  ovirt-engine-setup's ``50-engine.conf`` configures it, the proxy presents the engine's web
  certificate and its backend trusts the hosts through ``[backend_http] ca_file``, the
  engine's internal CA, which signs the host daemon's certificate (see ``tls``).

Tickets are managed over the daemon's control socket (HTTP over a unix socket), as vdsm and
the engine do. ``bytes_served`` counts image bytes moved through a daemon: imageio tracks, per
read-only or write-only ticket, the byte ranges completed (``transferred``: the union of
ranges, so a range read twice counts once); the lab reads it before a ticket is deleted or the
daemon is stopped, so the count survives both. imageio counts an operation's bytes as it moves
them, and a client may have the last byte before the operation ends, so ``bytes_served`` waits
for a ticket's running operations (its ``active``) to end before reading its count.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from ovirt_borg.lab import LabError
from ovirt_borg.lab.tls import LabPki

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 107

# The daemon checks for termination this often; a small value makes stop/restart fast.
_POLL_INTERVAL = 0.2

# Tickets outlive any lab transfer: imageio resets a PATCHed timeout on every request anyway.
DEFAULT_TICKET_TIMEOUT = 24 * 3600

# How long a read of ``bytes_served`` waits for a ticket's running operations to end, and how
# often it looks: an operation ends moments after its last byte, unless a client is still
# reading, when the count is taken as it is at the deadline.
SETTLE_TIMEOUT = 10.0
_SETTLE_POLL = 0.01


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_ticket(
    ticket_id: str,
    url: str,
    size: int,
    *,
    ops: tuple[str, ...] | list[str] = ("read",),
    timeout: int = DEFAULT_TICKET_TIMEOUT,
    inactivity_timeout: int = 120,
    dirty: bool = False,
    sparse: bool = True,
    transfer_id: str | None = None,
) -> dict:
    """Build an imageio ticket dict.

    Given the ticket id (the secret part of the image URL), the backend ``url``
    (``nbd:unix:/path.sock``, ``file:///path`` for raw files, or another daemon's
    ``https://.../images/ID`` for a proxy), the image size and options: ``ops`` ``("read",)``
    for downloads, ``("write",)`` for uploads (write implies read); ``dirty`` allows
    ``extents?context=dirty`` (the export must expose one bitmap); ``sparse`` lets zero
    requests unmap. Returns the dict ``ImageioDaemon.add_ticket`` accepts.
    """
    ticket = {
        "uuid": ticket_id,
        "url": url,
        "size": size,
        "ops": list(ops),
        "timeout": timeout,
        "inactivity_timeout": inactivity_timeout,
        "dirty": dirty,
        "sparse": sparse,
    }
    if transfer_id:
        ticket["transfer_id"] = transfer_id
    return ticket


def _daemon_executable() -> str:
    """Return the path of the ``ovirt-imageio`` console script, preferring this venv's.

    Raises ``LabError`` when it is not installed (``pip install ovirt-imageio``).
    """
    beside = Path(sys.executable).parent / "ovirt-imageio"
    if beside.exists():
        return os.fspath(beside)
    found = shutil.which("ovirt-imageio")
    if found:
        return found
    raise LabError("the ovirt-imageio daemon is not installed; pip install 'ovirt-borg[lab]'")


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the imageio control service)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class ImageioDaemon:
    """One standalone ``ovirt-imageio`` daemon with its own config, run dir and log.

    Given a work directory, a name (the daemon's files go to ``workdir/name``), the TCP port
    to listen on (127.0.0.1 only; use ``free_port()``), a ``LabPki`` for HTTPS (the key and
    certificate it presents, the CA it trusts) or None for plain HTTP, and for a proxy the CA
    its http backend trusts (``backend_ca_file``, default: the ``pki`` CA). Nothing runs until
    ``start()``.
    """

    def __init__(self, workdir: Path, name: str, *, port: int, pki: LabPki | None,
                 backend_ca_file: Path | None = None):
        self.name = name
        self.port = port
        self.pki = pki
        self.backend_ca_file = backend_ca_file
        self.dir = Path(workdir) / name
        self.conf_dir = self.dir / "conf"
        self.run_dir = self.dir / "run"
        self.control_socket = self.run_dir / "sock"
        self.log_file = self.dir / "daemon.log"
        self._output_file = self.dir / "output.log"
        if len(os.fspath(self.control_socket)) > _MAX_SOCKET_PATH:
            raise LabError(f"work directory too deep for a unix socket: {self.control_socket}")
        self._process: subprocess.Popen | None = None
        self._tickets: dict[str, dict] = {}
        self._served = 0

    # Process life cycle.

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT`` (``http://`` without a PKI)."""
        scheme = "https" if self.pki else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def images_url(self, ticket_id: str) -> str:
        """The image URL clients use for ``ticket_id`` (a transfer_url or proxy_url)."""
        return f"{self.base_url}/images/{ticket_id}"

    @property
    def pid(self) -> int | None:
        """Process id of the running daemon, None when it is not running."""
        if self._process is not None and self._process.poll() is None:
            return self._process.pid
        return None

    @property
    def running(self) -> bool:
        """True while the daemon process is alive."""
        return self.pid is not None

    def write_config(self) -> Path:
        """Write the daemon's ``conf.d/50-lab.conf``; return the conf dir (``--conf-dir``)."""
        conf_d = self.conf_dir / "conf.d"
        conf_d.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.pki:
            tls = (
                "[tls]\nenable = true\n"
                f"key_file = {self.pki.key_file}\n"
                f"cert_file = {self.pki.cert_file}\n"
                f"ca_file = {self.pki.ca_file}\n"
            )
            if self.backend_ca_file:
                tls += f"\n[backend_http]\nca_file = {self.backend_ca_file}\n"
        else:
            tls = "[tls]\nenable = false\n"
        # The defaults assume a real oVirt host (systemd, user ovirtimg, /run, /var/log and a
        # fixed abstract socket that only one daemon can own), so each of them is overridden.
        (conf_d / "50-lab.conf").write_text(
            "[daemon]\n"
            "systemd_enable = false\n"
            "drop_privileges = false\n"
            f"run_dir = {self.run_dir}\n"
            f"poll_interval = {_POLL_INTERVAL}\n"
            "\n"
            f"{tls}\n"
            "[remote]\nhost = 127.0.0.1\n"
            f"port = {self.port}\n"
            "\n"
            "[local]\nenable = false\n"
            "\n"
            "[control]\ntransport = unix\n"
            f"socket = {self.control_socket}\n"
            "\n"
            f"[profile]\nfilename = {self.run_dir / 'profile'}\n"
            "\n"
            "[handlers]\nkeys = logfile\n"
            "\n"
            "[logger_root]\nhandlers = logfile\n"
            "\n"
            f"[handler_logfile]\nargs = ({os.fspath(self.log_file)!r},)\n"
        )
        return self.conf_dir

    def start(self, timeout: float = 20.0) -> None:
        """Start the daemon and wait until ``GET /info/`` and the control socket answer.

        The daemon runs in its own session so a terminal's Ctrl-C does not reach it.
        Raises ``LabError`` when it is already running, exits, or is not ready in ``timeout``
        seconds (the end of its log is in the message).
        """
        if self.running:
            raise LabError(f"imageio daemon {self.name} is already running (pid {self.pid})")
        conf_dir = self.write_config()
        self.control_socket.unlink(missing_ok=True)
        with open(self._output_file, "ab") as output:
            self._process = subprocess.Popen(
                [_daemon_executable(), "--conf-dir", os.fspath(conf_dir)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise LabError(
                    f"imageio daemon {self.name} exited with {self._process.returncode}: "
                    f"{self._log_tail()}"
                )
            if self._ready():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(
                    f"imageio daemon {self.name} not ready on {self.base_url} in {timeout} s: "
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)
        log.info("imageio daemon %s (pid %s) listening on %s", self.name, self.pid, self.base_url)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the daemon with SIGTERM and wait; idempotent.

        Bytes served by live tickets are added to ``bytes_served`` first, because the
        daemon's tickets die with it. Falls back to SIGKILL after ``timeout`` seconds.
        """
        process = self._process
        if process is None or process.poll() is not None:
            return
        for ticket_id in list(self._tickets):
            self._served += self._transferred(ticket_id)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("imageio daemon %s ignored SIGTERM for %s s, killing it", self.name, timeout)
            process.kill()
            process.wait()
        log.info("imageio daemon %s stopped", self.name)

    def restart(self) -> None:
        """Stop and start the daemon on the same port, as a host's imageio restart does.

        Tickets are lost, as in a real restart; the ones added through this object stay
        recorded, so ``readd_tickets()`` can put them back (what the engine would do).
        Raises ``LabError`` when the new daemon does not start.
        """
        self.stop()
        self.start()

    def readd_tickets(self) -> None:
        """Add again every ticket added through this object and not deleted since.

        Raises ``LabError`` when the daemon refuses one.
        """
        for ticket in list(self._tickets.values()):
            self.add_ticket(ticket)

    def __enter__(self) -> ImageioDaemon:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<ImageioDaemon {self.name} pid={self.pid} url={self.base_url}>"

    # Tickets (control socket).

    def add_ticket(self, ticket: dict) -> None:
        """Install ``ticket`` (see ``make_ticket``) in the daemon and record it.

        Raises ``LabError`` when the daemon refuses it or does not answer.
        """
        status, body = self._control("PUT", ticket["uuid"], json.dumps(ticket).encode())
        if status != http.client.OK:
            raise LabError(f"imageio daemon {self.name} refused a ticket: {status} {body!r}")
        self._tickets[ticket["uuid"]] = dict(ticket)
        log.debug("imageio daemon %s: added ticket %s...", self.name, ticket["uuid"][:8])

    def get_ticket(self, ticket_id: str) -> dict:
        """Return the daemon's status of the ticket (``transferred``, ``connections``, ...).

        Raises ``LabError`` when there is no such ticket or the daemon does not answer.
        """
        status, body = self._control("GET", ticket_id)
        if status != http.client.OK:
            raise LabError(f"imageio daemon {self.name}: no ticket {ticket_id[:8]}...: {status}")
        return json.loads(body)

    def extend_ticket(self, ticket_id: str, timeout: int) -> None:
        """Set the ticket to expire ``timeout`` seconds from now.

        Raises ``LabError`` when there is no such ticket.
        """
        status, body = self._control("PATCH", ticket_id, json.dumps({"timeout": timeout}).encode())
        if status != http.client.OK:
            raise LabError(f"imageio daemon {self.name}: cannot extend ticket: {status} {body!r}")

    def delete_ticket(self, ticket_id: str) -> None:
        """Delete the ticket, adding the bytes it served to ``bytes_served``; idempotent.

        When the daemon is not running the ticket is gone already and is only forgotten.
        Raises ``LabError`` when the daemon refuses (a ticket still in use: 409).
        """
        if not self.running:
            self._tickets.pop(ticket_id, None)
            return
        transferred = self._transferred(ticket_id)
        status, body = self._control("DELETE", ticket_id)
        if status != http.client.NO_CONTENT:
            raise LabError(f"imageio daemon {self.name} cannot delete a ticket: {status} {body!r}")
        self._served += transferred
        self._tickets.pop(ticket_id, None)

    @property
    def tickets(self) -> dict[str, dict]:
        """Copy of the tickets added through this object and not deleted, by id."""
        return {ticket_id: dict(t) for ticket_id, t in self._tickets.items()}

    @property
    def bytes_served(self) -> int:
        """Image bytes read or written through this daemon since this object was made.

        Deleted tickets and tickets lost in a stop or restart are accumulated; live tickets
        are asked for their ``transferred`` once no operation runs on them (imageio's
        ``active``), waiting at most ``SETTLE_TIMEOUT`` seconds in all.
        """
        live = 0
        if self.running:
            settle_until = time.monotonic() + SETTLE_TIMEOUT
            live = sum(self._transferred(ticket_id, settle_until=settle_until)
                       for ticket_id in list(self._tickets))
        return self._served + live

    # Private.

    def _transferred(self, ticket_id: str, *, settle_until: float | None = None) -> int:
        """Bytes the live ticket has transferred; 0 when unknown (read-write or gone).

        With ``settle_until`` (a ``time.monotonic()`` deadline), asks again until the ticket
        runs no operation or the deadline passes.
        """
        while True:
            try:
                status, body = self._control("GET", ticket_id)
            except LabError:
                return 0
            if status != http.client.OK:
                return 0
            info = json.loads(body)
            if not info.get("active") or settle_until is None or time.monotonic() >= settle_until:
                return info.get("transferred") or 0
            time.sleep(_SETTLE_POLL)

    def _control(self, method: str, ticket_id: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send a request for ``/tickets/<id>`` to the control socket; return status and body.

        Raises ``LabError`` when the socket does not answer.
        """
        con = _UnixHTTPConnection(os.fspath(self.control_socket), timeout=70)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            con.request(method, f"/tickets/{ticket_id}", body=body, headers=headers)
            response = con.getresponse()
            return response.status, response.read()
        except OSError as e:
            raise LabError(f"imageio daemon {self.name} control socket failed: {e}") from e
        finally:
            con.close()

    def _ready(self) -> bool:
        """True when ``GET /info/`` answers and the control socket exists."""
        if not self.control_socket.exists():
            return False
        if self.pki:
            context = ssl.create_default_context(cafile=os.fspath(self.pki.ca_file))
            con = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=2, context=context)
        else:
            con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            con.request("GET", "/info/")
            response = con.getresponse()
            response.read()
            return response.status == http.client.OK
        except (OSError, http.client.HTTPException):
            return False
        finally:
            con.close()

    def _log_tail(self, lines: int = 15) -> str:
        """The last lines of the daemon's log and output, for error messages."""
        text = ""
        for path in (self._output_file, self.log_file):
            if path.exists():
                text += path.read_text(errors="replace")
        return "\n".join(text.strip().splitlines()[-lines:])
