"""The lab engine's state and rules: VMs, disks, backups, checkpoints, image transfers, faults.

This package decides what the engine answers; it never speaks HTTP and never runs a process
itself. Everything that touches real data (qcow2 bitmaps, qemu-nbd exports, imageio tickets,
guest writes) goes through a ``DataPlane`` given to ``LabEngine``, so the rules read like the
engine's own commands:

- a backup adds one persistent bitmap, named after the new checkpoint, to each qcow2 disk with
  incremental backup enabled, and exports every disk read-only (with ``--bitmap=<from
  checkpoint>`` for an incremental) until the backup is finalized;
- phases advance one step each time the object is polled (``GET``), as the real engine's
  asynchronous commands appear to a client;
- refusals are ``ApiFault`` errors with the engine's status codes and wording.

The inventory (clusters, hosts, storage domains, tags, VMs, disks, checkpoints) is saved as
JSON after every change, so an engine restart keeps it; open backups and transfers are not.

By concern: ``api`` (ids, dates, faults), ``layout`` (the lab directory), ``search`` (the
engine's search language), ``inventory`` (VMs, disks, storage domains, hosts, clusters),
``backups`` (backups and checkpoints), ``transfers`` (image transfers), ``exports`` (qemu-nbd
exports by disk), ``faults`` (fault injection), ``guest`` (guest writes, test VMs) and
``engine`` (``LabEngine``, composed of them).
"""

from ovirt_borg.lab.model.api import API_PATH, ZERO_ID, ApiFault, AuthFailed, new_id, not_found, timestamp
from ovirt_borg.lab.model.backups import Backup
from ovirt_borg.lab.model.engine import DataPlane, LabEngine
from ovirt_borg.lab.model.faults import FAULT_HELP, Faults
from ovirt_borg.lab.model.inventory import (
    BLOCK, MIB, Attachment, Checkpoint, Cluster, Disk, Host, Inventory, StorageDomain, Tag, Vm,
    block_volume_size,
)
from ovirt_borg.lab.model.layout import LabLayout
from ovirt_borg.lab.model.search import parse_search
from ovirt_borg.lab.model.transfers import Transfer

__all__ = [
    "API_PATH", "BLOCK", "FAULT_HELP", "MIB", "ZERO_ID", "ApiFault", "Attachment", "AuthFailed",
    "Backup", "Checkpoint", "Cluster", "DataPlane", "Disk", "Faults", "Host", "Inventory",
    "LabEngine", "LabLayout", "StorageDomain", "Tag", "Transfer", "Vm", "block_volume_size",
    "new_id", "not_found", "parse_search", "timestamp",
]
