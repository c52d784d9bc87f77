"""Run one contender as a subprocess and measure it: wall time, CPU, peak memory.

- wall time: from spawn to exit (``time.monotonic``);
- CPU: user + system seconds of the process and every descendant it waited for (``os.wait4``),
  and ``cpu_percent`` = CPU seconds / wall seconds (200% = both cores of a 2-core machine);
- peak memory: ``peak_rss`` is the process's own high-water mark (``VmHWM``, polled),
  ``peak_rss_max`` the largest of it and its reaped descendants (``ru_maxrss`` of ``wait4``, what
  ``/usr/bin/time -f %M`` reports), ``peak_rss_tree`` the largest sum of the RSS of the
  process and its live descendants seen by the poller (every 0.5 s);
- the lab's side: CPU seconds of the lab engine (with the qemu-nbd exports it reaped) and of
  both imageio daemons, read from ``/proc/<pid>/stat`` before and after;
- the machine: the share of both cores that was busy (``/proc/stat``), whoever used it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_POLL = 0.05


class CommandFailed(Exception):
    """A measured command exited with an error; the message holds the end of its stderr."""


@dataclass
class Measurement:
    """What one measured command did (times in seconds, sizes in bytes)."""

    name: str
    wall: float
    user: float
    system: float
    cpu_percent: float
    peak_rss: int
    peak_rss_max: int
    peak_rss_tree: int
    machine_busy_percent: float
    lab_cpu: dict[str, float] = field(default_factory=dict)
    returncode: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its closing one.
    return text[text.rindex(")") + 2:].split()


def process_cpu(pid: int, *, children: bool = True) -> float:
    """CPU seconds of ``pid`` (user + system), with its reaped children's when ``children``."""
    fields = _proc_stat(pid)
    if fields is None:
        return 0.0
    # After the pid and comm: state is fields[0]; utime, stime, cutime, cstime are 11..14.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICK


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _tree_rss(root: int) -> int:
    """Sum of the RSS of ``root`` and its live descendants, in bytes."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is None:
            continue
        parents[int(entry)] = int(fields[1])
        rss[int(entry)] = int(fields[21]) * _PAGE
    total = 0
    for pid in rss:
        walker, depth = pid, 0
        while walker and walker != root and depth < 64:
            walker, depth = parents.get(walker, 0), depth + 1
        if walker == root:
            total += rss[pid]
    return total


class _Poller(threading.Thread):
    """Samples the high-water mark and the tree RSS of a process until stopped."""

    def __init__(self, pid: int, deadline: float):
        super().__init__(name=f"poll-{pid}", daemon=True)
        self.pid = pid
        self.deadline = deadline
        self.peak_rss = 0
        self.peak_tree = 0
        self.timed_out = False
        self._stop_event = threading.Event()

    def run(self) -> None:
        count = 0
        while not self._stop_event.wait(_POLL):
            hwm = _status_kib(self.pid, "VmHWM:") * 1024
            self.peak_rss = max(self.peak_rss, hwm)
            count += 1
            # A scan of /proc costs a few ms: every 10th poll keeps it under 1% of a core.
            if count % 10 == 1:
                self.peak_tree = max(self.peak_tree, _tree_rss(self.pid))
            if time.monotonic() > self.deadline and not self.timed_out:
                self.timed_out = True
                log.error("process %s exceeded its time limit: terminating it", self.pid)
                _terminate(self.pid)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _terminate(pid: int) -> None:
    """SIGTERM the process group of our child ``pid``, SIGKILL after 10 s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def kill_later() -> None:
        time.sleep(10)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    threading.Thread(target=kill_later, daemon=True).start()


def run(name: str, cmd: list[str], *, env: dict[str, str], log_dir: Path,
        lab_pids: dict[str, int] | None = None, timeout: float = 3600,
        check: bool = True) -> tuple[Measurement, str]:
    """Run ``cmd`` and measure it; return the measurement and its stdout.

    Given a name for the logs (``log_dir/<name>.out`` and ``.err``), the command, its
    environment, the lab's pids to account (``{"engine": pid, ...}``) and a time limit after
    which the command's process group is terminated. Raises ``CommandFailed`` when ``check``
    and it exits non-zero (or was terminated).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    out_path, err_path = log_dir / f"{safe}.out", log_dir / f"{safe}.err"
    lab_pids = lab_pids or {}
    lab_before = {role: process_cpu(pid) for role, pid in lab_pids.items()}
    busy0, total0 = _machine_ticks()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        # Its own process group, so a timeout can stop the command with all it started.
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        poller = _Poller(process.pid, started + timeout)
        poller.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            _terminate(process.pid)
            process.wait()
            poller.stop()
            raise
        wall = time.monotonic() - started
        poller.stop()
        process.returncode = os.waitstatus_to_exitcode(status)
    busy1, total1 = _machine_ticks()
    lab_cpu = {role: round(process_cpu(pid) - lab_before[role], 3) for role, pid in lab_pids.items()}
    cpu = usage.ru_utime + usage.ru_stime
    measurement = Measurement(
        name=name, wall=round(wall, 3), user=round(usage.ru_utime, 3), system=round(usage.ru_stime, 3),
        cpu_percent=round(100 * cpu / wall, 1) if wall > 0 else 0.0,
        peak_rss=poller.peak_rss, peak_rss_max=usage.ru_maxrss * 1024,
        peak_rss_tree=max(poller.peak_tree, poller.peak_rss),
        machine_busy_percent=round(100 * (busy1 - busy0) / max(1, total1 - total0) * os.cpu_count(), 1),
        lab_cpu=lab_cpu, returncode=process.returncode)
    stdout = out_path.read_text(errors="replace")
    if check and (process.returncode != 0 or poller.timed_out):
        tail = err_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise CommandFailed(f"{name} exited with {process.returncode}"
                            f"{' after its time limit' if poller.timed_out else ''}: "
                            + "\n".join(tail) + f"\n(logs: {err_path})")
    log.info("%s: %.2f s wall, %.0f%% CPU, peak RSS %.0f MiB", name, wall, measurement.cpu_percent,
             measurement.peak_rss / 2**20)
    return measurement, stdout
