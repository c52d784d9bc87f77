"""Restore: a whole VM or one disk into oVirt, disks to local files, and verify.

Images are read block by block from the archive (``archive.read_image``): a block stored as
Borg's all-zero chunk is a hole and is never read from the repository, never sent (an imageio
``zero`` request in oVirt, a skipped range in a local sparse file).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ovirt_borg import archive, naming, pagecache, qcow2, sidecar as sc
from ovirt_borg.engine import DiskInfo, Engine, StorageDomainInfo
from ovirt_borg.errors import ConfigError, NotFound, OvirtBorgError, VerifyMismatch, nearest_hint
from ovirt_borg.imageio import ImageioClient, TransferSettings
from ovirt_borg.progress import Progress, human_size

log = logging.getLogger(__name__)

@dataclass
class RestoredDisk:
    id: str
    alias: str
    size: int = 0  # the disk's virtual size
    new_id: str = ""
    path: str = ""
    initial_size: int | None = None  # asked for on a block storage domain
    bytes_sent: int = 0
    holes: int = 0
    seconds: float = 0.0
    sha256: str | None = None  # of the whole image, when asked for


@dataclass
class RestoreResult:
    archive: str
    vm_name: str = ""
    vm_id: str = ""
    storage_domain: str = ""
    directory: str = ""
    ovf: str = ""  # where vm.ovf was written (restores to a directory)
    seconds: float = 0.0
    disks: list[RestoredDisk] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["disks"] = [dict(x.__dict__) for x in self.disks]
        return d


@dataclass(frozen=True)
class ArchivedVm:
    """An archive's sidecar and the directory of the VM's files in it."""

    directory: str  # holds vm.ovf, disks/ and the sidecar
    sidecar: sc.Sidecar


def load_archive_sidecar(repo: archive.Repo, archive_name: str, prefix: str) -> ArchivedVm:
    """Find the VM's directory in an archive by its content and read the sidecar there.

    The directory is the one holding ``ovirt-borg.json``, whatever the archive is called (renamed
    with ``borg rename``, written under another prefix); in the unlikely case of several, the
    one the archive's name says. Raises NotFound (naming the nearest archives) or
    OvirtBorgError for an archive without a sidecar or with a damaged one.
    """
    try:
        found = archive.read_top_files(repo, archive_name, sc.SIDECAR_NAME)
    except NotFound:
        names = archive.repository_view(repo).archives
        raise NotFound(f"no archive named {archive_name!r} in the repository{nearest_hint(archive_name, names)} "
                       "(see 'ovirt-borg list' for the archive names)") from None
    if not found:
        raise OvirtBorgError(f"archive {archive_name} has no ovirt-borg sidecar (<vm>/{sc.SIDECAR_NAME}); "
                             "is it an ovirt-borg archive?")
    path = next(iter(found))
    if len(found) > 1:
        path = f"{naming.vm_directory(archive_name, prefix)}/{sc.SIDECAR_NAME}"
        if path not in found:
            raise OvirtBorgError(f"archive {archive_name} holds several sidecars ({', '.join(sorted(found))}) "
                                 "and its name points at none of them")
    try:
        return ArchivedVm(path.rpartition("/")[0], sc.parse(found[path]))
    except sc.SidecarInvalid as e:
        raise OvirtBorgError(f"the sidecar in archive {archive_name} is damaged: {e}") from None


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


class _ImageDigest:
    """The sha256 of an image given block by block in order, a hole counted as its zeros."""

    _ZEROS = bytes(1 << 20)

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, length: int, data: bytes | None) -> None:
        if data is not None:
            self._hash.update(data)
            return
        zeros = memoryview(self._ZEROS)
        while length:
            piece = min(length, len(zeros))
            self._hash.update(zeros[:piece])
            length -= piece

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _blocks(repo: archive.Repo, archive_name: str, record: sc.DiskRecord,
            digest: _ImageDigest | None) -> Iterator[tuple[int, int, bytes | None]]:
    """``archive.read_image`` of the disk's image, each block added to ``digest`` if given."""
    for offset, length, data in archive.read_image(repo, archive_name, record.image):
        if digest is not None:
            digest.add(length, data)
        yield offset, length, data


def _rate(size: int, seconds: float) -> str:
    return f"{human_size(size / seconds)}/s" if seconds > 0 else "-"


def upload_disk(engine: Engine, repo: archive.Repo, archive_name: str, record: sc.DiskRecord,
                domain: StorageDomainInfo, settings: TransferSettings, name: str | None = None, *,
                inactivity_timeout: int, sha256: bool = False) -> RestoredDisk:
    """Create a new disk on the storage domain ``domain`` and upload the image into it.

    The disk is a thin qcow2 with incremental backup, which the engine takes on file and block
    domains alike (ImagesHandler.checkImageConfiguration refuses a thin raw disk on block
    domains); on a block domain it is created with room for the whole image (``initial_size``).
    Progress: a line on a terminal, a log line every 30 s otherwise. With ``sha256`` the image's
    sha256 is computed on the way (holes hashed as zeros: slow for a large sparse disk).
    On failure the transfer is cancelled (the engine removes the new disk) and the disk is
    removed if it is still there; the error is raised.
    """
    t0 = time.monotonic()
    result = RestoredDisk(record.id, record.alias, size=record.provisioned_size)
    extents = archive.image_data_extents(repo, archive_name, record.image)
    result.initial_size = initial_size(domain, record.provisioned_size, extents)
    log.info("disk %s: %s of data in %s, to a new disk on storage domain %s (%s)%s", record.alias,
             human_size(sum(length for _, length in extents)), human_size(record.provisioned_size),
             domain.name, domain.type or "?",
             f", initial size {human_size(result.initial_size)}" if result.initial_size else "")
    new_id = engine.create_disk(name or record.alias, record.provisioned_size, domain.name,
                                initial_size=result.initial_size)
    result.new_id = new_id
    digest = _ImageDigest() if sha256 else None
    try:
        with engine.transfer(new_id, direction="upload", inactivity_timeout=inactivity_timeout) as transfer, \
                ImageioClient(transfer.transfer_url, transfer.proxy_url, settings) as client:
            progress = Progress(f"restore {record.alias}", record.provisioned_size, moved_as="sent")

            def items() -> Iterator[tuple[int, int, bytes | None]]:
                for offset, length, data in _runs(split_zeros(_blocks(repo, archive_name, record, digest))):
                    if data is None:
                        result.holes += 1
                    progress.update(length, 0 if data is None else length)
                    yield offset, length, data

            try:
                client.write_ranges(items())
            finally:
                progress.finish()
            result.bytes_sent = client.bytes_written
        engine.wait_disk_ok(new_id)
    except BaseException:
        engine.remove_disk(new_id)
        raise
    result.seconds = round(time.monotonic() - t0, 3)
    result.sha256 = digest.hexdigest() if digest else None
    log.info("disk %s: restored into disk %s, %s sent in %.1f s (%s)", record.alias, new_id,
             human_size(result.bytes_sent), result.seconds, _rate(result.bytes_sent, result.seconds))
    return result


_OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1/"
_RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_DISK_RESOURCE_TYPE = "17"  # rasd:ResourceType of a disk image in the engine's OVF


def ovf_without_disks(ovf: str) -> str:
    """Return the OVF with its disks taken out (pure): the References' File elements, the
    DiskSection's Disk elements and the hardware section's disk Items.

    The engine imports a VM from an OVF (ImportVmFromConfigurationCommand) by taking the OVF's
    disks off the new VM and, once it exists, attaching each of them to the VM its
    DiskVmElement names, which is the OVF's own VM (OvfReader.fixDiskVmElements), regenerated
    ids or not: to the source VM. That fails for the disks the source VM still has (an event
    "failed to attach" in the engine's log) and attaches a disk detached from it since back to
    it. Restore attaches the new disks itself. Raises OvirtBorgError when the OVF is not XML.
    """
    try:
        for _, (prefix, uri) in ET.iterparse(io.StringIO(ovf), events=("start-ns",)):
            if prefix:
                ET.register_namespace(prefix, uri)  # keep the prefixes: xsi:type values name them
        root = ET.fromstring(ovf)
    except ET.ParseError as e:
        raise OvirtBorgError(f"the VM's saved configuration (vm.ovf) is not valid XML: {e}") from None
    for references in root.iter("References"):
        for element in references.findall("File"):
            references.remove(element)
    for section in root.iter("Section"):
        kind = section.get(_XSI_TYPE, "")
        if kind.endswith("DiskSection_Type"):
            for element in section.findall("Disk"):
                section.remove(element)
        elif kind.endswith("VirtualHardwareSection_Type"):
            for element in section.findall("Item"):
                if element.findtext(f"{{{_RASD_NS}}}ResourceType") == _DISK_RESOURCE_TYPE:
                    section.remove(element)
    return ET.tostring(root, encoding="unicode")


def restore_vm(engine: Engine, repo: archive.Repo, archive_name: str, prefix: str, *, vm_name: str,
               cluster: str, storage_domain: str, settings: TransferSettings, inactivity_timeout: int,
               disk_ids: list[str] | None = None, start: bool = False, sha256: bool = False) -> RestoreResult:
    """Recreate the VM of an archive under ``vm_name`` with new ids and its disks uploaded.

    The storage domain, the cluster and the free name are checked before the first upload. The
    VM is made from its saved OVF without the OVF's disks (``ovf_without_disks``), then the new
    disks are attached. On failure, every disk created so far and a half-created VM are removed.
    """
    t0 = time.monotonic()
    archived = load_archive_sidecar(repo, archive_name, prefix)
    records = _pick_disks(archived.sidecar, disk_ids)
    domain = _storage_domain(engine, storage_domain)
    clusters = engine.cluster_names()
    if cluster not in clusters:
        raise NotFound(f"cluster {cluster!r} does not exist on the engine (--cluster); it has: "
                       f"{', '.join(clusters) or 'none'}{nearest_hint(cluster, clusters)}")
    if any(vm.name == vm_name for vm in engine.list_vms(search=f"name={vm_name}")):
        raise ConfigError(f"a VM named {vm_name!r} already exists on the engine; choose another --vm-name")
    ovf = ovf_without_disks(archive.read_file(repo, archive_name, f"{archived.directory}/vm.ovf").decode())
    result = RestoreResult(archive_name, vm_name, storage_domain=domain.name)
    done: list[RestoredDisk] = []
    vm_id = None
    try:
        for record in records:
            done.append(upload_disk(engine, repo, archive_name, record, domain, settings,
                                    name=f"{vm_name}_{record.alias}", inactivity_timeout=inactivity_timeout,
                                    sha256=sha256))
        vm_id = engine.create_vm_from_ovf(ovf, vm_name, cluster)
        for record, disk in zip(records, done, strict=True):
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
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def restore_disk(engine: Engine, repo: archive.Repo, archive_name: str, prefix: str, disk_id: str,
                 storage_domain: str, settings: TransferSettings, *, inactivity_timeout: int,
                 sha256: bool = False) -> RestoreResult:
    """Upload one disk of an archive into a new disk on ``storage_domain``, attached to no VM."""
    t0 = time.monotonic()
    archived = load_archive_sidecar(repo, archive_name, prefix)
    [record] = _pick_disks(archived.sidecar, [disk_id])
    domain = _storage_domain(engine, storage_domain)
    result = RestoreResult(archive_name, archived.sidecar.vm_name, storage_domain=domain.name)
    result.disks.append(upload_disk(engine, repo, archive_name, record, domain, settings,
                                    inactivity_timeout=inactivity_timeout, sha256=sha256))
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def _storage_domain(engine: Engine, name: str) -> StorageDomainInfo:
    """The engine's storage domain ``name``; raises NotFound naming the ones there are."""
    domains = engine.storage_domains()
    for domain in domains:
        if domain.name == name:
            return domain
    raise NotFound(f"storage domain {name!r} does not exist on the engine; it has: "
                   + (", ".join(f"{d.name} ({d.type})" for d in domains) or "none")
                   + nearest_hint(name, [d.name for d in domains]))


# -- to local files ------------------------------------------------------------------------------


def restore_to_dir(repo: archive.Repo, archive_name: str, prefix: str, directory: Path, *,
                   fmt: str = "raw", disk_ids: list[str] | None = None, force: bool = False,
                   sha256: bool = False) -> RestoreResult:
    """Write each disk as a local sparse file (holes preserved) and the VM's ``vm.ovf`` beside
    them, all mode 0600; no engine needed.

    ``fmt`` is ``raw`` or ``qcow2`` (converted with qemu-img from a sparse raw temporary). Each
    file is first written as a hidden temporary and all are renamed into place once every one
    is complete, so a failure (a read-only directory, a full file system, a damaged chunk, a
    signal) leaves none of them. Raises ConfigError before anything is written when a file to
    write exists (``force`` replaces it), qemu-img is missing or the directory cannot be made;
    OvirtBorgError with one line when writing fails; the archive's typed errors.
    """
    t0 = time.monotonic()
    if fmt not in ("raw", "qcow2"):
        raise ConfigError(f"--format must be raw or qcow2, not {fmt!r}")
    if fmt == "qcow2" and shutil.which("qemu-img") is None:
        raise ConfigError("--format qcow2 converts with qemu-img, which is not installed (qemu-utils)")
    archived = load_archive_sidecar(repo, archive_name, prefix)
    records = _pick_disks(archived.sidecar, disk_ids)
    names = [f"{naming.safe_name(record.alias)}-{naming.safe_name(record.id)}" for record in records]
    targets = [directory / f"{name}.{fmt}" for name in names]
    ovf_target = directory / "vm.ovf"
    _refuse_existing([*targets, ovf_target], force)
    with _writing(directory):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    result = RestoreResult(archive_name, archived.sidecar.vm_name, directory=str(directory), ovf=str(ovf_target))
    parts: list[Path] = []  # temporaries written so far: removed on failure
    ready: list[tuple[Path, Path]] = []  # complete temporaries and their final names
    try:
        for record, name, target in zip(records, names, targets, strict=True):
            started = time.monotonic()
            disk = RestoredDisk(record.id, record.alias, size=record.provisioned_size, path=str(target))
            raw = _part(directory / f"{name}.raw")
            parts.append(raw)
            digest = _ImageDigest() if sha256 else None
            disk.bytes_sent, disk.holes = _write_sparse(repo, archive_name, record, raw, digest)
            if fmt == "qcow2":
                converted = _part(target)
                parts.append(converted)
                _convert(raw, converted)
                raw.unlink()
                ready.append((converted, target))
            else:
                ready.append((raw, target))
            disk.sha256 = digest.hexdigest() if digest else None
            disk.seconds = round(time.monotonic() - started, 3)
            log.info("disk %s: written to %s (%s of data) in %.1f s", record.alias, target,
                     human_size(disk.bytes_sent), disk.seconds)
            result.disks.append(disk)
        ovf = archive.read_file(repo, archive_name, f"{archived.directory}/vm.ovf")
        ovf_part = _part(ovf_target)
        parts.append(ovf_part)
        _write_private(ovf_part, ovf)
        ready.append((ovf_part, ovf_target))
        for part, target in ready:
            with _writing(target):
                os.replace(part, target)
    except BaseException:
        for part in parts:
            _remove_quietly(part)
        raise
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def _remove_quietly(path: Path) -> None:
    """Remove ``path`` if it is there; a failure is logged, never raised over the error that
    made the clean-up necessary (a read-only file system refuses even a missing file)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


def _part(target: Path) -> Path:
    """The hidden temporary a file is written as before it takes its name."""
    return target.with_name(f".{target.name}.part")


def _final(path: Path) -> Path:
    """The name the temporary ``path`` is written for (``path`` itself for another file)."""
    if path.name.startswith(".") and path.name.endswith(".part"):
        return path.with_name(path.name[1:-len(".part")])
    return path


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """Raise ConfigError naming the first of ``paths`` that exists (unless ``force`` and it is
    a file, which is then replaced)."""
    for path in paths:
        if path.is_symlink() or path.exists():
            if path.is_dir() and not path.is_symlink():
                raise ConfigError(f"{path} is a directory; restore --to-dir writes a file of that name")
            if not force:
                raise ConfigError(f"{path} exists; restore --to-dir does not overwrite files: "
                                  "remove it, choose another --to-dir, or give --force to replace it")
            log.warning("%s exists and is replaced (--force) once the restore is complete", path)


_WRITE_HINTS = {errno.ENOSPC: "; free space there or restore elsewhere",
                errno.EROFS: "; choose another --to-dir", errno.EACCES: "; choose another --to-dir",
                errno.EPERM: "; choose another --to-dir", errno.EDQUOT: "; free space there or restore elsewhere"}


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError of a local write to ``path`` into one line (exit 2)."""
    try:
        yield
    except OSError as e:
        raise OvirtBorgError(f"cannot write {_final(path)}: {e.strerror or e}{_WRITE_HINTS.get(e.errno, '')}") from None


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path``, mode 0600, and flush it to disk."""
    with _writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_sparse(repo: archive.Repo, archive_name: str, record: sc.DiskRecord, path: Path,
                  digest: _ImageDigest | None = None) -> tuple[int, int]:
    """Write the disk's image to the new file ``path`` (mode 0600), holes and all-zero
    64 KiB pieces left as holes; return (bytes of data blocks, holes)."""
    written = holes = 0
    progress = Progress(f"restore {record.alias}", record.provisioned_size, moved_as="written")
    with _writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    behind = pagecache.WriteBehind()  # the pieces come in order: a file growing at its end
    try:
        with _writing(path):
            os.ftruncate(fd, record.provisioned_size)
        for offset, length, data in _blocks(repo, archive_name, record, digest):
            if data is None:
                holes += 1
            else:
                # Zero pieces of data blocks stay holes in the file too.
                with _writing(path):
                    for piece_offset, _, piece in split_zeros([(offset, length, data)]):
                        if piece is not None:
                            os.pwrite(fd, piece, piece_offset)
                            behind.wrote(fd, fd, piece_offset + len(piece), _nothing_buffered)
                written += length
            progress.update(length, 0 if data is None else length)
        with _writing(path):
            os.fsync(fd)
    finally:
        os.close(fd)
        progress.finish()
    return written, holes


def _nothing_buffered() -> None:
    """The flush of a file written with os.pwrite: nothing is buffered."""


def _convert(raw: Path, out: Path) -> None:
    """Convert the sparse raw ``raw`` into the new qcow2 ``out`` (mode 0600) with qemu-img.

    Raises ConfigError when qemu-img is missing, OvirtBorgError with its message when it fails.
    """
    try:
        # umask: qemu-img creates the file with the usual 0644 otherwise.
        proc = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)],
                              capture_output=True, text=True, umask=0o077)
    except FileNotFoundError:
        raise ConfigError("--format qcow2 converts with qemu-img, which is not installed (qemu-utils)") from None
    if proc.returncode:
        detail = "; ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        raise OvirtBorgError(f"qemu-img could not write {_final(out)}: {detail}")
    with _writing(out):
        os.chmod(out, 0o600)


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
    sidecar = load_archive_sidecar(repo, archive_name, prefix).sidecar
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
            for index, (_offset, length, data) in enumerate(archive.read_image(repo, archive_name, record.image)):
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
