"""The floor of Borg's crypto measured by the benchmark, on a real repository key (the rest of
the benchmark's arithmetic is in tests/unit/test_bench_arithmetic.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The benchmark is a package of the repository, not of the installed distribution.
sys.path.insert(0, os.fspath(Path(__file__).resolve().parents[1]))

from bench import components, image  # noqa: E402

KiB = 1 << 10


def test_floor_of_borg_crypto_on_a_real_key(tmp_path):
    """``bench.components floor`` with a repository's own key: zero blocks are only tested,
    a repeated block is hashed but stored once, every data byte is counted."""
    env = {**os.environ, "BORG_PASSPHRASE": "bench test", "BORG_BASE_DIR": os.fspath(tmp_path / "home")}
    repo = tmp_path / "repo"
    borg = Path(sys.executable).parent / "borg"
    subprocess.run([borg, "init", "--encryption=repokey-blake2", os.fspath(repo)], env=env, check=True,
                   capture_output=True)
    content = image.Content(3)
    block = 256 * KiB
    raw = tmp_path / "image.raw"
    a, b = content.piece(image.RANDOM, 0, block), content.piece(image.TEXT, block, block)
    raw.write_bytes(a + bytes(block) + b + a + bytes(block // 2))
    out = subprocess.run([sys.executable, "-m", "bench.components", "--block-size", str(block), "floor", "--raw",
                          os.fspath(raw), "--repo", os.fspath(repo)], env={**env, "PYTHONPATH": os.fspath(
                              Path(components.__file__).resolve().parents[1])},
                         check=True, capture_output=True, text=True).stdout
    floor = json.loads(out)
    assert (floor["blocks"], floor["zero_blocks"], floor["unique_chunks"]) == (5, 2, 2)
    assert floor["data_bytes"] == 3 * block
    assert floor["key"] == "Blake2RepoKey"
    assert set(floor["seconds"]) == {"zero test", "chunk id", "compression", "encryption and MAC"}
    assert floor["cpu_seconds"] == pytest.approx(sum(floor["seconds"].values()), abs=0.002)
