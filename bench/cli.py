"""``python -m bench``: the command line of the benchmark.

Defaults measure a 4 GiB disk three times, the CPU cases with 1 GiB of each kind of data
three times and a 1 TiB sparse disk once (about 20-30 minutes on 2 cores); ``--quick``
measures a 1 GiB disk once, 256 MiB of each kind once and a 64 GiB sparse disk, without the
profile (a few minutes). Prints the table and writes ``bench/results/<UTC stamp>.json``.

``--case night`` runs only the night of N small VMs under the engine's latency
(``bench.night``): 20 VMs at the real engine's figures, or with ``--quick`` 4 VMs at a tenth
of them; it writes ``bench/results/<UTC stamp>-night.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import report
from bench.image import Change
from bench.night import Night, NightOptions
from bench.run import Bench, Options
from ovirt_borg.errors import ConfigError
from ovirt_borg.lab.cli import latency_spec

log = logging.getLogger(__name__)


def _size(text: str) -> int:
    from ovirt_borg.lab.sample import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _percents(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of percentages: {text!r}") from None
    if not values or any(not 0 < v <= 100 for v in values):
        raise argparse.ArgumentTypeError("percentages must be in (0, 100]")
    return values


#: The options of ``--case night`` alone.
NIGHT_ONLY = ("vms", "prepare_ahead", "latency", "latency_scale")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=("disks", "night"), default="disks",
                   help="disks: the full, incremental, restore, CPU and large-disk cases (default); "
                        "night: only N small VMs under the engine's latency, one after another against one run")
    p.add_argument("--vms", type=int, default=None, help="night: VMs of each contender (default 20; 4 with --quick)")
    p.add_argument("--prepare-ahead", type=int, default=None, metavar="K",
                   help="night: write [backup] prepare_ahead = K into the one run's job (default: not written)")
    p.add_argument("--latency", type=latency_spec, default=None, metavar="SPEC",
                   help="night: the lab engine's latency, as ovirt-borg-lab up --latency (default real)")
    p.add_argument("--latency-scale", type=float, default=None, metavar="F",
                   help="night: multiply every latency figure by F (default 1; 0.1 with --quick)")
    p.add_argument("--size", type=_size, default=None,
                   help="main disk size (default 4G; 1G with --quick); night: each VM's disk (default 64M)")
    p.add_argument("--runs", type=int, default=None, help="runs of the main disk (default 3; 1 with --quick)")
    p.add_argument("--changes", type=_percents, default=(0.1, 1.0, 10.0),
                   help="shares of the disk written before each incremental, in %% (default 0.1,1,10)")
    p.add_argument("--patterns", default="scattered,sequential",
                   help="write patterns: scattered (64 KiB writes), sequential (one run); default both")
    p.add_argument("--large", type=_size, default=None,
                   help="large sparse disk size (default 1T; 64G with --quick; 0 skips it)")
    p.add_argument("--large-data", type=_size, default=None,
                   help="data written on the large disk (default 2G; 256M with --quick)")
    p.add_argument("--large-change", type=float, default=0.01,
                   help="share of the large disk written before its incremental, in %% (default 0.01)")
    p.add_argument("--large-runs", type=int, default=1, help="runs of the large disk (default 1)")
    p.add_argument("--kinds-size", type=_size, default=None,
                   help="data of each kind (random, text, zero) in the CPU cases, each on a disk twice "
                        "that size (default 1G; 256M with --quick; 0 skips them)")
    p.add_argument("--encryption", default="repokey-blake2", choices=("repokey-blake2", "repokey", "none"),
                   help="borg init --encryption of every repository (default repokey-blake2)")
    p.add_argument("--compression", default="lz4", help="Borg compression of every contender (default lz4)")
    p.add_argument("--block-size", type=_size, default=1 << 20,
                   help="ovirt-borg's block size (default 1M, ovirt-borg's default)")
    p.add_argument("--chunker", default="fixed,4194304",
                   help="borg create's --chunker-params (default fixed,4194304: fixed 4 MiB chunks)")
    p.add_argument("--variant-env", action="append", default=[], metavar="NAME=VALUE",
                   help="add a contender to the full backups, the CPU cases and the restore: ovirt-borg with "
                        "this environment (repeatable), "
                        "e.g. MALLOC_MMAP_THRESHOLD_=67108864")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile of a full backup")
    p.add_argument("--quick", action="store_true", help="small sizes, one run, no profile")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the lab, images and repositories go (needs ~4x --size free; default /var/tmp)")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (logs, lab) afterwards; without it a failed run keeps only its logs")
    p.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--wait-load", type=float, default=None, metavar="LOAD",
                   help="first wait (up to --wait-max s) until the 1-minute load is below LOAD")
    p.add_argument("--wait-max", type=float, default=1800)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def options_from(args: argparse.Namespace) -> Options:
    quick = args.quick
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for pattern in patterns:
        if pattern not in ("scattered", "sequential"):
            raise SystemExit(f"python -m bench: unknown write pattern {pattern!r}")
    size = args.size or ((1 << 30) if quick else (4 << 30))
    large = args.large if args.large is not None else ((64 << 30) if quick else (1 << 40))
    kinds_size = args.kinds_size if args.kinds_size is not None else ((256 << 20) if quick else (1 << 30))
    return Options(
        size=size, runs=args.runs or (1 if quick else 3),
        changes=tuple(Change(pattern, pct) for pattern in patterns for pct in args.changes),
        large=large, large_data=args.large_data or ((256 << 20) if quick else (2 << 30)),
        large_change=args.large_change, large_runs=args.large_runs, kinds_size=kinds_size,
        encryption=args.encryption,
        compression=args.compression, block_size=args.block_size, chunker=args.chunker,
        variant_env=tuple(tuple(item.split("=", 1)) for item in args.variant_env), profile=not (quick or args.no_profile), workdir=args.workdir,
        results_dir=args.results_dir, keep=args.keep)


def night_options_from(args: argparse.Namespace) -> NightOptions:
    """The night's options; raises SystemExit for a value it cannot use."""
    vms = args.vms if args.vms is not None else (4 if args.quick else 20)
    scale = args.latency_scale if args.latency_scale is not None else (0.1 if args.quick else 1.0)
    if vms < 1:
        raise SystemExit("python -m bench: --vms must be at least 1")
    if args.prepare_ahead is not None and args.prepare_ahead < 0:
        raise SystemExit("python -m bench: --prepare-ahead must be 0 or more")
    if not scale >= 0:
        raise SystemExit("python -m bench: --latency-scale must be 0 or more")
    return NightOptions(vms=vms, disk_size=args.size or (64 << 20), prepare_ahead=args.prepare_ahead,
                        latency=args.latency or "real", latency_scale=scale)


def wait_for_load(limit: float, longest: float) -> None:
    deadline = time.monotonic() + longest
    while (load := os.getloadavg()[0]) >= limit:
        if time.monotonic() > deadline:
            log.warning("the 1-minute load is still %.2f after %.0f s; measuring anyway", load, longest)
            return
        log.info("1-minute load %.2f >= %.2f: waiting", load, limit)
        time.sleep(30)


def keep_only_logs(work: Path) -> None:
    """After a failed run: move every ``*.log`` of the work directory (the lab's engine,
    imageio and qemu-nbd logs) below ``work/logs``, then delete the rest (disk images and
    repositories: tens of GiB for the default sizes)."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for path in list(work.rglob("*.log")):
        if logs not in path.parents:
            target = logs / path.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
    for path in work.iterdir():
        if path == logs:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from(args)
    night = None
    if args.case == "night":
        night = night_options_from(args)
        options = dataclasses.replace(options, profile=False)
    elif given := [name for name in NIGHT_ONLY if getattr(args, name) is not None]:
        raise SystemExit(f"python -m bench: --{given[0].replace('_', '-')} applies to --case night only")
    if options.runs < 1 or options.size < (64 << 20) or options.size % (1 << 20):
        raise SystemExit("python -m bench: --runs must be >= 1 and --size a multiple of 1 MiB, at least 64M")
    if options.kinds_size % (1 << 20):
        raise SystemExit("python -m bench: --kinds-size must be a multiple of 1 MiB")
    if any(len(pair) != 2 or not pair[0] for pair in options.variant_env):
        raise SystemExit("python -m bench: --variant-env takes NAME=VALUE")
    if options.block_size < (64 << 10) or options.block_size & (options.block_size - 1):
        raise SystemExit("python -m bench: --block-size must be a power of two, at least 64K")
    if options.profile:
        from bench import profile

        if not profile.available():
            raise SystemExit(f"python -m bench: the profile needs py-spy ({profile.PY_SPY} is missing): "
                             f"{sys.executable} -m pip install py-spy, or run with --no-profile")
    if args.wait_load is not None:
        wait_for_load(args.wait_load, args.wait_max)
    options.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ovirt-borg-bench-", dir=options.workdir))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log.info("work directory %s", work)
    bench = Bench(options, work / "lab", work)
    try:
        results = Night(bench, night).run(stamp) if night else bench.run(stamp)
    except BaseException as e:
        if not options.keep:
            keep_only_logs(work)
        log.error("the benchmark failed; its logs are in %s", work / "logs")
        if isinstance(e, ConfigError):  # a job's config that ovirt-borg refuses: its message says all
            raise SystemExit(f"python -m bench: ovirt-borg refuses the job's config: {e}") from None
        raise
    if not night:  # the night's summary and goals come with its results
        summary = report.summarize(results)
        results["summary"] = summary
        results["goals"] = report.goals(summary, options.block_size)
        results["cpu_per_gib"] = report.cpu_per_gib(results)
    options.results_dir.mkdir(parents=True, exist_ok=True)
    out = options.results_dir / (f"{stamp}-night.json" if night else f"{stamp}.json")
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if not options.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(report.render(results))
    print(f"\nresults: {out}")
    return 0
