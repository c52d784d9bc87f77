"""The allocator tuning: block buffers are reused instead of mapped and faulted in each time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from ovirt_borg import memory

# Two threads allocate and free block-sized buffers of slightly varying sizes, as the archive
# writer's workers do (the block, then Borg's compressed and encrypted copies).
_WORKLOAD = textwrap.dedent("""
    import resource, sys
    from concurrent.futures import ThreadPoolExecutor
    if sys.argv[1] == "tuned":
        from ovirt_borg import memory
        assert memory.tune_allocator()
    def block(i):
        data = bytes(bytearray(4 << 20))
        return len(data + b"x" * (i % 7))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with ThreadPoolExecutor(2) as pool:
        assert sum(pool.map(block, range(200))) > 0
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _WORKLOAD, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_block_buffers():
    untuned = _page_faults("default")
    tuned = _page_faults("tuned")
    # 200 blocks of 4 MiB are 1024 pages each: untuned, most are faulted in afresh.
    assert untuned > 200 * 1024 / 2
    assert tuned < untuned / 10


def test_tune_allocator_is_idempotent():
    assert memory.tune_allocator() is True
    assert memory.tune_allocator() is True
