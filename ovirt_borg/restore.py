"""Restore: a whole VM or one disk into oVirt, disks to local files, and verify.

Images are read block by block from the archive (``archive.read_image``): a block stored as
Borg's all-zero chunk is a hole and is never read from the repository, never sent (an imageio
``zero`` request in oVirt, a skipped range in a local sparse file).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ovirt_borg import archive, pagecache, qcow2, sidecar as sc
from ovirt_borg.engine import DiskInfo, Engine, StorageDomainInfo
from ovirt_borg.errors import ConfigError, NotFound, OvirtBorgError, VerifyMismatch
from ovirt_borg.imageio import ImageioClient, TransferSettings
from ovirt_borg.progress import Progress

log = logging.getLogger(__name__)

_TIMESTAMP = re.compile(r"-\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@dataclass
class RestoredDisk:
    id: str
    alias: str
    new_id: str = ""
    path: str = ""
    bytes_sent: int = 0
    holes: int = 0
    seconds: float = 0.0


@dataclass
class RestoreResult:
    archive: str
    vm_name: str = ""
    vm_id: str = ""
    disks: list[RestoredDisk] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["disks"] = [dict(x.__dict__) for x in self.disks]
        return d


def load_archive_sidecar(repo: archive.Repo, archive_name: str, prefix: str) -> sc.Sidecar:
    """Read and validate the sidecar stored in an archive; raises NotFound or OvirtBorgError."""
    vm_dir = _vm_dir(archive_name, prefix)
    try:
        data = archive.read_file(repo, archive_name, f"{vm_dir}/{sc.SIDECAR_NAME}")
    except NotFound:
        if archive_name not in archive.repository_view(repo).archives:
            raise NotFound(f"no archive named {archive_name!r} in the repository; "
                           "see 'ovirt-borg list' for the archive names") from None
        raise OvirtBorgError(f"archive {archive_name} has no ovirt-borg sidecar ({vm_dir}/{sc.SIDECAR_NAME}); "
                             "is it an ovirt-borg archive?") from None
    try:
        return sc.parse(data)
    except sc.SidecarInvalid as e:
        raise OvirtBorgError(f"the sidecar in archive {archive_name} is damaged: {e}") from None


def _vm_dir(archive_name: str, prefix: str) -> str:
    """The directory of the VM's files in ``archive_name``: the VM name from the archive's name."""
    from ovirt_borg.backup import safe_name
    from ovirt_borg.retention import vm_of_archive

    vm_name = vm_of_archive(archive_name, prefix)
    if vm_name is None:  # not this job's name pattern: another prefix, still <vm>-<UTC time>
        vm_name = _TIMESTAMP.sub("", archive_name[len(prefix):] if archive_name.startswith(prefix) else archive_name)
    return safe_name(vm_name)


def _pick_disks(sidecar: sc.Sidecar, disk_ids: list[str] | None) -> list[sc.DiskRecord]:
    if not disk_ids:
        return list(sidecar.disks)
    chosen = []
    for wanted in disk_ids:
        record = next((d for d in sidecar.disks if wanted in (d.id, d.alias)), None)
        if record is None:
            raise NotFound(f"archive {sidecar.archive} has no disk {wanted!r}; it has: "
                           + ", ".join(f"{d.alias} ({d.id})" for d in sidecar.disks))
        chosen.append(record)
    return chosen


ZERO_GRANULARITY = 64 * 1024
_ZERO_PIECE = bytes(ZERO_GRANULARITY)


def split_zeros(blocks: Iterable[tuple[int, int, bytes | None]],
                granularity: int = ZERO_GRANULARITY) -> Iterator[tuple[int, int, bytes | memoryview | None]]:
    """Cut the all-zero ``granularity`` pieces out of data blocks (pure).

    Given ``(offset, length, data or None)`` blocks, yield the same bytes as ``(offset, length,
    data or None)`` pieces where every aligned all-zero piece of a data block is None: a block
    the guest wrote 64 KiB of is sent as 64 KiB of data and zero requests, not as a whole block.
    """
    zero_piece = _ZERO_PIECE if granularity == ZERO_GRANULARITY else bytes(granularity)
    for offset, length, data in blocks:
        if data is None:
            yield offset, length, data
            continue
        view = memoryview(data)
        # Only a piece whose first and last bytes are zero can be all zero: the full comparison
        # runs for those alone (a search for a zero piece in every block cost the restore a
        # fifth of its busiest thread).
        zeros = {position for position in range(0, length, granularity)
                 if not view[position] and not view[min(position + granularity, length) - 1]
                 and view[position:position + granularity] == zero_piece[:min(granularity, length - position)]}
        if not zeros:
            yield offset, length, data
            continue
        start, zero = 0, None  # the piece being gathered and whether it is zero
        for position in range(0, length, granularity):
            is_zero = position in zeros
            if zero is not None and is_zero != zero:
                yield offset + start, position - start, None if zero else view[start:position]
                start = position
            zero = is_zero
        yield offset + start, length - start, None if zero else view[start:length]


PUT_SIZE = 4 << 20  # data joined into one upload request, at most


def _runs(blocks: Iterable[tuple[int, int, bytes | memoryview | None]],
          put_size: int = PUT_SIZE) -> Iterator[tuple[int, int, bytes | memoryview | tuple | None]]:
    """Merge consecutive holes into one zero run and consecutive data into requests of up to
    ``put_size`` bytes (fewer, larger requests cost the imageio server less per byte).

    A request's data is one piece, or a tuple of the pieces, sent one after the other
    (``ImageioClient.write_ranges``): never joined into a copy.
    """
    start = size = 0
    kind = None  # "hole" or "data": what is being gathered
    pieces: list = []
    for offset, length, data in blocks:
        this = "hole" if data is None else "data"
        joinable = kind == this and start + size == offset and (this == "hole" or size + length <= put_size)
        if not joinable:
            if kind is not None:
                yield start, size, None if kind == "hole" else _body(pieces)
            start, size, kind, pieces = offset, 0, this, []
        size += length
        if data is not None:
            pieces.append(data)
    if kind is not None:
        yield start, size, None if kind == "hole" else _body(pieces)


def _body(pieces: list) -> bytes | memoryview | tuple:
    """The data of one upload request: its piece, or its pieces as a tuple (never joined)."""
    return pieces[0] if len(pieces) == 1 else tuple(pieces)


# -- to oVirt ------------------------------------------------------------------------------------


def initial_size(domain: StorageDomainInfo, provisioned_size: int,
                 data_extents: Iterable[tuple[int, int]]) -> int | None:
    """Return the ``initial_size`` to create a restored disk with on ``domain`` (pure).

    Given the disk's virtual size and the ``(offset, length)`` of the image's data blocks. On a
    block domain a thin qcow2 disk is an LV that vdsm sizes from the initial size (or makes one
    chunk, 2560 MiB on current hosts) and does not extend during an upload, so the image must
    fit from the start: ``qemu-img measure``'s ``required`` for the image with its data blocks
    allocated whole (the upload sends zero pieces as zero requests, so it never needs more).
    None on a file domain: the engine ignores it there and the file grows as written.
    """
    if not domain.is_block:
        return None
    return qcow2.required_size(provisioned_size, data_extents)


def upload_disk(engine: Engine, repo: archive.Repo, archive_name: str, record: sc.DiskRecord,
                domain: StorageDomainInfo, settings: TransferSettings, name: str | None = None, *,
                inactivity_timeout: int) -> RestoredDisk:
    """Create a new disk on the storage domain ``domain`` and upload the image into it.

    The disk is a thin qcow2 with incremental backup, which the engine takes on file and block
    domains alike (ImagesHandler.checkImageConfiguration refuses a thin raw disk on block
    domains); on a block domain it is created with room for the whole image (``initial_size``).
    On failure the transfer is cancelled (the engine removes the new disk) and the disk is
    removed if it is still there; the error is raised.
    """
    t0 = time.monotonic()
    result = RestoredDisk(record.id, record.alias)
    room = initial_size(domain, record.provisioned_size,
                        archive.image_data_extents(repo, archive_name, record.image))
    if room is not None:
        log.info("disk %s goes to block storage domain %s: created with an initial size of %d bytes",
                 record.alias, domain.name, room)
    new_id = engine.create_disk(name or record.alias, record.provisioned_size, domain.name, initial_size=room)
    result.new_id = new_id
    try:
        with engine.transfer(new_id, direction="upload", inactivity_timeout=inactivity_timeout) as transfer, \
                ImageioClient(transfer.transfer_url, transfer.proxy_url, settings) as client:
            progress = Progress(f"restore {record.alias}", record.provisioned_size)

            def items() -> Iterator[tuple[int, int, bytes | None]]:
                for offset, length, data in _runs(split_zeros(archive.read_image(repo, archive_name,
                                                                                 record.image))):
                    if data is None:
                        result.holes += 1
                    progress.update(length, 0 if data is None else length)
                    yield offset, length, data

            client.write_ranges(items())
            progress.finish()
            result.bytes_sent = client.bytes_written
        engine.wait_disk_ok(new_id)
    except BaseException:
        engine.remove_disk(new_id)
        raise
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def restore_vm(engine: Engine, repo: archive.Repo, archive_name: str, prefix: str, *, vm_name: str,
               cluster: str, storage_domain: str, settings: TransferSettings, inactivity_timeout: int,
               disk_ids: list[str] | None = None, start: bool = False) -> RestoreResult:
    """Recreate the VM of an archive under ``vm_name`` with new ids and its disks uploaded.

    The storage domain, the cluster and the free name are checked before the first upload. On
    failure, every disk created so far and a half-created VM are removed.
    """
    sidecar = load_archive_sidecar(repo, archive_name, prefix)
    records = _pick_disks(sidecar, disk_ids)
    domain = _storage_domain(engine, storage_domain)
    if cluster not in engine.cluster_names():
        raise NotFound(f"cluster {cluster!r} does not exist on the engine (--cluster)")
    if any(vm.name == vm_name for vm in engine.list_vms(search=f"name={vm_name}")):
        raise ConfigError(f"a VM named {vm_name!r} already exists on the engine; choose another --vm-name")
    ovf = archive.read_file(repo, archive_name, f"{_vm_dir(archive_name, prefix)}/vm.ovf").decode()
    result = RestoreResult(archive_name, vm_name)
    done: list[RestoredDisk] = []
    vm_id = None
    try:
        for record in records:
            done.append(upload_disk(engine, repo, archive_name, record, domain, settings,
                                    name=f"{vm_name}_{record.alias}", inactivity_timeout=inactivity_timeout))
        vm_id = engine.create_vm_from_ovf(ovf, vm_name, cluster)
        for record, disk in zip(records, done):
            engine.attach_disk(vm_id, DiskInfo(id=record.id, alias=record.alias, format="cow",
                                               provisioned_size=record.provisioned_size, backup="incremental",
                                               interface=record.interface, bootable=record.bootable), disk.new_id)
        if start:
            engine.start_vm(vm_id)
    except BaseException:
        log.error("restore of %s failed; removing what was created", archive_name)
        if vm_id:
            engine.remove_vm(vm_id)
        for disk in done:
            engine.remove_disk(disk.new_id)
        raise
    result.vm_id = vm_id
    result.disks = done
    return result


def restore_disk(engine: Engine, repo: archive.Repo, archive_name: str, prefix: str, disk_id: str,
                 storage_domain: str, settings: TransferSettings, *, inactivity_timeout: int) -> RestoreResult:
    """Upload one disk of an archive into a new disk on ``storage_domain``, attached to no VM."""
    sidecar = load_archive_sidecar(repo, archive_name, prefix)
    [record] = _pick_disks(sidecar, [disk_id])
    domain = _storage_domain(engine, storage_domain)
    result = RestoreResult(archive_name, sidecar.vm_name)
    result.disks.append(upload_disk(engine, repo, archive_name, record, domain, settings,
                                    inactivity_timeout=inactivity_timeout))
    return result


def _storage_domain(engine: Engine, name: str) -> StorageDomainInfo:
    """The engine's storage domain ``name``; raises NotFound when there is none."""
    for domain in engine.storage_domains():
        if domain.name == name:
            return domain
    raise NotFound(f"storage domain {name!r} does not exist on the engine")


# -- to local files ------------------------------------------------------------------------------


def restore_to_dir(repo: archive.Repo, archive_name: str, prefix: str, directory: Path, *,
                   fmt: str = "raw", disk_ids: list[str] | None = None) -> RestoreResult:
    """Write each disk as a local sparse file (holes preserved); no engine needed.

    ``fmt`` is ``raw`` or ``qcow2`` (converted with qemu-img from a sparse raw temporary).
    """
    if fmt not in ("raw", "qcow2"):
        raise ConfigError(f"--format must be raw or qcow2, not {fmt!r}")
    if fmt == "qcow2" and shutil.which("qemu-img") is None:
        raise ConfigError("--format qcow2 converts with qemu-img, which is not installed (qemu-utils)")
    sidecar = load_archive_sidecar(repo, archive_name, prefix)
    directory.mkdir(parents=True, exist_ok=True)
    result = RestoreResult(archive_name, sidecar.vm_name)
    for record in _pick_disks(sidecar, disk_ids):
        t0 = time.monotonic()
        raw = directory / f"{record.alias}-{record.id}.raw"
        target = raw if fmt == "raw" else directory / f"{record.alias}-{record.id}.qcow2"
        disk = RestoredDisk(record.id, record.alias, path=str(target))
        tmp = raw.with_name("." + raw.name + ".part")
        converted = target.with_name("." + target.name + ".part")
        try:
            disk.bytes_sent, disk.holes = _write_sparse(repo, archive_name, record, tmp)
            if fmt == "qcow2":
                _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(tmp), str(converted)])
                os.replace(converted, target)
                tmp.unlink()
            else:
                os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            converted.unlink(missing_ok=True)
            raise
        disk.seconds = round(time.monotonic() - t0, 3)
        result.disks.append(disk)
    return result


def _write_sparse(repo: archive.Repo, archive_name: str, record: sc.DiskRecord, path: Path) -> tuple[int, int]:
    written = holes = 0
    progress = Progress(f"restore {record.alias}", record.provisioned_size)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    behind = pagecache.WriteBehind()  # the pieces come in order: a file growing at its end
    try:
        os.ftruncate(fd, record.provisioned_size)
        for offset, length, data in archive.read_image(repo, archive_name, record.image):
            if data is None:
                holes += 1
            else:
                # Zero pieces of data blocks stay holes in the file too.
                for piece_offset, _, piece in split_zeros([(offset, length, data)]):
                    if piece is not None:
                        os.pwrite(fd, piece, piece_offset)
                        behind.wrote(fd, fd, piece_offset + len(piece), _nothing_buffered)
                written += length
            progress.update(length, 0 if data is None else length)
        os.fsync(fd)
    finally:
        os.close(fd)
        progress.finish()
    return written, holes


def _nothing_buffered() -> None:
    """The flush of a file written with os.pwrite: nothing is buffered."""


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise OvirtBorgError(f"{cmd[0]} failed: {proc.stderr.strip()}")


# -- verify --------------------------------------------------------------------------------------


@dataclass
class VerifiedDisk:
    alias: str
    id: str
    ok: bool
    blocks: int
    bad_blocks: list[int] = field(default_factory=list)
    message: str = ""


def _digest(digests: bytes, index: int) -> bytes:
    return digests[index * sc.DIGEST_SIZE:(index + 1) * sc.DIGEST_SIZE]


def verify_archive(repo: archive.Repo, archive_name: str, prefix: str) -> list[VerifiedDisk]:
    """Re-read every image of an archive and compare with the digests recorded at backup time.

    Every data chunk is read back (Borg checks its MAC and, for its id, its content). Chunk ids
    recorded at backup time (``borg-id``) are compared with the image's chunk list; sha256
    digests (archives of the 'cli' writer) with the sha256 of each block read. Returns one
    VerifiedDisk per disk; raises VerifyMismatch if any differs.
    """
    sidecar = load_archive_sidecar(repo, archive_name, prefix)
    results = []
    for record in sidecar.disks:
        digests = archive.read_file(repo, archive_name, record.blocks_file)
        check = VerifiedDisk(record.alias, record.id, True, len(digests) // sc.DIGEST_SIZE)
        if sc.digests_sha256(digests) != record.blocks_sha256:
            check.ok, check.message = False, "the block digests file does not match the sidecar"
            results.append(check)
            continue
        if record.blocks_kind == sc.BLOCKS_BORG_ID:
            # The image's chunk list against the ids recorded, while every chunk is read back.
            blocks = 0
            for index, (_, _, _, chunk_id) in enumerate(archive.read_image_with_ids(repo, archive_name,
                                                                                     record.image)):
                if index < check.blocks and chunk_id != _digest(digests, index):
                    check.bad_blocks.append(index)
                blocks = index + 1
        else:
            blocks = 0
            for index, (offset, length, data) in enumerate(archive.read_image(repo, archive_name, record.image)):
                actual = sc.zero_digest(length) if data is None else hashlib.sha256(data).digest()
                if actual != _digest(digests, index):
                    check.bad_blocks.append(index)
                blocks = index + 1
        if blocks != check.blocks:
            check.ok, check.message = False, f"the image has {blocks} blocks, the digests {check.blocks}"
        if check.bad_blocks:
            check.ok = False
            check.message = f"{len(check.bad_blocks)} blocks differ (first: block {check.bad_blocks[0]})"
        results.append(check)
    bad = [r for r in results if not r.ok]
    if bad:
        raise VerifyMismatch(f"archive {archive_name}: " + "; ".join(f"disk {r.alias}: {r.message}" for r in bad))
    return results
