"""How ovirt-borg names its archives and what it writes in their comments (pure functions).

An archive of this job is named ``<prefix><vm>-<UTC time>``, the time as ``TIMESTAMP_FORMAT``
(``2026-11-26T03:00:00Z``, one-second resolution), optionally followed by a tag ``.<tag>`` that a
plugin may add. List, prune and restore find a VM's archives by that name alone, so every
module that builds or reads one uses this module. The same timestamp format is used for the
times a sidecar records.

Inside an archive the VM's files live below a directory named after the VM (``safe_name``).
The archive comment (``archive_comment``) says what ``ovirt-borg list`` shows without opening
the archive.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Protocol

#: The UTC time in archive names and sidecars (``datetime.strftime``).
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
#: What ``TIMESTAMP_FORMAT`` gives, as a regular expression.
TIMESTAMP_PATTERN = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z"

_TIMESTAMP = re.compile(TIMESTAMP_PATTERN)
# The time at the end of an archive name of another prefix (still <vm>-<UTC time>).
_TRAILING_TIMESTAMP = re.compile(rf"-{TIMESTAMP_PATTERN}$")
# A tag after the time: a plugin's choice; Borg's ``.checkpoint`` archives are not archives of a VM.
_TAG = r"(?:\.(?!checkpoint)[A-Za-z0-9_-][A-Za-z0-9._-]*)?"
_COMMENT_MARK = "ovirt-borg "


def timestamp(moment: datetime) -> str:
    """``moment`` (a UTC time) as archive names and sidecars write it."""
    return moment.strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    """The aware UTC time of a ``timestamp`` string; raises ValueError for another format."""
    return datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=timezone.utc)


def unused_timestamp(previous_archives: Iterable[str], now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                     sleep: Callable[[float], None] = time.sleep) -> str:
    """The archive timestamp for a run starting now, one that none of ``previous_archives`` has.

    Archive names have a one-second resolution: a run started within the second of the last
    one (a retry, a test) waits for the next second rather than fail on a taken name.
    """
    taken = {m.group(0) for name in previous_archives if (m := _TIMESTAMP.search(name))}
    stamp = timestamp(now())
    for _ in range(40):
        if stamp not in taken:
            break
        sleep(0.05)
        stamp = timestamp(now())
    return stamp


def archive_name(prefix: str, vm_name: str, stamp: str) -> str:
    """The name of a VM's archive written at ``stamp`` (a ``timestamp``), without a tag."""
    return f"{prefix}{vm_name}-{stamp}"


def vm_archive_glob(prefix: str, vm_name: str) -> str:
    """The Borg glob matching exactly this VM's archives (not those of a VM named 'NAME-2')."""
    return f"{prefix}{vm_name}-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T*"


def vm_of_archive(name: str, prefix: str) -> str | None:
    """The VM name of an archive this job wrote, or None for a foreign archive.

    This job's archives are named ``<prefix><vm>-<UTC time>``, optionally followed by a tag
    ``.<tag>`` (a plugin's choice); Borg's ``.checkpoint`` archives are not archives of a VM.
    """
    match = re.fullmatch(re.escape(prefix) + rf"(.+)-{TIMESTAMP_PATTERN}{_TAG}", name)
    return match.group(1) if match else None


def safe_name(name: str) -> str:
    """A name usable as one path component inside the archive."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "_"


def vm_directory(archive_name: str, prefix: str) -> str:
    """The directory of the VM's files that the name ``archive_name`` says."""
    vm_name = vm_of_archive(archive_name, prefix)
    if vm_name is None:  # not this job's name pattern: another prefix, still <vm>-<UTC time>
        vm_name = _TRAILING_TIMESTAMP.sub("", archive_name[len(prefix):] if archive_name.startswith(prefix)
                                          else archive_name)
    return safe_name(vm_name)


class _DiskSizes(Protocol):
    """What the comment says of each disk (a ``sidecar.DiskRecord``)."""

    provisioned_size: int
    bytes_read: int
    stored: int


def archive_comment(vm_name: str, mode: str, path: str, checkpoint: str | None,
                    disks: Sequence[_DiskSizes] = ()) -> str:
    """The Borg archive comment: what ``ovirt-borg list`` shows without opening the archive.

    The sizes are known only at the end; the command-line writer, which must name its comment
    when it starts, records the rest.
    """
    comment = f"{_COMMENT_MARK}vm={vm_name} mode={mode} path={path} checkpoint={checkpoint or '-'}"
    if disks:
        comment += (f" disks={len(disks)} size={sum(d.provisioned_size for d in disks)}"
                    f" read={sum(d.bytes_read for d in disks)} blocks_stored={sum(d.stored for d in disks)}")
    return comment


def parse_archive_comment(comment: str) -> dict[str, str]:
    """The key=value fields of an archive comment written by ``archive_comment``."""
    if not comment.startswith(_COMMENT_MARK):
        return {}
    return dict(part.split("=", 1) for part in comment.split()[1:] if "=" in part)
