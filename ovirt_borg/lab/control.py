"""``Lab``: create, start, drive and stop a lab from Python (tests, the demo, benchmarks).

``Lab.up(dir)`` makes everything a lab needs once (secrets, PKI, sample VMs, a Borg
repository) and starts one detached engine process (``python -m ovirt_borg.lab serve``) that
owns the imageio daemons and qemu-nbd exports; it writes ``lab.json`` (how to reach the lab)
and ``config.toml`` (an ovirt-borg configuration for it). ``Lab.open(dir)`` attaches to a
running lab; ``down()`` stops it and makes sure none of its processes is left.

Guest writes, disk images, statistics and fault switches go to the running engine through its
JSON control API, authenticated by the control token in ``control.token``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from ovirt_borg.lab import LabError
from ovirt_borg.lab.latency import Latency, LatencyError, parse_latency
from ovirt_borg.lab.model import LabLayout
from ovirt_borg.lab.sample import DEFAULT_DISK_SIZE, create_sample, parse_size
from ovirt_borg.lab.tls import LabPki

log = logging.getLogger(__name__)

USER = "admin@internal"
CONTROL_TOKEN_HEADER = "X-Lab-Token"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 20.0

# Engines started by this process: down() reaps them, so no zombie outlives the lab.
_spawned: dict[int, subprocess.Popen] = {}


class LabRequestError(LabError):
    """The running lab engine refused a control request; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Lab:
    """A lab on this machine, described by its ``lab.json``. Use ``up`` or ``open``."""

    def __init__(self, dir: Path, info: dict[str, Any]):
        self.layout = LabLayout(Path(dir).resolve())
        self.info = info
        self._session: requests.Session | None = None

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def up(cls, dir: Path | str, *, vms: int = 2, disk_size: int | str = DEFAULT_DISK_SIZE,
           plain_http: bool = False, separate_web_ca: bool = False,
           latency: str | Latency = "none", latency_scale: float = 1.0,
           timeout: float = _START_TIMEOUT) -> Lab:
        """Create the lab in ``dir`` when new, start its engine, and return it.

        The sample VMs (``vms``, each disk ``disk_size`` bytes or ``64M``/``1G``), secrets,
        PKI and Borg repository are made only once; a second ``up`` reuses them, and returns
        at once when the engine is already running. ``separate_web_ca`` gives the engine's web
        certificate (engine HTTPS, imageio proxy) a CA of its own, as when an admin installs a
        commercial one; the host imageio keeps the engine's internal CA (``host_ca_file``).
        ``latency`` (a ``--latency`` value such as ``real`` or ``ready=8,transfer=3``, or a
        ``Latency``), multiplied by ``latency_scale``, is how long the engine's slow phases last
        (``ovirt_borg.lab.latency``); a running engine with other figures is restarted.
        Raises ``LabError`` for a bad latency, when a tool fails, or when the engine does not
        answer within ``timeout`` seconds (the end of ``engine.log`` is in the message).
        """
        try:
            phases = (latency.scaled(latency_scale) if isinstance(latency, Latency)
                      else parse_latency(latency, latency_scale))
        except LatencyError as e:
            raise LabError(f"bad engine latency: {e}") from e
        layout = LabLayout(Path(dir).resolve())
        layout.dir.mkdir(parents=True, exist_ok=True)
        if layout.lab_json.exists():
            try:
                existing = cls.open(layout.dir)
            except LabError:
                existing = None
            if existing is not None and existing.running:
                if (existing.info.get("plain_http", False) == plain_http
                        and existing.info.get("separate_web_ca", False) == separate_web_ca
                        and existing.info.get("latency", Latency().as_dict()) == phases.as_dict()):
                    log.info("lab in %s is already running", layout.dir)
                    return existing
                existing.down()
            elif existing is not None:
                existing._kill_leftovers()
        pki = _prepare(layout, vms=vms, disk_size=parse_size(disk_size), plain_http=plain_http,
                       separate_web_ca=separate_web_ca)
        engine = _start_engine(layout, ca_file=pki.ca_file if pki else None, latency=phases,
                               timeout=timeout)
        info = _lab_info(layout, engine, pki)
        info["latency"] = phases.as_dict()
        _write_private(layout.lab_json, json.dumps(info, indent=1) + "\n", mode=0o644)
        layout.config.write_text(_config_toml(layout, info))
        log.info("lab up in %s: %s", layout.dir, info["url"])
        return cls(layout.dir, info)

    @classmethod
    def open(cls, dir: Path | str) -> Lab:
        """Return the lab described by ``dir/lab.json``; raises ``LabError`` when missing."""
        layout = LabLayout(Path(dir).resolve())
        try:
            info = json.loads(layout.lab_json.read_text())
        except (OSError, ValueError) as e:
            raise LabError(f"no lab in {layout.dir} ({e}); run: ovirt-borg-lab up "
                           f"--dir {layout.dir}") from e
        return cls(layout.dir, info)

    def down(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Stop the engine (SIGTERM: it closes exports and daemons) and every lab process.

        Processes still alive after ``timeout`` seconds are killed. Idempotent.
        """
        if self._session is not None:
            self._session.close()
            self._session = None
        pids = self._known_pids()
        engine_pid = self.info.get("pids", {}).get("engine")
        if engine_pid and _alive(engine_pid, "ovirt_borg.lab"):
            log.info("stopping lab engine %s", engine_pid)
            os.kill(engine_pid, signal.SIGTERM)
            _wait_gone(engine_pid, timeout)
        self._kill_leftovers(pids)
        self.info["running"] = False
        if self.layout.lab_json.exists():
            _write_private(self.layout.lab_json, json.dumps(self.info, indent=1) + "\n",
                           mode=0o644)

    def _known_pids(self) -> dict[int, str]:
        """Every lab process we know of: pid -> what its command line must contain."""
        pids: dict[int, str] = {}
        for name, pid in self.info.get("pids", {}).items():
            if pid:
                pids[pid] = "ovirt_borg.lab" if name == "engine" else "ovirt-imageio"
        try:
            runtime = json.loads(self.layout.engine_json.read_text())
        except (OSError, ValueError):
            runtime = {}
        children = runtime.get("children", {})
        for name in ("imageio_host", "imageio_proxy"):
            if children.get(name):
                pids[children[name]] = "ovirt-imageio"
        for pid in children.get("exports", {}).values():
            pids[pid] = "qemu-nbd"
        return pids

    def _kill_leftovers(self, pids: dict[int, str] | None = None) -> None:
        pids = self._known_pids() if pids is None else pids
        for pid, marker in pids.items():
            if _alive(pid, marker):
                log.warning("lab process %s (%s) still running, terminating it", pid, marker)
                os.kill(pid, signal.SIGTERM)
        for pid, marker in pids.items():
            if not _wait_gone(pid, 5.0) and _alive(pid, marker):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5.0)

    @property
    def running(self) -> bool:
        """True when the engine process is alive and answers the control API."""
        pid = self.info.get("pids", {}).get("engine")
        if not pid or not _alive(pid, "ovirt_borg.lab"):
            return False
        try:
            self._call("ping", timeout=5)
        except (LabError, requests.RequestException):
            return False
        return True

    # -- what clients need ------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return self.layout.dir

    @property
    def url(self) -> str:
        """The engine API URL, ``https://127.0.0.1:PORT/ovirt-engine/api``."""
        return self.info["url"]

    @property
    def ca_file(self) -> Path | None:
        """The CA of the engine's web certificate (engine HTTPS, imageio proxy); None for a
        plain-HTTP lab."""
        return Path(self.info["ca_file"]) if self.info.get("ca_file") else None

    @property
    def host_ca_file(self) -> Path | None:
        """The engine's internal CA, which the host imageio's certificate has (``ca_file``
        too unless the lab was started with ``separate_web_ca``); None for plain HTTP."""
        path = self.info.get("host_ca_file") or self.info.get("ca_file")
        return Path(path) if path else None

    @property
    def user(self) -> str:
        return self.info["user"]

    @property
    def password_file(self) -> Path:
        return Path(self.info["password_file"])

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def passphrase_file(self) -> Path:
        return Path(self.info["passphrase_file"])

    @property
    def repo(self) -> Path:
        return Path(self.info["repo"])

    @property
    def borg_env(self) -> dict[str, str]:
        """Environment for the ``borg`` command line: BORG_REPO and BORG_PASSCOMMAND."""
        return dict(self.info["borg_env"])

    @property
    def config_path(self) -> Path:
        return Path(self.info["config"])

    @property
    def state_dir(self) -> Path:
        return Path(self.info["state_dir"])

    @property
    def pids(self) -> dict[str, int]:
        return dict(self.info.get("pids", {}))

    @property
    def sample(self) -> dict[str, Any]:
        """``sample.json``: ids, file hashes and data regions of the sample disks."""
        return json.loads(self.layout.sample.read_text())

    def connection(self, **kwargs: Any):
        """Return an ``ovirtsdk4.Connection`` to the lab engine (keyword arguments override)."""
        import ovirtsdk4

        options: dict[str, Any] = dict(url=self.url, username=self.user, password=self.password,
                                       ca_file=os.fspath(self.ca_file) if self.ca_file else None)
        options.update(kwargs)
        return ovirtsdk4.Connection(**options)

    # -- control API ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Return the VMs with their status, tags and disks (ids, paths, sizes)."""
        return self._call("describe")

    def vm_info(self, name: str) -> dict[str, Any]:
        """Return one VM of ``describe()``; raises ``LabError`` when there is none."""
        for vm in self.describe()["vms"]:
            if vm["name"] == name:
                return vm
        raise LabError(f"the lab has no VM {name!r}")

    def write(self, vm: str, disk: int | str = 1, *, percent: float | None = None,
              offset: int | None = None, length: int | None = None, zero: bool = False,
              discard: bool = False, seed: int | None = None) -> list[dict[str, int]]:
        """Write to a VM disk like its guest (through qemu, recorded by dirty bitmaps).

        Either ``percent`` of the disk as scattered 64 KiB-aligned runs of random data, or the
        range ``offset``/``length`` (random data, or ``zero``/``discard``). Returns the written
        ranges as ``{"offset", "length"}``. Raises ``LabRequestError`` (409) while a backup or
        transfer of the disk is open.
        """
        if (percent is None) == (offset is None or length is None):
            raise ValueError("give percent, or offset and length")
        result = self._call("write", vm=vm, disk=disk, percent=percent, offset=offset,
                            length=length, zero=zero, discard=discard, seed=seed)
        return result["ranges"]

    def image(self, vm: str, disk: int | str = 1, *, out: Path | str) -> Path:
        """Write the disk's current guest-visible content to the raw file ``out``."""
        out = Path(out).resolve()
        self._call("image", vm=vm, disk=disk, out=os.fspath(out))
        return out

    def disk_sha256(self, vm: str, disk: int | str = 1) -> str:
        """Return the sha256 of the disk's current raw content."""
        with tempfile.TemporaryDirectory(dir=self.layout.dir, prefix=".image-") as tmp:
            raw = self.image(vm, disk, out=Path(tmp) / "disk.raw")
            return _file_sha256(raw)

    def stats(self) -> dict[str, Any]:
        """Return the engine's counters (imageio bytes, open backups/transfers, checkpoints,
        calls, active faults)."""
        return self._call("stats")

    def fault(self, name: str, on: bool = True, *, vm: str | None = None,
              times: int | None = None) -> dict[str, Any]:
        """Turn a fault switch on or off (see ``faults()['known']``); returns what was done.

        ``vm`` limits a checkpoint or stale-backup fault to one VM; ``times`` makes a switch
        last that many events. Raises ``LabRequestError`` for an unknown name.
        """
        return self._call("fault", name=name, on=on, vm=vm, times=times)

    def faults(self) -> dict[str, Any]:
        """Return ``{"active": {name: remaining}, "known": {name: help}}``."""
        return self._call("faults")

    def clear_faults(self) -> None:
        """Turn every fault switch off."""
        self._call("clear-faults")

    def add_disk(self, vm: str, *, size: int | str = DEFAULT_DISK_SIZE, format: str = "cow",
                 storage_type: str = "image", shareable: bool = False,
                 active: bool = True) -> dict[str, Any]:
        """Create a disk (``cow`` or ``raw``) and attach it to the VM; returns its id and path.

        ``storage_type`` ("lun", "managed_block_storage", "cinder") and ``shareable`` give the
        disks an engine's backup leaves out; ``active=False`` attaches the disk unplugged.
        """
        return self._call("add-disk", vm=vm, size=parse_size(size), format=format,
                          storage_type=storage_type, shareable=shareable, active=active)

    def add_vm(self, name: str, *, disks: int = 1, size: int | str = DEFAULT_DISK_SIZE,
               format: str = "cow", status: str = "up", tags: tuple[str, ...] = (),
               seed: int | None = None, origin: str = "ovirt", cluster: str | None = None) -> dict[str, Any]:
        """Create a VM with ``disks`` data disks (random data in two regions each).

        Tests that change checkpoints or turn faults on use their own VM, so a lab shared by
        many tests stays predictable. ``origin`` "managed_hosted_engine" makes the hosted
        engine's VM; ``cluster`` names the VM's cluster (default: the first). Returns the VM's
        id, name, status and disk ids.
        """
        return self._call("add-vm", vm=name, disks=disks, size=parse_size(size), format=format,
                          status=status, tags=list(tags), seed=seed, origin=origin, cluster=cluster)

    def cluster(self, name: str, version: str) -> dict[str, Any]:
        """Create the cluster ``name``, or set its compatibility level (``"4.4"`` .. ``"4.8"``)."""
        return self._call("cluster", name=name, version=version)

    def engine_config(self, name: str, version: str, value: bool) -> dict[str, Any]:
        """Set an engine option for one cluster level (``UseHybridBackup``,
        ``IsIncrementalBackupSupported``), as ``engine-config -s NAME=VALUE --cver=VERSION``."""
        return self._call("engine-config", name=name, version=version, value=value)
    def add_storage_domain(self, name: str, *, type: str = "iscsi", chunk_size: int | str | None = None,
                           extent_size: int | str | None = None) -> dict[str, Any]:
        """Add a data storage domain: ``iscsi`` or ``fcp`` for a block domain (thin disks hold
        their LV's size, vdsm's ``chunk_size`` without an initial size, LVs in whole
        ``extent_size``; both vdsm's when not given), ``localfs`` or ``nfs`` for a file one."""
        sizes = {key: parse_size(value) for key, value in
                 (("chunk_size", chunk_size), ("extent_size", extent_size)) if value is not None}
        return self._call("add-storage-domain", name=name, type=type, **sizes)

    def add_guests(self, vm: str = "guests") -> dict[str, Any]:
        """Add the VM with the guest disks of file-level recovery (``ovirt_borg.lab.guests``).

        Returns its ``sample.json`` entry: per disk its id, alias and volumes with their known
        files. Raises ``LabRequestError`` (409) when the name is taken.
        """
        return self._call("add-guests", vm=vm)

    def detach_disk(self, vm: str, disk: int | str) -> dict[str, Any]:
        """Detach a VM disk (by 1-based index or id); it stays as a floating disk."""
        return self._call("detach-disk", vm=vm, disk=disk)

    def delete_vm(self, vm: str) -> dict[str, Any]:
        """Delete a VM and its disks at once, even when it is up or has a backup open."""
        return self._call("delete-vm", vm=vm)

    def start_vm(self, vm: str) -> dict[str, Any]:
        return self._call("start-vm", vm=vm)

    def stop_vm(self, vm: str) -> dict[str, Any]:
        return self._call("stop-vm", vm=vm)

    def _call(self, op: str, timeout: float = 600, **args: Any) -> Any:
        """POST a control operation; return its JSON answer.

        Raises ``LabRequestError`` when the engine refuses, ``LabError`` when it cannot be
        reached.
        """
        if self._session is None:
            session = requests.Session()
            # A CA bundle from the environment must not override the lab CA.
            session.trust_env = False
            session.verify = os.fspath(self.ca_file) if self.ca_file else True
            token = self.layout.control_token.read_text().strip()
            session.headers[CONTROL_TOKEN_HEADER] = token
            self._session = session
        base = self.url.split("/ovirt-engine/")[0]
        try:
            response = self._session.post(f"{base}/ovirt-engine/lab/{op}",
                                          json={k: v for k, v in args.items() if v is not None},
                                          timeout=timeout)
        except requests.ConnectionError as e:
            raise LabError(f"the lab engine at {base} does not answer; is the lab up? "
                           f"({type(e).__name__})") from e
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text[:200]}
        if response.status_code != 200:
            raise LabRequestError(f"lab {op} failed ({response.status_code}): "
                                  f"{data.get('error', data)}", response.status_code)
        return data

    def __repr__(self) -> str:
        return f"<Lab {self.dir} {self.info.get('url')}>"


# ---------------------------------------------------------------------------------------------
# Set-up steps


def _prepare(layout: LabLayout, *, vms: int, disk_size: int, plain_http: bool,
             separate_web_ca: bool = False) -> LabPki | None:
    """Create whatever the lab directory lacks: secrets, PKI, sample VMs, Borg repository.

    Returns the PKI (None for plain HTTP).
    """
    for path in (layout.password, layout.passphrase, layout.control_token):
        if not path.exists():
            _write_private(path, secrets.token_urlsafe(24) + "\n")
    pki = None
    if not plain_http:
        from ovirt_borg.lab.tls import make_lab_pki
        pki = make_lab_pki(layout.pki, separate_web_ca=separate_web_ca)
    if not layout.engine_state.exists():
        create_sample(layout, vms=vms, disk_size=disk_size)
    layout.state.mkdir(exist_ok=True)
    if not (layout.repo / "config").exists():
        _borg_init(layout)
    return pki


def _borg_init(layout: LabLayout) -> None:
    """``borg init --encryption=repokey-blake2`` with this venv's borg; raises ``LabError``."""
    env = dict(os.environ, BORG_PASSCOMMAND=f"cat {layout.passphrase}",
               BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
    env.pop("BORG_PASSPHRASE", None)
    env.pop("BORG_REPO", None)
    cmd = [sys.executable, "-m", "borg", "init", "--encryption=repokey-blake2",
           os.fspath(layout.repo)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise LabError(f"borg init of {layout.repo} failed: {result.stderr.strip()}")
    log.info("created Borg repository %s", layout.repo)


def _start_engine(layout: LabLayout, *, ca_file: Path | None, latency: Latency | None = None,
                  timeout: float) -> dict[str, Any]:
    """Spawn the detached engine (plain HTTP without ``ca_file``, the CA of its certificate;
    ``latency`` for its slow phases) and wait until it answers; return its run/engine.json."""
    layout.engine_json.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ovirt_borg.lab", "serve", "--dir", os.fspath(layout.dir)]
    if ca_file is None:
        cmd.append("--plain-http")
    if latency is not None and not latency.is_none:
        cmd += ["--latency", latency.spec()]
    with open(layout.engine_log, "ab") as log_file:
        # Its own session: the engine outlives the command that started it, and a Ctrl-C in
        # that terminal does not reach it.
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=log_file, start_new_session=True, cwd=layout.dir)
    _spawned[process.pid] = process
    deadline = time.monotonic() + timeout
    token = layout.control_token.read_text().strip()
    while True:
        if process.poll() is not None:
            _spawned.pop(process.pid, None)
            raise LabError(f"the lab engine exited with {process.returncode}:\n"
                           f"{_tail(layout.engine_log)}")
        runtime = _read_runtime(layout)
        if runtime and runtime.get("pid") == process.pid and runtime.get("url"):
            if _ping(runtime["url"], token, ca_file):
                return runtime
        if time.monotonic() > deadline:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            _spawned.pop(process.pid, None)
            raise LabError(f"the lab engine did not answer within {timeout:.0f} s:\n"
                           f"{_tail(layout.engine_log)}")
        time.sleep(0.05)


def _read_runtime(layout: LabLayout) -> dict[str, Any] | None:
    try:
        return json.loads(layout.engine_json.read_text())
    except (OSError, ValueError):
        return None


def _ping(url: str, token: str, ca_file: Path | None) -> bool:
    base = url.split("/ovirt-engine/")[0]
    session = requests.Session()
    session.trust_env = False
    try:
        response = session.post(f"{base}/ovirt-engine/lab/ping", json={},
                                headers={CONTROL_TOKEN_HEADER: token},
                                verify=os.fspath(ca_file) if ca_file else True, timeout=2)
        return response.status_code == 200
    except requests.RequestException:
        return False
    finally:
        session.close()


def _lab_info(layout: LabLayout, runtime: dict[str, Any], pki: LabPki | None) -> dict[str, Any]:
    children = runtime.get("children", {})
    passcommand = f"cat {layout.passphrase}"
    return {
        "dir": os.fspath(layout.dir),
        "url": runtime["url"],
        "ca_file": os.fspath(pki.ca_file) if pki else None,
        "host_ca_file": os.fspath(pki.host_ca_file) if pki else None,
        "separate_web_ca": bool(pki and pki.ca_file != pki.host_ca_file),
        "user": USER,
        "password_file": os.fspath(layout.password),
        "pids": {"engine": runtime["pid"], "imageio_host": children.get("imageio_host"),
                 "imageio_proxy": children.get("imageio_proxy")},
        "repo": os.fspath(layout.repo),
        "passphrase_file": os.fspath(layout.passphrase),
        "borg_env": {"BORG_REPO": os.fspath(layout.repo), "BORG_PASSCOMMAND": passcommand},
        "control_token_file": os.fspath(layout.control_token),
        "config": os.fspath(layout.config),
        "state_dir": os.fspath(layout.state),
        "sample": os.fspath(layout.sample),
        "engine_log": os.fspath(layout.engine_log),
        "plain_http": pki is None,
        "running": True,
    }


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes.
    return json.dumps(value)


def _config_toml(layout: LabLayout, info: dict[str, Any]) -> str:
    lines = [
        "[engine]",
        f"url = {_toml_string(info['url'])}",
        f"user = {_toml_string(info['user'])}",
        f"password_file = {_toml_string(info['password_file'])}",
        f"ca_file = {_toml_string(info['ca_file'] or '')}",
    ]
    if info.get("plain_http"):
        # The configuration refuses http:// engines unless told to accept them.
        lines.append("allow_http = true")
    lines += [
        "[repository]",
        f"location = {_toml_string(os.fspath(layout.repo))}",
        f"passcommand = {_toml_string(info['borg_env']['BORG_PASSCOMMAND'])}",
        "[state]",
        f"directory = {_toml_string(os.fspath(layout.state))}",
    ]
    if info.get("host_ca_file"):
        lines += ["[transfer]", f"host_ca_file = {_toml_string(info['host_ca_file'])}"]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically, never readable beyond ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Processes


def _alive(pid: int, marker: str) -> bool:
    """True when ``pid`` runs (not a zombie) and its command line contains ``marker``.

    The marker guards against a recycled pid now belonging to an unrelated process.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        if state in (b"Z", b"X"):
            _reap(pid)
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ")
    except (OSError, IndexError):
        return False
    return marker.encode() in cmdline


def _reap(pid: int) -> None:
    process = _spawned.pop(pid, None)
    if process is not None:
        process.wait()


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited (reaping it when it is our child); return True if gone."""
    deadline = time.monotonic() + timeout
    process = _spawned.get(pid)
    while time.monotonic() < deadline:
        if process is not None:
            if process.poll() is not None:
                _spawned.pop(pid, None)
                return True
        elif not _alive(pid, ""):
            return True
        time.sleep(0.05)
    return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()
