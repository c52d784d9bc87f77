"""Lab fixtures: a running lab engine (real imageio daemons, qemu-nbd, qcow2 bitmaps).

Load them in a test module (or the root conftest) with::

    pytest_plugins = ["fixtures_lab"]

- ``lab``: one lab for the whole session (3 sample VMs, 32 MiB disks), stopped at the end.
  Tests that change checkpoints or turn faults on should work on their own VM
  (``lab.add_vm(...)``, or the ``lab_vm`` fixture) and leave faults off (``lab_clean``).
- ``lab_clean``: the session lab, with every fault switched off before and after the test.
- ``lab_vm``: a fresh up VM with one 16 MiB data disk in the session lab, deleted afterwards.
- ``module_lab``: a lab of its own for one test module, for tests that need a pristine lab.
- ``small_block_domain``: the name of a new iSCSI domain in the session lab with small vdsm
  sizes (thin disks without an initial size get 1 MiB; LVs in 1 MiB extents).
- ``engine``: an ``ovirtsdk4.Connection`` to the session lab, closed after the test.
"""

from __future__ import annotations

import itertools
import os

import pytest

from helpers import temporary_vm
from ovirt_borg.lab.control import Lab

LAB_VMS = 3
LAB_DISK_SIZE = "32M"
_domain_numbers = itertools.count(1)


def _start_lab(directory) -> Lab:
    return Lab.up(directory, vms=LAB_VMS, disk_size=LAB_DISK_SIZE)


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A running lab shared by the whole session; stopped (no process left) at the end."""
    instance = _start_lab(tmp_path_factory.mktemp("lab"))
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture
def lab_clean(lab):
    """The session lab with every fault off before and after the test."""
    lab.clear_faults()
    try:
        yield lab
    finally:
        lab.clear_faults()


@pytest.fixture
def lab_vm(lab_clean, request):
    """A new up VM (one 16 MiB qcow2 data disk, incremental backup) in the session lab.

    Returns the ``describe()`` entry of the VM (id, name, disks with ids and paths). The VM
    and its disk are deleted after the test, even with a backup still open.
    """
    with temporary_vm(lab_clean, "t", disks=1, size="16M") as name:
        yield lab_clean.vm_info(name)


@pytest.fixture
def small_block_domain(lab_clean) -> str:
    """A new block (iSCSI) domain in the session lab whose chunk and extent are 1 MiB, so that
    a thin disk holds only a few MiB more than its initial size; returns its name."""
    name = f"block-small{next(_domain_numbers)}-{os.getpid()}"
    lab_clean.add_storage_domain(name, type="iscsi", chunk_size="1M", extent_size="1M")
    return name


@pytest.fixture(scope="module")
def module_lab(tmp_path_factory):
    """A lab of its own for one test module; stopped at the end of the module."""
    instance = _start_lab(tmp_path_factory.mktemp("module-lab"))
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture
def engine(lab):
    """An ``ovirtsdk4.Connection`` to the session lab (logged out after the test)."""
    connection = lab.connection()
    try:
        yield connection
    finally:
        connection.close()
