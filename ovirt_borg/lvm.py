"""LVM2 physical volumes and volume group metadata, read in user space (no device-mapper).

Pure functions: ``read_physical_volume`` reads a PV's label and its current metadata text
through a ``read(offset, size) -> bytes`` callable; ``parse_metadata`` parses that text and
``volume_group`` turns it into the VG's PVs and LVs with their segments, so that each linear LV
can be read as the list of extents it is made of.

The format, as lvm2 defines it (lvmteam/lvm2, the files named):

- ``lib/label/label.h``: a 32-byte ``label_header`` in one of the first 4 sectors (512
  bytes): ``"LABELONE"``, ``sector_xl`` (u64, that sector's number), ``crc_xl`` (u32, of the
  rest of the sector from ``offset_xl`` on), ``offset_xl`` (u32, where the PV header starts
  in the sector), type ``"LVM2 001"``. All integers little-endian.
- ``lib/format_text/layout.h``: the ``pv_header`` follows: ``pv_uuid`` (32 characters),
  ``device_size_xl`` (u64), then two lists of ``disk_locn`` (offset u64, size u64, in bytes),
  each ended by an all-zero entry: the data areas, then the metadata areas. Each metadata
  area starts with an ``mda_header`` (512 bytes): ``checksum_xl`` (of the 508 bytes after it),
  magic ``" LVM2 x[5A%r0N*>"``, version 1, ``start`` (the area's absolute offset), ``size``,
  then ``raw_locn`` entries (offset relative to the area, size, checksum of the text, flags;
  flag 1 = ignored); the first is the committed metadata.
- ``lib/format_text/format-text.c`` (``_vg_read_raw_area``): the text is a circular buffer
  after the 512-byte header: when ``offset + size`` passes the area's end, the rest ("wrap")
  continues at ``area start + 512``; its checksum is taken over both parts in order
  (``lib/config/config.c``).
- ``lib/misc/crc.c``: ``calc_crc`` is CRC-32 (polynomial 0xEDB88320, reflected) started at
  ``INITIAL_CRC`` 0xf597a6cf with no final inversion.
- ``lib/format_text/import_vsn1.c``, ``lib/striped/striped.c``: the VG section holds
  ``id``, ``seqno``, ``extent_size`` (sectors), ``physical_volumes`` (``pvN { id, pe_start
  (sectors), pe_count }``) and ``logical_volumes`` (``name { id, status, segment_count,
  segmentN { start_extent, extent_count, type, ... } }``); a ``"striped"`` segment has
  ``stripe_count`` and ``stripes = ["pvN", first extent, ...]`` (a linear LV is striped with
  one stripe), other types (thin, raid, mirror, snapshot, cache, vdo...) refer to hidden LVs.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

Reader = Callable[[int, int], bytes]

SECTOR = 512
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SCAN_SECTORS = 4
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_HEADER_SIZE = 512
INITIAL_CRC = 0xF597A6CF
RAW_LOCN_IGNORED = 0x1
_MAX_METADATA = 64 << 20  # metadata larger than this is taken for damage
_MAX_DEPTH = 32


class LvmError(ValueError):
    """LVM metadata that cannot be used (damaged, or of a kind not understood)."""


def lvm_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """lvm2's ``calc_crc``: CRC-32 from ``initial`` without the final inversion."""
    # zlib.crc32 inverts before and after; undo both to continue lvm2's running value.
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


@dataclass(frozen=True)
class PhysicalVolume:
    """A PV found on a disk: its UUID (32 characters, no dashes), size and metadata text."""

    uuid: str
    device_size: int
    metadata: str | None  # None when the PV carries no metadata area (pvcreate --metadatacopies 0)


def read_physical_volume(read: Reader) -> PhysicalVolume | None:
    """Read the LVM2 label at the start of a volume; return the PV, or None when there is none.

    Raises ``LvmError`` when a label is there but its checksum, its metadata area header or
    its metadata text is damaged.
    """
    head = read(0, LABEL_SCAN_SECTORS * SECTOR)
    for sector in range(LABEL_SCAN_SECTORS):
        label = head[sector * SECTOR:(sector + 1) * SECTOR]
        if len(label) == SECTOR and label[:8] == LABEL_ID:
            break
    else:
        return None
    sector_xl, crc_xl, offset_xl = struct.unpack_from("<QII", label, 8)
    if sector_xl != sector or label[24:32] != LABEL_TYPE:
        return None
    if lvm_crc(label[20:]) != crc_xl:
        raise LvmError(f"the LVM label in sector {sector} has a wrong checksum")
    if not 32 <= offset_xl <= SECTOR - 40 - 16:
        raise LvmError(f"the LVM label in sector {sector} points outside itself")
    uuid = label[offset_xl:offset_xl + 32].decode("ascii", "replace")
    (device_size,) = struct.unpack_from("<Q", label, offset_xl + 32)
    position = offset_xl + 40
    lists: list[list[tuple[int, int]]] = [[], []]
    for areas in lists:  # data areas, then metadata areas
        while True:
            if position + 16 > SECTOR:
                raise LvmError("the LVM PV header's area lists run past its sector")
            offset, size = struct.unpack_from("<QQ", label, position)
            position += 16
            if not offset and not size:
                break
            areas.append((offset, size))
    metadata = None
    problems = []
    for offset, size in lists[1]:
        try:
            metadata = _read_metadata_area(read, offset, size)
        except LvmError as e:
            problems.append(str(e))
            continue
        if metadata is not None:
            break
    if metadata is None and problems:
        raise LvmError("; ".join(problems))
    return PhysicalVolume(uuid, device_size, metadata)


def _read_metadata_area(read: Reader, start: int, size: int) -> str | None:
    """The committed metadata text of the area at ``start`` (None when it is ignored or empty)."""
    header = read(start, MDA_HEADER_SIZE)
    if len(header) < MDA_HEADER_SIZE or header[4:20] != MDA_MAGIC:
        raise LvmError(f"the LVM metadata area at byte {start} has no valid header")
    (checksum,) = struct.unpack_from("<I", header, 0)
    if lvm_crc(header[4:]) != checksum:
        raise LvmError(f"the LVM metadata area header at byte {start} has a wrong checksum")
    _version, area_start, area_size = struct.unpack_from("<IQQ", header, 20)
    if area_start != start or area_size < MDA_HEADER_SIZE:
        raise LvmError(f"the LVM metadata area header at byte {start} describes another area")
    offset, length, text_crc, flags = struct.unpack_from("<QQII", header, 40)
    if flags & RAW_LOCN_IGNORED or (not offset and not length):
        return None
    if offset >= area_size or length > area_size - MDA_HEADER_SIZE or length > _MAX_METADATA:
        raise LvmError(f"the LVM metadata at byte {start} lies outside its area")
    wrap = max(0, offset + length - area_size)
    text = read(start + offset, length - wrap)
    if wrap:
        text += read(start + MDA_HEADER_SIZE, wrap)
    if len(text) != length:
        raise LvmError(f"the LVM metadata at byte {start} runs past the end of the disk")
    if lvm_crc(text) != text_crc:
        raise LvmError(f"the LVM metadata text at byte {start} has a wrong checksum")
    return text.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# -- the metadata text ---------------------------------------------------------------------------

_TOKEN = re.compile(r"""
    \s+ | \#[^\n]* |
    (?P<string>"(?:[^"\\]|\\.)*") |
    (?P<number>[-+]?\d+(?:\.\d+)?) |
    (?P<name>[^\s=\[\]{},"\#]+) |
    (?P<punct>[=\[\]{},])
""", re.VERBOSE | re.DOTALL)


def _tokens(text: str) -> list[tuple[str, Any]]:
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise LvmError(f"unreadable LVM metadata near {text[position:position + 20]!r}")
        position = match.end()
        kind = match.lastgroup
        if kind == "string":
            tokens.append(("value", re.sub(r"\\(.)", r"\1", match.group(kind)[1:-1], flags=re.DOTALL)))
        elif kind == "number":
            number = match.group(kind)
            tokens.append(("value", float(number) if "." in number else int(number)))
        elif kind == "name":
            tokens.append(("name", match.group(kind)))
        elif kind == "punct":
            tokens.append((match.group(kind), None))
    return tokens


def parse_metadata(text: str) -> dict[str, Any]:
    """Parse LVM2 metadata text (lvm2's config format) into nested dicts.

    A section ``name { ... }`` becomes a dict, ``key = value`` an entry whose value is a
    string, an int, a float or a list of those. Raises ``LvmError`` for text that does not
    follow the format.
    """
    tokens = _tokens(text)
    position = 0

    def section(depth: int, closing: str | None) -> dict[str, Any]:
        nonlocal position
        if depth > _MAX_DEPTH:
            raise LvmError("LVM metadata nested too deep")
        out: dict[str, Any] = {}
        while position < len(tokens):
            kind, value = tokens[position]
            if kind == closing:
                position += 1
                return out
            if kind != "name" or position + 1 >= len(tokens):
                raise LvmError(f"unexpected {value if value is not None else kind!r} in LVM metadata")
            key = value
            following = tokens[position + 1][0]
            position += 2
            if following == "{":
                out[key] = section(depth + 1, "}")
            elif following == "=":
                out[key] = item()
            else:
                raise LvmError(f"expected '=' or '{{' after {key!r} in LVM metadata")
        if closing is not None:
            raise LvmError("LVM metadata ends inside a section")
        return out

    def item() -> Any:
        nonlocal position
        if position >= len(tokens):
            raise LvmError("LVM metadata ends after '='")
        kind, value = tokens[position]
        position += 1
        if kind == "value":
            return value
        if kind != "[":
            raise LvmError("expected a value in LVM metadata")
        values: list[Any] = []
        while position < len(tokens):
            kind, value = tokens[position]
            position += 1
            if kind == "]":
                return values
            if kind == ",":
                continue
            if kind != "value":
                raise LvmError("expected a value in a list of LVM metadata")
            values.append(value)
        raise LvmError("LVM metadata ends inside a list")

    return section(0, None)


# -- the volume group ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PvRef:
    """A PV as the VG metadata names it: its key (``pv0``), UUID (no dashes) and data start."""

    key: str
    uuid: str
    pe_start: int  # bytes from the start of the PV
    pe_count: int


@dataclass(frozen=True)
class Segment:
    start_extent: int
    extent_count: int
    type: str
    stripes: tuple[tuple[str, int], ...] = ()  # (PV key, first extent on it)


@dataclass
class LogicalVolume:
    name: str
    visible: bool
    segments: list[Segment] = field(default_factory=list)
    #: Why its data cannot be read as a plain extent map, when it cannot.
    reason: str | None = None


@dataclass
class VolumeGroup:
    name: str
    uuid: str
    seqno: int
    extent_size: int  # bytes
    pvs: dict[str, PvRef]
    lvs: list[LogicalVolume]


def _uuid(text: Any) -> str:
    return str(text).replace("-", "")


def volume_group(metadata: dict[str, Any]) -> VolumeGroup:
    """The VG described by parsed metadata (``parse_metadata``); raises ``LvmError``.

    Every LV is returned; ``reason`` says why one cannot be read as a linear extent map (its
    type, or the LV it stores data for).
    """
    groups = [(name, body) for name, body in metadata.items()
              if isinstance(body, dict) and "physical_volumes" in body]
    if len(groups) != 1:
        raise LvmError("the LVM metadata does not describe exactly one volume group")
    name, body = groups[0]
    logical = body.get("logical_volumes", {})
    if not isinstance(body["physical_volumes"], dict) or not isinstance(logical, dict):
        raise LvmError(f"the LVM metadata of VG {name!r} has no sections of PVs and LVs")
    try:
        extent_size = int(body["extent_size"]) * SECTOR
        seqno = int(body.get("seqno", 0))
        pvs = {key: PvRef(key, _uuid(pv["id"]), int(pv["pe_start"]) * SECTOR, int(pv.get("pe_count", 0)))
               for key, pv in body["physical_volumes"].items() if isinstance(pv, dict)}
    except (KeyError, TypeError, ValueError) as e:
        raise LvmError(f"the LVM metadata of VG {name!r} lacks or garbles {e}") from None
    if extent_size <= 0:
        raise LvmError(f"the LVM metadata of VG {name!r} has extent size {extent_size}")
    lvs = []
    cow_stores: set[str] = set()
    for lv_name, lv in logical.items():
        if not isinstance(lv, dict):
            continue
        status = lv.get("status")
        volume = LogicalVolume(lv_name, isinstance(status, list) and "VISIBLE" in status)
        for key, seg in sorted(((k, v) for k, v in lv.items() if k.startswith("segment") and isinstance(v, dict)),
                               key=lambda kv: int(kv[0][7:]) if kv[0][7:].isdigit() else 0):
            try:
                segment = Segment(int(seg["start_extent"]), int(seg["extent_count"]), str(seg["type"]),
                                  _stripes(seg))
            except (KeyError, TypeError, ValueError) as e:
                raise LvmError(f"LV {lv_name!r} of VG {name!r} has a garbled {key}: {e}") from None
            volume.segments.append(segment)
            if segment.type == "snapshot" and seg.get("cow_store"):
                cow_stores.add(str(seg["cow_store"]))
        volume.reason = _unreadable(volume)
        lvs.append(volume)
    for volume in lvs:
        if volume.name in cow_stores:
            # An old-style snapshot shows its copy-on-write store as a visible linear LV.
            volume.reason = "the copy-on-write store of a snapshot (no file system of its own)"
    return VolumeGroup(str(name), _uuid(body.get("id", "")), seqno, extent_size, pvs, lvs)


def _stripes(seg: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    raw = seg.get("stripes")
    if seg.get("type") != "striped" or not isinstance(raw, list) or len(raw) % 2:
        return ()
    return tuple((str(raw[i]), int(raw[i + 1])) for i in range(0, len(raw), 2))


def _unreadable(volume: LogicalVolume) -> str | None:
    """Why an LV cannot be read as a linear extent map, None when it can."""
    if not volume.segments:
        return "it has no segments"
    expected = 0
    for segment in sorted(volume.segments, key=lambda s: s.start_extent):
        if segment.type != "striped":
            kind = segment.type.split("+")[0]
            if kind.startswith("raid") or kind == "mirror":
                return f"a {kind} LV (RAID and mirror LVs need device-mapper to be read)"
            if kind.startswith("thin"):
                return f"a {kind} LV (thin LVs need device-mapper to be read)"
            return f"an LV of type {segment.type!r} (only linear LVs are read)"
        if len(segment.stripes) != 1:
            return f"a striped LV over {len(segment.stripes)} PVs (only linear LVs are read)"
        if segment.start_extent != expected or segment.extent_count <= 0:
            return "its segments leave gaps or overlap"
        expected += segment.extent_count
    return None
