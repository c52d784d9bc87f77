"""The night case: N small VMs backed up under the engine's latency, two ways, in one run.

A real engine spends tens of seconds per VM in its slow phases (backup ready, transfer start
and finalize, backup finalize, checkpoint deletion; ``ovirt_borg.lab.latency``), whatever the
size of the disks. For many small VMs these seconds, not the data, make the night long. This
case brings up a lab with that latency, adds two sets of N VMs (``night-a-NN`` and
``night-b-NN``, VM i of each set holding the same content, every VM's content its own, so
nothing deduplicates across VMs and the two sets' checkpoints never mix), and measures:

- one after another: N ``ovirt-borg backup VM`` processes in turn, each a full backup of one
  VM of set a into one repository (a cron loop or a scheduler running one VM at a time);
- one run: ``ovirt-borg backup --all`` of set b (the job's selection) into a new repository
  with a state of its own, with ``[backup] prepare_ahead`` when given;
- the reference: the VMs' data phases (each disk's seconds in the JSON of the first way: the
  data path through the open transfer) one after the other, plus one VM's engine
  latency (``report.engine_latency``): what a run that hid every other VM's engine phases
  behind the data would take.

Wall seconds and the client's CPU seconds (the processes and the Borg processes they waited
for) of both ways, the lab's CPU seconds, and the ratios against the goals go into the JSON.
The images of the first and the last VM of each set are checked against the reference raw
image (sha256 of ``borg extract --stdout``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import borgrepo, image, measure, report
from bench.image import Content
from bench.measure import Measurement
from bench.run import OVIRT_BORG, Bench, Step, combine, machine, quiesce, sha256_file

log = logging.getLogger(__name__)

CASE = "night"
#: The two sets of VMs: one per contender, VM i of each holding the same content.
SEQUENTIAL_PREFIX = "night-a-"
ONE_RUN_PREFIX = "night-b-"


@dataclass(frozen=True)
class NightOptions:
    """What the night measures; see ``bench.cli`` for the command-line options."""

    vms: int = 20
    disk_size: int = 64 << 20
    #: ``[backup] prepare_ahead`` of the one run's job (None: not written).
    prepare_ahead: int | None = None
    latency: str = "real"
    latency_scale: float = 1.0


def vm_name(prefix: str, index: int, count: int) -> str:
    """``prefix`` and the 1-based ``index``, zero-padded to the width of ``count``."""
    return f"{prefix}{index + 1:0{max(2, len(str(count)))}d}"


class Night:
    """Runs the night case with ``bench``'s lab, repositories and job configs."""

    def __init__(self, bench: Bench, options: NightOptions):
        self.bench = bench
        self.options = options
        self.regions = image.layout(options.disk_size)
        self.run_dir = bench.work / CASE

    def content(self, index: int) -> Content:
        """The content of VM ``index`` of either set: its own seed."""
        return Content(self.bench.options.seed * 1000 + index)

    # -- set-up ------------------------------------------------------------------------------

    def job_configs(self) -> tuple[Path, Path]:
        """The two jobs' configs, each with a new repository and state directory.

        Raises ``ConfigError`` when ovirt-borg refuses the one run's config (as it does with
        ``prepare_ahead`` before that option exists), before anything is measured.
        """
        from ovirt_borg import config as ob_config

        sequential = self.bench.job_config(self.run_dir / "one-after-another")
        sections: dict[str, dict[str, Any]] = {"selection": {"names": [ONE_RUN_PREFIX + "*"]}}
        if self.options.prepare_ahead is not None:
            sections["backup"] = {"prepare_ahead": self.options.prepare_ahead}
        one_run = self.bench.job_config(self.run_dir / "one-run", sections=sections)
        for path in (sequential, one_run):
            ob_config.load(path)
        return sequential, one_run

    def add_vms(self, checked: dict[int, Path]) -> None:
        """Add both sets of VMs; those of ``checked`` indexes are compared with their raw image."""
        size, count = self.options.disk_size, self.options.vms
        log.info("night: filling 2 x %d disks of %d MiB with %d MiB of data each", count, size >> 20,
                 image.data_bytes(self.regions) >> 20)
        for index in range(count):
            content = self.content(index)
            for prefix in (SEQUENTIAL_PREFIX, ONE_RUN_PREFIX):
                self.bench.new_vm(vm_name(prefix, index, count), size, self.regions, checked.get(index), content)
        quiesce()

    def reference_images(self) -> dict[int, tuple[Path, str]]:
        """The raw images of the first and the last VM (``{index: (path, sha256)}``)."""
        out = {}
        for index in sorted({0, self.options.vms - 1}):
            raw = self.run_dir / f"reference-{index}.raw"
            image.write_raw(raw, self.options.disk_size, self.regions, self.content(index))
            out[index] = (raw, sha256_file(raw))
        return out

    # -- the two ways ------------------------------------------------------------------------

    def one_after_another(self, config: Path) -> tuple[Step, list[Step]]:
        """N ``ovirt-borg backup VM`` processes in turn; the sum of them, and each one."""
        count = self.options.vms
        steps = []
        for index in range(count):
            step = self.bench.ovirt_borg_backup(config, vm_name(SEQUENTIAL_PREFIX, index, count), CASE,
                                                self.options.disk_size, index, contender=report.NIGHT_SEQUENTIAL)
            if step.extra["mode"] != "full":
                raise measure.CommandFailed(f"ovirt-borg made a {step.extra['mode']} backup of {step.extra['vm']}")
            steps.append(step)
        total = steps[0].measurement
        for step in steps[1:]:
            total = combine(report.NIGHT_SEQUENTIAL, total, step.measurement)
        archives = [{key: s.extra[key] for key in ("vm", "archive", "mode", "disk_id", "alias", "vm_seconds",
                                                    "disk_seconds")} for s in steps]
        return Step(report.NIGHT_SEQUENTIAL, CASE, total, count * self.options.disk_size,
                    moved=sum(s.moved for s in steps), stored=sum(s.stored for s in steps),
                    extra={"how": f"{count} x ovirt-borg backup VM", "archives": archives}), steps

    def one_run(self, config: Path) -> Step:
        """One ``ovirt-borg backup --all`` of the job's selection (set b)."""
        count = self.options.vms
        repo = config.parent / "repo"
        bench = self.bench
        read0 = bench.imageio_read()
        before = borgrepo.size_on_disk(repo)
        # Its time limit grows with the VMs: each may spend the engine's latency in turn.
        slow = report.engine_latency(bench.lab.info["latency"])
        m, out = measure.run(f"{CASE}-one-run", [OVIRT_BORG, "-c", os.fspath(config), "backup", "--all", "--json"],
                             env=bench.env, log_dir=bench.logs, lab_pids=bench.lab_pids,
                             timeout=bench.options.timeout + count * slow)
        results = json.loads(out)["archives"]
        names = sorted(r["vm"] for r in results)
        expected = [vm_name(ONE_RUN_PREFIX, index, count) for index in range(count)]
        if names != expected:
            raise measure.CommandFailed(f"ovirt-borg backup --all backed up {names}, not {expected}")
        for result in results:
            if not result.get("ok") or result["mode"] != "full":
                raise measure.CommandFailed(f"ovirt-borg backup of {result['vm']}: {result['mode']} "
                                            f"{result.get('error', '')}")
        archives = [{"vm": r["vm"], "archive": r["archive"], "mode": r["mode"], "disk_id": r["disks"][0]["id"],
                     "alias": r["disks"][0]["alias"], "vm_seconds": r["seconds"],
                     "disk_seconds": [d["seconds"] for d in r["disks"]]} for r in results]
        prepare = self.options.prepare_ahead
        how = "backup --all" + (f", prepare_ahead {prepare}" if prepare is not None else "")
        return Step(report.NIGHT_ONE_RUN, CASE, m, count * self.options.disk_size,
                    moved=sum(d["bytes_read"] for r in results for d in r["disks"]),
                    stored=borgrepo.size_on_disk(repo) - before,
                    extra={"how": how, "archives": archives, "imageio_bytes_read": bench.imageio_read() - read0})

    def check_images(self, step: Step, repo: Path, references: dict[int, tuple[Path, str]],
                     prefix: str) -> list[dict]:
        """Compare the images of the reference VMs in ``step``'s archives with their raw files."""
        by_vm = {a["vm"]: a for a in step.extra["archives"]}
        checked = []
        for index, (_, sha) in references.items():
            entry = by_vm[vm_name(prefix, index, self.options.vms)]
            self.bench.check_image(repo, entry["archive"], entry["vm"], entry["alias"], entry["disk_id"], sha,
                                   self.options.disk_size)
            checked.append({"contender": step.contender, "vm": entry["vm"], "archive": entry["archive"],
                            "sha256": sha, "identical": True})
        return checked

    # -- everything ---------------------------------------------------------------------------

    def run(self, stamp: str) -> dict[str, Any]:
        """Bring the lab up, measure both ways and the reference; return the JSON-ready results
        (with ``summary`` and ``goals``). Raises ``CommandFailed`` when a backup fails or an
        image differs, ``ConfigError`` when ovirt-borg refuses a job's config."""
        opts, bench = self.options, self.bench
        results: dict[str, Any] = {
            "case": CASE, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "options": {"vms": opts.vms, "disk_size": opts.disk_size, "data_bytes": image.data_bytes(self.regions),
                        "prepare_ahead": opts.prepare_ahead, "latency": opts.latency,
                        "latency_scale": opts.latency_scale, "encryption": bench.options.encryption,
                        "compression": bench.options.compression, "block_size": bench.options.block_size,
                        "seed": bench.options.seed},
            "load": {"start": os.getloadavg()}, "steps": [],
        }
        bench.start_lab(opts.latency, opts.latency_scale)
        try:
            latency = dict(bench.lab.info["latency"])
            results["latency"] = latency
            self.run_dir.mkdir(parents=True, exist_ok=True)
            sequential_config, one_run_config = self.job_configs()
            t0 = time.monotonic()
            references = self.reference_images()
            self.add_vms({index: raw for index, (raw, _) in references.items()})
            results["seconds_to_prepare"] = round(time.monotonic() - t0, 1)

            results["load"]["one after another"] = os.getloadavg()
            sequential, each = self.one_after_another(sequential_config)
            quiesce()
            results["load"]["one run"] = os.getloadavg()
            one_run = self.one_run(one_run_config)
            results["steps"] = [sequential.as_dict(), one_run.as_dict()]
            results["vm_steps"] = [step.as_dict() for step in each]
            results["images"] = (
                self.check_images(sequential, sequential_config.parent / "repo", references, SEQUENTIAL_PREFIX)
                + self.check_images(one_run, one_run_config.parent / "repo", references, ONE_RUN_PREFIX))
            shutil.rmtree(self.run_dir)
        finally:
            results["load"]["end"] = os.getloadavg()
            bench.stop_lab()
        results["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        reference = report.night_reference([a["disk_seconds"] for a in sequential.extra["archives"]], latency)
        results["reference"] = reference
        results["contenders"] = {step.contender: contender_row(step) for step in (sequential, one_run)}
        ratios = report.night_ratios(sequential.measurement.wall, one_run.measurement.wall, reference["seconds"])
        results["summary"] = {"ratios": {k: round(v, 3) for k, v in ratios.items()}}
        results["goals"] = report.night_goals(ratios, opts.vms)
        return results


def contender_row(step: Step) -> dict[str, Any]:
    """The figures of one way in the night's table."""
    m: Measurement = step.measurement
    return {"how": step.extra["how"], "wall": m.wall, "user": m.user, "system": m.system,
            "cpu_seconds": round(m.user + m.system, 3), "lab_cpu_seconds": round(sum(m.lab_cpu.values()), 3),
            "lab_cpu": m.lab_cpu, "peak_rss": m.peak_rss, "moved": step.moved, "stored": step.stored}
