"""What a restore sends, without a lab: zero pieces of blocks sent as holes, data in requests of
up to the put size, and the progress line naming the bytes sent."""

from __future__ import annotations

import io
import logging
import os


def test_restore_progress_says_what_was_sent(caplog):
    from ovirt_borg.progress import Progress

    progress = Progress("restore disk1", 8 << 20, stream=io.StringIO(), interval=0, moved_as="sent")
    with caplog.at_level(logging.INFO, logger="ovirt_borg.progress"):
        progress.update(4 << 20, 1 << 20)
    [line] = [r.getMessage() for r in caplog.records if r.name == "ovirt_borg.progress"]
    assert line.startswith("restore disk1:  50.0% of 8.0 MiB, sent 1.0 MiB at ") and ", ETA " in line


def test_split_zeros_sends_zero_pieces_as_holes():
    from ovirt_borg.restore import _runs, split_zeros

    k = 64 * 1024
    block = bytearray(os.urandom(16 * k))
    block[2 * k:5 * k] = bytes(3 * k)   # aligned zero pieces
    block[15 * k:] = bytes(k)
    block[7 * k + 5:7 * k + 9] = bytes(4)  # a few zero bytes are data
    block[9 * k] = block[10 * k - 1] = 0  # so is a piece that only starts and ends with zero
    random_block = os.urandom(16 * k)
    blocks = [(0, 16 * k, bytes(block)), (16 * k, 16 * k, None), (32 * k, 16 * k, random_block),
              (48 * k, 1000, bytes(1000))]
    pieces = list(_runs(split_zeros(blocks)))
    assert [(offset // k, length, data is None) for offset, length, data in pieces] == [
        (0, 2 * k, False), (2, 3 * k, True), (5, 10 * k, False), (15, 17 * k, True), (32, 16 * k, False),
        (48, 1000, True)]
    image = bytearray(48 * k + 1000)
    for offset, length, data in pieces:
        if data is not None:
            data = b"".join(data) if isinstance(data, tuple) else data
            assert len(data) == length
            image[offset:offset + length] = data
    assert image == bytes(block) + bytes(16 * k) + random_block + bytes(1000)
    # Consecutive data goes in requests of up to put_size bytes, as the pieces themselves.
    a, b, c = os.urandom(k), os.urandom(k), os.urandom(k)
    runs = list(_runs([(0, k, a), (k, k, memoryview(b)), (2 * k, k, c), (3 * k, k, None)], put_size=2 * k))
    assert runs == [(0, 2 * k, (a, b)), (2 * k, k, c), (3 * k, k, None)]
    assert runs[0][2][0] is a
