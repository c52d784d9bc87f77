"""Borg repositories of the benchmark: creation, size on disk, and per-archive metadata.

Every contender writes into a repository of its own, created with the same settings
(``--encryption``, the passphrase, and ``lz4`` compression given to each writer), so none
profits from chunks another already stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BORG = str(Path(sys.executable).parent / "borg")


@dataclass(frozen=True)
class RepoSettings:
    """What every contender's repository shares."""

    encryption: str = "repokey-blake2"
    compression: str = "lz4"
    chunker: str = "fixed,4194304"


def init(path: Path, settings: RepoSettings, env: dict[str, str]) -> None:
    """``borg init`` a new repository at ``path``; raises ``CalledProcessError`` with stderr."""
    subprocess.run([BORG, "init", f"--encryption={settings.encryption}", os.fspath(path)], env=env,
                   check=True, capture_output=True, text=True)


def create_command(path: Path, archive: str, source: Path, settings: RepoSettings) -> list[str]:
    """The ``borg create`` command storing the file ``source`` as ``archive``.

    By default the fixed 4 MiB chunker and no ``--sparse`` (which would
    cut chunks at the file system's hole boundaries). Run from ``source``'s directory, so the
    archive holds the bare file name.
    """
    return [BORG, "create", "--json", "--chunker-params", settings.chunker, "--compression",
            settings.compression, f"{os.fspath(path)}::{archive}", source.name]


def size_on_disk(path: Path) -> int:
    """Bytes allocated by every file under ``path`` (segments, index, hints, config)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def archive_metadata(path: Path, archive: str, env: dict[str, str]) -> dict[str, int]:
    """Return what the archive's metadata takes in the repository.

    ``item_chunks``/``item_bytes``: the chunks holding the archive's item list (for an image,
    its chunk list: one entry per block), as stored (compressed and encrypted);
    ``archive_bytes``: the archive object itself. Runs Borg's internals in a subprocess with
    ``env`` (read-only, no lock). Raises ``CalledProcessError``.
    """
    code = (
        "import json, sys\n"
        "from borg.logger import setup_logging\n"
        "setup_logging(level='warning')\n"
        "from borg.repository import Repository\n"
        "from borg.helpers import Manifest\n"
        "from borg.archive import Archive\n"
        "with Repository(sys.argv[1], exclusive=False, lock=False) as repository:\n"
        "    manifest, key = Manifest.load(repository, (Manifest.Operation.READ,))\n"
        "    archive = Archive(repository, key, manifest, sys.argv[2])\n"
        "    items = list(archive.metadata.items)\n"
        "    sizes = [len(repository.get(i)) for i in items]\n"
        "    print(json.dumps({'item_chunks': len(items), 'item_bytes': sum(sizes),\n"
        "                      'archive_bytes': len(repository.get(archive.id))}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, os.fspath(path), archive], env=env,
                            check=True, capture_output=True, text=True)
    return json.loads(result.stdout)
