"""Restore against the lab with real Borg: VMs and disks into the engine, local files, verify,
file-level recovery from the lab's ext4 disk."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from helpers import file_sha256

_names = itertools.count(1)


@pytest.fixture
def vm(lab_clean):
    name = f"r{next(_names)}-{os.getpid()}"
    lab_clean.add_vm(name, disks=2, size="32M")
    try:
        yield name
    finally:
        lab_clean.delete_vm(name)


def chain(job, vm, incrementals=3):
    """A full backup and a few incrementals; returns the newest result."""
    result = job.backup(vm)[vm]
    for i in range(incrementals):
        job.lab.write(vm, disk=1 + i % 2, percent=2)
        result = job.backup(vm)[vm]
        assert result["mode"] == "incremental"
    return result


def test_restore_vm_from_a_chain_of_incrementals(job, vm):
    lab = job.lab
    newest = chain(job, vm)
    sources = [job.lab_image_sha(vm, i) for i in range(2)]
    before = lab.stats()
    proc = job.run("restore", newest["archive"], "--vm-name", f"{vm}-restored", "--storage-domain", "data1",
                   "--sha256", "--json")
    restored = json.loads(proc.stdout)
    after = lab.stats()
    info = lab.vm_info(f"{vm}-restored")
    try:
        assert [d["id"] for d in info["disks"]] == [d["new_id"] for d in restored["disks"]]
        # The summary: the VM, each disk's ids, sizes, bytes sent and sha256, the time taken.
        assert (restored["vm_name"], restored["vm_id"], restored["storage_domain"]) == \
            (f"{vm}-restored", info["id"], "data1")
        assert [(d["id"], d["size"], d["sha256"]) for d in restored["disks"]] == \
            [(d["id"], d["size"], source) for d, source in zip(newest["disks"], sources)]
        assert "seconds" in restored and all("bytes_sent" in d and "seconds" in d for d in restored["disks"])
        for index, source in enumerate(sources):
            assert lab.disk_sha256(f"{vm}-restored", index + 1) == source
        # data blocks only crossed the wire: holes went as zero requests
        sent = sum(d["bytes_sent"] for d in restored["disks"])
        data_blocks = sum(d["blocks"] - d["holes"] for d in newest["disks"])
        assert 0 < sent <= data_blocks * (1 << 20)  # the default block_size
        assert after["imageio.host.bytes_read"] == before["imageio.host.bytes_read"]
        assert after["open_transfers"] == [] and after["open_backups"] == []
        # the VM was recreated from the saved OVF: same settings, new ids, new name
        connection = lab.connection()
        try:
            vms = connection.system_service().vms_service()
            source_vm = vms.list(search=f"name={vm}")[0]
            new_vm = vms.list(search=f"name={vm}-restored")[0]
        finally:
            connection.close()
        assert new_vm.id != source_vm.id
        assert new_vm.memory == source_vm.memory
        assert (new_vm.cpu.topology.sockets, new_vm.cpu.topology.cores) == \
            (source_vm.cpu.topology.sockets, source_vm.cpu.topology.cores)
    finally:
        lab.delete_vm(f"{vm}-restored")


def test_restore_vm_into_a_block_domain(job, vm, small_block_domain):
    """Thin disks on a block domain hold their initial size: restore sizes it from the archive.

    The domain gives a disk created without an initial size 1 MiB, less than the data of
    either disk: the upload would run out of room (imageio answers 500).
    """
    lab = job.lab
    newest = chain(job, vm, incrementals=1)
    sources = [job.lab_image_sha(vm, i) for i in range(2)]
    restored = json.loads(job.run("restore", newest["archive"], "--vm-name", f"{vm}-block",
                                  "--storage-domain", small_block_domain, "--json").stdout)
    try:
        info = lab.vm_info(f"{vm}-block")
        for index, (disk, source) in enumerate(zip(info["disks"], sources)):
            assert disk["storage_domain"] == small_block_domain
            assert lab.disk_sha256(f"{vm}-block", index + 1) == source
            # The LV vdsm made for the initial size: qemu-img measure's figure for the image
            # with its data blocks allocated, times 1.1, in whole 1 MiB extents.
            data_bytes = (newest["disks"][index]["blocks"] - newest["disks"][index]["holes"]) << 20
            assert 2 << 20 < disk["lv_size"] < data_bytes * 1.1 + (2 << 20)
        assert [d["new_id"] for d in restored["disks"]] == [d["id"] for d in info["disks"]]
        assert lab.stats()["open_transfers"] == []
    finally:
        lab.delete_vm(f"{vm}-block")


@pytest.mark.slow
def test_restore_3_gib_of_data_into_the_block_and_the_file_domain(job, lab_clean):
    """A disk holding 3 GiB of data restores into block1 (vdsm's real sizes: a thin disk made
    without an initial size gets one 2560 MiB chunk) and into data1, identical to the source."""
    name = f"big-{os.getpid()}"
    lab_clean.add_vm(name, disks=1, size="4G")
    try:
        for offset in range(0, 3 << 30, 512 << 20):  # 3 GiB of random data, 512 MiB at a time
            lab_clean.write(name, 1, offset=offset, length=512 << 20)
        result = job.backup(name)[name]
        source = job.lab_image_sha(name, 0)
        for domain in ("block1", "data1"):
            restored = f"{name}-{domain}"
            summary = json.loads(job.run("restore", result["archive"], "--vm-name", restored,
                                         "--storage-domain", domain, "--sha256", "--json").stdout)
            try:
                [disk] = lab_clean.vm_info(restored)["disks"]
                assert disk["storage_domain"] == domain
                assert summary["disks"][0]["sha256"] == source
                assert lab_clean.disk_sha256(restored, 1) == source
                if domain == "block1":
                    assert disk["lv_size"] > 2560 << 20  # more than the chunk vdsm gives by default
            finally:
                lab_clean.delete_vm(restored)
    finally:
        lab_clean.delete_vm(name)


def test_the_recreated_vm_leaves_the_source_vm_and_its_disks_alone(job, vm):
    """The VM is made from its OVF without the OVF's disks: the engine would attach those to the
    source VM (ImportVmFromConfigurationCommand), failing for a disk it has (an event) and
    taking back a disk detached from it since."""
    lab = job.lab
    result = job.backup(vm)[vm]
    detached = lab.detach_disk(vm, 2)["detached"]
    events = len(lab.stats()["events"])
    try:
        job.run("restore", result["archive"], "--vm-name", f"{vm}-copy", "--storage-domain", "data1")
        assert [d["id"] for d in lab.vm_info(vm)["disks"]] == [result["disks"][0]["id"]]
        assert len(lab.vm_info(f"{vm}-copy")["disks"]) == 2
        assert lab.stats()["events"][events:] == []
    finally:
        lab.delete_vm(f"{vm}-copy")
        connection = lab.connection()
        try:
            connection.system_service().disks_service().disk_service(detached).remove()
        finally:
            connection.close()


def test_ovf_without_disks_keeps_the_rest_of_the_configuration(job, vm):
    from ovirt_borg.errors import OvirtBorgError
    from ovirt_borg.lab.xmlout import parse_ovf
    from ovirt_borg.restore import ovf_without_disks

    result = job.backup(vm)[vm]
    ovf = job.borg("extract", "--stdout", f"{job.repo}::{result['archive']}", f"{vm}/vm.ovf").stdout.decode()
    before, after = parse_ovf(ovf), parse_ovf(ovf_without_disks(ovf))
    assert len(before["disk_ids"]) == len(before["disks"]) == 2
    assert after["disk_ids"] == after["disks"] == []
    assert {k: v for k, v in after.items() if "disk" not in k} == {k: v for k, v in before.items() if "disk" not in k}
    assert "<rasd:ResourceType>17<" in ovf and "<rasd:ResourceType>17<" not in ovf_without_disks(ovf)
    assert 'xsi:type="ovf:DiskSection_Type"' in ovf_without_disks(ovf)
    with pytest.raises(OvirtBorgError, match="not valid XML"):
        ovf_without_disks("<Envelope><References>")


def test_restore_one_disk_to_a_storage_domain(job, vm):
    result = job.backup(vm)[vm]
    disk = result["disks"][1]
    proc = job.run("restore", result["archive"], "--disk", disk["id"], "--storage-domain", "data1", "--json")
    new_id = json.loads(proc.stdout)["disks"][0]["new_id"]
    image = job.dir / "one.raw"
    floating = job.lab.dir / "storage" / f"{new_id}.qcow2"  # a disk attached to no VM
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(floating), str(image)], check=True)
    assert file_sha256(image) == job.lab_image_sha(vm, 1)


def test_restore_to_a_wrong_place_creates_nothing(job, vm):
    """A missing storage domain or cluster, a VM name in use: refused before any disk is made."""
    result = job.backup(vm)[vm]
    disks_before = sorted(os.listdir(job.lab.dir / "storage"))
    disks_added = job.lab.stats()["calls"].get("disks.add", 0)
    for args, code, message in (
            (["--vm-name", "never", "--storage-domain", "nope"], 11,
             "storage domain 'nope' does not exist on the engine; it has: "),
            (["--vm-name", "never", "--storage-domain", "nope"], 11, "block1 (iscsi), "),
            (["--vm-name", "never", "--storage-domain", "nope"], 11, "data1 (localfs)"),
            (["--vm-name", "never", "--storage-domain", "dta1"], 11, "; did you mean 'data1'?"),
            (["--disk", result["disks"][0]["id"], "--storage-domain", "blok1"], 11,
             "storage domain 'blok1' does not exist on the engine; it has: "),
            (["--vm-name", "never", "--storage-domain", "data1", "--cluster", "nope"], 11,
             "cluster 'nope' does not exist on the engine (--cluster); it has: Default"),
            (["--vm-name", "never", "--storage-domain", "data1", "--cluster", "default"], 11,
             "did you mean 'Default'?"),
            (["--vm-name", vm, "--storage-domain", "data1"], 2, f"a VM named '{vm}' already exists")):
        proc = job.run("restore", result["archive"], *args, expect=code)
        assert message in proc.stderr, proc.stderr
    assert job.lab.stats()["calls"].get("disks.add", 0) == disks_added
    assert sorted(os.listdir(job.lab.dir / "storage")) == disks_before
    assert "never" not in [v["name"] for v in job.lab.describe()["vms"]]


def test_restore_to_dir_works_with_the_engine_stopped(job, vm, tmp_path):
    newest = chain(job, vm, incrementals=2)
    sources = [job.lab_image_sha(vm, i) for i in range(2)]
    # the engine is unreachable: point the job at a dead URL
    job.config.write_text(job.config.read_text().replace(job.lab.url, "https://127.0.0.1:9/ovirt-engine/api"))
    out = tmp_path / "restored"
    job.run("restore", newest["archive"], "--to-dir", str(out))
    for index, disk in enumerate(newest["disks"]):
        path = out / f"{disk['alias']}-{disk['id']}.raw"
        assert file_sha256(path) == sources[index]
        assert os.stat(path).st_blocks * 512 < disk["size"], "holes must stay holes"
    job.run("restore", newest["archive"], "--to-dir", str(tmp_path / "q"), "--format", "qcow2")
    qcow = next((tmp_path / "q").glob("*.qcow2"))
    raw = tmp_path / "q.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(qcow), str(raw)], check=True)
    assert file_sha256(raw) in sources


def test_verify_an_archive_and_an_unknown_one(job, vm):
    result = job.backup(vm)[vm]
    proc = job.run("verify", result["archive"])
    assert "OK" in proc.stdout
    job.run("verify", vm, "--last", "1")
    job.run("verify", "no-such-archive", expect=11)


def test_unknown_names_suggest_the_nearest_ones(job, vm, tmp_path):
    """A mistyped archive or VM name: exit 11, and the nearest existing names are suggested."""
    archive_name = job.backup(vm)[vm]["archive"]
    typo = archive_name[:-2] + ("8" if archive_name[-2] == "9" else "9") + "Z"  # another second
    for args in (["restore", typo, "--to-dir", str(tmp_path / "out")], ["verify", typo]):
        proc = job.run(*args, expect=11)
        assert f"no archive named '{typo}'" in proc.stderr and f"did you mean '{archive_name}'" in proc.stderr
    vm_typo = vm[:-1] + "x"
    proc = job.run("list", vm_typo, expect=11)
    assert f"no archives of VM '{vm_typo}'" in proc.stderr and f"did you mean '{vm}'" in proc.stderr
    proc = job.run("verify", vm_typo, expect=11)
    assert f"no archive or VM with archives named '{vm_typo}'" in proc.stderr, proc.stderr
    assert f"did you mean '{vm}'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_renamed_archive_restores_and_verifies(job, vm, tmp_path):
    """The VM's directory is found from the archive's content, not from its name."""
    result = job.backup(vm)[vm]
    job.borg("rename", f"{job.repo}::{result['archive']}", "kept-before-the-upgrade")
    assert "OK" in job.run("verify", "kept-before-the-upgrade").stdout
    out = tmp_path / "out"
    job.run("restore", "kept-before-the-upgrade", "--to-dir", str(out))
    for index, disk in enumerate(result["disks"]):
        assert file_sha256(out / f"{disk['alias']}-{disk['id']}.raw") == job.lab_image_sha(vm, index)
    assert (out / "vm.ovf").read_bytes() == job.borg(
        "extract", "--stdout", f"{job.repo}::kept-before-the-upgrade", f"{vm}/vm.ovf").stdout


def _modes(directory: Path) -> dict[str, int]:
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in directory.iterdir()}


def test_restore_to_dir_never_overwrites_unless_forced_and_writes_private_files(job, vm, tmp_path):
    result = job.backup(vm)[vm]
    names = sorted([f"{d['alias']}-{d['id']}.qcow2" for d in result["disks"]] + ["vm.ovf"])
    out = tmp_path / "out"
    job.run("restore", result["archive"], "--to-dir", str(out), "--format", "qcow2")
    assert _modes(out) == {name: 0o600 for name in names}  # qemu-img's own files are 0644
    assert (out / "vm.ovf").read_bytes() == job.borg(
        "extract", "--stdout", f"{job.repo}::{result['archive']}", f"{vm}/vm.ovf").stdout
    before = {path.name: path.stat().st_ino for path in out.iterdir()}
    # A second restore into the same directory is refused, naming the file; nothing changes.
    proc = job.run("restore", result["archive"], "--to-dir", str(out), "--format", "qcow2", expect=2)
    assert f"{out / names[0]} exists" in proc.stderr and "--force" in proc.stderr
    assert {path.name: path.stat().st_ino for path in out.iterdir()} == before
    # The same for the VM's configuration alone, with raw images.
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "vm.ovf").write_text("mine")
    proc = job.run("restore", result["archive"], "--to-dir", str(raw), expect=2)
    assert f"{raw / 'vm.ovf'} exists" in proc.stderr
    assert [path.name for path in raw.iterdir()] == ["vm.ovf"]
    # --force replaces them, once the new files are complete.
    job.run("restore", result["archive"], "--to-dir", str(out), "--format", "qcow2", "--force")
    assert all(before[path.name] != path.stat().st_ino for path in out.iterdir())
    assert _modes(out) == {name: 0o600 for name in names}
    job.run("restore", result["archive"], "--to-dir", str(raw), "--force")
    assert _modes(raw) == {name.replace(".qcow2", ".raw"): 0o600 for name in names}
    for index, disk in enumerate(result["disks"]):
        assert file_sha256(raw / f"{disk['alias']}-{disk['id']}.raw") == job.lab_image_sha(vm, index)


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
    return line


def test_restore_to_dir_failures_are_one_line_and_leave_no_file(job, vm, tmp_path):
    """A read-only directory, a full file system, a missing qemu-img: exit 2, one line, no file."""
    result = job.backup(vm)[vm]
    with _tmpfs(tmp_path / "ro", "ro,size=64m") as read_only:
        proc = job.run("restore", result["archive"], "--to-dir", str(read_only), expect=2)
        assert "Read-only file system; choose another --to-dir" in _one_error_line(proc)
    with _tmpfs(tmp_path / "full", "size=1m") as full:  # each disk holds more than 1 MiB of data
        for fmt in ("raw", "qcow2"):
            proc = job.run("restore", result["archive"], "--to-dir", str(full), "--format", fmt, expect=2)
            assert "No space left on device" in _one_error_line(proc)
            assert list(full.iterdir()) == []
    bin_dir = tmp_path / "bin"  # a PATH with cat (the passphrase command) and no qemu-img
    bin_dir.mkdir()
    (bin_dir / "cat").symlink_to(shutil.which("cat"))
    proc = subprocess.run([str(Path(sys.executable).parent / "ovirt-borg"), "-c", str(job.config), "restore",
                           result["archive"], "--to-dir", str(tmp_path / "q"), "--format", "qcow2"],
                          capture_output=True, text=True, env={**job.env, "PATH": str(bin_dir)})
    assert proc.returncode == 2
    assert "qemu-img, which is not installed" in _one_error_line(proc)
    assert not (tmp_path / "q").exists()


def test_verify_finds_a_block_that_differs_from_its_recorded_chunk_id(job, vm, tmp_path):
    """An archive whose image does not hold the recorded blocks fails verify (exit 10).

    Rebuilt with plain ``borg create`` and the same fixed 1 MiB chunks, the image has the same
    chunk ids (Borg's id is a keyed hash of the content); one recorded id is then changed, with
    the sidecar's hash of the ids file, so only the comparison of ids can tell.
    """
    result = job.backup(vm)[vm]
    name, disk = result["archive"], result["disks"][0]
    tree = tmp_path / "tree"
    tree.mkdir()
    job.borg("extract", "--sparse", f"{job.repo}::{name}", cwd=tree)
    blocks = tree / vm / "disks" / f"{disk['alias']}-{disk['id']}.blocks"
    ids = bytearray(blocks.read_bytes())
    ids[3 * 32] ^= 0x01
    blocks.write_bytes(bytes(ids))
    sidecar_path = tree / vm / "ovirt-borg.json"
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["disks"][0]["blocks_sha256"] = hashlib.sha256(bytes(ids)).hexdigest()
    sidecar_path.write_text(json.dumps(sidecar))
    job.borg("delete", f"{job.repo}::{name}")
    job.borg("create", "--chunker-params", "fixed,1048576", f"{job.repo}::{name}", vm, cwd=tree)
    proc = job.run("verify", name, expect=None)
    assert proc.returncode == 10, proc.stdout + proc.stderr
    assert "1 blocks differ (first: block 3)" in proc.stdout + proc.stderr


def test_file_level_recovery_from_the_ext4_disk(job, tmp_path):
    """A file of the lab's ext4 disk is recovered byte-identically from the archive."""
    lab = job.lab
    sample = lab.sample
    result = job.backup("vm1")["vm1"]
    mountpoint = tmp_path / "mnt"
    proc = job.run("mount", result["archive"], str(mountpoint))
    try:
        fs_dirs = [line.split(" at ")[-1] for line in proc.stdout.splitlines() if "mounted read-only at" in line]
        assert fs_dirs, proc.stdout
        found = {}
        for name, info in sample["vms"]["vm1"]["disks"]["1"]["files"].items():
            for fs in fs_dirs:
                path = os.path.join(fs, name.lstrip("/"))
                if os.path.exists(path):
                    found[name] = file_sha256(path) == info["sha256"]
        assert found and all(found.values()), found
    finally:
        job.run("umount", str(mountpoint))
    assert not any(str(mountpoint) in line for line in open("/proc/mounts"))


def _tamper_largest_chunk(repo: Path) -> None:
    """Flip one byte of the largest chunk stored in ``repo`` (a local Borg 1.x repository).

    The segment entry's CRC is recomputed, so only the chunk's own MAC can tell.
    """
    largest = None
    for segment in sorted((repo / "data").glob("*/*")):
        if not segment.name.isdigit():
            continue
        raw = segment.read_bytes()
        position = 8  # b"BORG_SEG"
        while position + 9 <= len(raw):
            size, tag = struct.unpack_from("<IB", raw, position + 4)
            if tag == 0 and (largest is None or size > largest[2]):  # PUT
                largest = (segment, position, size)
            position += size
    assert largest is not None, f"no chunk in {repo}"
    segment, position, size = largest
    raw = bytearray(segment.read_bytes())
    raw[position + size - 100] ^= 0x01
    struct.pack_into("<I", raw, position, zlib.crc32(raw[position + 4:position + size]) & 0xFFFFFFFF)
    segment.write_bytes(bytes(raw))


def test_verify_and_restore_refuse_a_tampered_chunk(job, vm, tmp_path):
    result = job.backup(vm)[vm]
    job.run("verify", result["archive"])
    _tamper_largest_chunk(job.repo)
    proc = job.run("verify", result["archive"], expect=None)
    assert proc.returncode == 9, proc.stderr
    assert "looks damaged; run borg check" in proc.stderr and "MAC Authentication failed" in proc.stderr
    out = tmp_path / "out"
    proc = job.run("restore", result["archive"], "--to-dir", str(out), expect=None)
    assert proc.returncode == 9, proc.stderr
    assert "looks damaged" in proc.stderr
    assert not out.exists() or not any(out.iterdir()), "no half-restored image is left"


