"""Where a full backup spends its time: py-spy profiles of ovirt-borg and the host's imageio.

``record`` runs one ovirt-borg backup under ``py-spy record --format raw --threads
--subprocesses`` while a second py-spy samples the host imageio daemon (the serving side), and
sorts the on-CPU samples of both into categories (imageio reads, block assembly, chunk id hash,
compression, encryption, repository writes, control plane, start-up, Borg command-line
children). Samples of threads waiting (a lock, a socket, a future) are not on-CPU and are left
out, so the shares say what kept a core busy. ``flamegraph`` records a second run as an SVG
flame graph for reading by eye.

py-spy samples Python frames only: time inside a C function (hashlib, lz4, the cipher,
``ssl.read``) is charged to the Python line that called it, which is how the categories below
tell compression from encryption (two different lines of ``archive.borg14._InternalWriter._encrypt``).
"""

from __future__ import annotations

import functools
import linecache
import logging
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import measure

log = logging.getLogger(__name__)

PY_SPY = str(Path(sys.executable).parent / "py-spy")


def available() -> bool:
    """True when py-spy is installed next to this Python (``pip install py-spy``)."""
    return Path(PY_SPY).exists()
RATE = 250

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# py-spy names files relative to the directory of sys.path they were found in.
_SEARCH = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"]),
           Path(__file__).resolve().parents[1]]


def _is(path: str, *names: str) -> bool:
    """True when ``path`` is one of ``names`` or ends with ``/name``."""
    return any(path == name or path.endswith("/" + name) for name in names)


# (category, test on a frame): a sample goes to the first category whose test passes on its
# innermost frame, else on the next frame outwards, and so on. A test gets (function, file,
# source line text).
_CLIENT_RULES: list[tuple[str, Any]] = [
    ("imageio reads (HTTP, TLS, copy into buffers)",
     lambda f, p, src: _is(p, "http/client.py", "ssl.py", "socket.py")
     or f in ("_read_range", "attempt") and _is(p, "ovirt_borg/imageio.py")),
    ("compression (lz4)", lambda f, p, src: "compress(" in src and "decompress" not in src),
    ("encryption + MAC", lambda f, p, src: f == "seal" or ".encrypt(" in src or "_seal(" in src),
    ("chunk id hash", lambda f, p, src: f == "id_hash" or "id_hash(" in src),
    ("block assembly (backup.py)", lambda f, p, src: _is(p, "ovirt_borg/backup.py")
     and f in ("_stream", "_assemble")),
    ("repository writes and cache", lambda f, p, src: _is(p, "borg/repository.py", "borg/cache.py",
                                                          "borg/platform/base.py")
     or f in ("_store", "_hole")),
    ("archive items (metadata)", lambda f, p, src: _is(p, "borg/archive.py", "borg/item.pyx")),
    ("engine control plane (SDK)", lambda f, p, src: "ovirtsdk4" in p or _is(p, "ovirt_borg/engine.py")),
    ("start-up and imports", lambda f, p, src: "importlib" in p),
]

_DAEMON_RULES: list[tuple[str, Any]] = [
    ("TLS + socket send", lambda f, p, src: _is(p, "ssl.py", "socket.py") or "sendall" in src),
    ("NBD reads from qemu-nbd", lambda f, p, src: "nbd" in p or "nbdutil" in p),
    ("HTTP request handling", lambda f, p, src: "http" in p or "images.py" in p or "extents" in f),
    ("tickets, auth, operations", lambda f, p, src: "auth" in p or "ops" in p or "backends" in p),
]


# The modules of the archive writer: its interface and its backends.
_ARCHIVE_WRITER = ("ovirt_borg/archive/__init__.py", "ovirt_borg/archive/borg14.py", "ovirt_borg/archive/tarpipe.py")

# Where the main thread's wall time goes (waits included), for short runs like incrementals.
_WALL_RULES: list[tuple[str, Any]] = [
    ("start-up and imports", lambda f, p, src: "importlib" in p),
    ("borg command line", lambda f, p, src: _is(p, "ovirt_borg/borgcli.py")),
    ("repository id and archive list (in-process)",
     lambda f, p, src: f in ("repository_id", "repository_view") and _is(p, "ovirt_borg/archive/reader.py")),
    ("bitmap check (re-read samples, base blocks)", lambda f, p, src: f == "_check_sample"),
    ("imageio extents", lambda f, p, src: f == "extents" and _is(p, "ovirt_borg/imageio.py")),
    ("image data (read plan, reads, writer)", lambda f, p, src: f in ("add_image", "_write_image")),
    ("repository open, lock, cache sync", lambda f, p, src: f in ("_open", "_open_repository", "__enter__",
                                                                    "lock", "_lock_repository")
     and _is(p, *_ARCHIVE_WRITER)),
    ("archive commit", lambda f, p, src: f == "commit" and _is(p, *_ARCHIVE_WRITER)),
    ("engine: transfers (create, poll, finalize)", lambda f, p, src: f in ("start_transfer", "finalize_transfer",
                                                                         "transfer", "abandon_transfer")),
    ("engine: backup (start, poll ready, finalize)", lambda f, p, src: f in (
        "start_backup", "wait_backup_ready", "finalize_backup", "backup_disk_modes", "finalize_stale_backups")),
    ("engine: checkpoints (list, purge)", lambda f, p, src: f in ("checkpoints", "purge_checkpoints",
                                                                 "delete_checkpoint")),
    ("engine: log in, VMs, disks, OVF", lambda f, p, src: "ovirtsdk4" in p or _is(p, "ovirt_borg/engine.py")),
    ("sidecar and state", lambda f, p, src: _is(p, "ovirt_borg/sidecar.py")),
]


def _parse(line: str) -> tuple[list[str], int] | None:
    stack, _, count = line.rstrip("\n").rpartition(" ")
    if not stack or not count.isdigit():
        return None
    return stack.split(";"), int(count)


def _frame(text: str) -> tuple[str, str, str]:
    """(function, file, source line text) of a py-spy frame ``func (file:line)``."""
    match = _FRAME.match(text.strip())
    if not match:
        return text.strip(), "", ""
    function, path, line = match.group("function"), match.group("file"), match.group("line")
    source = _source(path, int(line)) if line else ""
    return function, path, source


@functools.lru_cache(maxsize=None)
def _source(path: str, line: int) -> str:
    for base in _SEARCH:
        candidate = base / path
        if candidate.exists():
            return linecache.getline(os.fspath(candidate), line).strip()
    return ""


def categorize(raw: Path, rules: list[tuple[str, Any]], main_thread_only: bool = False,
               outermost_first: bool = False) -> dict[str, Any]:
    """Sort the samples of a py-spy raw (collapsed stacks) file into categories.

    Given the file and the rules (samples of child processes become "Borg command-line child
    processes"); ``main_thread_only`` keeps the main thread's
    samples; ``outermost_first`` names a sample by its outermost frame a rule knows (the
    operation that was waiting) rather than its innermost (the code that was running).
    Returns the total samples, the share of each category in percent, and the top 15
    innermost frames.
    """
    categories: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        parsed = _parse(line)
        if parsed is None:
            continue
        frames, count = parsed
        total += count
        # With --subprocesses a child's samples carry its parent's process frame, then its own.
        if sum(f.startswith("process ") for f in frames) > 1:
            if main_thread_only:
                total -= count  # the parent's main thread is charged for waiting on it
                continue
            categories["Borg command-line child processes"] += count
            continue
        if main_thread_only and not any(f.startswith("thread ") and f.endswith("MainThread") for f in frames):
            total -= count
            continue
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        decoded = [_frame(f) for f in reversed(frames)]
        if decoded:
            function, path, _ = decoded[0]
            leaves[f"{function} ({_short(path)})"] += count
        categories[_category(decoded[::-1] if outermost_first else decoded, rules)] += count
    share = {name: round(100 * n / total, 1) for name, n in categories.most_common()} if total else {}
    top = [{"frame": name, "percent": round(100 * n / total, 1)} for name, n in leaves.most_common(15)] if total else []
    return {"samples": total, "categories": share, "top_frames": top}


def _category(frames: list[tuple[str, str, str]], rules: list[tuple[str, Any]]) -> str:
    """The category of a sample: the first rule matching the first frame that any rule matches."""
    for function, path, source in frames:
        # Rules name plain functions; py-spy gives Class.method or outer.<locals>.inner.
        name = function.rsplit(".", 1)[-1]
        for category, test in rules:
            if test(name, path, source):
                return category
    return "other"


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path.rsplit("/work/main/", 1)[-1]


def record(command: list[str], *, env: dict[str, str], daemon_pid: int, out_dir: Path, stamp: str,
           log_dir: Path) -> dict[str, Any]:
    """Profile ``command`` (an ovirt-borg backup) and the imageio daemon ``daemon_pid``.

    Writes ``<stamp>-profile-ovirt-borg.txt`` and ``<stamp>-profile-imageio.txt`` (py-spy raw
    stacks) into ``out_dir``; returns their categories and the run's measurement. Raises
    ``measure.CommandFailed`` when the backup fails.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    client_raw = out_dir / f"{stamp}-profile-ovirt-borg.txt"
    daemon_raw = out_dir / f"{stamp}-profile-imageio.txt"
    with open(log_dir / "py-spy-daemon.err", "wb") as err:
        daemon = subprocess.Popen([PY_SPY, "record", "--pid", str(daemon_pid), "--format", "raw", "--threads",
                                   "--nonblocking", "--rate", str(RATE), "-o", os.fspath(daemon_raw)],
                                  stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        time.sleep(1.0)  # py-spy attaches
        measurement, _ = measure.run(
            "profile-ovirt-borg",
            [PY_SPY, "record", "--format", "raw", "--threads", "--subprocesses", "--nonblocking", "--rate",
             str(RATE), "-o", os.fspath(client_raw), "--", *command],
            env=env, log_dir=log_dir)
    finally:
        # py-spy writes its output when interrupted.
        daemon.send_signal(signal.SIGINT)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    client = {"raw": client_raw.name, **categorize(client_raw, _CLIENT_RULES)}
    daemon_result: dict[str, Any] = {"error": "py-spy wrote no profile of the daemon"}
    if daemon_raw.exists():
        daemon_result = {"raw": daemon_raw.name, **categorize(daemon_raw, _DAEMON_RULES)}
    # On-CPU samples per second of wall time over the sampling rate: how many threads were busy
    # on average (2.0 = both cores of this machine).
    for part in (client, daemon_result):
        if "samples" in part:
            part["busy_threads"] = round(part["samples"] / RATE / measurement.wall, 2)
    return {"wall": measurement.wall, "ovirt_borg": client, "imageio_daemon": daemon_result}


def record_wall(command: list[str], *, env: dict[str, str], out_dir: Path, stamp: str, log_dir: Path,
                name: str) -> dict[str, Any]:
    """Profile the wall time of ``command``'s main thread, waits included (``py-spy --idle``).

    Writes ``<stamp>-profile-<name>.txt``; returns the run's wall time and the main thread's
    time per category in seconds and percent.
    """
    raw = out_dir / f"{stamp}-profile-{name}.txt"
    measurement, _ = measure.run(
        f"profile-{name}",
        [PY_SPY, "record", "--format", "raw", "--threads", "--idle", "--subprocesses", "--nonblocking",
         "--rate", str(RATE), "-o", os.fspath(raw), "--", *command],
        env=env, log_dir=log_dir)
    result = categorize(raw, _WALL_RULES, main_thread_only=True, outermost_first=True)
    result["seconds"] = {category: round(share * result["samples"] / RATE / 100, 2)
                         for category, share in result["categories"].items()}
    # py-spy sees Python frames only once the interpreter is up and it has attached.
    result["seconds"]["before the first sample (interpreter start, py-spy attach)"] = round(
        max(0.0, measurement.wall - result["samples"] / RATE), 2)
    return {"raw": raw.name, "wall": measurement.wall, **result}


def flamegraph(command: list[str], *, env: dict[str, str], out_dir: Path, stamp: str, log_dir: Path) -> str:
    """Record ``command`` as an SVG flame graph (threads apart); return the file name."""
    svg = out_dir / f"{stamp}-profile-ovirt-borg.svg"
    measure.run("profile-flamegraph",
                [PY_SPY, "record", "--format", "flamegraph", "--threads", "--subprocesses", "--nonblocking",
                 "--rate", str(RATE), "-o", os.fspath(svg), "--", *command],
                env=env, log_dir=log_dir)
    return svg.name
