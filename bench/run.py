"""The benchmark cases, run against a lab of their own.

Each run of the main disk (``--size``, default 4 GiB) uses two fresh VMs filled with the same
content (one backed up by ovirt-borg, one by the two-step way, so their checkpoints never mix)
and fresh repositories, and measures in this order, rotating the order of the contenders from
run to run:

- full: ovirt-borg; ``borg create`` of the local raw file; download + ``borg create``;
- incremental, for each write pattern and share: the same guest writes on both VMs, then
  ovirt-borg and download(incremental) + ``borg create``;
- restore of ovirt-borg's newest archive into a new disk, ``client.upload`` of the same
  image (the disk's raw content at that point) into another new disk, and the two-step
  restore a Borg user does today: ``borg extract --sparse`` of the image to a local file,
  then ``client.upload`` of that file.

Then, once per run, the CPU cases: a full backup of a disk holding one kind of data (random,
text-like, zeros the guest wrote; ``--kinds-size`` of it on a disk twice that size, the rest
holes) by ovirt-borg and by ``borg create`` of the same image as a local raw file (random
data also by the two-step way), the fixed cost of each (ovirt-borg backing up a disk of holes
only, ``borg create`` of an empty file), and the floor: the CPU seconds Borg's own key and
compressor objects need for the same blocks (``bench.components floor``).

The large sparse disk (``--large``) gets its own runs: full and incremental with ovirt-borg
and the two-step way, and the metadata each ovirt-borg archive adds to the repository.

Every image that a contender produced is checked against the reference: the restored and
uploaded disks with ``qemu-img compare``, and in the first run the full archive's image by
sha256 of ``borg extract --stdout``.
"""

from __future__ import annotations

import compileall
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import borgrepo, image, measure
from bench.borgrepo import RepoSettings
from bench.image import Change, Content
from bench.measure import Measurement

log = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
OVIRT_BORG = str(VENV_BIN / "ovirt-borg")
STORAGE_DOMAIN = "data1"
#: The kinds of data of the CPU cases, and the name of their fixed-cost case.
KINDS = (image.RANDOM, image.TEXT, image.ZERO)
NO_DATA = "no data"


@dataclass(frozen=True)
class Options:
    """What to measure; see ``bench.cli`` for the command-line options."""

    size: int = 4 << 30
    runs: int = 3
    changes: tuple[Change, ...] = tuple(Change(p, pct) for p in ("scattered", "sequential")
                                        for pct in (0.1, 1.0, 10.0))
    large: int = 1 << 40
    large_data: int = 2 << 30
    large_change: float = 0.01
    large_runs: int = 1
    #: Data of each kind in the CPU cases (on a disk twice as large); 0 skips them.
    kinds_size: int = 1 << 30
    encryption: str = "repokey-blake2"
    compression: str = "lz4"
    block_size: int = 1 << 20
    #: borg create's chunker (the issue's baseline: fixed 4 MiB chunks).
    chunker: str = "fixed,4194304"
    #: Environment of an extra full-backup contender "ovirt-borg + NAME=VALUE ..." (empty: none).
    variant_env: tuple[tuple[str, str], ...] = ()
    profile: bool = True
    workdir: Path = Path("/var/tmp")
    results_dir: Path = Path(__file__).resolve().parent / "results"
    keep: bool = False
    seed: int = 1
    timeout: float = 3600.0


@dataclass
class Step:
    """One measured contender in one case: the measurement and what it moved and stored."""

    contender: str
    case: str
    measurement: Measurement
    provisioned: int
    moved: int  # bytes read from imageio (or from the local file)
    stored: int  # growth of the contender's repository
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["measurement"] = self.measurement.as_dict()
        return data


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(4 << 20):
            digest.update(piece)
    return digest.hexdigest()


def allocated(path: Path) -> int:
    """Bytes the file takes on disk."""
    return os.stat(path).st_blocks * 512


def machine() -> dict[str, Any]:
    """Describe the machine and the versions measured."""
    import importlib.metadata

    import borg

    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        memory = int(f.readline().split()[1]) * 1024
    qemu = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    flags = open("/proc/cpuinfo").read()
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", os.fspath(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", os.fspath(root), "status", "--porcelain", "--", "ovirt_borg"],
                           capture_output=True, text=True).stdout.split("\n")
    return {
        "nproc": os.cpu_count(), "cpu": model or platform.processor(), "memory": memory,
        "aes_ni": " aes " in flags, "sha_ni": " sha_ni " in flags,
        "kernel": platform.release(), "python": platform.python_version(), "borg": borg.__version__,
        "ovirt_imageio": importlib.metadata.version("ovirt-imageio"), "qemu": qemu,
        # The product code measured: the commit, and its files changed since (work in progress).
        "git": head, "uncommitted": [line[3:] for line in dirty if line.strip()],
    }


class Bench:
    """Runs every case and returns the results as a JSON-ready dict."""

    def __init__(self, options: Options, lab_dir: Path, work: Path):
        self.options = options
        self.work = work
        self.logs = work / "logs"
        self.lab_dir = lab_dir
        self.settings = RepoSettings(encryption=options.encryption, compression=options.compression,
                                     chunker=options.chunker)
        self.content = Content(options.seed)
        self.lab = None
        self.stamp = ""
        self.large_profile: dict[str, Any] | None = None
        passphrase = work / "passphrase"
        passphrase.write_text("ovirt-borg benchmark passphrase\n")
        passphrase.chmod(0o600)
        # The contenders' programs are modules of this package: importable from any directory.
        root = os.fspath(Path(__file__).resolve().parents[1])
        python_path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": python_path, "BORG_BASE_DIR": os.fspath(work / "borg-home"),
                    "BORG_PASSCOMMAND": f"cat {passphrase}", "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
        for name in ("BORG_PASSPHRASE", "BORG_REPO", "BORG_RSH", "BORG_REMOTE_PATH"):
            self.env.pop(name, None)
        self.passphrase = passphrase
        # Measure ovirt-borg as pip installs it, its modules compiled to bytecode: from a shell
        # with PYTHONDONTWRITEBYTECODE set, each run would compile them again (0.05-0.08 s).
        compileall.compile_dir(Path(__file__).resolve().parents[1] / "ovirt_borg", quiet=1)

    # -- set-up ------------------------------------------------------------------------------

    def start_lab(self, latency: str = "none", latency_scale: float = 1.0) -> None:
        """Bring the lab up; ``latency`` and ``latency_scale`` as ``ovirt-borg-lab up`` takes them."""
        from ovirt_borg.lab.control import Lab

        self.lab = Lab.up(self.lab_dir, vms=1, disk_size="16M", latency=latency, latency_scale=latency_scale)

    def stop_lab(self) -> None:
        if self.lab is not None:
            self.lab.down()
            self.lab = None

    @property
    def lab_pids(self) -> dict[str, int]:
        pids = self.lab.pids
        return {"engine": pids["engine"], "imageio_host": pids["imageio_host"],
                "imageio_proxy": pids["imageio_proxy"]}

    @property
    def variant_name(self) -> str:
        """The name of the ``--variant-env`` contender."""
        return "ovirt-borg + " + " ".join(f"{k}={v}" for k, v in self.options.variant_env)

    def contender_args(self) -> list[str]:
        return [sys.executable, "-m", "bench.contenders", "--url", self.lab.url, "--user", self.lab.user,
                "--password-file", os.fspath(self.lab.password_file), "--ca-file", os.fspath(self.lab.ca_file)]

    def new_repo(self, path: Path) -> Path:
        if path.exists():
            shutil.rmtree(path)
        borgrepo.init(path, self.settings, self.env)
        return path

    def job_config(self, directory: Path, keep_checkpoints: int = 1,
                   sections: dict[str, dict[str, Any]] | None = None) -> Path:
        """An ovirt-borg job writing to ``directory/repo`` with its state in ``directory/state``.

        ``keep_checkpoints`` large lets a second job back up the same VM without deleting the
        checkpoint the first job's next incremental starts from. ``sections`` adds TOML sections
        of other options (``{"selection": {"names": ["night-*"]}}``).
        """
        directory.mkdir(parents=True, exist_ok=True)
        repo = self.new_repo(directory / "repo")
        config = directory / "job.toml"
        config.write_text(
            "[engine]\n"
            f"url = {json.dumps(self.lab.url)}\nuser = {json.dumps(self.lab.user)}\n"
            f"password_file = {json.dumps(os.fspath(self.lab.password_file))}\n"
            f"ca_file = {json.dumps(os.fspath(self.lab.ca_file))}\n"
            "poll_interval = 0.05\n"
            "[repository]\n"
            f"location = {json.dumps(os.fspath(repo))}\n"
            f"passcommand = {json.dumps('cat ' + os.fspath(self.passphrase))}\n"
            f"compression = {json.dumps(self.settings.compression)}\n"
            f"block_size = \"{self.options.block_size >> 10}K\"\n"
            "lock_wait = 30\n"
            "[state]\n"
            f"directory = {json.dumps(os.fspath(directory / 'state'))}\n"
            "[checkpoints]\n"
            f"keep = {keep_checkpoints}\n"
            + "".join(f"[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())
                      for name, options in (sections or {}).items()))
        return config

    def new_vm(self, name: str, size: int, regions: list[image.Region], reference: Path | None,
               content: Content | None = None) -> dict:
        """Create a VM with one qcow2 disk of ``size`` holding ``regions`` (of ``content``, by
        default the run's); return its disk.

        With a ``reference`` raw file, the disk is compared with it (raises on a mismatch).
        """
        self.lab.add_vm(name, disks=1, size=size)
        disk = self.lab.vm_info(name)["disks"][0]
        image.fill_disk(Path(disk["path"]), size, regions, content or self.content, self.work)
        if reference is not None:
            compare(Path(disk["path"]), reference)
        return disk

    def imageio_read(self) -> int:
        """Bytes the host's imageio has served to readers so far."""
        return int(self.lab.stats()["imageio.host.bytes_read"])

    def imageio_written(self) -> int:
        """Bytes the host's imageio has received from writers so far."""
        return int(self.lab.stats()["imageio.host.bytes_written"])

    # -- contenders ----------------------------------------------------------------------------

    def ovirt_borg_backup(self, config: Path, vm: str, case: str, provisioned: int, run: int,
                          contender: str = "ovirt-borg", extra_env: dict[str, str] | None = None) -> Step:
        repo = config.parent / "repo"
        before = borgrepo.size_on_disk(repo)
        read0 = self.imageio_read()
        m, out = measure.run(f"r{run}-{case}-{contender}", [OVIRT_BORG, "-c", os.fspath(config), "backup", vm, "--json"],
                             env={**self.env, **(extra_env or {})}, log_dir=self.logs, lab_pids=self.lab_pids,
                             timeout=self.options.timeout)
        [result] = json.loads(out)["archives"]
        if not result.get("ok"):
            raise measure.CommandFailed(f"ovirt-borg backup of {vm} failed: {result.get('error')}")
        disk = result["disks"][0]
        return Step(contender, case, m, provisioned, moved=sum(d["bytes_read"] for d in result["disks"]),
                    stored=borgrepo.size_on_disk(repo) - before,
                    extra={"mode": result["mode"], "archive": result["archive"], "blocks": disk["blocks"],
                           "holes": disk["holes"], "reused": disk["reused"], "read_blocks": disk["stored"],
                           "imageio_bytes_read": self.imageio_read() - read0, "disk_id": disk["id"],
                           "vm": result["vm"], "alias": disk["alias"], "vm_seconds": result["seconds"],
                           "phase_seconds": sum(d["seconds"] for d in result["disks"]),
                           "disk_seconds": [d["seconds"] for d in result["disks"]]})

    def borg_create(self, repo: Path, source: Path, archive: str, case: str, contender: str, run: int,
                    provisioned: int) -> Step:
        before = borgrepo.size_on_disk(repo)
        cmd = borgrepo.create_command(repo, archive, source, self.settings)
        m, _ = measure.run(f"r{run}-{case}-{contender}", ["env", "-C", os.fspath(source.parent), *cmd],
                           env=self.env, log_dir=self.logs, lab_pids=self.lab_pids, timeout=self.options.timeout)
        return Step(contender, case, m, provisioned, moved=source.stat().st_size,
                    stored=borgrepo.size_on_disk(repo) - before)

    def two_step(self, vm: str, repo: Path, scratch: Path, state: Path, case: str, run: int,
                 provisioned: int, incremental: bool) -> Step:
        """download (+ incremental) to ``scratch``, then ``borg create`` of it; the sum is the step."""
        read0 = self.imageio_read()
        cmd = [*self.contender_args(), "download", "--vm", vm, "--out", os.fspath(scratch),
               "--state", os.fspath(state)]
        if incremental:
            cmd.append("--incremental")
        download, _ = measure.run(f"r{run}-{case}-download", cmd, env=self.env, log_dir=self.logs,
                                  lab_pids=self.lab_pids, timeout=self.options.timeout)
        moved = self.imageio_read() - read0
        scratch_bytes = allocated(scratch)
        create = self.borg_create(repo, scratch, f"{vm}-{case.replace(' ', '_').replace('%', 'pct')}", case,
                                  "borg create of the qcow2", run, provisioned)
        scratch.unlink()
        total = combine("download + borg create", download, create.measurement)
        return Step("two-step", case, total, provisioned, moved=moved, stored=create.stored,
                    extra={"scratch_bytes": scratch_bytes, "download": download.as_dict(),
                           "borg_create": create.measurement.as_dict()})

    # -- cases -------------------------------------------------------------------------------

    def main_run(self, run: int, regions: list[image.Region], raw: Path, raw_sha: str) -> list[Step]:
        size = self.options.size
        run_dir = self.work / f"run{run}"
        run_dir.mkdir()
        ob_vm, ts_vm = f"ob{run}", f"ts{run}"
        log.info("run %d: filling two %d MiB disks", run + 1, size >> 20)
        ob_disk = self.new_vm(ob_vm, size, regions, raw)
        self.new_vm(ts_vm, size, regions, raw)
        quiesce()
        config = self.job_config(run_dir / "ovirt-borg")
        raw_repo = self.new_repo(run_dir / "borg-raw")
        ts_repo = self.new_repo(run_dir / "two-step")
        scratch = run_dir / "scratch.qcow2"
        ts_state = run_dir / "two-step.state"
        steps: list[Step] = []

        full = [
            lambda: self.ovirt_borg_backup(config, ob_vm, "full", size, run),
            lambda: self.borg_create(raw_repo, raw, "raw", "full", "borg create (local raw)", run, size),
            lambda: self.two_step(ts_vm, ts_repo, scratch, ts_state, "full", run, size, False),
        ]
        if self.options.variant_env:
            variant_env = dict(self.options.variant_env)
            variant = self.job_config(run_dir / "ovirt-borg-variant", keep_checkpoints=1000)
            full.append(lambda: self.ovirt_borg_backup(variant, ob_vm, "full", size, run,
                                                       contender=self.variant_name, extra_env=variant_env))
        shift = run % len(full)
        for contender in full[shift:] + full[:shift]:
            steps.append(contender())
            quiesce()
        steps += self.components(run, ts_vm, raw, run_dir)
        ob_full = next(s for s in steps if s.contender == "ovirt-borg")
        if run == 0:
            self.check_archive(config.parent / "repo", ob_full, raw_sha, size)

        for index, change in enumerate(self.options.changes):
            seed = self.options.seed * 1000 + run * 100 + index
            log.info("run %d: guest writes %s", run + 1, change.name)
            image.apply_change(Path(ob_disk["path"]), size, change, seed, self.work)
            image.apply_change(Path(self.lab.vm_info(ts_vm)["disks"][0]["path"]), size, change, seed, self.work)
            quiesce()
            case = f"incremental {change.name}"
            pair = [
                lambda: self.ovirt_borg_backup(config, ob_vm, case, size, run),
                lambda: self.two_step(ts_vm, ts_repo, scratch, ts_state, case, run, size, True),
            ]
            if (run + index) % 2:
                pair.reverse()
            for contender in pair:
                step = contender()
                quiesce()
                step.extra.update(changed_bytes=change.changed_bytes(size, seed),
                                  dirty_bytes=change.dirty_bytes(size, seed),
                                  dirty_blocks=change.dirty_blocks(size, seed, self.options.block_size),
                                  pattern=change.pattern, percent=change.percent)
                steps.append(step)
            ob_step = next(s for s in steps[-2:] if s.contender == "ovirt-borg")
            if ob_step.extra["mode"] != "incremental":
                raise measure.CommandFailed(f"ovirt-borg made a {ob_step.extra['mode']} backup for {case}")

        steps += self.restore_pair(run, config, ob_vm, steps[-1] if steps[-1].contender == "ovirt-borg" else steps[-2])
        self.lab.delete_vm(ob_vm)
        self.lab.delete_vm(ts_vm)
        shutil.rmtree(run_dir)
        return steps

    def components(self, run: int, vm: str, raw: Path, run_dir: Path) -> list[Step]:
        """The imageio read alone and the archive writer alone, on the same image."""
        size = self.options.size
        component = [sys.executable, "-m", "bench.components", "--block-size", str(self.options.block_size)]
        read, out = measure.run(
            f"r{run}-component-read",
            [*component, "read", "--url", self.lab.url, "--user", self.lab.user, "--password-file",
             os.fspath(self.lab.password_file), "--ca-file", os.fspath(self.lab.ca_file), "--vm", vm],
            env=self.env, log_dir=self.logs, lab_pids=self.lab_pids, timeout=self.options.timeout)
        data = json.loads(out)
        steps = [Step("imageio read only", "full: halves of the data path", read, size, moved=data["bytes"],
                      stored=0, extra={"phase_seconds": data["seconds"], "phase_cpu_seconds": data["cpu_seconds"]})]
        repo = self.new_repo(run_dir / "components")
        write, out = measure.run(
            f"r{run}-component-write",
            [*component, "write", "--raw", os.fspath(raw), "--repo", os.fspath(repo), "--compression",
             self.settings.compression],
            env=self.env, log_dir=self.logs, lab_pids=self.lab_pids, timeout=self.options.timeout)
        data = json.loads(out)
        steps.append(Step("archive writer only", "full: halves of the data path", write, size, moved=data["bytes"],
                          stored=borgrepo.size_on_disk(repo),
                          extra={"phase_seconds": data["seconds"], "phase_cpu_seconds": data["cpu_seconds"]}))
        shutil.rmtree(repo)
        return steps

    def restore_pair(self, run: int, config: Path, vm: str, newest: Step) -> list[Step]:
        """ovirt-borg restore of ``newest``'s archive, client.upload of the same image, and
        the two-step restore (``borg extract`` of the archive's image, then client.upload)."""
        size = self.options.size
        reference = self.work / f"restore-reference-{run}.raw"
        self.lab.image(vm, 1, out=reference)
        quiesce()
        archive, disk_id = newest.extra["archive"], newest.extra["disk_id"]

        def ovirt_borg(contender: str = "ovirt-borg", extra_env: dict[str, str] | None = None) -> Step:
            written0 = self.imageio_written()
            m, out = measure.run(f"r{run}-restore-{contender}",
                                 [OVIRT_BORG, "-c", os.fspath(config), "restore", archive, "--disk", disk_id,
                                  "--storage-domain", STORAGE_DOMAIN, "--json"],
                                 env={**self.env, **(extra_env or {})}, log_dir=self.logs, lab_pids=self.lab_pids,
                                 timeout=self.options.timeout)
            restored = json.loads(out)["disks"][0]
            return Step(contender, "restore", m, size, moved=restored["bytes_sent"], stored=0,
                        extra={"disk": restored["new_id"], "holes": restored["holes"],
                               "imageio_bytes_written": self.imageio_written() - written0})

        def upload() -> Step:
            written0 = self.imageio_written()
            m, out = measure.run(f"r{run}-restore-upload",
                                 [*self.contender_args(), "upload", "--image", os.fspath(reference),
                                  "--name", f"upload{run}", "--storage-domain", STORAGE_DOMAIN],
                                 env=self.env, log_dir=self.logs, lab_pids=self.lab_pids, timeout=self.options.timeout)
            # It sends the data extents of the raw file (qemu-img convert left the zeros as holes).
            return Step("client.upload", "restore", m, size, moved=allocated(reference), stored=0,
                        extra={"disk": json.loads(out)["disk"],
                               "imageio_bytes_written": self.imageio_written() - written0})

        path = f"{newest.extra['vm']}/disks/{newest.extra['alias']}-{disk_id}.raw"

        def two_step() -> Step:
            # What a Borg user does today: extract the image to a local file (sparse: all-zero
            # chunks become holes, so the upload sends only data), then upload that file.
            scratch_dir = self.work / f"extract-{run}"
            scratch_dir.mkdir()
            extract, _ = measure.run(f"r{run}-restore-borg-extract",
                                     ["env", "-C", os.fspath(scratch_dir), borgrepo.BORG, "extract", "--sparse",
                                      f"{config.parent / 'repo'}::{archive}", path],
                                     env=self.env, log_dir=self.logs, lab_pids=self.lab_pids,
                                     timeout=self.options.timeout)
            scratch = scratch_dir / path
            scratch_bytes = allocated(scratch)
            written0 = self.imageio_written()
            upload, out = measure.run(f"r{run}-restore-upload-extracted",
                                      [*self.contender_args(), "upload", "--image", os.fspath(scratch),
                                       "--name", f"twostep{run}", "--storage-domain", STORAGE_DOMAIN],
                                      env=self.env, log_dir=self.logs, lab_pids=self.lab_pids,
                                      timeout=self.options.timeout)
            written = self.imageio_written() - written0
            shutil.rmtree(scratch_dir)
            return Step("two-step restore", "restore", combine("borg extract + client.upload", extract, upload),
                        size, moved=scratch_bytes, stored=0,
                        extra={"disk": json.loads(out)["disk"], "scratch_bytes": scratch_bytes,
                               "imageio_bytes_written": written, "extract": extract.as_dict(),
                               "upload": upload.as_dict()})

        def read_archive() -> Step:
            m, out = measure.run(f"r{run}-component-read-archive",
                                 [sys.executable, "-m", "bench.components", "read-archive", "--repo",
                                  os.fspath(config.parent / "repo"), "--archive", archive, "--path", path],
                                 env=self.env, log_dir=self.logs, lab_pids=self.lab_pids, timeout=self.options.timeout)
            data = json.loads(out)
            return Step("archive read only", "restore: the Borg half alone", m, size, moved=data["bytes"], stored=0,
                        extra={"phase_seconds": data["seconds"], "phase_cpu_seconds": data["cpu_seconds"]})

        pair = [ovirt_borg, upload, two_step]
        if self.options.variant_env:
            pair.append(lambda: ovirt_borg(self.variant_name, dict(self.options.variant_env)))
        shift = run % len(pair)
        steps = []
        # A restore reads what was written long before: both sources start out of the page
        # cache, whatever the runs before left there (client.upload reads its image through a
        # qemu-nbd with direct I/O; ovirt-borg reads Borg's segment files through the cache).
        sources = (config.parent / "repo", reference)
        for contender in pair[shift:] + pair[:shift]:
            evict(*sources)
            steps.append(contender())
            quiesce()
        restored = list(steps)
        evict(*sources)
        steps.append(read_archive())
        storage = self.lab.dir / "storage"
        for step in restored:
            compare(storage / f"{step.extra['disk']}.qcow2", reference)
            subprocess.run([*self.contender_args(), "remove-disk", "--disk", step.extra["disk"]], env=self.env,
                           check=True, capture_output=True)
        reference.unlink()
        return steps

    def check_archive(self, repo: Path, step: Step, raw_sha: str, size: int) -> None:
        """Compare the image in ovirt-borg's archive with the reference (sha256 of all bytes)."""
        self.check_image(repo, step.extra["archive"], step.extra["vm"], step.extra["alias"], step.extra["disk_id"],
                         raw_sha, size)

    def check_image(self, repo: Path, archive: str, vm: str, alias: str, disk_id: str, raw_sha: str,
                    size: int) -> None:
        """Raise ``CommandFailed`` unless the disk's image in ``archive`` has ``size`` bytes
        whose sha256 is ``raw_sha``."""
        path = f"{vm}/disks/{alias}-{disk_id}.raw"
        process = subprocess.Popen([borgrepo.BORG, "extract", "--stdout", f"{repo}::{archive}", path],
                                   env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        digest = hashlib.sha256()
        total = 0
        while piece := process.stdout.read(4 << 20):
            digest.update(piece)
            total += len(piece)
        _, err = process.communicate()
        if process.returncode != 0 or total != size or digest.hexdigest() != raw_sha:
            raise measure.CommandFailed(f"the image in archive {archive} differs from the reference "
                                        f"({total} bytes, exit {process.returncode}: {err.decode()[-300:]})")
        log.info("archive %s holds the reference image (sha256 %s)", archive, raw_sha[:16])

    def large_run(self, run: int) -> list[Step]:
        """Full and incremental of a large sparse disk, ovirt-borg and the two-step way."""
        size, opts = self.options.large, self.options
        regions = image.sparse_layout(size, opts.large_data, seed=opts.seed + run)
        run_dir = self.work / f"large{run}"
        run_dir.mkdir()
        ob_vm, ts_vm = f"big{run}", f"bigts{run}"
        log.info("large run %d: filling two %d GiB disks with %d MiB of data", run + 1, size >> 30,
                 image.data_bytes(regions) >> 20)
        ob_disk = self.new_vm(ob_vm, size, regions, None)
        ts_disk = self.new_vm(ts_vm, size, regions, None)
        quiesce()
        config = self.job_config(run_dir / "ovirt-borg")
        ts_repo = self.new_repo(run_dir / "two-step")
        scratch, ts_state = run_dir / "scratch.qcow2", run_dir / "two-step.state"
        steps = [self.ovirt_borg_backup(config, ob_vm, "large full", size, run),
                 self.two_step(ts_vm, ts_repo, scratch, ts_state, "large full", run, size, False)]
        change = Change("scattered", opts.large_change)
        seed = opts.seed * 1000 + 900 + run
        image.apply_change(Path(ob_disk["path"]), size, change, seed, self.work)
        image.apply_change(Path(ts_disk["path"]), size, change, seed, self.work)
        quiesce()
        case = f"large incremental {change.name}"
        steps += [self.ovirt_borg_backup(config, ob_vm, case, size, run),
                  self.two_step(ts_vm, ts_repo, scratch, ts_state, case, run, size, True)]
        for step in steps:
            step.extra["data_bytes"] = image.data_bytes(regions)
            if step.contender == "ovirt-borg":
                step.extra["metadata"] = borgrepo.archive_metadata(config.parent / "repo", step.extra["archive"],
                                                                   self.env)
        steps[2].extra.update(changed_bytes=change.changed_bytes(size, seed),
                              dirty_blocks=change.dirty_blocks(size, seed, opts.block_size))
        if opts.profile and run == 0:
            # Where an incremental of a huge, mostly empty disk spends its wall time: the same
            # writes again (other places), then one more incremental under py-spy.
            from bench import profile

            image.apply_change(Path(ob_disk["path"]), size, change, seed + 1, self.work)
            quiesce()
            command = [OVIRT_BORG, "-c", os.fspath(config), "backup", ob_vm, "--json"]
            self.large_profile = profile.record_wall(command, env=self.env, out_dir=opts.results_dir,
                                                     stamp=self.stamp, log_dir=self.logs, name="large-incremental")
        self.lab.delete_vm(ob_vm)
        self.lab.delete_vm(ts_vm)
        shutil.rmtree(run_dir)
        return steps

    def kinds_prepare(self) -> dict[str, tuple[str, Path | None]]:
        """The disks and raw files of the CPU cases: ``{kind: (vm, raw file)}``.

        One VM per kind of data (random, text, zero) with ``kinds_size`` of it on a disk twice
        as large (``image.kind_layout``), the same image as a local raw file (compared with the
        disk), and for the fixed costs a VM whose disk holds holes only and an empty file.
        """
        size = 2 * self.options.kinds_size
        prepared: dict[str, tuple[str, Path | None]] = {}
        for kind in KINDS:
            regions = image.kind_layout(size, kind)
            raw = self.work / f"kind-{kind}.raw"
            image.write_raw(raw, size, regions, self.content)
            vm = f"kind{kind}"
            log.info("CPU cases: filling a %d MiB disk with %d MiB of %s data", size >> 20,
                     image.data_bytes(regions) >> 20, kind)
            self.new_vm(vm, size, regions, raw)
            prepared[kind] = (vm, raw)
        self.new_vm("kindholes", size, [image.Region(0, size, image.HOLE)], None)
        empty = self.work / "kind-empty.raw"
        empty.write_bytes(b"")
        prepared[NO_DATA] = ("kindholes", empty)
        quiesce()
        return prepared

    def kinds_run(self, run: int, prepared: dict[str, tuple[str, Path | None]]) -> tuple[list[Step], list[dict]]:
        """The CPU cases of one run: ovirt-borg, ``borg create`` (and for random data the
        two-step way) per kind of data, their fixed costs, and the floor of each kind."""
        size = 2 * self.options.kinds_size
        run_dir = self.work / f"kinds{run}"
        steps: list[Step] = []
        floors: list[dict] = []
        for kind, (vm, raw) in prepared.items():
            kind_dir = run_dir / kind
            config = self.job_config(kind_dir / "ovirt-borg")
            raw_repo = self.new_repo(kind_dir / "borg-raw")
            case = f"full {kind} data" if kind != NO_DATA else "fixed cost: no data"
            contenders = [
                lambda: self.ovirt_borg_backup(config, vm, case, size, run),
                lambda: self.borg_create(raw_repo, raw, "raw", case, "borg create (local raw)", run,
                                         size if kind != NO_DATA else 0),
            ]
            if self.options.variant_env:
                variant = self.job_config(kind_dir / "ovirt-borg-variant")
                contenders.append(lambda: self.ovirt_borg_backup(variant, vm, case, size, run,
                                                                 contender=self.variant_name,
                                                                 extra_env=dict(self.options.variant_env)))
            if kind == image.RANDOM:
                ts_repo = self.new_repo(kind_dir / "two-step")
                contenders.append(lambda: self.two_step(vm, ts_repo, kind_dir / "scratch.qcow2",
                                                        kind_dir / "two-step.state", case, run, size, False))
            shift = run % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                step = contender()
                quiesce()
                if step.extra.get("mode", "full") != "full":
                    raise measure.CommandFailed(f"ovirt-borg made a {step.extra['mode']} backup for {case}")
                step.extra.update(kind=kind, data_bytes=0 if kind == NO_DATA else self.options.kinds_size)
                steps.append(step)
            if kind != NO_DATA:
                m, out = measure.run(
                    f"r{run}-floor-{kind}",
                    [sys.executable, "-m", "bench.components", "--block-size", str(self.options.block_size), "floor",
                     "--raw", os.fspath(raw), "--repo", os.fspath(raw_repo), "--compression",
                     self.settings.compression],
                    env=self.env, log_dir=self.logs, timeout=self.options.timeout)
                floors.append({"run": run, "kind": kind, "case": case, "kind_bytes": self.options.kinds_size,
                               "wall": m.wall, **json.loads(out)})
        shutil.rmtree(run_dir)
        return steps, floors

    def kinds_cleanup(self, prepared: dict[str, tuple[str, Path | None]]) -> None:
        for vm, raw in prepared.values():
            self.lab.delete_vm(vm)
            if raw is not None:
                raw.unlink(missing_ok=True)

    def profile_run(self, regions: list[image.Region], raw: Path, out_dir: Path, stamp: str) -> dict:
        """Profile one ovirt-borg full backup (and the host imageio daemon) with py-spy."""
        from bench import profile

        vm = "prof"
        self.new_vm(vm, self.options.size, regions, raw)
        quiesce()
        prof_dir = self.work / "profile"
        try:
            config = self.job_config(prof_dir / "raw")
            command = [OVIRT_BORG, "-c", os.fspath(config), "backup", vm, "--json", "--full"]
            result = profile.record(command, env=self.env, daemon_pid=self.lab.pids["imageio_host"],
                                    out_dir=out_dir, stamp=stamp, log_dir=self.logs)
            # The incremental's wall time, main thread with its waits, after a 1% sequential write.
            change = Change("sequential", 1.0)
            disk = self.lab.vm_info(vm)["disks"][0]
            image.apply_change(Path(disk["path"]), self.options.size, change, self.options.seed, self.work)
            quiesce()
            incremental = [OVIRT_BORG, "-c", os.fspath(config), "backup", vm, "--json"]
            result["incremental"] = profile.record_wall(incremental, env=self.env, out_dir=out_dir, stamp=stamp,
                                                        log_dir=self.logs, name="incremental")
            config = self.job_config(prof_dir / "svg")
            result["flamegraph"] = profile.flamegraph(command, env=self.env, out_dir=out_dir, stamp=stamp,
                                                      log_dir=self.logs)
        finally:
            self.lab.delete_vm(vm)
            shutil.rmtree(prof_dir, ignore_errors=True)
        return result

    # -- everything ---------------------------------------------------------------------------

    def run(self, stamp: str) -> dict[str, Any]:
        opts = self.options
        self.stamp = stamp
        started = datetime.now(timezone.utc)
        results: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"), "machine": machine(),
            "options": {"size": opts.size, "runs": opts.runs, "changes": [c.name for c in opts.changes],
                        "large": opts.large, "large_data": opts.large_data, "large_change": opts.large_change,
                        "large_runs": opts.large_runs, "kinds_size": opts.kinds_size,
                        "encryption": opts.encryption,
                        "compression": opts.compression, "chunker": self.settings.chunker,
                        "block_size": opts.block_size, "seed": opts.seed},
            "load": {"start": os.getloadavg()}, "steps": [],
        }
        self.start_lab()
        try:
            regions = image.layout(opts.size)
            raw = self.work / "image.raw"
            t0 = time.monotonic()
            image.write_raw(raw, opts.size, regions, self.content)
            raw_sha = sha256_file(raw)
            results["image"] = {"size": opts.size, "data_bytes": image.data_bytes(regions),
                                "random": sum(r.length for r in regions if r.kind == image.RANDOM),
                                "text": sum(r.length for r in regions if r.kind == image.TEXT),
                                "sha256": raw_sha, "seconds_to_make": round(time.monotonic() - t0, 1)}
            for run in range(opts.runs):
                results["load"][f"run{run}"] = os.getloadavg()
                results["steps"] += [dict(s.as_dict(), run=run) for s in self.main_run(run, regions, raw, raw_sha)]
            if opts.kinds_size:
                results["floor"] = []
                prepared = self.kinds_prepare()
                try:
                    for run in range(opts.runs):
                        results["load"][f"kinds{run}"] = os.getloadavg()
                        steps, floors = self.kinds_run(run, prepared)
                        results["steps"] += [dict(s.as_dict(), run=run) for s in steps]
                        results["floor"] += floors
                finally:
                    self.kinds_cleanup(prepared)
            if opts.large:
                for run in range(opts.large_runs):
                    results["load"][f"large{run}"] = os.getloadavg()
                    results["steps"] += [dict(s.as_dict(), run=run) for s in self.large_run(run)]
            if opts.profile:
                results["load"]["profile"] = os.getloadavg()
                results["profile"] = self.profile_run(regions, raw, opts.results_dir, stamp)
                if self.large_profile:
                    results["profile"]["large_incremental"] = self.large_profile
            raw.unlink()
        finally:
            results["load"]["end"] = os.getloadavg()
            self.stop_lab()
        results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return results


def combine(name: str, first: Measurement, second: Measurement) -> Measurement:
    """Two measurements of steps run one after the other, as one."""
    wall = first.wall + second.wall
    cpu = first.user + first.system + second.user + second.system
    lab = {k: round(first.lab_cpu.get(k, 0) + second.lab_cpu.get(k, 0), 3) for k in first.lab_cpu}
    busy = (first.machine_busy_percent * first.wall + second.machine_busy_percent * second.wall) / wall if wall else 0
    return Measurement(name=name, wall=round(wall, 3), user=round(first.user + second.user, 3),
                       system=round(first.system + second.system, 3),
                       cpu_percent=round(100 * cpu / wall, 1) if wall else 0.0,
                       peak_rss=max(first.peak_rss, second.peak_rss),
                       peak_rss_max=max(first.peak_rss_max, second.peak_rss_max),
                       peak_rss_tree=max(first.peak_rss_tree, second.peak_rss_tree),
                       machine_busy_percent=round(busy, 1), lab_cpu=lab)


def quiesce() -> None:
    """Write dirty pages out before a measurement, so that no contender pays for the set-up's
    writes (filling disks, guest writes, reference images) while it runs."""
    os.sync()


def evict(*paths: Path) -> None:
    """Drop the files at or below ``paths`` from the page cache (written out first)."""
    os.sync()
    for path in paths:
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def compare(image_path: Path, reference: Path) -> None:
    """Raise ``CommandFailed`` unless the qcow2 ``image_path`` reads exactly like the raw ``reference``."""
    result = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", os.fspath(image_path),
                             os.fspath(reference)], capture_output=True, text=True)
    if result.returncode != 0:
        raise measure.CommandFailed(f"{image_path} differs from {reference}: {result.stdout}{result.stderr}")
