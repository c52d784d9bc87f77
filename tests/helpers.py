"""Helpers shared by the test modules: file digests, temporary lab VMs, processes that hold a
repository lock, the page cache a file takes, the TCP peers of a process, and waits on a state
with a deadline (``from helpers import ...``)."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

_vm_numbers = itertools.count(1)


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex sha256 of the file at ``path``."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def wait_for(condition: Callable[[], object], timeout: float = 30.0, interval: float = 0.02,
             what: str = "condition") -> object:
    """Poll ``condition`` until it returns something true, and return that.

    Raises AssertionError naming ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def page_cache_bytes(path: str | os.PathLike) -> int:
    """Bytes of the file at ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", os.fspath(path)],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def tcp_peer_ports(pid: int) -> set[int]:
    """The remote ports of the TCP sockets process ``pid`` holds open (any state), read from /proc.

    A socket the process has closed is not among them, even while the kernel still ends it.
    """
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


@contextlib.contextmanager
def kept_root_logging() -> Iterator[None]:
    """Inside the block code may set up logging (``ovirt_borg.logs.setup``, run by ``cli.main``);
    afterwards the root logger's handlers and the levels ``setup`` sets are as they were, so no
    handler is left writing to a stream the test has closed (such as capsys's stderr)."""
    root = logging.getLogger()
    names = ("ovirt_borg", "borg", "urllib3")
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in names}
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            if handler not in saved_handlers:
                handler.close()
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def temporary_vm(lab, prefix: str = "t", *, ignore_delete_errors: bool = False, **options) -> Iterator[str]:
    """Add a VM named ``<prefix>-v<n>-<pid>`` to the lab (``options`` as ``lab.add_vm`` takes
    them), yield its name, and delete it afterwards, even with a backup still open.

    ``ignore_delete_errors`` is for tests that may leave the lab unable to delete it.
    """
    with temporary_vms(lab, [f"{prefix}-v{next(_vm_numbers)}-{os.getpid()}"],
                       ignore_delete_errors=ignore_delete_errors, **options) as (name,):
        yield name


@contextlib.contextmanager
def temporary_vms(lab, names: list[str], *, ignore_delete_errors: bool = False,
                  **options) -> Iterator[list[str]]:
    """Add the VMs ``names`` to the lab (``options`` as ``lab.add_vm`` takes them), yield their
    names, and delete those added afterwards, even with a backup still open.

    ``ignore_delete_errors`` is for tests that may leave the lab unable to delete them.
    """
    added = []
    try:
        for name in names:
            lab.add_vm(name, **options)
            added.append(name)
        yield names
    finally:
        for name in added:
            if ignore_delete_errors:
                with contextlib.suppress(Exception):
                    lab.delete_vm(name)
            else:
                lab.delete_vm(name)


# A process forked from pytest counts pytest's memory in its peak RSS (the kernel keeps the higher
# of the old and the new image's high-water marks across exec): a program's own peak is read
# from a grandchild forked by a small Python, which writes it (KiB) to a file and exits as the
# program did.
_PEAK_RSS = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def with_peak_rss(command: list[str], peak_file: Path) -> list[str]:
    """``command`` run so that its peak RSS (KiB, its own and its children's) ends in ``peak_file``."""
    return [sys.executable, "-c", _PEAK_RSS, str(peak_file), *command]


def lab_engine_settings(lab):
    """ovirt-borg's engine settings for the lab's engine (short polls, a 30 s timeout)."""
    from ovirt_borg.engine import EngineSettings

    return EngineSettings(url=lab.url, user=lab.user, password=lab.password_file.read_text().strip(),
                          ca_file=str(lab.ca_file), poll_interval=0.05, timeout=30)


@contextlib.contextmanager
def holding_lock(command: list[str], env: dict[str, str], locked: Callable[[], bool], *,
                 what: str, timeout: float = 30.0) -> Iterator[subprocess.Popen]:
    """Run ``command`` (a process that takes a repository lock and keeps it) in a session of its
    own; once ``locked()`` holds, yield the process; afterwards end its whole session.

    Raises AssertionError naming ``what`` when the process exits first or ``timeout`` passes.
    """
    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not locked():
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited: {proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not take the lock in time")
            time.sleep(0.05)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()


def exclusive_lock_taken(repo_dir: Path) -> Callable[[], bool]:
    """A ``locked`` test for ``holding_lock``: Borg's exclusive lock of the local repository."""
    lock_dir = Path(repo_dir) / "lock.exclusive"
    return lambda: lock_dir.is_dir() and any(lock_dir.iterdir())
