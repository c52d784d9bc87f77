"""The lab engine process: an HTTP(S) server the real ovirtsdk4 takes for an oVirt engine.

``serve(dir)`` loads the lab inventory, starts the two imageio daemons (host role for
``transfer_url``, proxy role for ``proxy_url``), and answers:

- ``/ovirt-engine/sso/oauth/token`` and ``/ovirt-engine/services/sso-logout`` (JSON, as SSO);
- ``/ovirt-engine/api/...``: the REST subset of OVIRT_API.md, XML in and out, bearer tokens;
- ``/ovirt-engine/lab/<op>``: the lab's JSON control API (guest writes, faults, stats...),
  only with the control token in the ``X-Lab-Token`` header.

Through its ``LabDataPlane`` (``dataplane``) it owns every qemu-nbd export and both daemons,
and stops them on SIGTERM/SIGINT: tickets first, then exports, then daemons. Its pid, port and
children are kept in ``run/engine.json`` so ``ovirt-borg-lab down`` can make sure nothing is
left behind.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from ovirt_borg.lab import LabError, xmlout
from ovirt_borg.lab.dataplane import LabDataPlane
from ovirt_borg.lab.latency import Latency
from ovirt_borg.lab.model import (
    API_PATH, FAULT_HELP, ApiFault, AuthFailed, Inventory, LabEngine, LabLayout,
)
from ovirt_borg.lab.tls import make_lab_pki

log = logging.getLogger(__name__)

SSO_TOKEN_PATH = "/ovirt-engine/sso/oauth/token"
SSO_LOGOUT_PATH = "/ovirt-engine/services/sso-logout"
CONTROL_PATH = "/ovirt-engine/lab/"
CONTROL_TOKEN_HEADER = "X-Lab-Token"

_XML = "application/xml;charset=UTF-8"
_JSON = "application/json"
_MAX_BODY = 64 << 20
_NO_REPLY = -1  # a response never sent: the connection closes (the reply_lost fault)
_MONITOR_INTERVAL = 0.5  # seconds between the engine's checks of its transfers' tickets


# ---------------------------------------------------------------------------------------------
# HTTP


class _Response:
    def __init__(self, status: int, body: bytes = b"", content_type: str = _XML,
                 headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


class _Request:
    """What a route handler gets: path parameters, query, headers and body."""

    def __init__(self, method: str, params: tuple[str, ...], query: dict[str, str],
                 headers: Any, body: bytes):
        self.method = method
        self.params = params
        self.query = query
        self.headers = headers
        self.body = body

    def flag(self, name: str) -> bool:
        value = self.query.get(name) or self.headers.get(name.replace("_", "-").title())
        return (value or "").lower() == "true"

    def xml(self, expected: str):
        return xmlout.parse_body(self.body, expected)


Handler = Callable[["EngineServer", _Request], _Response]
_ROUTES: list[tuple[str, re.Pattern[str], str, Handler]] = []
_ID = r"([^/]+)"


def _route(method: str, pattern: str, call: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        _ROUTES.append((method, re.compile(f"^{pattern}$"), call, fn))
        return fn
    return register


def _xml(element, status: int = 200, location: str | None = None) -> _Response:
    headers = {"Location": location} if location else None
    return _Response(status, xmlout.to_bytes(element), headers=headers)


def _created(element) -> _Response:
    return _xml(element, 201, location=element.get("href"))


def _action() -> _Response:
    return _Response(200, xmlout.action())


# -- API root and inventory -------------------------------------------------------------------


@_route("GET", "", "api.get")
def _api_root(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.api_root(srv.engine, old=srv.engine.faults.is_on("old_engine")))


@_route("GET", "vms", "vms.list")
def _vms_list(srv: EngineServer, req: _Request) -> _Response:
    e = srv.engine
    vms = e.list_vms(req.query.get("search"),
                     case_sensitive=req.query.get("case_sensitive", "true").lower() != "false",
                     max_results=_int_query(req, "max"))
    all_content = req.flag("all_content")
    return _xml(xmlout.collection("vms", (xmlout.vm(e, v, all_content=all_content) for v in vms)))


@_route("POST", "vms", "vms.add")
def _vms_add(srv: EngineServer, req: _Request) -> _Response:
    body = req.xml("vm")
    ovf = None
    data = xmlout.text(body, "initialization/configuration/data")
    if data:
        ovf = xmlout.parse_ovf(data)
    memory = xmlout.integer(body, "memory")
    vm = srv.engine.add_vm(name=xmlout.text(body, "name"), cluster=xmlout.reference(body, "cluster"),
                           ovf=ovf, memory=memory, description=xmlout.text(body, "description"))
    return _created(xmlout.vm(srv.engine, vm))


@_route("GET", f"vms/{_ID}", "vm.get")
def _vm_get(srv: EngineServer, req: _Request) -> _Response:
    vm = srv.engine.vm(req.params[0])
    return _xml(xmlout.vm(srv.engine, vm, all_content=req.flag("all_content")))


@_route("DELETE", f"vms/{_ID}", "vm.remove")
def _vm_remove(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.remove_vm(req.params[0], detach_only=req.flag("detach_only"))
    return _action()


@_route("POST", f"vms/{_ID}/start", "vm.start")
def _vm_start(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.set_vm_status(req.params[0], "up")
    return _action()


@_route("POST", f"vms/{_ID}/(?:stop|shutdown)", "vm.stop")
def _vm_stop(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.set_vm_status(req.params[0], "down")
    return _action()


@_route("GET", f"vms/{_ID}/diskattachments", "diskattachments.list")
def _attachments_list(srv: EngineServer, req: _Request) -> _Response:
    vm = srv.engine.vm(req.params[0])
    return _xml(xmlout.collection("disk_attachments",
                                  (xmlout.attachment(srv.engine, vm, a) for a in vm.attachments)))


@_route("POST", f"vms/{_ID}/diskattachments", "diskattachments.add")
def _attachments_add(srv: EngineServer, req: _Request) -> _Response:
    body = req.xml("disk_attachment")
    disk = xmlout.reference(body, "disk")
    if not disk or "id" not in disk:
        raise ApiFault(400, "[Cannot attach Virtual Disk. The disk id is required.]")
    active = xmlout.boolean(body, "active")
    att = srv.engine.attach_disk(req.params[0], disk["id"],
                                 bootable=bool(xmlout.boolean(body, "bootable")),
                                 interface=xmlout.text(body, "interface"),
                                 active=True if active is None else active)
    return _created(xmlout.attachment(srv.engine, srv.engine.vm(req.params[0]), att))


@_route("GET", f"vms/{_ID}/diskattachments/{_ID}", "diskattachment.get")
def _attachment_get(srv: EngineServer, req: _Request) -> _Response:
    att = srv.engine.attachment(*req.params)
    return _xml(xmlout.attachment(srv.engine, srv.engine.vm(req.params[0]), att))


@_route("DELETE", f"vms/{_ID}/diskattachments/{_ID}", "diskattachment.remove")
def _attachment_remove(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.detach_disk(*req.params)
    return _action()


@_route("GET", f"vms/{_ID}/tags", "vm.tags.list")
def _vm_tags(srv: EngineServer, req: _Request) -> _Response:
    vm = srv.engine.vm(req.params[0])
    tags = [srv.engine.tag(t) for t in vm.tags]
    return _xml(xmlout.collection("tags", (xmlout.tag(srv.engine, t, vm_id=vm.id) for t in tags)))


@_route("GET", "disks", "disks.list")
def _disks_list(srv: EngineServer, req: _Request) -> _Response:
    disks = srv.engine.list_disks(req.query.get("search"))
    return _xml(xmlout.collection("disks", (xmlout.disk(srv.engine, d) for d in disks)))


@_route("POST", "disks", "disks.add")
def _disks_add(srv: EngineServer, req: _Request) -> _Response:
    body = req.xml("disk")
    sd = xmlout.reference(body, "storage_domains/storage_domain")
    disk = srv.engine.add_disk(
        name=xmlout.text(body, "name") or xmlout.text(body, "alias"),
        fmt=xmlout.text(body, "format"),
        provisioned_size=xmlout.integer(body, "provisioned_size"),
        backup=xmlout.text(body, "backup"), storage_domain=sd,
        sparse=xmlout.boolean(body, "sparse"),
        description=xmlout.text(body, "description") or "",
        initial_size=xmlout.integer(body, "initial_size"),
    )
    return _created(xmlout.disk(srv.engine, disk))


@_route("GET", f"disks/{_ID}", "disk.get")
def _disk_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.disk(srv.engine, srv.engine.poll_disk(req.params[0])))


@_route("PUT", f"disks/{_ID}", "disk.update")
def _disk_update(srv: EngineServer, req: _Request) -> _Response:
    body = req.xml("disk")
    disk = srv.engine.update_disk(req.params[0], backup=xmlout.text(body, "backup"),
                                  name=xmlout.text(body, "alias") or xmlout.text(body, "name"),
                                  description=xmlout.text(body, "description"))
    return _xml(xmlout.disk(srv.engine, disk))


@_route("DELETE", f"disks/{_ID}", "disk.remove")
def _disk_remove(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.remove_disk(req.params[0])
    return _action()


@_route("GET", "storagedomains", "storagedomains.list")
def _sds_list(srv: EngineServer, req: _Request) -> _Response:
    sds = srv.engine.list_storage_domains(req.query.get("search"))
    return _xml(xmlout.collection("storage_domains",
                                  (xmlout.storage_domain(srv.engine, s) for s in sds)))


@_route("GET", f"storagedomains/{_ID}", "storagedomain.get")
def _sd_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.storage_domain(srv.engine, srv.engine.storage_domain(req.params[0])))


@_route("GET", f"storagedomains/{_ID}/disks", "storagedomain.disks")
def _sd_disks(srv: EngineServer, req: _Request) -> _Response:
    sd = srv.engine.storage_domain(req.params[0])
    disks = [d for d in srv.engine.list_disks(req.query.get("search"))
             if d.storage_domain_id == sd.id]
    return _xml(xmlout.collection("disks", (xmlout.disk(srv.engine, d) for d in disks)))


@_route("GET", "clusters", "clusters.list")
def _clusters_list(srv: EngineServer, req: _Request) -> _Response:
    clusters = srv.engine.list_clusters(req.query.get("search"))
    return _xml(xmlout.collection("clusters", (xmlout.cluster(srv.engine, c) for c in clusters)))


@_route("GET", f"clusters/{_ID}", "cluster.get")
def _cluster_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.cluster(srv.engine, srv.engine.cluster(req.params[0])))


@_route("GET", "hosts", "hosts.list")
def _hosts_list(srv: EngineServer, req: _Request) -> _Response:
    hosts = srv.engine.list_hosts(req.query.get("search"))
    return _xml(xmlout.collection("hosts", (xmlout.host(srv.engine, h) for h in hosts)))


@_route("GET", f"hosts/{_ID}", "host.get")
def _host_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.host(srv.engine, srv.engine.host(req.params[0])))


@_route("GET", "tags", "tags.list")
def _tags_list(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.collection("tags", (xmlout.tag(srv.engine, t) for t in srv.engine.inv.tags)))


@_route("GET", f"tags/{_ID}", "tag.get")
def _tag_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.tag(srv.engine, srv.engine.tag(req.params[0])))


# -- backups and checkpoints ------------------------------------------------------------------


@_route("GET", f"vms/{_ID}/backups", "backups.list")
def _backups_list(srv: EngineServer, req: _Request) -> _Response:
    backups = srv.engine.list_backups(req.params[0])
    return _xml(xmlout.collection("backups", (xmlout.backup(srv.engine, b) for b in backups)))


@_route("POST", f"vms/{_ID}/backups", "backups.add")
def _backups_add(srv: EngineServer, req: _Request) -> _Response:
    body = req.xml("backup")
    backup = srv.engine.add_backup(req.params[0],
                                   from_checkpoint_id=xmlout.text(body, "from_checkpoint_id"),
                                   disk_ids=xmlout.ids(body, "disks/disk"),
                                   description=xmlout.text(body, "description"),
                                   legacy=req.flag("legacy"))  # BackendVmBackupsResource.legacy()
    return _created(xmlout.backup(srv.engine, backup))


@_route("GET", f"vms/{_ID}/backups/{_ID}", "backup.get")
def _backup_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.backup(srv.engine, srv.engine.poll_backup(*req.params)))


@_route("GET", f"vms/{_ID}/backups/{_ID}/disks", "backup.disks")
def _backup_disks(srv: EngineServer, req: _Request) -> _Response:
    vm_id, backup_id = req.params
    disks = srv.engine.backup_disks(vm_id, backup_id)
    base = f"{API_PATH}/vms/{vm_id}/backups/{backup_id}/disks"
    return _xml(xmlout.collection("disks", (
        xmlout.disk(srv.engine, d, backup_mode=mode, href=f"{base}/{d.id}") for d, mode in disks)))


@_route("POST", f"vms/{_ID}/backups/{_ID}/finalize", "backup.finalize")
def _backup_finalize(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.finalize_backup(*req.params)
    return _action()


@_route("GET", f"vms/{_ID}/snapshots", "snapshots.list")
def _snapshots_list(srv: EngineServer, req: _Request) -> _Response:
    vm_id = req.params[0]
    return _xml(xmlout.collection("snapshots", (
        xmlout.snapshot(vm_id, sid, description) for sid, description in srv.engine.snapshots_of(vm_id))))


@_route("GET", f"vms/{_ID}/snapshots/{_ID}", "snapshot.get")
def _snapshot_get(srv: EngineServer, req: _Request) -> _Response:
    vm_id, snapshot_id = req.params
    for sid, description in srv.engine.snapshots_of(vm_id):
        if sid == snapshot_id:
            return _xml(xmlout.snapshot(vm_id, sid, description))
    raise ApiFault(404, f"Entity not found: Snapshot: {snapshot_id}", reason="Resource not found")


@_route("GET", f"vms/{_ID}/checkpoints", "checkpoints.list")
def _checkpoints_list(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.vm(req.params[0])
    cps = srv.engine.checkpoints_of(req.params[0])
    return _xml(xmlout.collection("checkpoints", (xmlout.checkpoint(srv.engine, c) for c in cps)))


@_route("GET", f"vms/{_ID}/checkpoints/{_ID}", "checkpoint.get")
def _checkpoint_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.checkpoint(srv.engine, srv.engine.checkpoint(*req.params)))


@_route("GET", f"vms/{_ID}/checkpoints/{_ID}/disks", "checkpoint.disks")
def _checkpoint_disks(srv: EngineServer, req: _Request) -> _Response:
    cp = srv.engine.checkpoint(*req.params)
    disks = [d for d in srv.engine.inv.disks if d.id in cp.disk_ids]
    return _xml(xmlout.collection("disks", (xmlout.disk(srv.engine, d) for d in disks)))


@_route("DELETE", f"vms/{_ID}/checkpoints/{_ID}", "checkpoints.delete")
def _checkpoint_remove(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.remove_checkpoint(*req.params)
    return _action()


# -- image transfers --------------------------------------------------------------------------


@_route("GET", "imagetransfers", "imagetransfers.list")
def _transfers_list(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.collection("image_transfers", (
        xmlout.transfer(srv.engine, t) for t in srv.engine.transfers.values())))


@_route("POST", "imagetransfers", "imagetransfers.add")
def _transfers_add(srv: EngineServer, req: _Request) -> _Response:
    body = req.xml("image_transfer")
    disk = xmlout.reference(body, "disk") or xmlout.reference(body, "image") or {}
    backup = xmlout.reference(body, "backup") or {}
    if xmlout.reference(body, "snapshot"):
        raise ApiFault(400, "[Cannot transfer Virtual Disk. Snapshot transfers are not "
                       "supported by this engine.]")
    transfer = srv.engine.add_transfer(
        direction=xmlout.text(body, "direction"), disk_id=disk.get("id"),
        backup_id=backup.get("id"), fmt=xmlout.text(body, "format"),
        inactivity_timeout=xmlout.integer(body, "inactivity_timeout"),
    )
    return _created(xmlout.transfer(srv.engine, transfer))


@_route("GET", f"imagetransfers/{_ID}", "transfer.get")
def _transfer_get(srv: EngineServer, req: _Request) -> _Response:
    return _xml(xmlout.transfer(srv.engine, srv.engine.poll_transfer(req.params[0])))


@_route("POST", f"imagetransfers/{_ID}/finalize", "transfer.finalize")
def _transfer_finalize(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.finalize_transfer(req.params[0])
    return _action()


@_route("POST", f"imagetransfers/{_ID}/cancel", "transfer.cancel")
def _transfer_cancel(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.cancel_transfer(req.params[0])
    return _action()


@_route("POST", f"imagetransfers/{_ID}/extend", "transfer.extend")
def _transfer_extend(srv: EngineServer, req: _Request) -> _Response:
    srv.engine.transfer(req.params[0])
    return _action()


def _int_query(req: _Request, name: str) -> int | None:
    value = req.query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise xmlout.BadRequest(f"query parameter {name} must be an integer") from e


# -- lab control API --------------------------------------------------------------------------


def _control(srv: EngineServer, op: str, args: dict[str, Any]) -> Any:  # noqa: PLR0911 (one return per operation)
    """Run a control operation; returns JSON-ready data. Raises ApiFault/ValueError/LabError."""
    e = srv.engine
    if op == "ping":
        return {"ok": True, "pid": os.getpid()}
    if op == "describe":
        return e.describe()
    if op == "write":
        return {"vm": args["vm"], "disk": args.get("disk", 1), "ranges": e.guest_write(
            args["vm"], args.get("disk", 1), percent=args.get("percent"),
            offset=args.get("offset"), length=args.get("length"),
            zero=bool(args.get("zero")), discard=bool(args.get("discard")),
            seed=args.get("seed"))}
    if op == "image":
        disk = e.image(args["vm"], args.get("disk", 1), Path(args["out"]))
        return {"vm": args["vm"], "disk": disk.id, "out": args["out"],
                "size": disk.provisioned_size}
    if op == "stats":
        return e.stats()
    if op == "fault":
        times = args.get("times")
        return e.set_fault(args["name"], bool(args.get("on", True)), vm_name=args.get("vm"),
                           times=int(times) if times is not None else None)
    if op == "faults":
        return {"active": e.faults.listing(), "known": FAULT_HELP}
    if op == "clear-faults":
        e.faults.clear()
        return {"active": {}}
    if op == "add-disk":
        disk = e.add_vm_disk(args["vm"], size=int(args["size"]), fmt=args.get("format", "cow"),
                             storage_type=args.get("storage_type", "image"),
                             shareable=bool(args.get("shareable")), active=bool(args.get("active", True)))
        return {"vm": args["vm"], "id": disk.id, "name": disk.name, "format": disk.format,
                "size": disk.provisioned_size, "path": disk.path}
    if op == "add-vm":
        vm = e.add_sample_vm(args["vm"], disks=int(args.get("disks", 1)),
                             size=int(args.get("size", 64 << 20)),
                             fmt=args.get("format", "cow"), status=args.get("status", "up"),
                             tags=args.get("tags", ()), seed=args.get("seed"),
                             origin=args.get("origin", "ovirt"), cluster=args.get("cluster"))
        return {"id": vm.id, "name": vm.name, "status": vm.status,
                "disks": [a.disk_id for a in vm.attachments]}
    if op == "cluster":
        cluster = e.set_cluster(args["name"], args["version"])
        return {"id": cluster.id, "name": cluster.name, "version": ".".join(map(str, cluster.version))}
    if op == "engine-config":
        return e.set_config(args["name"], args["version"], bool(args["value"]))
    if op == "add-storage-domain":
        sd = e.add_storage_domain(args["name"], type=args.get("type", "iscsi"),
                                  **{k: int(args[k]) for k in ("chunk_size", "extent_size") if args.get(k)})
        return {"id": sd.id, "name": sd.name, "type": sd.type, "path": sd.path,
                "chunk_size": sd.chunk_size, "extent_size": sd.extent_size}
    if op == "add-guests":
        from ovirt_borg.lab.guests import add_guest_vm

        return add_guest_vm(e, args.get("vm", "guests"))
    if op == "detach-disk":
        disk = e.vm_disk(args["vm"], args.get("disk", 1))
        e.detach_disk(e.vm_by_name(args["vm"]).id, disk.id)
        return {"vm": args["vm"], "detached": disk.id}
    if op == "delete-vm":
        vm = e.vm_by_name(args["vm"])
        e.remove_vm(vm.id, force=True)
        return {"deleted": vm.id, "name": vm.name}
    if op in ("start-vm", "stop-vm"):
        vm = e.vm_by_name(args["vm"])
        e.set_vm_status(vm.id, "up" if op == "start-vm" else "down")
        return {"vm": vm.name, "status": vm.status}
    raise ApiFault(404, f"unknown lab operation {op!r}")


# -- server -----------------------------------------------------------------------------------


class EngineServer(ThreadingHTTPServer):
    """The engine's HTTP(S) listener. Given the bind address, the engine, an SSL context (or
    None for plain HTTP) and the control token."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], engine: LabEngine, *,
                 ssl_context: ssl.SSLContext | None, control_token: str):
        self.engine = engine
        self.ssl_context = ssl_context
        self.control_token = control_token
        super().__init__(address, _RequestHandler)
        if ssl_context is not None:
            # The handshake runs in the request thread, so a slow client cannot block accept().
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True,
                                                  do_handshake_on_connect=False)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that drop the connection or fail the TLS handshake are routine here.
        error = sys.exc_info()[1]
        if isinstance(error, (ssl.SSLError, ConnectionError, socket.timeout)):
            log.debug("connection from %s dropped: %s", client_address, error)
            return
        log.exception("error serving %s", client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ovirt-borg-lab-engine"
    timeout = 120  # idle keep-alive connections end after this
    server: EngineServer

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: with Nagle's algorithm the body waited for the
        # client's delayed ACK (40 ms per request), which no real engine does.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ssl.SSLError, ConnectionError, socket.timeout) as e:
            log.debug("connection closed: %s", e)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._send(_Response(413, xmlout.fault("Request too large", "body too large")))
            return
        body = self.rfile.read(length) if length else b""
        path = url.path.rstrip("/") or "/"
        try:
            if path == SSO_TOKEN_PATH and method == "POST":
                response = self._sso_token(body)
            elif path == SSO_LOGOUT_PATH and method == "POST":
                response = self._sso_logout(body)
            elif path.startswith(CONTROL_PATH.rstrip("/")) and method == "POST":
                response = self._control(path[len(CONTROL_PATH):], body)
            elif path == API_PATH or path.startswith(API_PATH + "/"):
                response = self._api(method, path[len(API_PATH):].strip("/"), url.query, body)
            else:
                response = _Response(404, xmlout.fault("Not Found", f"No resource at {path}"))
        except Exception:
            log.exception("unexpected error answering %s %s", method, url.path)
            response = _Response(500, xmlout.fault("Operation Failed",
                                                   "Internal engine error, see the engine log"))
        self._send(response)
        log.info("%s %s -> %d (%.0f ms)", method, _loggable(url.path, url.query),
                 response.status, (time.monotonic() - started) * 1000)

    def _send(self, response: _Response) -> None:
        if response.status == _NO_REPLY:
            # A reply cut short (a proxy or network failure after the engine acted): the status
            # line, then the connection closes. Nothing at all would make curl resend the
            # request on a new connection, which hides the loss.
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.close_connection = True
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    # -- SSO ---------------------------------------------------------------------------------

    def _sso_token(self, body: bytes) -> _Response:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        engine = self.server.engine
        with engine.lock:
            engine.count_call("sso.token")
            if form.get("grant_type") != "password":
                return _json(400, {"error": "unsupported_grant_type",
                                   "error_description": "only grant_type=password is supported"})
            try:
                token = engine.login(form.get("username", ""), form.get("password", ""))
            except AuthFailed as e:
                log.warning("SSO login refused for user %s", form.get("username", ""))
                return _json(401, {"error": "access_denied", "error_description": str(e)})
        return _json(200, {"access_token": token, "scope": form.get("scope", "ovirt-app-api"),
                           "exp": str(int((time.time() + 3600) * 1000)), "token_type": "bearer"})

    def _sso_logout(self, body: bytes) -> _Response:
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        with self.server.engine.lock:
            self.server.engine.count_call("sso.logout")
            self.server.engine.logout(form.get("token"))
        return _json(200, {})

    # -- REST API ----------------------------------------------------------------------------

    def _authorized(self) -> bool:
        engine = self.server.engine
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return engine.token_valid(auth[7:].strip())
        if auth.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                engine.login(user, password)
                return True
            except (AuthFailed, ValueError):
                return False
        return False

    def _api(self, method: str, path: str, query_text: str, body: bytes) -> _Response:
        engine = self.server.engine
        query = {k: v[-1] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
        for route_method, pattern, call, handler in _ROUTES:
            match = pattern.match(path)
            if not match:
                continue
            if route_method != method:
                continue
            with engine.lock:
                if not self._authorized():
                    return _Response(401, xmlout.fault("Unauthorized",
                                                       "A valid SSO token is required"))
                engine.count_call(call)
                if engine.faults.engine_500(call):
                    log.info("fault engine_500:%s answers 500", call)
                    return _Response(500, xmlout.fault(
                        "Operation Failed", f"[Internal Engine Error while running {call}]"))
                request = _Request(method, match.groups(), query, self.headers, body)
                try:
                    response = handler(self.server, request)
                    if engine.faults.reply_lost(call):
                        log.info("fault reply_lost:%s: carried out, no reply sent", call)
                        return _Response(_NO_REPLY)
                    return response
                except ApiFault as e:
                    log.info("%s refused: %s %s", call, e.status, e.detail)
                    return _Response(e.status, xmlout.fault(e.reason, e.detail))
                except xmlout.BadRequest as e:
                    return _Response(400, xmlout.fault("Incomplete parameters", str(e)))
        if any(p.match(path) for _, p, _, _ in _ROUTES):
            return _Response(405, xmlout.fault("Method Not Allowed",
                                               f"{method} is not supported here"))
        return _Response(404, xmlout.fault("Not Found", f"No resource at {API_PATH}/{path}"))

    # -- control API -------------------------------------------------------------------------

    def _control(self, op: str, body: bytes) -> _Response:
        given = self.headers.get(CONTROL_TOKEN_HEADER, "")
        if not given or not hmac.compare_digest(given, self.server.control_token):
            return _json(403, {"error": "the lab control API needs the control token"})
        try:
            args = json.loads(body or b"{}")
            if not isinstance(args, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return _json(400, {"error": f"bad JSON body: {e}"})
        engine = self.server.engine
        with engine.lock:
            try:
                return _json(200, _control(self.server, op, args))
            except ApiFault as e:
                return _json(e.status, {"error": e.detail})
            except KeyError as e:
                return _json(400, {"error": f"missing argument {e}"})
            except (ValueError, TypeError) as e:
                return _json(400, {"error": str(e)})
            except LabError as e:
                log.error("lab operation %s failed: %s", op, e)
                return _json(500, {"error": str(e)})


def _json(status: int, data: Any) -> _Response:
    return _Response(status, json.dumps(data).encode(), content_type=_JSON)


def _loggable(path: str, query: str) -> str:
    # Query strings carry searches, never secrets; keep them readable but short.
    return f"{path}?{query[:200]}" if query else path


# ---------------------------------------------------------------------------------------------
# The engine process


def serve(dir: Path, *, plain_http: bool = False, port: int = 0, latency: Latency | None = None) -> None:
    """Run the lab engine for the lab in ``dir`` until SIGTERM or SIGINT.

    Reads the inventory, password and control token written by ``Lab.up``, starts both
    imageio daemons, listens on 127.0.0.1:``port`` (0: any free port) and writes
    ``run/engine.json``. On a signal: closes transfers and backups (tickets, exports), stops the
    daemons and removes ``run/engine.json``. ``latency`` is how long the engine's slow phases
    last (``ovirt_borg.lab.latency``; none by default). Raises ``LabError`` when the lab is
    incomplete or a daemon does not start.
    """
    layout = LabLayout(Path(dir).resolve())
    try:
        inventory = Inventory.load(layout.engine_state)
        password = layout.password.read_text().strip()
        control_token = layout.control_token.read_text().strip()
    except (OSError, ValueError) as e:
        raise LabError(f"the lab in {layout.dir} is incomplete ({e}); run ovirt-borg-lab up") from e
    layout.run.mkdir(parents=True, exist_ok=True)
    pki = None if plain_http else make_lab_pki(layout.pki)

    server: EngineServer | None = None
    children_file_ready = threading.Event()

    def write_runtime() -> None:
        if not children_file_ready.is_set():
            return
        _write_json(layout.engine_json, {
            "pid": os.getpid(),
            "port": server.port if server else None,
            "url": f"{server.scheme}://127.0.0.1:{server.port}{API_PATH}" if server else None,
            "children": plane.children(),
        })

    plane = LabDataPlane(layout.run, pki, on_change=write_runtime)
    engine = LabEngine(inventory, plane, state_file=layout.engine_state, password=password, latency=latency)
    if latency is not None and not latency.is_none:
        log.info("engine latency (seconds): %s", latency.as_dict())
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    plane.start()
    try:
        context = None
        if pki is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(pki.cert_file, pki.key_file)
        server = EngineServer(("127.0.0.1", port), engine, ssl_context=context,
                              control_token=control_token)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="engine-http", daemon=True)
        thread.start()
        children_file_ready.set()
        write_runtime()
        log.info("lab engine (pid %s) listening on %s://127.0.0.1:%s%s", os.getpid(),
                 server.scheme, server.port, API_PATH)
        while not stop.wait(_MONITOR_INTERVAL):
            with engine.lock:
                engine.tick()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    finally:
        with engine.lock:
            try:
                engine.shutdown()
            except Exception:
                log.exception("closing transfers and backups failed")
        plane.shutdown()
        children_file_ready.clear()
        layout.engine_json.unlink(missing_ok=True)
        log.info("lab engine stopped")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
