"""A read-only FUSE file system showing volumes made of pieces of disk images as plain files.

An LVM logical volume made of several segments (or spread over several disks) is no
contiguous range of one disk image, so a loop device cannot show it alone; this file system
shows it as one file, which a read-only loop device then can. It needs no device-mapper.

``ovirt-borg mount`` runs it as ``python -m ovirt_borg.volumefs DIR LOG`` in a session of its
own and writes on its stdin a JSON document::

    {"volumes": [{"name": "v1", "size": N, "pieces": [["/path/of/disk.raw", offset, length], ...]}]}

It opens the images, mounts ``DIR`` (``ro,nosuid,nodev,noexec``, files mode 0400 of root) and
serves until ``DIR`` is unmounted; then it exits. Messages go to the file ``LOG``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys

FSNAME = "ovirt-borg-volumes"

log = logging.getLogger("ovirt_borg.volumefs")


def serve(mountpoint: str, volumes: list[dict]) -> None:
    """Mount the volumes at ``mountpoint`` and serve them until it is unmounted."""
    import pyfuse3
    import trio

    files = []  # (name, size, [(fd, offset, length)])
    opened: dict[str, int] = {}
    for volume in volumes:
        pieces = []
        for path, offset, length in volume["pieces"]:
            if path not in opened:
                opened[path] = os.open(path, os.O_RDONLY)
            pieces.append((opened[path], int(offset), int(length)))
        files.append((str(volume["name"]).encode(), int(volume["size"]), pieces))

    class Operations(pyfuse3.Operations):
        def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
            attributes = pyfuse3.EntryAttributes()
            attributes.st_ino = inode
            attributes.st_uid = attributes.st_gid = 0
            if inode == pyfuse3.ROOT_INODE:
                attributes.st_mode = stat.S_IFDIR | 0o500
                attributes.st_nlink = 2
            else:
                attributes.st_mode = stat.S_IFREG | 0o400
                attributes.st_nlink = 1
                attributes.st_size = files[inode - 2][1]
            attributes.st_blksize = 512
            attributes.entry_timeout = attributes.attr_timeout = 3600
            return attributes

        async def getattr(self, inode, ctx=None):
            if inode != pyfuse3.ROOT_INODE and not 0 <= inode - 2 < len(files):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attributes(inode)

        async def lookup(self, parent_inode, name, ctx=None):
            for index, (file_name, _, _) in enumerate(files):
                if parent_inode == pyfuse3.ROOT_INODE and name == file_name:
                    return self._attributes(index + 2)
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode, ctx):
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            for index in range(start_id, len(files)):
                if not pyfuse3.readdir_reply(token, files[index][0], self._attributes(index + 2), index + 1):
                    break

        async def open(self, inode, flags, ctx):
            if flags & (os.O_WRONLY | os.O_RDWR):
                raise pyfuse3.FUSEError(errno.EROFS)
            if not 0 <= inode - 2 < len(files):
                raise pyfuse3.FUSEError(errno.EISDIR)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)

        async def read(self, fh, off, size):
            try:
                return await trio.to_thread.run_sync(_read, files[fh - 2], off, size)
            except OSError as e:
                log.error("reading %s at %d: %s", files[fh - 2][0].decode(), off, e)
                raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", "ro", "nosuid", "nodev", "noexec"}
    pyfuse3.init(Operations(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


def _read(file: tuple[bytes, int, list[tuple[int, int, int]]], offset: int, size: int) -> bytes:
    """``size`` bytes of a volume from ``offset`` (fewer at its end)."""
    _, total, pieces = file
    size = max(0, min(size, total - offset))
    out, position = [], 0
    for fd, piece_offset, length in pieces:
        if size <= 0:
            break
        if offset < position + length:
            start = offset - position
            count = min(length - start, size)
            data = os.pread(fd, count, piece_offset + start)
            if len(data) < count:  # an image shorter than its volume map: zeros, as a loop device
                data += bytes(count - len(data))
            out.append(data)
            offset += count
            size -= count
        position += length
    return b"".join(out)


def main(argv: list[str]) -> int:
    mountpoint, log_file = argv
    logging.basicConfig(filename=log_file, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(mountpoint, json.loads(sys.stdin.read())["volumes"])
    except Exception as e:  # the parent reads the reason from the log
        log.exception("volume file system at %s failed: %s", mountpoint, e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
