"""Keep the C allocator from handing every block buffer back to the kernel.

The data path allocates and frees a few block-sized buffers per block: the bytes read from
imageio, Borg's compressed and encrypted copies, the chunks read back on restore. glibc serves
an allocation above its mmap threshold (128 KiB at start, raised on the fly only up to the
size of chunks already freed) with its own ``mmap`` and unmaps it on free, and it trims the heap
whenever more than the trim threshold is free at its top. Either way each 4 MiB buffer costs
about a thousand page faults and the kernel's zeroing of its pages, a large share of a full
backup's CPU time; the archive writer and the archive reader of a restore both run faster once
block buffers are reused from the heap (docs/BENCHMARKS.md has the figures).

``tune_allocator()`` raises both thresholds once per process, so freed block buffers are
reused. The heap then keeps at most ``TRIM_THRESHOLD`` of free memory per arena beyond what is
in use; peak memory stays bounded by the blocks in flight. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Above the largest block (16 MiB) plus Borg's headers, and at glibc's cap for 64-bit (32 MiB).
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20

_tuned = False


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; return True when set.

    Idempotent. Returns False (and changes nothing) when the C library is not glibc or refuses.
    """
    global _tuned
    if _tuned:
        return True
    try:
        # The symbols the process already has: its C library, found without the ldconfig run
        # of ctypes.util.find_library.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in the C library: allocator left as it is")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.debug("mallopt refused the thresholds: allocator left as it is")
        return False
    _tuned = True
    return True
