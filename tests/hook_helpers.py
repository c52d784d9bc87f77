"""Shared by the tests of the ready plugins in hooks/ (tests/test_hooks.py through the lab,
tests/unit/test_ready_plugins.py without it): a local HTTP endpoint that records what it
receives, a port where nothing listens, a real plugin manager, sample results, and a strict
reader of Prometheus textfiles (``from hook_helpers import ...``)."""

from __future__ import annotations

import http.server
import re
import socket
import threading
from pathlib import Path

from ovirt_borg import config as config_mod, plugins
from ovirt_borg.engine import VmInfo

SECRET = "9d8c7b6a-5f4e-4d3c-b2a1-0f9e8d7c6b5a"  # stands for a Healthchecks UUID / ntfy topic

CONFIG = config_mod.from_dict({"engine": {"url": "https://engine.example/ovirt-engine/api"}},
                              source="/etc/ovirt-borg/nightly.toml")
VM = VmInfo(id="6c1a9e0e-0000-4000-8000-000000000001", name="web1", status="up")


class Endpoint:
    """An HTTP server on 127.0.0.1 recording every request; answers ``status``.

    While ``answering`` is clear, requests are recorded but their answers held back (a server
    that does not answer in time); ``answered`` counts the answers sent.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status = 200
        self.answering = threading.Event()
        self.answering.set()
        self.answered = 0
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                endpoint.requests.append({"method": self.command, "path": self.path,
                                          "headers": dict(self.headers), "body": body})
                endpoint.answering.wait()
                self.send_response(endpoint.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")
                endpoint.answered += 1

            do_GET = do_POST = do_HEAD = _serve

            def log_message(self, format, *args):  # keep the test output quiet
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that gave up (timeout)
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.answering.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manager(name: str, options: dict):
    """A real plugin manager with the ready plugin ``name`` loaded from hooks/ and configured."""
    return plugins.build_manager({name: options})


def ok_result(vm: str = "web1", mode: str = "full", seconds: float = 2.5) -> dict:
    return {"vm": vm, "vm_id": "id-" + vm, "ok": True, "mode": mode, "reason": "", "path": "backup",
            "archive": f"ovirt-{vm}-2026-11-26T02:00:00Z", "checkpoint": "cp", "seconds": seconds,
            "error": "", "exit_code": 0,
            "disks": [{"id": "d1", "alias": "disk1", "mode": mode, "size": 8 << 20, "blocks": 2, "holes": 0,
                       "reused": 1, "stored": 1, "bytes_read": 4 << 20, "seconds": 1.0}]}


def failed_result(vm: str = "db1", error: str = "the engine failed (HTTP 500)", code: int = 4) -> dict:
    return {"vm": vm, "vm_id": "id-" + vm, "ok": False, "mode": "", "reason": "", "path": "", "archive": "",
            "checkpoint": None, "seconds": 0.0, "error": error, "exit_code": code, "disks": []}


# -- Prometheus textfiles -----------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-z_]+)\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\} (-?[0-9.]+(?:e[+-]?[0-9]+)?)$')


def parse_textfile(path: Path) -> dict[tuple, float]:
    """Parse a textfile strictly: {(metric, (label pairs...)): value}; HELP/TYPE once each, first."""
    samples: dict[tuple, float] = {}
    typed: set[str] = set()
    helped: set[str] = set()
    for line in path.read_text().splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind == "gauge" and name in helped and name not in typed
            typed.add(name)
        else:
            match = _SAMPLE.match(line)
            assert match, f"bad sample line {line!r}"
            name, labels, value = match.groups()
            assert name in typed, f"{name} has no TYPE before its samples"
            pairs = tuple(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', labels))
            assert (name, pairs) not in samples
            samples[(name, pairs)] = float(value)
    return samples


def vm_metrics(samples: dict[tuple, float], vm: str) -> dict[str, float]:
    out = {}
    for (name, pairs), value in samples.items():
        labels = dict(pairs)
        if labels.get("vm") == vm:
            out[name + (f"/{labels['mode']}" if "mode" in labels else "")] = value
    return out


def run_metrics(samples: dict[tuple, float]) -> dict[str, float]:
    return {name: value for (name, pairs), value in samples.items() if "vm" not in dict(pairs)}
