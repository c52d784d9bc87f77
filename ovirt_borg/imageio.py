"""ovirt-borg's client for the imageio data path (the host's imageio or the engine's proxy).

Backup reads image extents and byte ranges from an image transfer's URL; restore writes ranges,
zeroes holes and flushes. The imageio protocol (HTTP/1.1, one ticket per transfer):

- ``OPTIONS /images/<ticket>``: ``features`` and ``max_readers``/``max_writers``;
- ``GET /images/<ticket>/extents?context=zero|dirty``: JSON list of extents;
- ``GET /images/<ticket>`` with ``Range: bytes=a-b``: 206 with exactly that many bytes;
- ``PUT /images/<ticket>?flush=n`` with ``Content-Range: bytes a-b/*``;
- ``PATCH /images/<ticket>`` with ``{"op": "zero", ...}`` or ``{"op": "flush"}``.

The Python HTTP layer is the slow part of the read side, so this client talks ``http.client``
directly: one keep-alive connection per worker thread, each ranged response read with
``readinto`` into a buffer the thread reuses, and a bounded window of ranges in flight.

The ticket id in the URL is a bearer secret: it never appears in logs or error messages
(``mask_ticket_url``).
"""

from __future__ import annotations

import collections
import http.client
import itertools
import json
import logging
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import tenacity

from ovirt_borg.errors import ConfigError, TransferError
from ovirt_borg.plan import Extent

log = logging.getLogger(__name__)

__all__ = ["Extent", "ImageioClient", "TransferSettings", "mask_ticket_url"]

_T = TypeVar("_T")

#: The body of one upload request: bytes-like, or a tuple of bytes-like parts sent in order.
_Data = bytes | bytearray | memoryview | tuple

# Backoff between attempts of one request: 0.5, 1, 2, 4, 8 s (capped at 10 s). Long enough to
# ride out an imageio restart on the host (the engine re-adds the tickets), short enough that
# a dead transfer fails within a minute.
_BACKOFF_MULTIPLIER = 0.5
_BACKOFF_MAX = 10.0

# Error bodies are short text; anything longer is not an imageio error message.
_MAX_ERROR_BODY = 512


def mask_ticket_url(url: str) -> str:
    """Return ``url`` with the ticket (the secret after ``/images/``) replaced by ``****``."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path
    marker = "/images/"
    if marker in path:
        path = path[: path.index(marker) + len(marker)] + "****"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@dataclass(frozen=True)
class TransferSettings:
    """How ovirt-borg talks to imageio.

    ``readers`` parallel HTTP connections (capped by the server's ``max_readers`` or
    ``max_writers``); ``connect_timeout`` to establish a connection, ``read_timeout`` the longest
    silence from the server within a request, ``extents_timeout`` the same for the extents
    query, which is slow on huge disks; ``retries`` per range with exponential
    backoff; ``force_proxy`` uses the proxy URL only; ``ca_file`` is the CA to trust for the
    engine's proxy (its web certificate; when unset the system CAs are used), ``host_ca_file``
    for the host's imageio (the engine's internal CA; when unset ``ca_file``); ``verify=False``
    disables TLS verification (only for a user's explicit "insecure"); ``bandwidth_limit`` in
    bytes/s over all connections.
    """

    readers: int = 4
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    extents_timeout: float = 600.0
    retries: int = 5
    force_proxy: bool = False
    ca_file: str | None = None
    host_ca_file: str | None = None
    verify: bool = True
    bandwidth_limit: int | None = None

    def __post_init__(self) -> None:
        if self.readers < 1:
            raise ConfigError(f"imageio readers must be at least 1, got {self.readers}")
        if self.retries < 0:
            raise ConfigError(f"imageio retries must not be negative, got {self.retries}")
        for name in ("connect_timeout", "read_timeout", "extents_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"imageio {name} must be positive, got {getattr(self, name)}")
        if self.bandwidth_limit is not None and self.bandwidth_limit <= 0:
            raise ConfigError(
                f"imageio bandwidth_limit must be positive or unset, got {self.bandwidth_limit}"
            )


@dataclass(frozen=True)
class _Endpoint:
    """A parsed image URL: where to connect and the request path carrying the ticket."""

    scheme: str
    host: str
    port: int
    path: str
    ticket_id: str
    masked: str

    @classmethod
    def parse(cls, url: str) -> _Endpoint:
        parts = urllib.parse.urlsplit(url)
        masked = mask_ticket_url(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise TransferError(f"not an imageio image URL: {masked}")
        if "/images/" not in parts.path:
            raise TransferError(f"not an imageio image URL (no /images/): {masked}")
        ticket_id = parts.path.rsplit("/images/", 1)[1]
        if not ticket_id:
            raise TransferError(f"imageio image URL without a ticket: {masked}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path, ticket_id, masked)

    def mask(self, text: str) -> str:
        """Return ``text`` with the ticket id replaced by ``****`` (server messages echo it)."""
        return text.replace(self.ticket_id, "****")


class _ServerError(Exception):
    """imageio answered with an unexpected HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class _TimeoutMixin:
    """Connect with the connect timeout, then wait on reads with the read timeout."""

    read_timeout: float

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self.read_timeout)  # type: ignore[attr-defined]


class _HTTPSConnection(_TimeoutMixin, http.client.HTTPSConnection):
    pass


class _HTTPConnection(_TimeoutMixin, http.client.HTTPConnection):
    pass


class _Throttle:
    """Shares a byte rate among threads by spacing the start of each transfer."""

    def __init__(self, rate: int):
        self._rate = rate
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def wait(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self._rate
        if start > now:
            time.sleep(start - now)


def _size(data: _Data) -> int:
    """Bytes in ``data`` (parts summed)."""
    return sum(map(len, data)) if isinstance(data, tuple) else len(data)


def _is_transient(error: BaseException) -> bool:
    """True for errors worth retrying: lost connections, timeouts, server-side failures.

    A 403 is retried too: after an imageio restart the ticket is missing until the engine
    adds it again. A TLS verification failure is never transient.
    """
    if isinstance(error, ssl.SSLCertVerificationError):
        return False
    if isinstance(error, _ServerError):
        return error.status >= 500 or error.status == http.client.FORBIDDEN
    return isinstance(error, (OSError, http.client.HTTPException))


def _is_unreachable(error: BaseException) -> bool:
    """True when the server could not be reached or dropped the connection at once."""
    if isinstance(error, ssl.SSLError):
        return False
    return isinstance(error, (OSError, http.client.RemoteDisconnected))


class ImageioClient:
    """A client of one image transfer: extents, parallel ranged reads, writes for restore.

    Given the transfer's ``transfer_url`` (imageio on the host), its ``proxy_url`` (imageio
    proxy on the engine, may be None) and ``TransferSettings``. Nothing is sent until the first
    call; then the host URL is tried, and on a connection error, or a host certificate that
    ``host_ca_file`` does not verify, the proxy URL is used instead (``force_proxy`` goes straight
    to the proxy). ``via_proxy`` tells which one is in use, ``fallback_reason`` why the proxy is
    used after an untrusted host certificate (a setting to fix: the caller says so). The proxy
    path stays verified end to end: its web certificate against ``ca_file``, and the proxy
    verifies the host with the engine's internal CA (its ``[backend_http] ca_file``).
    Use as a context manager, or call ``close()``.

    ``bytes_read``/``bytes_written`` count image bytes received and sent.
    """

    def __init__(self, transfer_url: str, proxy_url: str | None, settings: TransferSettings):
        self._settings = settings
        self._transfer = _Endpoint.parse(transfer_url)
        self._proxy = _Endpoint.parse(proxy_url) if proxy_url else None
        if settings.force_proxy and self._proxy is None:
            raise ConfigError("force_proxy is set but the image transfer has no proxy_url")
        self._ssl_context = self._make_ssl_context(settings, settings.ca_file)
        self._host_ssl_context = self._ssl_context
        if settings.host_ca_file and settings.host_ca_file != settings.ca_file:
            self._host_ssl_context = self._make_ssl_context(settings, settings.host_ca_file)
        self._throttle = _Throttle(settings.bandwidth_limit) if settings.bandwidth_limit else None
        self._endpoint: _Endpoint | None = None
        self._options: dict | None = None
        self._main: http.client.HTTPConnection | None = None
        # _lock guards the first contact and the main connection (one-at-a-time requests);
        # _stats_lock the counters and connection lists that worker threads update.
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.via_proxy = settings.force_proxy
        self.fallback_reason: str | None = None
        self.bytes_read = 0
        self.bytes_written = 0

    # Public interface.

    def options(self) -> dict:
        """Return the server's answer to ``OPTIONS /images/<ticket>``.

        A dict with ``features`` (e.g. ``["checksum", "extents", "flush", "zero"]``),
        ``max_readers`` and ``max_writers``. Raises ``TransferError``.
        """
        self._open()
        assert self._options is not None
        return dict(self._options)

    def extents(self, context: str = "zero") -> list[Extent]:
        """Return the image's extents in ``context`` "zero" (zero/hole runs) or "dirty".

        Dirty extents need an incremental backup's export (one bitmap) and a ticket with
        dirty enabled. Waits up to ``extents_timeout``. Raises ``ValueError`` for another
        context and ``TransferError`` when imageio cannot answer (404 for dirty extents
        that are not available).
        """
        if context not in ("zero", "dirty"):
            raise ValueError(f"extents context must be 'zero' or 'dirty', not {context!r}")
        self._open()
        endpoint = self._current()

        def query() -> list[dict]:
            # Its own connection: the extents call alone may take minutes on a huge disk.
            con = self._new_connection(endpoint, read_timeout=self._settings.extents_timeout)
            try:
                con.request("GET", f"{endpoint.path}/extents?context={context}")
                response = con.getresponse()
                body = response.read()
                if response.status == http.client.NOT_FOUND and context == "dirty":
                    raise _NoDirtyExtents(self._error_text(endpoint, body))
                if response.status != http.client.OK:
                    raise _ServerError(response.status, self._error_text(endpoint, body))
                return json.loads(body)
            finally:
                con.close()

        try:
            raw = self._retrying(query, endpoint, f"get {context} extents")
        except _NoDirtyExtents as e:
            raise NoDirtyExtents(
                f"imageio at {endpoint.masked} has no dirty extents for this transfer ({e}): "
                "the export has no bitmap or the ticket does not allow dirty extents"
            ) from None
        return [
            Extent(
                start=item["start"],
                length=item["length"],
                zero=bool(item.get("zero", False)),
                hole=bool(item.get("hole", False)),
                # The zero context has no dirty flags: all of it counts as changed.
                dirty=bool(item.get("dirty", context == "zero")),
            )
            for item in raw
        ]

    def read_ranges(self, ranges: Iterable[tuple[int, int]], piece_size: int | None = None
                    ) -> Iterator[tuple[int, bytes]]:
        """Read byte ranges of the image in parallel; yield ``(offset, data)`` in input order.

        Given ``(offset, length)`` pairs (typically 4 MiB; read lazily), each range is read in
        one request and yielded whole, or with ``piece_size`` as consecutive pieces that end at
        multiples of ``piece_size`` (block boundaries: a block's bytes come as one ``bytes``
        object, copied once out of the receive buffer). Up to
        ``readers`` ranges (capped by the server's ``max_readers``) are in flight, each on its
        own keep-alive connection, and at most two per reader are buffered ahead of the
        consumer. A failed range is retried with backoff and resumed at the first byte not
        yet received. Closing the generator early stops the reads.

        Raises ``TransferError`` once a range has used up its retries (or at once for errors
        that retrying cannot fix, like an untrusted certificate or a 416).
        """
        self._open()
        readers = self._parallel("max_readers")
        local = threading.local()
        connections: list[http.client.HTTPConnection] = []
        pending: collections.deque[tuple[int, Future[bytes]]] = collections.deque()
        source = iter(ranges)
        started = time.monotonic()
        count = 0
        total = 0

        def submit_next() -> bool:
            try:
                offset, length = next(source)
            except StopIteration:
                return False
            if offset < 0 or length < 0:
                raise ValueError(f"invalid range offset={offset} length={length}")
            pending.append((offset, pool.submit(self._read_range, local, connections, offset, length,
                                                piece_size)))
            return True

        pool = ThreadPoolExecutor(readers, thread_name_prefix="imageio-read")
        try:
            while len(pending) < 2 * readers and submit_next():
                pass
            while pending:
                _, future = pending.popleft()
                pieces = future.result()
                submit_next()
                count += 1
                for piece in pieces:
                    total += len(piece[1])
                    yield piece
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            with self._stats_lock:
                for con in connections:
                    con.close()
            elapsed = time.monotonic() - started
            log.debug(
                "read %d ranges, %d bytes in %.2f s (%.0f MiB/s) with %d readers via %s",
                count, total, elapsed, total / elapsed / (1 << 20) if elapsed else 0.0, readers,
                self._current().masked,
            )

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (PUT, no flush). Raises ``TransferError``."""
        self._open()
        with self._lock:
            self._retrying(
                lambda: self._put(self._main_connection(), offset, data),
                self._current(),
                f"write {len(data)} bytes at offset {offset}",
                on_error=self._drop_main,
            )

    def zero(self, offset: int, size: int) -> None:
        """Zero ``size`` bytes at ``offset`` without sending them. Raises ``TransferError``."""
        self._open()
        with self._lock:
            self._retrying(
                lambda: self._patch(
                    self._main_connection(),
                    {"op": "zero", "offset": offset, "size": size, "flush": False},
                ),
                self._current(),
                f"zero {size} bytes at offset {offset}",
                on_error=self._drop_main,
            )

    def flush(self) -> None:
        """Ask imageio to flush written data to storage. Raises ``TransferError``."""
        self._open()
        with self._lock:
            self._retrying(
                lambda: self._patch(self._main_connection(), {"op": "flush"}),
                self._current(),
                "flush",
                on_error=self._drop_main,
            )

    def write_ranges(self, items: Iterable[tuple[int, int, _Data | None]]) -> None:
        """Upload ranges in parallel, then flush once.

        Given ``(offset, length, data)`` items, ``data`` None meaning "zero this range" (no
        bytes on the wire); ``data`` is bytes-like, or a tuple of bytes-like parts sent one
        after the other in one request (no joined copy). Up to ``readers`` writers (capped by
        ``max_writers``), each on its own connection. Raises ``ValueError`` when ``data`` does
        not have ``length`` bytes and ``TransferError`` when a range fails after its retries.
        """
        self._open()
        writers = self._parallel("max_writers")
        local = threading.local()
        connections: list[http.client.HTTPConnection] = []
        in_flight: set[Future[None]] = set()
        pool = ThreadPoolExecutor(writers, thread_name_prefix="imageio-write")
        try:
            for offset, length, data in items:
                if data is not None and _size(data) != length:
                    raise ValueError(f"range at {offset}: {_size(data)} bytes of data, length {length}")
                if length == 0:
                    continue
                in_flight.add(pool.submit(self._write_item, local, connections, offset, length, data))
                if len(in_flight) >= 2 * writers:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
            done, in_flight = wait(in_flight)
            for future in done:
                future.result()
        finally:
            for future in in_flight:
                future.cancel()
            pool.shutdown(wait=True)
            with self._stats_lock:
                for con in connections:
                    con.close()
        self.flush()

    def close(self) -> None:
        """Close the connections; the client cannot be used afterwards."""
        with self._lock:
            self._drop_main()

    def __enter__(self) -> ImageioClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # First contact and connections.

    @staticmethod
    def _make_ssl_context(settings: TransferSettings, ca_file: str | None) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the CA file {ca_file}: {e}") from e
        if not settings.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _current(self) -> _Endpoint:
        return self._endpoint or (self._proxy if self._settings.force_proxy else self._transfer)

    def _open(self) -> None:
        """Choose the URL (host first; the proxy on a connection error or an untrusted host
        certificate) and fetch OPTIONS once."""
        with self._lock:
            if self._endpoint is not None:
                return
            if self._settings.force_proxy:
                assert self._proxy is not None
                self._options = self._first_contact(self._proxy)
                self._endpoint = self._proxy
                log.info("using the imageio proxy %s (forced by settings)", self._proxy.masked)
                return
            untrusted = None
            try:
                self._options = self._first_contact(self._transfer, fallback=self._proxy is not None)
                self._endpoint = self._transfer
                self.via_proxy = False
                return
            except _Untrusted as e:
                untrusted = str(e)
            except _Unreachable as e:
                log.warning(
                    "cannot reach imageio on the host at %s (%s); using the engine's proxy %s",
                    self._transfer.masked, e, self._proxy.masked if self._proxy else None,
                )
            assert self._proxy is not None
            try:
                self._options = self._first_contact(self._proxy)
            except TransferError as e:
                if untrusted:
                    raise TransferError(f"{untrusted}; the engine's imageio proxy failed too: {e}") from None
                raise
            self._endpoint = self._proxy
            self.via_proxy = True
            if untrusted:
                self.fallback_reason = (f"{untrusted}; until then the data goes through the engine's imageio "
                                        f"proxy {self._proxy.masked}, verified with engine.ca_file")
                log.warning("%s", self.fallback_reason)

    def _first_contact(self, endpoint: _Endpoint, *, fallback: bool = False) -> dict:
        """OPTIONS on ``endpoint``; return the options dict.

        With ``fallback``, a first attempt that cannot connect raises ``_Unreachable`` at once,
        and one whose certificate is not verified ``_Untrusted`` (the caller then tries the
        proxy). Otherwise transient errors are retried. Raises ``TransferError`` when it gives up.
        """

        def options() -> dict:
            con = self._main_connection(endpoint)
            try:
                con.request("OPTIONS", endpoint.path)
                response = con.getresponse()
                body = response.read()
            except BaseException:
                self._drop_main()
                raise
            if response.status != http.client.OK:
                raise _ServerError(response.status, self._error_text(endpoint, body))
            return json.loads(body)

        if fallback:
            try:
                return options()
            except Exception as e:
                if isinstance(e, ssl.SSLCertVerificationError):
                    raise _Untrusted(self._untrusted_text(endpoint, e)) from None
                if _is_unreachable(e):
                    raise _Unreachable(endpoint.mask(str(e))) from None
                if not _is_transient(e):
                    raise self._transfer_error(endpoint, "get transfer options", e, attempts=1) from None
        return self._retrying(options, endpoint, "get transfer options", on_error=self._drop_main)

    def _new_connection(
        self, endpoint: _Endpoint, read_timeout: float | None = None
    ) -> http.client.HTTPConnection:
        if endpoint.scheme == "https":
            con: http.client.HTTPConnection = _HTTPSConnection(
                endpoint.host, endpoint.port, timeout=self._settings.connect_timeout,
                context=self._ssl_context if endpoint is self._proxy else self._host_ssl_context,
            )
        else:
            con = _HTTPConnection(endpoint.host, endpoint.port, timeout=self._settings.connect_timeout)
        con.read_timeout = read_timeout or self._settings.read_timeout  # type: ignore[attr-defined]
        return con

    def _main_connection(self, endpoint: _Endpoint | None = None) -> http.client.HTTPConnection:
        """The connection for one-at-a-time requests (caller holds ``_lock``)."""
        if self._main is None:
            self._main = self._new_connection(endpoint or self._current())
        return self._main

    def _drop_main(self) -> None:
        if self._main is not None:
            self._main.close()
            self._main = None

    def _thread_connection(
        self, local: threading.local, connections: list[http.client.HTTPConnection]
    ) -> http.client.HTTPConnection:
        con = getattr(local, "connection", None)
        if con is None:
            con = local.connection = self._new_connection(self._current())
            with self._stats_lock:
                connections.append(con)
        return con

    def _parallel(self, option: str) -> int:
        """Connections to open in parallel: ``readers``, capped by the server's ``option``.

        The main connection (OPTIONS, extents, flush) holds one of the server's backend
        connections too, so the workers get one fewer: qemu-nbd serves at most ``--shared``
        clients (8 on oVirt hosts) and a ninth would wait until one of them closes.
        """
        assert self._options is not None
        server_max = int(self._options.get(option, 1))
        return max(1, min(self._settings.readers, server_max - 1))

    # Requests.

    def _read_range(
        self,
        local: threading.local,
        connections: list[http.client.HTTPConnection],
        offset: int,
        length: int,
        piece_size: int | None = None,
    ) -> list[tuple[int, bytes]]:
        """Read one range into this thread's reused buffer; return ``(offset, bytes)`` pieces
        copied out of it, cut at multiples of ``piece_size`` (one piece without it)."""
        if length == 0:
            return [(offset, b"")]
        buffer = getattr(local, "buffer", None)
        if buffer is None or len(buffer) < length:
            buffer = local.buffer = bytearray(length)
        view = memoryview(buffer)[:length]
        endpoint = self._current()
        filled = 0

        def attempt() -> None:
            nonlocal filled
            con = self._thread_connection(local, connections)
            if self._throttle:
                self._throttle.wait(length - filled)
            received = 0
            try:
                start = offset + filled
                con.request("GET", endpoint.path, headers={"Range": f"bytes={start}-{offset + length - 1}"})
                response = con.getresponse()
                if response.status != http.client.PARTIAL_CONTENT:
                    raise _ServerError(response.status, self._error_text(endpoint, response.read()))
                while filled < length:
                    n = response.readinto(view[filled:])
                    if not n:
                        raise http.client.IncompleteRead(b"", length - filled)
                    filled += n
                    received += n
            except BaseException:
                # The connection is in an unknown state: the next attempt starts afresh.
                local.connection = None
                con.close()
                raise
            finally:
                with self._stats_lock:
                    self.bytes_read += received

        self._retrying(attempt, endpoint, f"read {length} bytes at offset {offset}")
        if not piece_size:
            return [(offset, bytes(view))]
        cuts = [offset, *range((offset // piece_size + 1) * piece_size, offset + length, piece_size),
                offset + length]
        return [(a, bytes(view[a - offset:b - offset])) for a, b in itertools.pairwise(cuts)]

    def _write_item(
        self,
        local: threading.local,
        connections: list[http.client.HTTPConnection],
        offset: int,
        length: int,
        data: _Data | None,
    ) -> None:
        endpoint = self._current()

        def attempt() -> None:
            con = self._thread_connection(local, connections)
            try:
                if data is None:
                    self._patch(con, {"op": "zero", "offset": offset, "size": length, "flush": False})
                else:
                    self._put(con, offset, data)
            except BaseException:
                local.connection = None
                con.close()
                raise

        what = f"{'zero' if data is None else 'write'} {length} bytes at offset {offset}"
        self._retrying(attempt, endpoint, what)

    def _put(self, con: http.client.HTTPConnection, offset: int, data: _Data) -> None:
        endpoint = self._current()
        size = _size(data)
        if self._throttle:
            self._throttle.wait(size)
        con.putrequest("PUT", f"{endpoint.path}?flush=n")
        con.putheader("Content-Length", str(size))
        con.putheader("Content-Type", "application/octet-stream")
        con.putheader("Content-Range", f"bytes {offset}-{offset + size - 1}/*")
        con.endheaders()
        try:
            for part in data if isinstance(data, tuple) else (data,):
                con.send(memoryview(part))
        except (BrokenPipeError, ConnectionResetError):
            # imageio may refuse the request (416, 403) before reading the body and close
            # the connection; its answer says why, so try to read it.
            pass
        response = con.getresponse()
        body = response.read()
        if response.status != http.client.OK:
            raise _ServerError(response.status, self._error_text(endpoint, body))
        with self._stats_lock:
            self.bytes_written += size

    def _patch(self, con: http.client.HTTPConnection, message: dict) -> None:
        endpoint = self._current()
        con.request(
            "PATCH", endpoint.path, body=json.dumps(message).encode(),
            headers={"Content-Type": "application/json"},
        )
        response = con.getresponse()
        body = response.read()
        if response.status != http.client.OK:
            raise _ServerError(response.status, self._error_text(endpoint, body))

    # Errors and retries.

    def _retrying(
        self,
        fn: Callable[[], _T],
        endpoint: _Endpoint,
        what: str,
        on_error: Callable[[], None] | None = None,
    ) -> _T:
        """Run ``fn`` with the retry policy; raise ``TransferError`` when it gives up."""
        attempts = self._settings.retries + 1

        def before_sleep(state: tenacity.RetryCallState) -> None:
            if on_error:
                on_error()
            error = state.outcome.exception() if state.outcome else None
            log.warning(
                "imageio %s: %s failed (attempt %d of %d): %s; retrying in %.1f s",
                endpoint.masked, what, state.attempt_number, attempts,
                endpoint.mask(str(error)), state.next_action.sleep if state.next_action else 0,
            )

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=tenacity.wait_exponential(multiplier=_BACKOFF_MULTIPLIER, max=_BACKOFF_MAX),
            retry=tenacity.retry_if_exception(_is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except (OSError, http.client.HTTPException, _ServerError, ValueError) as e:
            tried = retrying.statistics.get("attempt_number", 1)
            raise self._transfer_error(endpoint, what, e, attempts=tried) from None

    def _transfer_error(
        self, endpoint: _Endpoint, what: str, error: BaseException, *, attempts: int
    ) -> TransferError:
        """Build the user-facing error for a failed request (the ticket masked)."""
        if isinstance(error, ssl.SSLCertVerificationError):
            return TransferError(self._untrusted_text(endpoint, error))
        if isinstance(error, _ServerError):
            detail = f"imageio answered {error.status}: {error.message}"
        else:
            detail = f"{type(error).__name__}: {endpoint.mask(str(error))}"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return TransferError(f"imageio {endpoint.masked}: {what} failed{tries}: {detail}")

    def _untrusted_text(self, endpoint: _Endpoint, error: ssl.SSLCertVerificationError) -> str:
        """What to configure when ``endpoint``'s certificate is not verified: the host's imageio
        has a certificate of the engine's internal CA, the proxy the engine's web certificate."""
        reason = error.verify_message or str(error)
        if endpoint is self._proxy:
            ca = self._settings.ca_file or "the system CAs"
            return (f"the engine's imageio proxy at {endpoint.masked} presented a certificate that is not "
                    f"trusted ({reason}; CA file: {ca}); it is the engine's web certificate: set engine.ca_file "
                    "to the CA that signed it")
        ca = self._settings.host_ca_file or self._settings.ca_file or "the system CAs"
        engine = self._proxy.host if self._proxy else "ENGINE"
        return (f"imageio on the host at {endpoint.masked} presented a certificate that is not trusted "
                f"({reason}; CA file: {ca}); the hosts' imageio has certificates of the engine's internal CA, whatever "
                "certificate the engine's web server has: download it from "
                f"https://{engine}/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA "
                "and set transfer.host_ca_file to that file")

    def _error_text(self, endpoint: _Endpoint, body: bytes) -> str:
        text = body[:_MAX_ERROR_BODY].decode("utf-8", errors="replace").strip()
        return endpoint.mask(text)


class _Unreachable(Exception):
    """The first contact could not connect (the caller may try the proxy)."""


class _Untrusted(Exception):
    """The first contact met a certificate that is not verified (the caller may try the proxy)."""


class _NoDirtyExtents(Exception):
    """imageio answered 404 to a dirty extents query (inside the retry loop: never retried)."""


class NoDirtyExtents(TransferError):
    """The transfer gives no dirty extents: the ticket or the export has no bitmap."""
