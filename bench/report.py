"""Medians, ratios, goals and tables from the steps of a benchmark run.

"CPU s" is the CPU time (user + system) of the contender's processes. CPU percentages are of
one core (200% = both cores of a 2-core machine): "CPU %" is the
contender's processes, "lab CPU %" the lab's engine, qemu-nbd and imageio daemons (the oVirt
side), "machine CPU %" everything on the machine, other users included.

Ratios compare contenders measured side by side in the same run: for each run the ratio of
the two wall times is taken, and the median of those ratios is reported (not the ratio of
medians), so slow phases of a noisy machine hit both sides of a pair alike.

``python -m bench.report bench/results/<stamp>.json [--markdown]`` prints the tables again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from typing import Any

OVIRT_BORG = "ovirt-borg"
MB = 1e6
MiB = 1 << 20


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _cases(steps: list[dict]) -> list[str]:
    seen: list[str] = []
    for step in steps:
        if step["case"] not in seen:
            seen.append(step["case"])
    return seen


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Return ``{case: {contender: medians...}}`` with the per-run ratios' medians."""
    steps = results["steps"]
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for step in steps:
        by_key[(step["case"], step["contender"])].append(step)
    walls = {(s["case"], s["contender"], s["run"]): s["measurement"]["wall"] for s in steps}
    summary: dict[str, Any] = {}
    for case in _cases(steps):
        rows: dict[str, Any] = {}
        full_case = "large full" if case.startswith("large") else "full"
        for (step_case, contender), items in by_key.items():
            if step_case != case:
                continue
            m = [s["measurement"] for s in items]
            wall = _median([x["wall"] for x in m])
            row = {
                "runs": len(items),
                "wall": round(wall, 3),
                "wall_min": min(x["wall"] for x in m), "wall_max": max(x["wall"] for x in m),
                "moved": int(_median([s["moved"] for s in items])),
                "stored": int(_median([s["stored"] for s in items])),
                "provisioned": items[0]["provisioned"],
                "moved_mb_s": round(_median([s["moved"] / s["measurement"]["wall"] / MB for s in items]), 1),
                "provisioned_mb_s": round(_median([s["provisioned"] / s["measurement"]["wall"] / MB
                                                   for s in items]), 1),
                "cpu_percent": round(_median([x["cpu_percent"] for x in m]), 1),
                "cpu_seconds": round(_median([x["user"] + x["system"] for x in m]), 2),
                "lab_cpu_seconds": round(_median([sum(x["lab_cpu"].values()) for x in m]), 2),
                "lab_cpu_percent": round(_median([100 * sum(x["lab_cpu"].values()) / x["wall"] for x in m]), 1),
                "imageio_cpu_percent": round(_median([100 * x["lab_cpu"].get("imageio_host", 0) / x["wall"]
                                                      for x in m]), 1),
                "machine_busy_percent": round(_median([x["machine_busy_percent"] for x in m]), 1),
                "peak_rss": int(_median([x["peak_rss"] for x in m])),
                "peak_rss_tree": int(_median([x["peak_rss_tree"] for x in m])),
                "scratch": int(_median([s["extra"].get("scratch_bytes", 0) for s in items])),
            }
            partner = walls.keys()
            ratios = [walls[(case, contender, s["run"])] / walls[(case, OVIRT_BORG, s["run"])]
                      for s in items if (case, OVIRT_BORG, s["run"]) in partner]
            if ratios and contender != OVIRT_BORG:
                row["vs_ovirt_borg"] = round(_median(ratios), 3)
            if "incremental" in case:
                of_full = [walls[(case, contender, s["run"])] / walls[(full_case, contender, s["run"])]
                           for s in items if (full_case, contender, s["run"]) in partner]
                if of_full:
                    row["of_full"] = round(_median(of_full), 4)
            phases = [s for s in items if s["extra"].get("phase_seconds")]
            if phases:
                row["phase_seconds"] = round(_median([s["extra"]["phase_seconds"] for s in phases]), 3)
                row["phase_moved_mb_s"] = round(_median([s["moved"] / s["extra"]["phase_seconds"] / MB
                                                         for s in phases]), 1)
                row["phase_provisioned_mb_s"] = round(_median([s["provisioned"] / s["extra"]["phase_seconds"] / MB
                                                               for s in phases]), 1)
                phase_cpu = [s["extra"]["phase_cpu_seconds"] for s in phases if s["extra"].get("phase_cpu_seconds")]
                if phase_cpu:
                    row["phase_cpu_seconds"] = round(_median(phase_cpu), 3)
            for key in ("changed_bytes", "dirty_bytes", "dirty_blocks", "read_blocks", "reused", "holes", "blocks",
                        "imageio_bytes_read"):
                values = [s["extra"][key] for s in items if key in s["extra"]]
                if values:
                    row[key] = int(_median(values))
            if row.get("dirty_bytes"):
                # ovirt-borg: imageio's own count (the bitmap check's samples included); the
                # two-step way: what the lab's imageio served it.
                row["read_vs_dirty"] = round(row.get("imageio_bytes_read", row["moved"]) / row["dirty_bytes"], 3)
            metadata = [s["extra"]["metadata"] for s in items if "metadata" in s["extra"]]
            if metadata:
                row["metadata_bytes"] = int(_median([x["item_bytes"] + x["archive_bytes"] for x in metadata]))
                row["metadata_chunks"] = int(_median([x["item_chunks"] for x in metadata]))
            rows[contender] = row
        summary[case] = rows
    return summary


def goals(summary: dict[str, Any], block_size: int = 1 << 20) -> list[dict[str, Any]]:
    """Check the goals of the benchmark against the summary; each with its value and verdict."""
    out: list[dict[str, Any]] = []
    full = summary.get("full", {})
    raw = full.get("borg create (local raw)", {})
    if raw:
        ratio = raw.get("vs_ovirt_borg", 0)
        out.append({"goal": "full backup at least as fast as borg create of the local raw file",
                    "value": f"borg create takes {ratio:.2f}x ovirt-borg's time", "met": ratio >= 1.0})
    two = full.get("two-step", {})
    if two:
        ratio = two.get("vs_ovirt_borg", 0)
        out.append({"goal": "full backup at least 2x faster than download + borg create, no scratch disk",
                    "value": f"two-step takes {ratio:.2f}x ovirt-borg's time and {two['scratch'] / MiB:.0f} MiB "
                             f"of scratch; ovirt-borg none", "met": ratio >= 2.0})
    for case, rows in summary.items():
        if case.startswith("incremental 1%") and OVIRT_BORG in rows:
            share = rows[OVIRT_BORG].get("of_full", 1)
            out.append({"goal": f"{case}: under 5% of the full backup's time",
                        "value": f"{100 * share:.1f}% of the full", "met": share < 0.05})
    restore = summary.get("restore", {})
    if "client.upload" in restore:
        ratio = restore["client.upload"].get("vs_ovirt_borg", 0)
        out.append({"goal": "restore at least as fast as ovirt_imageio.client.upload",
                    "value": f"upload takes {ratio:.2f}x ovirt-borg's time", "met": ratio >= 1.0})
    if "two-step restore" in restore:
        two_restore = restore["two-step restore"]
        ratio = two_restore.get("vs_ovirt_borg", 0)
        out.append({"goal": "restore at least 1.5x faster than the two-step restore (borg extract + upload), "
                            "no scratch file",
                    "value": f"the two-step restore takes {ratio:.2f}x ovirt-borg's time and "
                             f"{two_restore['scratch'] / MiB:.0f} MiB of scratch; ovirt-borg none",
                    "met": ratio >= 1.5})
    for case, rows in summary.items():
        row = rows.get(OVIRT_BORG, {})
        if case.startswith("incremental 1% scattered") and row.get("dirty_bytes"):
            ratio = row.get("imageio_bytes_read", row["moved"]) / row["dirty_bytes"]
            out.append({"goal": f"{case}: bytes read from imageio at most 1.3x the dirty bytes",
                        "value": f"{_size(row.get('imageio_bytes_read', row['moved']))} read for "
                                 f"{_size(row['dirty_bytes'])} dirty: {ratio:.1f}x", "met": ratio <= 1.3})
    random_full = summary.get("full random data", {})
    if OVIRT_BORG in random_full:
        versus = {name: random_full[name].get("vs_ovirt_borg", 0)
                  for name in ("borg create (local raw)", "two-step") if name in random_full}
        out.append({"goal": "full backup of random data ahead of borg create of the local raw file and of "
                            "the two-step way",
                    "value": ", ".join(f"{name} takes {ratio:.2f}x ovirt-borg's time" for name, ratio in versus.items()),
                    "met": all(ratio >= 1.0 for ratio in versus.values())})
    large = summary.get("large full", {}).get(OVIRT_BORG)
    if large and OVIRT_BORG in full:
        small_rss, large_rss = full[OVIRT_BORG]["peak_rss"], large["peak_rss"]
        blocks = large["provisioned"] // block_size
        out.append({"goal": "memory bounded, independent of disk size beyond the block map",
                    "value": f"peak RSS {small_rss / MiB:.0f} MiB at {_size(full[OVIRT_BORG]['provisioned'])}, "
                             f"{large_rss / MiB:.0f} MiB at {_size(large['provisioned'])} "
                             f"({(large_rss - small_rss) / blocks:.0f} bytes per extra block)",
                    "met": None})
    return out


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


COLUMNS = ("case", "contender", "wall s", "vs ovirt-borg", "MB/s moved", "MB/s provisioned", "read/sent",
           "stored", "scratch", "CPU s", "CPU %", "lab CPU %", "machine CPU %", "peak RSS")


def rows(summary: dict[str, Any]) -> list[list[str]]:
    """The table rows: one per case and contender."""
    table = []
    for case, contenders in summary.items():
        for contender, row in contenders.items():
            if contender == OVIRT_BORG:
                versus = f"{100 * row['of_full']:.1f}% of full" if "of_full" in row else "1"
            else:
                versus = f"{row['vs_ovirt_borg']:.2f}x" if "vs_ovirt_borg" in row else "-"
                if "of_full" in row:
                    versus += f" ({100 * row['of_full']:.1f}% of full)"
            table.append([case, contender, f"{row['wall']:.2f}", versus, f"{row['moved_mb_s']:.0f}",
                          f"{row['provisioned_mb_s']:.0f}", _size(row["moved"]), _size(row["stored"]),
                          _size(row["scratch"]) if row["scratch"] else "-", f"{row.get('cpu_seconds', 0):.1f}",
                          f"{row['cpu_percent']:.0f}",
                          f"{row['lab_cpu_percent']:.0f}", f"{row['machine_busy_percent']:.0f}",
                          f"{row['peak_rss'] / MiB:.0f} MiB"])
    return table


def text_table(summary: dict[str, Any]) -> str:
    table = [list(COLUMNS)] + rows(summary)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(summary: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(summary)]
    return "\n".join(lines)


def goals_text(checks: list[dict[str, Any]], markdown: bool = False) -> str:
    lines = []
    for check in checks:
        verdict = {True: "met", False: "NOT met", None: "see value"}[check["met"]]
        lines.append(f"- {check['goal']}: {check['value']} -> **{verdict}**" if markdown
                     else f"  [{verdict}] {check['goal']}: {check['value']}")
    return "\n".join(lines)


def machine_text(results: dict[str, Any]) -> str:
    m = results["machine"]
    load = results.get("load", {})
    loads = [v[0] for k, v in load.items() if isinstance(v, (list, tuple))]
    return (f"{m['nproc']} x {m['cpu']} (AES-NI {'yes' if m.get('aes_ni') else 'no'}, SHA-NI "
            f"{'yes' if m.get('sha_ni') else 'no'}), {m['memory'] / (1 << 30):.0f} GiB RAM, Linux {m['kernel']}, "
            f"Python {m['python']}, Borg {m['borg']}, ovirt-imageio {m['ovirt_imageio']}, {m['qemu']}; "
            f"1-minute load during the run {min(loads):.2f}..{max(loads):.2f}" if loads else "")


def data_path_rows(summary: dict[str, Any]) -> list[list[str]]:
    """The full backup's data phase next to each half of it measured alone."""
    full = summary.get("full", {})
    halves = summary.get("full: halves of the data path", {})
    candidates = [("ovirt-borg: the disk phase of its full backup", full.get(OVIRT_BORG)),
                  ("imageio read only (ImageioClient.read_ranges)", halves.get("imageio read only")),
                  ("archive writer only (ArchiveWriter.add_image, image cached)", halves.get("archive writer only"))]
    out = []

    def cpu(row: dict) -> str:
        # The data phase's own CPU seconds where the component reports them, else (in
        # parentheses) the whole process's.
        return f"{row['phase_cpu_seconds']:.1f}" if "phase_cpu_seconds" in row else f"({row['cpu_seconds']:.1f})"

    for title, row in candidates:
        if row and "phase_seconds" in row:
            out.append([title, f"{row['phase_seconds']:.2f}", f"{row['phase_moved_mb_s']:.0f}",
                        f"{row['phase_provisioned_mb_s']:.0f}", cpu(row)])
    raw = full.get("borg create (local raw)")
    if raw:
        out.append(["borg create of the local raw file (whole command)", f"{raw['wall']:.2f}",
                    f"{raw['moved_mb_s']:.0f}", f"{raw['provisioned_mb_s']:.0f}", f"{raw['cpu_seconds']:.1f}"])
    restore = summary.get("restore", {})
    for title, row in (("restore: ovirt-borg (whole command)", restore.get(OVIRT_BORG)),
                       ("restore: archive read only (archive.read_image)",
                        summary.get("restore: the Borg half alone", {}).get("archive read only")),
                       ("restore: client.upload (whole command)", restore.get("client.upload"))):
        if row:
            seconds = row.get("phase_seconds", row["wall"])
            mb_s = row.get("phase_moved_mb_s", row["moved_mb_s"])
            out.append([title, f"{seconds:.2f}", f"{mb_s:.0f}", f"{row['provisioned'] / seconds / MB:.0f}",
                        cpu(row) if "phase_seconds" in row else f"{row['cpu_seconds']:.1f}"])
    return out


DATA_PATH_COLUMNS = ("data phase", "seconds", "MB/s of data", "MB/s of provisioned", "CPU s")


def data_path_text(summary: dict[str, Any], markdown: bool = False) -> str:
    return _table(DATA_PATH_COLUMNS, data_path_rows(summary), markdown)


def metadata_text(summary: dict[str, Any]) -> str:
    """What each ovirt-borg archive of the large disk adds to the repository as metadata."""
    parts = []
    for case, rows in summary.items():
        row = rows.get(OVIRT_BORG, {})
        if "metadata_bytes" in row:
            parts.append(f"{case}: {_size(row['metadata_bytes'])} in {row['metadata_chunks']} item chunks "
                         f"for {row.get('blocks', 0)} blocks")
    return ("Archive metadata (item list and archive object, as stored): " + "; ".join(parts)) if parts else ""


def _table(columns: tuple[str, ...], table: list[list[str]], markdown: bool, left: int = 1) -> str:
    """A table, its first ``left`` columns left-aligned and the others right-aligned."""
    if not table:
        return ""
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * left + "---:|" * (len(columns) - left)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table])
    table = [list(columns)] + table
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(r))
                     for r in table)


def _steps(results: dict[str, Any], case: str, contender: str) -> list[dict]:
    return [s for s in results["steps"] if s["case"] == case and s["contender"] == contender]


def _cpu(measurement: dict) -> float:
    return measurement["user"] + measurement["system"]


RESTORE_COLUMNS = ("restore", "wall s", "vs ovirt-borg", "client CPU s", "lab CPU s", "scratch")


def restore_text(results: dict[str, Any], markdown: bool = False) -> str:
    """The restore against the two-step restore and the upload of a local file: wall time, the
    client's and the lab's CPU seconds apart, scratch space (medians of the runs)."""
    summary = summarize(results)
    restore = summary.get("restore", {})
    two = _steps(results, "restore", "two-step restore")
    if not two:
        return ""
    table = []

    def add(title: str, measurements: list[dict], versus: str, scratch: str) -> None:
        table.append([title, f"{_median([m['wall'] for m in measurements]):.2f}", versus,
                      f"{_median([_cpu(m) for m in measurements]):.1f}",
                      f"{_median([sum(m['lab_cpu'].values()) for m in measurements]):.1f}", scratch])

    for contender, title in ((OVIRT_BORG, "ovirt-borg restore"),
                             ("two-step restore", "two-step: borg extract --sparse + client.upload"),
                             ("client.upload", "client.upload of a local raw file")):
        row = restore.get(contender)
        if row is None:
            continue
        versus = f"{row['vs_ovirt_borg']:.2f}x" if "vs_ovirt_borg" in row else "1"
        add(title, [s["measurement"] for s in _steps(results, "restore", contender)], versus,
            _size(row["scratch"]) if row["scratch"] else "-")
        if contender == "two-step restore":
            add("  of which borg extract to the scratch file", [s["extra"]["extract"] for s in two], "", "")
            add("  of which client.upload of the scratch file", [s["extra"]["upload"] for s in two], "", "")
    return ("Restore against the two-step restore (the client's CPU seconds and the lab's apart):\n"
            + _table(RESTORE_COLUMNS, table, markdown))


DIRTY_COLUMNS = ("incremental", "dirty bytes (64 KiB granules)", "ovirt-borg read", "read / dirty",
                 "two-step read (imageio's dirty extents)", "read / dirty")


def dirty_text(results: dict[str, Any], markdown: bool = False) -> str:
    """Bytes read from imageio by each incremental against the dirty bytes: the guest's writes
    rounded out to the bitmap's 64 KiB granules."""
    summary = summarize(results)
    table = []
    for case, rows in summary.items():
        ob, two = rows.get(OVIRT_BORG, {}), rows.get("two-step", {})
        dirty = ob.get("dirty_bytes")
        if not dirty or case.startswith("large"):
            continue
        read = ob.get("imageio_bytes_read", ob["moved"])
        cells = [case, _size(dirty), _size(read), f"{read / dirty:.2f}x"]
        cells += [_size(two["moved"]), f"{two['moved'] / dirty:.2f}x"] if two else ["-", "-"]
        table.append(cells)
    if not table:
        return ""
    return "Bytes read from imageio against the dirty bytes:\n" + _table(DIRTY_COLUMNS, table, markdown)


FIXED_CASE = "fixed cost: no data"
FLOOR = "floor: Borg's key and compressor"
CPU_COLUMNS = ("data", "contender", "CPU s/GiB", "lab CPU s/GiB", "vs floor", "fixed CPU s", "wall s",
               "wall vs ovirt-borg")


def cpu_per_gib(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """CPU seconds per GiB of each kind of data, ``{kind: {contender: ...}}``: the floor (Borg's
    key and compressor on the same blocks, with its parts) and each contender that also ran
    the fixed-cost case (ovirt-borg backing up a disk of holes, ``borg create`` of an empty
    file), net of that fixed cost in the same run: its processes' CPU seconds, and the lab's
    apart; medians of the runs."""
    floors = results.get("floor", [])
    summary = summarize(results)
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({f["kind"] for f in floors}, key=["random", "text", "zero"].index):
        case = f"full {kind} data"
        mine = [f for f in floors if f["kind"] == kind]
        gib = [f["kind_bytes"] / (1 << 30) for f in mine]
        rows: dict[str, Any] = {FLOOR: {
            "cpu_per_gib": round(_median([f["cpu_seconds"] / g for f, g in zip(mine, gib)]), 3),
            "parts": {part: round(_median([f["seconds"][part] / g for f, g in zip(mine, gib)]), 3)
                      for part in mine[0]["seconds"]}}}
        for contender, row in summary.get(case, {}).items():
            fixed = {s["run"]: s["measurement"] for s in _steps(results, FIXED_CASE, contender)}
            pairs = [(s, fixed[s["run"]]) for s in _steps(results, case, contender) if s["run"] in fixed]
            if not pairs:
                continue
            cpu = [(_cpu(s["measurement"]) - _cpu(base)) / (s["extra"]["data_bytes"] / (1 << 30))
                   for s, base in pairs]
            lab = [(sum(s["measurement"]["lab_cpu"].values()) - sum(base["lab_cpu"].values()))
                   / (s["extra"]["data_bytes"] / (1 << 30)) for s, base in pairs]
            rows[contender] = {"cpu_per_gib": round(_median(cpu), 3), "lab_cpu_per_gib": round(_median(lab), 3),
                               "fixed_cpu": round(_median([_cpu(base) for _, base in pairs]), 3),
                               "wall": row["wall"], "vs_ovirt_borg": row.get("vs_ovirt_borg")}
        out[kind] = rows
    return out


def cpu_text(results: dict[str, Any], markdown: bool = False) -> str:
    kinds = cpu_per_gib(results)
    table = []
    for kind, rows in kinds.items():
        floor = rows[FLOOR]["cpu_per_gib"]
        for contender, row in rows.items():
            if contender == FLOOR:
                parts = row["parts"]
                table.append([kind, f"{FLOOR} (id {parts['chunk id']:.2f}, lz4 {parts['compression']:.2f}, "
                                    f"AES+MAC {parts['encryption and MAC']:.2f})",
                              f"{floor:.2f}", "-", "1", "-", "-", "-"])
                continue
            # Zeros have next to no floor (a zero test per block): no ratio to speak of.
            versus = f"{row['cpu_per_gib'] / floor:.2f}x" if floor >= 0.25 else "-"
            wall = "1" if contender == OVIRT_BORG else (f"{row['vs_ovirt_borg']:.2f}x" if row["vs_ovirt_borg"] else "-")
            table.append([kind, contender, f"{row['cpu_per_gib']:.2f}",
                          f"{row['lab_cpu_per_gib']:.2f}" if contender != "borg create (local raw)" else "-",
                          versus, f"{row['fixed_cpu']:.2f}", f"{row['wall']:.2f}", wall])
    if not table:
        return ""
    return ("CPU seconds per GiB of data (net of each contender's fixed cost, the lab's CPU apart; floor: one "
            "thread of Borg's key and compressor on the same blocks):\n" + _table(CPU_COLUMNS, table, markdown, left=2))


def profile_text(results: dict[str, Any]) -> str:
    """Where the profiled full backup spent its on-CPU time, client and imageio daemon."""
    profile = results.get("profile")
    if not profile:
        return ""
    wall = profile.get("wall") or profile.get("measurement", {}).get("wall", 0)
    lines = [f"Profile of one full backup ({wall:.1f} s wall, py-spy, on-CPU samples):"]
    for side, title in (("ovirt_borg", "ovirt-borg"), ("imageio_daemon", "host imageio daemon")):
        part = profile.get(side, {})
        if "categories" not in part:
            lines.append(f"- {title}: {part.get('error', 'no profile')}")
            continue
        shares = ", ".join(f"{name} {share:.0f}%" for name, share in part["categories"].items() if share >= 1)
        lines.append(f"- {title}: {part.get('busy_threads', 0):.2f} threads busy on average; {shares}")
    for key, title in (("incremental", "incremental after a 1% sequential write"),
                       ("large_incremental", "incremental of the large disk")):
        wall_profile = profile.get(key)
        if wall_profile and "seconds" in wall_profile:
            spent = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in wall_profile["seconds"].items()
                              if seconds >= 0.05)
            lines.append(f"- {title} ({wall_profile['wall']:.1f} s wall), main thread: {spent}")
    if profile.get("flamegraph"):
        lines.append(f"- flame graph: bench/results/{profile['flamegraph']}")
    return "\n".join(lines)


# -- the night of N VMs under the engine's latency ---------------------------------------------

NIGHT_SEQUENTIAL = "one after another"
NIGHT_ONE_RUN = "ovirt-borg, one run"
NIGHT_REFERENCE = "reference"
#: The goals of the night: one run this many times faster than the VMs one after another, and
#: at most this many times the reference (the VMs' data phases plus one VM's engine latency).
NIGHT_SPEEDUP_GOAL = 3.0
NIGHT_REFERENCE_GOAL = 1.3


def engine_latency(latency: dict[str, float], disks: int = 1) -> float:
    """The seconds one VM with ``disks`` disks spends in the engine's slow phases during a backup.

    Given the lab's latency figures (``Latency.as_dict()``): the backup's start until ready,
    each disk's transfer start and transfer finalize, the backup's finalize and one checkpoint
    deletion.
    """
    return (latency.get("ready", 0.0) + disks * (latency.get("transfer", 0.0) + latency.get("transfer_finalize", 0.0))
            + latency.get("backup_finalize", 0.0) + latency.get("checkpoint_delete", 0.0))


def data_seconds(disk_seconds: list[float]) -> float:
    """A VM's data phase: the sum over its disks of the seconds ovirt-borg reports per disk
    (extents, reads, archive writes through a transfer already open; its start and finalize are
    the engine's phases, outside these seconds)."""
    return sum(disk_seconds)


def night_reference(vm_disk_seconds: list[list[float]], latency: dict[str, float]) -> dict[str, Any]:
    """The goal's reference for a night: the VMs' data phases one after the other, plus one VM's
    engine latency (that of the VM with the most disks).

    Given each VM's per-disk seconds of a backup alone and the latency figures; returns
    ``{"data_seconds", "vm_data_seconds", "engine_latency", "seconds"}``.
    """
    per_vm = [data_seconds(seconds) for seconds in vm_disk_seconds]
    slow = engine_latency(latency, max((len(seconds) for seconds in vm_disk_seconds), default=1))
    return {"data_seconds": round(sum(per_vm), 3), "vm_data_seconds": [round(s, 3) for s in per_vm],
            "engine_latency": round(slow, 3), "seconds": round(sum(per_vm) + slow, 3)}


def night_ratios(sequential_wall: float, one_run_wall: float, reference_seconds: float) -> dict[str, float]:
    """``sequential_vs_one_run``: the VMs one after another over the one run (wall seconds);
    ``one_run_vs_reference``: the one run over the reference. NaN where a divisor is 0."""
    return {"sequential_vs_one_run": sequential_wall / one_run_wall if one_run_wall else float("nan"),
            "one_run_vs_reference": one_run_wall / reference_seconds if reference_seconds else float("nan")}


def night_goals(ratios: dict[str, float], vms: int) -> list[dict[str, Any]]:
    """The night's goals, in the shape of ``goals``: each with its value and verdict."""
    speedup, versus_reference = ratios["sequential_vs_one_run"], ratios["one_run_vs_reference"]
    return [
        {"goal": f"one run of {vms} VMs at least {NIGHT_SPEEDUP_GOAL:g}x faster than {vms} backups one after "
                 "another",
         "value": f"one after another takes {speedup:.2f}x the one run's time", "met": speedup >= NIGHT_SPEEDUP_GOAL},
        {"goal": f"one run at most {NIGHT_REFERENCE_GOAL:g}x the VMs' data phases plus one VM's engine latency",
         "value": f"the one run takes {versus_reference:.2f}x the reference",
         "met": versus_reference <= NIGHT_REFERENCE_GOAL},
    ]


NIGHT_COLUMNS = ("contender", "wall s", "client CPU s", "lab CPU s", "vs one run", "vs reference", "read", "stored")


def night_text(results: dict[str, Any], markdown: bool = False) -> str:
    """The night's table: both contenders and the reference, then the goals."""
    opts = results["options"]
    contenders, reference = results["contenders"], results["reference"]
    one_run = contenders[NIGHT_ONE_RUN]["wall"]
    table = []
    for name, row in contenders.items():
        table.append([f"{name} ({row['how']})", f"{row['wall']:.2f}", f"{row['cpu_seconds']:.2f}",
                      f"{row['lab_cpu_seconds']:.2f}", f"{row['wall'] / one_run:.2f}x" if one_run else "-",
                      f"{row['wall'] / reference['seconds']:.2f}x" if reference["seconds"] else "-",
                      _size(row["moved"]), _size(row["stored"])])
    table.append([f"{NIGHT_REFERENCE} (data phases {reference['data_seconds']:.2f} s + one VM's engine latency "
                  f"{reference['engine_latency']:.2f} s)", f"{reference['seconds']:.2f}", "-", "-",
                  f"{reference['seconds'] / one_run:.2f}x" if one_run else "-", "1", "-", "-"])
    prepare = opts.get("prepare_ahead")
    head = (f"A night of {opts['vms']} VMs ({_size(opts['disk_size'])} disk, {_size(opts['data_bytes'])} of data "
            f"each) under the engine's latency {opts['latency']} x {opts['latency_scale']:g} "
            f"({', '.join(f'{k} {v:g} s' for k, v in results['latency'].items())}); "
            f"prepare_ahead {prepare if prepare is not None else 'not set'}; repositories {opts['encryption']} + "
            f"{opts['compression']}; one run each.")
    identical: dict[str, list[str]] = defaultdict(list)
    for checked in results.get("images", []):
        if checked.get("identical"):
            identical[checked["contender"]].append(checked["vm"])
    images = "; ".join(f"{', '.join(vms)} ({contender})" for contender, vms in identical.items())
    parts = [head, machine_text(results), _table(NIGHT_COLUMNS, table, markdown),
             f"Images identical to the reference: {images or 'none checked'}.", "Goals:",
             goals_text(results["goals"], markdown)]
    return ("\n\n" if markdown else "\n").join(part for part in parts if part)


def render(results: dict[str, Any], markdown: bool = False) -> str:
    if results.get("case") == "night":
        return night_text(results, markdown)
    # Recomputed from the steps (the measurements), so a file from an older version renders alike.
    summary = summarize(results)
    opts = results["options"]
    image = results.get("image", {})
    head = (f"{opts['runs']} run(s) of a {opts['size'] / (1 << 30):g} GiB disk "
            f"({_size(image.get('random', 0))} random, {_size(image.get('text', 0))} text, rest holes), "
            f"large disk {opts['large'] / (1 << 30):g} GiB with {_size(opts['large_data'])} written; "
            f"repositories {opts['encryption']} + {opts['compression']}; ovirt-borg blocks "
            f"{_size(opts.get('block_size', 4 << 20))}, borg create chunker {opts['chunker']}; medians.")
    checks = goals(summary, results["options"].get("block_size", 1 << 20))
    profile = profile_text(results)
    data_path = data_path_text(summary, markdown) + ("\n\n" if markdown else "\n") + metadata_text(summary)
    extra = [restore_text(results, markdown), dirty_text(results, markdown), cpu_text(results, markdown)]
    if markdown:
        return "\n\n".join(part for part in [head, machine_text(results), markdown_table(summary), data_path,
                                               *extra, "Goals:", goals_text(checks, True), profile] if part)
    return "\n".join([head, machine_text(results), "", text_table(summary), "", data_path, "",
                      *[part + "\n" for part in extra if part], "Goals:", goals_text(checks), "", profile])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description="print a benchmark's tables again")
    parser.add_argument("results", help="a JSON file written by python -m bench")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    print(render(results, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
