"""XML of the lab engine: API objects as the engine renders them, request bodies, VM OVFs.

Rendering follows the wire rules the SDK relies on (see OVIRT_API.md): plural collection roots,
an ``id`` (and ``href``) attribute on objects, lowercase enum values, engine-style dates, and
``<fault><reason/><detail/></fault>`` for errors. Parsing accepts what the SDK's writers send.
The OVF is the engine's ``ovf:Envelope`` (References, DiskSection, VirtualSystem with the
hardware items), served with ``all_content`` and read back when a VM is created from it.
"""

from __future__ import annotations

import math
import os
import shutil
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any, Iterable

from ovirt_borg.lab.model import API_PATH, ZERO_ID, timestamp

if TYPE_CHECKING:
    from ovirt_borg.lab.model import (
        Attachment, Backup, Checkpoint, Cluster, Disk, Host, LabEngine, StorageDomain, Tag,
        Transfer, Vm,
    )

PRODUCT_VERSION = (4, 5, 6)
OLD_PRODUCT_VERSION = (4, 4, 4)

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1/"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"


class BadRequest(ValueError):
    """A request body that is not the XML the engine expects."""


# ---------------------------------------------------------------------------------------------
# Helpers


def to_bytes(element: ET.Element) -> bytes:
    """Serialize an element as a UTF-8 XML document."""
    return b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + ET.tostring(
        element, encoding="utf-8")


def _sub(parent: ET.Element, tag: str, text: Any = None, **attrs: str) -> ET.Element:
    child = ET.SubElement(parent, tag, {k: v for k, v in attrs.items() if v is not None})
    if text is not None:
        child.text = _text(text)
    return child


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _obj(tag: str, ident: str, href: str | None) -> ET.Element:
    attrs = {"id": ident}
    if href:
        attrs = {"href": href, "id": ident}
    return ET.Element(tag, attrs)


def _ref(parent: ET.Element, tag: str, ident: str, href: str | None = None) -> ET.Element:
    attrs = {"href": href, "id": ident} if href else {"id": ident}
    return ET.SubElement(parent, tag, attrs)


def _link(parent: ET.Element, href: str, rel: str) -> None:
    ET.SubElement(parent, "link", {"href": href, "rel": rel})


def collection(tag: str, items: Iterable[ET.Element]) -> ET.Element:
    """Wrap rendered objects in a collection root such as ``<vms>``."""
    root = ET.Element(tag)
    root.extend(items)
    return root


def fault(reason: str, detail: str) -> bytes:
    """Render a fault document."""
    root = ET.Element("fault")
    _sub(root, "detail", detail)
    _sub(root, "reason", reason)
    return to_bytes(root)


def action(status: str = "complete") -> bytes:
    """Render the body an action such as ``finalize`` answers with."""
    root = ET.Element("action")
    _sub(root, "status", status)
    return to_bytes(root)


def _version(parent: ET.Element, version: tuple[int, ...]) -> None:
    el = _sub(parent, "version")
    _sub(el, "build", 0)
    _sub(el, "full_version", ".".join(map(str, version)) + "-1.el8")
    _sub(el, "major", version[0])
    _sub(el, "minor", version[1])
    _sub(el, "revision", 0)


# ---------------------------------------------------------------------------------------------
# Objects


def api_root(engine: LabEngine, *, old: bool = False) -> ET.Element:
    """Render ``GET /ovirt-engine/api``."""
    root = ET.Element("api")
    for rel in ("clusters", "disks", "hosts", "imagetransfers", "storagedomains", "tags", "vms"):
        _link(root, f"{API_PATH}/{rel}", rel)
    info = _sub(root, "product_info")
    _sub(info, "instance_id", ZERO_ID)
    _sub(info, "name", "oVirt Engine")
    _sub(info, "vendor", "ovirt.org")
    _version(info, OLD_PRODUCT_VERSION if old else PRODUCT_VERSION)
    summary = _sub(root, "summary")
    vms = _sub(summary, "vms")
    _sub(vms, "active", sum(1 for v in engine.inv.vms if v.status == "up"))
    _sub(vms, "total", len(engine.inv.vms))
    hosts = _sub(summary, "hosts")
    _sub(hosts, "active", len(engine.inv.hosts))
    _sub(hosts, "total", len(engine.inv.hosts))
    sds = _sub(summary, "storage_domains")
    _sub(sds, "active", len(engine.inv.storage_domains))
    _sub(sds, "total", len(engine.inv.storage_domains))
    _sub(root, "time", timestamp())
    user = _sub(root, "authenticated_user", id=ZERO_ID)
    user.set("href", f"{API_PATH}/users/{ZERO_ID}")
    return root


def vm(engine: LabEngine, vm: Vm, *, all_content: bool = False) -> ET.Element:
    """Render a VM; with ``all_content`` it carries its OVF in ``initialization``."""
    href = f"{API_PATH}/vms/{vm.id}"
    el = _obj("vm", vm.id, href)
    for rel in ("diskattachments", "backups", "checkpoints", "tags", "snapshots", "nics"):
        _link(el, f"{href}/{rel}", rel)
    _sub(el, "name", vm.name)
    _sub(el, "description", vm.description)
    _sub(el, "comment", "")
    cpu = _sub(el, "cpu")
    _sub(cpu, "architecture", "x86_64")
    topology = _sub(cpu, "topology")
    _sub(topology, "cores", vm.cores)
    _sub(topology, "sockets", vm.sockets)
    _sub(topology, "threads", vm.threads)
    _sub(el, "creation_time", vm.creation_time)
    _sub(el, "delete_protected", False)
    _sub(el, "memory", vm.memory)
    os_el = _sub(el, "os")
    _sub(os_el, "type", vm.os_type)
    _sub(el, "stateless", False)
    _sub(el, "type", "server")
    _sub(el, "status", vm.status)
    _sub(el, "origin", vm.origin)
    cluster = engine.cluster(vm.cluster_id)
    _ref(el, "cluster", cluster.id, f"{API_PATH}/clusters/{cluster.id}")
    if vm.status == "up":
        host = engine.host_for(vm)
        _ref(el, "host", host.id, f"{API_PATH}/hosts/{host.id}")
    _ref(el, "template", ZERO_ID, f"{API_PATH}/templates/{ZERO_ID}")
    if all_content:
        init = _sub(el, "initialization")
        conf = _sub(init, "configuration")
        _sub(conf, "data", render_ovf(engine, vm))
        _sub(conf, "type", "ovf")
    return el


def disk(engine: LabEngine, disk: Disk, *, backup_mode: str | None = None,
         href: str | None = None) -> ET.Element:
    """Render a disk (``backup_mode`` inside a backup's disk list).

    A LUN disk carries ``<lun_storage>`` instead of the image fields (DiskMapper.map: only
    image, Cinder and managed-block disks get sizes, format, status and storage domains).
    """
    el = _obj("disk", disk.id, href or f"{API_PATH}/disks/{disk.id}")
    if disk.storage_type == "lun":
        _sub(el, "alias", disk.name)
        _sub(el, "content_type", disk.content_type)
        _sub(el, "description", disk.description)
        lun = _sub(_sub(el, "lun_storage"), "logical_units")
        unit = _sub(lun, "logical_unit", id=f"36001405{disk.id.replace('-', '')[:24]}")
        _sub(unit, "size", disk.provisioned_size)
        _sub(el, "name", disk.name)
        _sub(el, "propagate_errors", False)
        _sub(el, "shareable", disk.shareable)
        _sub(el, "storage_type", "lun")
        _sub(el, "wipe_after_delete", False)
        return el
    _sub(el, "actual_size", _actual_size(disk))
    _sub(el, "alias", disk.name)
    _sub(el, "backup", disk.backup)
    if backup_mode is not None:
        _sub(el, "backup_mode", backup_mode)
    _sub(el, "content_type", disk.content_type)
    _sub(el, "description", disk.description)
    _sub(el, "format", disk.format)
    _sub(el, "image_id", disk.image_id)
    _sub(el, "name", disk.name)
    _sub(el, "propagate_errors", False)
    _sub(el, "provisioned_size", disk.provisioned_size)
    if disk.format == "cow":
        _sub(el, "qcow_version", "qcow2_v3")
    _sub(el, "shareable", disk.shareable)
    _sub(el, "sparse", disk.sparse)
    _sub(el, "status", disk.status)
    _sub(el, "storage_type", disk.storage_type)
    _sub(el, "total_size", _actual_size(disk))
    _sub(el, "wipe_after_delete", False)
    sd = engine.storage_domain(disk.storage_domain_id)
    sds = _sub(el, "storage_domains")
    _ref(sds, "storage_domain", sd.id, f"{API_PATH}/storagedomains/{sd.id}")
    return el


def _actual_size(disk: Disk) -> int:
    if disk.lv_size:  # vdsm's BlockVolume.getVolumeTrueSize: the size of the volume's LV
        return disk.lv_size
    try:
        return os.stat(disk.path).st_blocks * 512
    except OSError:
        return 0


def attachment(engine: LabEngine, vm: Vm, att: Attachment) -> ET.Element:
    """Render a disk attachment (its id is the disk id, as on the engine)."""
    href = f"{API_PATH}/vms/{vm.id}/diskattachments/{att.disk_id}"
    el = _obj("disk_attachment", att.disk_id, href)
    _sub(el, "active", att.active)
    _sub(el, "bootable", att.bootable)
    _sub(el, "interface", att.interface)
    _sub(el, "pass_discard", False)
    _sub(el, "read_only", False)
    _sub(el, "uses_scsi_reservation", False)
    _ref(el, "disk", att.disk_id, f"{API_PATH}/disks/{att.disk_id}")
    _ref(el, "vm", vm.id, f"{API_PATH}/vms/{vm.id}")
    return el


def backup(engine: LabEngine, b: Backup) -> ET.Element:
    """Render a VM backup (``to_checkpoint_id`` once ready)."""
    href = f"{API_PATH}/vms/{b.vm_id}/backups/{b.id}"
    el = _obj("backup", b.id, href)
    _link(el, f"{href}/disks", "disks")
    _sub(el, "creation_date", b.creation_date)
    if b.description:
        _sub(el, "description", b.description)
    if b.from_checkpoint_id:
        _sub(el, "from_checkpoint_id", b.from_checkpoint_id)
    _sub(el, "phase", b.phase)
    if b.to_checkpoint_id:
        _sub(el, "to_checkpoint_id", b.to_checkpoint_id)
    _ref(el, "host", b.host_id, f"{API_PATH}/hosts/{b.host_id}")
    if b.snapshot_id:  # VmBackupMapper: a hybrid backup names its snapshot
        _ref(el, "snapshot", b.snapshot_id, f"{API_PATH}/vms/{b.vm_id}/snapshots/{b.snapshot_id}")
    _ref(el, "vm", b.vm_id, f"{API_PATH}/vms/{b.vm_id}")
    return el


def snapshot(vm_id: str, snapshot_id: str, description: str) -> ET.Element:
    """Render a VM snapshot (the active one, or a hybrid backup's)."""
    el = _obj("snapshot", snapshot_id, f"{API_PATH}/vms/{vm_id}/snapshots/{snapshot_id}")
    _sub(el, "description", description)
    _sub(el, "snapshot_status", "ok")
    _sub(el, "snapshot_type", "active" if description == "Active VM" else "regular")
    _ref(el, "vm", vm_id, f"{API_PATH}/vms/{vm_id}")
    return el


def checkpoint(engine: LabEngine, cp: Checkpoint) -> ET.Element:
    """Render a VM checkpoint."""
    href = f"{API_PATH}/vms/{cp.vm_id}/checkpoints/{cp.id}"
    el = _obj("checkpoint", cp.id, href)
    _sub(el, "creation_date", cp.creation_date)
    if cp.parent_id:
        _sub(el, "parent_id", cp.parent_id)
    _sub(el, "state", cp.state)
    disks = _sub(el, "disks")
    for disk_id in cp.disk_ids:
        _ref(disks, "disk", disk_id, f"{API_PATH}/disks/{disk_id}")
    _ref(el, "vm", cp.vm_id, f"{API_PATH}/vms/{cp.vm_id}")
    return el


def transfer(engine: LabEngine, t: Transfer) -> ET.Element:
    """Render an image transfer (URLs only while ``transferring``).

    As ovirt-engine's ImageTransferMapper.map(entity) writes it: ``<host>`` and ``<image>``
    (whose id is the entity's disk id, not a volume id; BackendImageTransferResource.addLinks
    strips its href), never ``<backup>`` nor ``<disk>``, although the SDK's type has them and
    a request may carry them. A client finds a backup's transfers by image id.
    """
    href = f"{API_PATH}/imagetransfers/{t.id}"
    el = _obj("image_transfer", t.id, href)
    _sub(el, "active", t.phase == "transferring")
    _sub(el, "direction", t.direction)
    _sub(el, "format", t.format)
    _sub(el, "inactivity_timeout", t.inactivity_timeout)
    _sub(el, "phase", t.phase)
    if t.phase in ("transferring", "paused_user", "paused_system"):
        if t.proxy_url:
            _sub(el, "proxy_url", t.proxy_url)
        if t.transfer_url:
            _sub(el, "transfer_url", t.transfer_url)
    _sub(el, "shallow", False)
    _sub(el, "timeout_policy", "legacy")
    _sub(el, "transferred", 0)
    _ref(el, "host", t.host_id, f"{API_PATH}/hosts/{t.host_id}")
    _ref(el, "image", t.disk_id)
    return el


def storage_domain(engine: LabEngine, sd: StorageDomain) -> ET.Element:
    """Render a data storage domain with its free and used space."""
    el = _obj("storage_domain", sd.id, f"{API_PATH}/storagedomains/{sd.id}")
    _sub(el, "name", sd.name)
    _sub(el, "description", "")
    try:  # a new domain's directory appears with its first disk
        usage = shutil.disk_usage(sd.path if os.path.isdir(sd.path) else os.path.dirname(sd.path))
        available, used = usage.free, usage.used
    except OSError:
        available, used = 0, 0
    _sub(el, "available", available)
    _sub(el, "used", used)
    _sub(el, "committed", sum(d.provisioned_size for d in engine.inv.disks
                             if d.storage_domain_id == sd.id))
    _sub(el, "external_status", "ok")
    _sub(el, "master", True)
    _sub(el, "status", "active")
    storage = _sub(el, "storage")
    _sub(storage, "type", sd.type)
    if not sd.is_block:
        _sub(storage, "path", sd.path)
    _sub(el, "storage_format", "v5")
    _sub(el, "type", "data")
    _sub(el, "backup", False)
    return el


def cluster(engine: LabEngine, c: Cluster) -> ET.Element:
    """Render a cluster with its compatibility version."""
    el = _obj("cluster", c.id, f"{API_PATH}/clusters/{c.id}")
    _sub(el, "name", c.name)
    _sub(el, "description", "The default server cluster")
    version = _sub(el, "version")
    _sub(version, "major", c.version[0])
    _sub(version, "minor", c.version[1])
    return el


def host(engine: LabEngine, h: Host) -> ET.Element:
    """Render a hypervisor host."""
    el = _obj("host", h.id, f"{API_PATH}/hosts/{h.id}")
    _sub(el, "name", h.name)
    _sub(el, "address", h.address)
    _sub(el, "status", "up")
    _sub(el, "type", "rhel")
    _ref(el, "cluster", h.cluster_id, f"{API_PATH}/clusters/{h.cluster_id}")
    return el


def tag(engine: LabEngine, t: Tag, *, vm_id: str | None = None) -> ET.Element:
    """Render a tag (under a VM when ``vm_id`` is given)."""
    href = f"{API_PATH}/vms/{vm_id}/tags/{t.id}" if vm_id else f"{API_PATH}/tags/{t.id}"
    el = _obj("tag", t.id, href)
    _sub(el, "name", t.name)
    _sub(el, "description", "")
    if vm_id:
        _ref(el, "vm", vm_id, f"{API_PATH}/vms/{vm_id}")
    return el


# ---------------------------------------------------------------------------------------------
# OVF


def _ovf(tag: str) -> str:
    return f"{{{OVF_NS}}}{tag}"


def _rasd(tag: str) -> str:
    return f"{{{RASD_NS}}}{tag}"


ET.register_namespace("ovf", OVF_NS)
ET.register_namespace("rasd", RASD_NS)
ET.register_namespace("vssd", VSSD_NS)
ET.register_namespace("xsi", XSI_NS)


def render_ovf(engine: LabEngine, vm: Vm) -> str:
    """Return the engine-style OVF of a VM and its attached disks."""
    cluster_ = engine.cluster(vm.cluster_id)
    disks = [(att, engine.disk(att.disk_id)) for att in vm.attachments]
    env = ET.Element(_ovf("Envelope"), {_ovf("version"): "4.5.0.0"})
    refs = ET.SubElement(env, "References")
    for _, d in disks:
        ET.SubElement(refs, "File", {
            _ovf("href"): f"{d.id}/{d.image_id}", _ovf("id"): d.image_id,
            _ovf("size"): str(d.provisioned_size), _ovf("description"): d.description,
            _ovf("disk_storage_type"): "IMAGE", _ovf("cinder_volume_type"): "",
        })
    net = ET.SubElement(env, "Section", {f"{{{XSI_NS}}}type": "ovf:NetworkSection_Type"})
    _sub(net, "Info", "List of networks")
    ET.SubElement(net, "Network", {_ovf("name"): "ovirtmgmt"})
    section = ET.SubElement(env, "Section", {f"{{{XSI_NS}}}type": "ovf:DiskSection_Type"})
    _sub(section, "Info", "List of Virtual Disks")
    for att, d in disks:
        gib = max(1, math.ceil(d.provisioned_size / (1 << 30)))
        ET.SubElement(section, "Disk", {
            _ovf("diskId"): d.image_id, _ovf("size"): str(gib),
            _ovf("actual_size"): str(max(1, math.ceil(_actual_size(d) / (1 << 30)))),
            _ovf("vm_snapshot_id"): vm.snapshot_id, _ovf("parentRef"): "",
            _ovf("fileRef"): f"{d.id}/{d.image_id}",
            _ovf("format"): "http://www.vmware.com/specifications/vmdk.html#sparse",
            _ovf("volume-format"): "COW" if d.format == "cow" else "RAW",
            _ovf("volume-type"): "Sparse" if d.sparse else "Preallocated",
            _ovf("disk-interface"): _OVF_INTERFACES.get(att.interface, "VirtIO_SCSI"),
            _ovf("read-only"): "false", _ovf("shareable"): "false",
            _ovf("boot"): _text(att.bootable), _ovf("pass-discard"): "false",
            _ovf("incremental-backup"): _text(d.backup == "incremental"),
            _ovf("disk-alias"): d.name, _ovf("disk-description"): d.description,
            _ovf("wipe-after-delete"): "false",
        })
    content = ET.SubElement(env, "Content", {
        _ovf("id"): "out", f"{{{XSI_NS}}}type": "ovf:VirtualSystem_Type"})
    _sub(content, "Name", vm.name)
    _sub(content, "Description", vm.description)
    _sub(content, "Comment", "")
    _sub(content, "CreationDate", _ovf_date(vm.creation_time))
    _sub(content, "ExportDate", _ovf_date(timestamp()))
    _sub(content, "DeleteProtected", "false")
    _sub(content, "IsStateless", "false")
    _sub(content, "Origin", "0")
    _sub(content, "VmType", "1")
    _sub(content, "ClusterName", cluster_.name)
    _sub(content, "ClusterCompatibilityVersion", f"{cluster_.version[0]}.{cluster_.version[1]}")
    _sub(content, "TemplateId", ZERO_ID)
    _sub(content, "TemplateName", "Blank")
    _sub(content, "MinAllocatedMem", vm.memory // (1 << 20))
    os_section = ET.SubElement(content, "Section", {
        _ovf("id"): vm.id, _ovf("required"): "false",
        f"{{{XSI_NS}}}type": "ovf:OperatingSystemSection_Type"})
    _sub(os_section, "Info", "Guest Operating System")
    _sub(os_section, "Description", vm.os_type)
    hw = ET.SubElement(content, "Section", {
        f"{{{XSI_NS}}}type": "ovf:VirtualHardwareSection_Type"})
    vcpus = vm.sockets * vm.cores * vm.threads
    memory_mb = vm.memory // (1 << 20)
    _sub(hw, "Info", f"{vcpus} CPU, {memory_mb} Memory")
    system = _sub(hw, "System")
    _sub(system, f"{{{VSSD_NS}}}VirtualSystemType", "ENGINE 4.5.0.0")
    item = _sub(hw, "Item")
    _sub(item, _rasd("Caption"), f"{vcpus} virtual cpu")
    _sub(item, _rasd("Description"), "Number of virtual CPU")
    _sub(item, _rasd("InstanceId"), "1")
    _sub(item, _rasd("ResourceType"), "3")
    _sub(item, _rasd("num_of_sockets"), vm.sockets)
    _sub(item, _rasd("cpu_per_socket"), vm.cores)
    _sub(item, _rasd("threads_per_cpu"), vm.threads)
    _sub(item, _rasd("max_num_of_vcpus"), max(16, vcpus))
    _sub(item, _rasd("VirtualQuantity"), vcpus)
    item = _sub(hw, "Item")
    _sub(item, _rasd("Caption"), f"{memory_mb} MB of memory")
    _sub(item, _rasd("Description"), "Memory Size")
    _sub(item, _rasd("InstanceId"), "2")
    _sub(item, _rasd("ResourceType"), "4")
    _sub(item, _rasd("AllocationUnits"), "MegaBytes")
    _sub(item, _rasd("VirtualQuantity"), memory_mb)
    for index, (att, d) in enumerate(disks, start=1):
        item = _sub(hw, "Item")
        _sub(item, _rasd("Caption"), d.name)
        _sub(item, _rasd("InstanceId"), d.image_id)
        _sub(item, _rasd("ResourceType"), "17")
        _sub(item, _rasd("HostResource"), f"{d.id}/{d.image_id}")
        _sub(item, _rasd("Parent"), ZERO_ID)
        _sub(item, _rasd("Template"), ZERO_ID)
        _sub(item, _rasd("StorageId"), d.storage_domain_id)
        _sub(item, _rasd("StoragePoolId"), ZERO_ID)
        _sub(item, _rasd("CreationDate"), _ovf_date(d.created or vm.creation_time))
        _sub(item, "Type", "disk")
        _sub(item, "Device", "disk")
        _sub(item, "BootOrder", index if att.bootable else 0)
        _sub(item, "IsPlugged", _text(att.active))
        _sub(item, "IsReadOnly", "false")
        _sub(item, "Alias", f"ua-{d.id}")
    return ET.tostring(env, encoding="unicode", xml_declaration=True)


_OVF_INTERFACES = {"virtio_scsi": "VirtIO_SCSI", "virtio": "VirtIO", "ide": "IDE",
                   "sata": "SATA", "spapr_vscsi": "SPAPR_VSCSI"}


def _ovf_date(engine_date: str) -> str:
    # The OVF writes "2024/01/01 10:00:00"; engine dates are "2024-01-01T10:00:00.000+00:00".
    return engine_date[:19].replace("-", "/").replace("T", " ") if engine_date else ""


def parse_ovf(text: str) -> dict[str, Any]:
    """Read the settings the lab restores from an engine OVF.

    Returns ``name``, ``description``, ``memory`` (bytes), ``sockets``, ``cores``, ``threads``,
    ``os_type``, ``id`` (the VM's own id: its OperatingSystemSection's, as OvfOvirtReader's
    readOsSection takes it), ``disks`` (``image_id``, ``disk_id``, ``alias``, ``format``,
    ``boot``) and ``disk_ids`` (the disks the engine reads from the References' File
    elements, OvfOvirtReader.buildFileReference) for the fields present. Raises
    ``BadRequest`` when the text is not an OVF envelope.
    """
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise BadRequest(f"the OVF is not valid XML: {e}") from e
    if root.tag != _ovf("Envelope"):
        raise BadRequest("the OVF has no ovf:Envelope root")
    out: dict[str, Any] = {}
    content = root.find("Content")
    if content is not None:
        for key, tag in (("name", "Name"), ("description", "Description")):
            el = content.find(tag)
            if el is not None and el.text is not None:
                out[key] = el.text
        for section in content.findall("Section"):
            kind = section.get(f"{{{XSI_NS}}}type", "")
            if kind.endswith("OperatingSystemSection_Type"):
                if section.get(_ovf("id")):
                    out["id"] = section.get(_ovf("id"))
                desc = section.find("Description")
                if desc is not None and desc.text:
                    out["os_type"] = desc.text
            elif kind.endswith("VirtualHardwareSection_Type"):
                for item in section.findall("Item"):
                    rtype = item.findtext(_rasd("ResourceType"))
                    if rtype == "3":
                        for key, tag in (("sockets", "num_of_sockets"), ("cores", "cpu_per_socket"),
                                         ("threads", "threads_per_cpu")):
                            value = item.findtext(_rasd(tag))
                            if value and value.isdigit():
                                out[key] = int(value)
                    elif rtype == "4":
                        value = item.findtext(_rasd("VirtualQuantity"))
                        if value and value.isdigit():
                            out["memory"] = int(value) << 20
    disks = []
    section = None
    for candidate in root.findall("Section"):
        if candidate.get(f"{{{XSI_NS}}}type", "").endswith("DiskSection_Type"):
            section = candidate
    if section is not None:
        for d in section.findall("Disk"):
            file_ref = d.get(_ovf("fileRef"), "")
            disks.append({
                "image_id": d.get(_ovf("diskId")),
                "disk_id": file_ref.split("/")[0] if file_ref else None,
                "alias": d.get(_ovf("disk-alias")),
                "format": "cow" if d.get(_ovf("volume-format")) == "COW" else "raw",
                "boot": d.get(_ovf("boot")) == "true",
            })
    out["disks"] = disks
    references = root.find("References")
    out["disk_ids"] = [] if references is None else [
        href.split("/")[0] for href in (f.get(_ovf("href"), "") for f in references.findall("File")) if href]
    return out


# ---------------------------------------------------------------------------------------------
# Request bodies


def parse_body(body: bytes, expected: str) -> ET.Element:
    """Parse a request body whose root must be ``expected``; raises ``BadRequest``."""
    if not body or not body.strip():
        raise BadRequest(f"the request needs a <{expected}> body")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise BadRequest(f"the request body is not valid XML: {e}") from e
    if root.tag != expected:
        raise BadRequest(f"expected a <{expected}> body, got <{root.tag}>")
    return root


def text(el: ET.Element, path: str) -> str | None:
    """Return the stripped text at ``path`` or None."""
    found = el.find(path)
    if found is None or found.text is None:
        return None
    return found.text.strip()


def integer(el: ET.Element, path: str) -> int | None:
    """Return the integer at ``path`` or None; raises ``BadRequest`` for a non-number."""
    value = text(el, path)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as e:
        raise BadRequest(f"<{path}> must be an integer, got {value!r}") from e


def boolean(el: ET.Element, path: str) -> bool | None:
    value = text(el, path)
    if value is None:
        return None
    return value.lower() in ("true", "1")


def reference(el: ET.Element, path: str) -> dict[str, str] | None:
    """Return ``{"id": ..., "name": ...}`` for a referenced object (id attribute or name)."""
    found = el.find(path)
    if found is None:
        return None
    out = {}
    if found.get("id"):
        out["id"] = found.get("id")
    name = found.findtext("name")
    if name:
        out["name"] = name.strip()
    return out or None


def ids(el: ET.Element, path: str) -> list[str]:
    """Return the ``id`` attributes of the elements at ``path``."""
    return [e.get("id") for e in el.findall(path) if e.get("id")]
