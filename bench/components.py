"""The two halves of ovirt-borg's data path, measured alone.

Run as ``python -m bench.components COMMAND ...`` (a process of its own, measured like the
contenders):

``read``
    Start a full backup of a VM, open its image transfer, and read every data block the way
    ovirt-borg's full backup plans it (``extents?context=zero``, ``plan.plan_blocks``,
    ``ImageioClient.read_ranges`` with the default settings), dropping the data. This is the
    imageio side alone: what the data path could do if storing cost nothing.
``write``
    Give the same image, read from a local raw file, to ovirt-borg's archive writer
    (``archive.open_writer(...).add_image``) as ovirt-borg would: holes as ``None``, data
    blocks as bytes (the writer's chunk ids are the per-block digests backup.py keeps), from the
    page cache (the file is read once before the clock starts). This is the Borg side alone:
    what the data path could do if reading cost nothing.

``read-archive``
    Read an image back from an archive the way restore does (``archive.read_image``: holes are
    not fetched, data chunks are fetched ahead, decrypted and checked), dropping the data: the
    Borg side of a restore alone.

``floor``
    The work Borg's own crypto and compression need for an image, the floor of any writer:
    for every block of a local raw file (``--block-size``), the zero test every writer makes
    (all-zero blocks are neither hashed nor stored, by Borg's chunker or by ovirt-borg), then
    with the repository's own key and Borg's compressor objects the chunk id
    (``key.id_hash``), and for each chunk not seen before the compression
    (``key.compressor.compress``) and the encryption with its MAC (the key's cipher suite,
    ``cipher.encrypt``, what ``key.encrypt`` does after compressing). One thread; each step
    timed with ``time.thread_time`` around its call only, so reading the file costs nothing.
    Prints the CPU seconds of each step and their sum.

Each of the others prints ``{"seconds": ..., "cpu_seconds": ..., "bytes": ...}`` for its data
phase only (wall and CPU seconds of the process, control plane and start-up excluded); the
whole process is measured by the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def cmd_read(args: argparse.Namespace) -> dict:
    from ovirt_borg import plan
    from ovirt_borg.backup import READ_REQUEST
    from ovirt_borg.imageio import ImageioClient, TransferSettings

    from bench import contenders

    connection = contenders.connect(args)
    try:
        from ovirtsdk4 import types

        vms = connection.system_service().vms_service()
        vm = vms.list(search=f"name={args.vm}")[0]
        vm_service = vms.vm_service(vm.id)
        disk = vm_service.disk_attachments_service().list()[0].disk
        size = connection.system_service().disks_service().disk_service(disk.id).get().provisioned_size
        backups = vm_service.backups_service()
        backup = backups.add(types.Backup(disks=[types.Disk(id=disk.id)]))
        backup_service = backups.backup_service(backup.id)
        contenders.wait(backup_service.get, lambda b: contenders.phase(b) == "ready", "backup")
        try:
            service, transfer = contenders.open_transfer(connection, disk.id, "download", backup.id)
            try:
                started, cpu0 = time.monotonic(), time.process_time()
                settings = TransferSettings(ca_file=args.ca_file)
                with ImageioClient(transfer.transfer_url, transfer.proxy_url, settings) as client:
                    extents = client.extents("zero")
                    blocks = plan.plan_blocks(size, args.block_size, extents)
                    total = 0
                    for _, data in client.read_ranges(plan.read_ranges(blocks, READ_REQUEST),
                                                       piece_size=args.block_size):
                        total += len(data)
                seconds, cpu = time.monotonic() - started, time.process_time() - cpu0
            finally:
                contenders.finalize_transfer(service)
        finally:
            backup_service.finalize()
            contenders.wait(lambda: contenders.phase(backup_service.get()),
                             lambda p: p in ("succeeded", "failed"), "backup finalize")
    finally:
        connection.close()
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "bytes": total}


def cmd_write(args: argparse.Namespace) -> dict:
    from ovirt_borg import archive
    from ovirt_borg.borgcli import Repo

    raw = Path(args.raw)
    size = raw.stat().st_size
    block_size = args.block_size
    zeros = bytes(block_size)
    repo = Repo(location=args.repo, env={k: v for k, v in os.environ.items() if k.startswith("BORG_")},
                compression=args.compression)
    total = 0

    def blocks():
        nonlocal total
        with open(raw, "rb") as f:
            for offset in range(0, size, block_size):
                data = f.read(min(block_size, size - offset))
                # A slice of zeros would copy 4 MiB per block: compare with the whole zero block.
                if data == (zeros if len(data) == block_size else bytes(len(data))):
                    yield None  # a zero extent: ovirt-borg neither reads nor hashes it
                    continue
                total += len(data)
                yield data

    # Bring the image into the page cache first: the data phase measures the writer, not this
    # machine's disk. Read cold, the file costs this VM several times the kernel time of the
    # writer's own work (perf: the kernel's copy out of fresh page-cache pages, zeroing of the
    # hole pages), which ovirt-borg, reading from imageio, never pays.
    with open(raw, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass
    started, cpu0 = time.monotonic(), time.process_time()
    with archive.open_writer(repo, "components-write", block_size=block_size, base_archive=None) as writer:
        writer.add_image(f"{raw.stem}/disks/image.raw", size, blocks())
        writer.commit()
    return {"seconds": round(time.monotonic() - started, 3), "cpu_seconds": round(time.process_time() - cpu0, 3),
            "bytes": total}


def cmd_read_archive(args: argparse.Namespace) -> dict:
    from ovirt_borg import archive
    from ovirt_borg.borgcli import Repo

    repo = Repo(location=args.repo, env={k: v for k, v in os.environ.items() if k.startswith("BORG_")})
    started, cpu0 = time.monotonic(), time.process_time()
    total = 0
    for _, _, data in archive.read_image(repo, args.archive, args.path):
        if data is not None:
            total += len(data)
    return {"seconds": round(time.monotonic() - started, 3), "cpu_seconds": round(time.process_time() - cpu0, 3),
            "bytes": total}


def cmd_floor(args: argparse.Namespace) -> dict:
    from borg.compress import CompressionSpec
    from borg.constants import zeros
    from borg.helpers import Manifest
    from borg.logger import setup_logging
    from borg.repository import Repository

    setup_logging(level="warning")
    with Repository(args.repo, exclusive=False, lock=False) as repository:
        _, key = Manifest.load(repository, (Manifest.Operation.READ,))
    compressor = CompressionSpec(args.compression).compressor
    # key.encrypt would reserve nonces in the repository; a cipher of the key's suite with
    # an IV of its own does the same work without touching it.
    cipher = None
    if hasattr(key, "enc_key") and hasattr(key, "CIPHERSUITE"):
        cipher = key.CIPHERSUITE(mac_key=key.enc_hmac_key, enc_key=key.enc_key, header_len=1, aad_offset=1)
    iv = 0
    seconds = {"zero test": 0.0, "chunk id": 0.0, "compression": 0.0, "encryption and MAC": 0.0}
    seen: set[bytes] = set()
    blocks = zero_blocks = data_bytes = stored = 0
    clock = time.thread_time
    with open(args.raw, "rb") as f:
        while data := f.read(args.block_size):
            blocks += 1
            t0 = clock()
            zero = zeros.startswith(data)
            t1 = clock()
            seconds["zero test"] += t1 - t0
            if zero:
                zero_blocks += 1
                continue
            data_bytes += len(data)
            chunk_id = key.id_hash(data)
            t2 = clock()
            seconds["chunk id"] += t2 - t1
            if chunk_id in seen:
                continue
            seen.add(chunk_id)
            stored += 1
            compressed = compressor.compress(data)
            t3 = clock()
            seconds["compression"] += t3 - t2
            if cipher is not None:
                cipher.encrypt(compressed, header=key.TYPE_STR, iv=iv)
                iv = cipher.next_iv()
            seconds["encryption and MAC"] += clock() - t3
    return {"blocks": blocks, "zero_blocks": zero_blocks, "data_bytes": data_bytes, "unique_chunks": stored,
            "key": type(key).__name__, "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "cpu_seconds": round(sum(seconds.values()), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.components", description=__doc__.split("\n\n")[0])
    parser.add_argument("--block-size", type=int, default=4 << 20)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("read")
    p.add_argument("--url", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", required=True)
    p.add_argument("--ca-file", required=True)
    p.add_argument("--vm", required=True)
    p = sub.add_parser("write")
    p.add_argument("--raw", required=True)
    p.add_argument("--repo", required=True)
    p.add_argument("--compression", default="lz4")
    p = sub.add_parser("read-archive")
    p.add_argument("--repo", required=True)
    p.add_argument("--archive", required=True)
    p.add_argument("--path", required=True, help="the image's path in the archive")
    p = sub.add_parser("floor")
    p.add_argument("--raw", required=True)
    p.add_argument("--repo", required=True, help="a repository whose key to use")
    p.add_argument("--compression", default="lz4")
    args = parser.parse_args(argv)
    from ovirt_borg import memory

    memory.tune_allocator()  # as ovirt-borg's command line does
    commands = {"read": cmd_read, "write": cmd_write, "read-archive": cmd_read_archive, "floor": cmd_floor}
    print(json.dumps(commands[args.command](args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
